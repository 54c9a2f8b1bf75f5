"""Analytic cost model: roofline formulas, per-kind overrides, validation, JSON round trip."""
import math

import pytest

from moe.scheduler.cost_model import AnalyticCostModel
from moe.scheduler.work import WorkItem

# (tokens, weight_bytes, flops_per_token): memory-bound, compute-bound, empty, odd sizes.
SHAPES = [(1, 3 * 4096 * 14336 * 2, 6 * 4096 * 14336), (512, 3 * 2048 * 1408 * 2, 6 * 2048 * 1408), (0, 1000, 10), (33, 511, 7)]


@pytest.mark.parametrize("tokens,nbytes,fpt", SHAPES)
def test_times_follow_the_roofline(tokens, nbytes, fpt):
    """cpu/device times are call latency + max(read, compute); zero tokens cost nothing."""
    m = AnalyticCostModel(cpu_read_gbps=50, cpu_gflops=1000, cpu_call_s=1e-5,
                          device_read_gbps=2000, device_gflops=2e5, device_call_s=2e-6)
    it = WorkItem(key=0, tokens=tokens, weight_bytes=nbytes, flops_per_token=fpt)
    if tokens == 0:
        assert m.cpu_time(it) == 0.0 and m.device_time(it) == 0.0
        return
    want_cpu = 1e-5 + max(nbytes / 50e9, tokens * fpt / 1000e9)
    want_dev = 2e-6 + max(nbytes / 2000e9, tokens * fpt / 2e14)
    assert math.isclose(m.cpu_time(it), want_cpu, rel_tol=1e-12)
    assert math.isclose(m.device_time(it), want_dev, rel_tol=1e-12)


def test_copy_time():
    """A copy costs its latency plus bytes over the H2D bandwidth; nothing for zero bytes."""
    m = AnalyticCostModel(h2d_gbps=25, copy_call_s=1e-5)
    assert m.copy_time(0) == 0.0
    assert math.isclose(m.copy_time(25 * 10**9), 1.0 + 1e-5)
    with pytest.raises(ValueError, match="nbytes"):
        m.copy_time(-1)


def test_per_kind_override_and_read_bytes():
    """A per-kind rate replaces the global one for that kind only; read_bytes limits bytes read."""
    m = AnalyticCostModel(cpu_read_gbps=10, cpu_call_s=0, per_kind={"embedding": {"cpu_read_gbps": 1.0}})
    expert = WorkItem(key=0, tokens=1, weight_bytes=10**9, flops_per_token=1)
    emb = WorkItem(key=1, tokens=1, weight_bytes=10**9, flops_per_token=1, kind="embedding", read_bytes=10**6)
    assert math.isclose(m.cpu_time(expert), 0.1)
    assert math.isclose(m.cpu_time(emb), 1e-3)


def test_cpu_copy_of_other_size_changes_only_cpu_time():
    """cpu_read_bytes (a packed CPU copy) shortens the CPU run and leaves the device run alone."""
    m = AnalyticCostModel(cpu_read_gbps=10, cpu_call_s=0, device_read_gbps=100, device_call_s=0)
    dense = WorkItem(key=0, tokens=1, weight_bytes=10**9, flops_per_token=1)
    packed = WorkItem(key=0, tokens=1, weight_bytes=10**9, flops_per_token=1, cpu_read_bytes=10**9 // 4)
    assert math.isclose(m.cpu_time(packed), m.cpu_time(dense) / 4)
    assert m.device_time(packed) == m.device_time(dense)
    with pytest.raises(ValueError, match="cpu_read_bytes"):
        WorkItem(key=0, tokens=1, weight_bytes=1, flops_per_token=1, cpu_read_bytes=-1)


@pytest.mark.parametrize(
    "kw,word",
    [({"cpu_read_gbps": 0}, "cpu_read_gbps"), ({"h2d_gbps": float("inf")}, "h2d_gbps"),
     ({"copy_call_s": -1e-6}, "copy_call_s"), ({"per_kind": {"conv": {}}}, "conv"),
     ({"per_kind": {"expert": {"h2d_gbps": 3.0}}}, "h2d_gbps")],
)
def test_bad_rates_are_rejected(kw, word):
    """Non-positive, non-finite or unknown rates raise an error naming them."""
    with pytest.raises(ValueError, match=word):
        AnalyticCostModel(**kw)


def test_dict_round_trip_and_unknown_field():
    """to_dict/from_dict round-trips; an unknown field is named in the error."""
    m = AnalyticCostModel(cpu_gflops=123.0, per_kind={"expert": {"cpu_gflops": 77.0}}, source="calibrated:x")
    assert AnalyticCostModel.from_dict(m.to_dict()) == m
    with pytest.raises(ValueError, match="bogus"):
        AnalyticCostModel.from_dict({**m.to_dict(), "bogus": 1})


def test_defaults_per_device():
    """Defaults exist for cuda and cpu; other devices are rejected."""
    assert AnalyticCostModel.defaults("cuda").h2d_gbps > 0
    assert AnalyticCostModel.defaults("cpu").device_read_gbps == AnalyticCostModel.defaults("cpu").cpu_read_gbps
    with pytest.raises(ValueError, match="device"):
        AnalyticCostModel.defaults("tpu")
