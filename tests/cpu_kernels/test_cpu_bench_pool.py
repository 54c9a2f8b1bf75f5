"""bench/cpu_expert.py: its weight pools sit in huge-page arenas as the store keeps them, values unchanged."""
import pytest
import torch
from bench_script import load_bench

from moe.cpu_kernels import expert_ffn


@pytest.fixture(scope="module")
def bench():
    return load_bench("cpu_expert")


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
def test_arena_pool_equals_the_plain_pool(bench, dtype, monkeypatch):
    """Copies into arenas keep every expert's values and kernel output; the huge-page share is a fraction."""
    monkeypatch.setattr(bench, "ARENA_EXPERTS", 2)
    torch.manual_seed(0)
    plain = bench._pool(256, 512, dtype, max_experts=3, huge_pages=False)
    packed = bench._arenas(list(plain))
    x = torch.randn(1, 256).bfloat16()
    assert len(packed) == 3
    for a, b in zip(plain, packed):
        assert torch.equal(expert_ffn(x, *a), expert_ffn(x, *b))
    frac = bench._huge_fraction(packed)
    assert frac is None or 0.0 <= frac <= 1.0


def test_int4_over_bf16_interleaved_is_a_ratio_the_goals_use(bench, monkeypatch):
    """The alternating-block int4/bf16 ratio is a positive number and, where given, is what
    the same-window goal judges (the cross-run ratio stays in `goals`)."""
    monkeypatch.setattr(bench, "POOL_BYTES", 1 << 20)
    ratio = bench.int4_over_bf16_interleaved(256, 512, repeats=3, threads=1, huge_pages=False)
    assert ratio > 0
    rows = [dict(shape="s", dtype=d, T=1, tokens_per_s=tps, gbps=1.0, frac_of_probe=0.9)
            for d, tps in (("bf16", 100.0), ("int4", 200.0))]
    assert bench._goals(rows, 10.0)["s/int4_over_bf16_T1_tokens_per_s"]["value"] == 2.0
    assert bench._goals(rows, None, {"s": 3.0})["s/int4_over_bf16_T1_tokens_per_s"]["value"] == 3.0
