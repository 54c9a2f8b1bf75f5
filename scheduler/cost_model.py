"""Cost model: predicted seconds for one work item on the CPU, on the device, and for a copy.

Every time is a roofline with a fixed per-call latency:

    cpu_time(item)    = cpu_call_s    + max(cpu_bytes_read / cpu_read_bw,    tokens * flops_per_token / cpu_flops)
    device_time(item) = device_call_s + max(bytes_read / device_read_bw, tokens * flops_per_token / device_flops)
    copy_time(nbytes) = copy_call_s   + nbytes / h2d_bw

An item with no tokens costs nothing to run (the runtime skips it). Rates are given per
cost-model family (`WorkItem.kind`): `per_kind` overrides any rate field for one kind, so
a calibrated profile can carry the measured expert-FFN rates next to the raw memory
bandwidth. Rates depend on the weight dtype; a profile records the dtype it measured.

`AnalyticCostModel.defaults(device)` gives bandwidth-based defaults; `moe calibrate`
measures this machine and writes a JSON profile that `load_profile()` reads
(see scheduler/profile.py).
"""
from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass, field

from moe.scheduler.work import KINDS, WorkItem

__all__ = ["CostModel", "AnalyticCostModel", "RATE_FIELDS"]

# Fields a per-kind override may set.
RATE_FIELDS = (
    "cpu_read_gbps", "cpu_gflops", "cpu_call_s",
    "device_read_gbps", "device_gflops", "device_call_s",
)


class CostModel(abc.ABC):
    """Predicts seconds for running an item on either side and for host->device copies.

    shared_cores: true when the "device" is the CPU itself, so nothing overlaps.
    """

    shared_cores: bool = False

    @abc.abstractmethod
    def cpu_time(self, item: WorkItem) -> float:
        """Seconds to run `item` on the CPU from host memory (all CPU workers on this item)."""

    @abc.abstractmethod
    def device_time(self, item: WorkItem) -> float:
        """Seconds to run `item` on the device once its weights are there."""

    @abc.abstractmethod
    def copy_time(self, nbytes: int) -> float:
        """Seconds to copy `nbytes` host->device on the copy stream."""


def _check_rate(owner: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
    if name.endswith("_s"):
        if value < 0:
            raise ValueError(f"{owner}: {name} must be >= 0 seconds, got {value!r}")
    elif value <= 0:
        raise ValueError(f"{owner}: {name} must be > 0, got {value!r}")


@dataclass(kw_only=True)
class AnalyticCostModel(CostModel):
    """Roofline cost model from bandwidths (GB/s, 1e9 bytes), FLOP rates (GFLOP/s) and latencies.

    The defaults describe a PCIe-4 server with an H100-class device: they are what a run
    uses before `moe calibrate` has measured the machine.
    per_kind: {kind: {rate field: value}} overrides for one cost-model family.
    shared_cores: the "device" runs on the same cores as the CPU side (CPU-only runs),
        so CPU, copy and device work cannot overlap (see scheduler/makespan.py).
    dtype: weight dtype the rates describe (informative; profiles are measured per dtype).
    source: "analytic" or where the numbers came from (e.g. "calibrated:<host>").
    """

    cpu_read_gbps: float = 40.0
    cpu_gflops: float = 400.0
    cpu_call_s: float = 30e-6
    device_read_gbps: float = 2000.0
    device_gflops: float = 300_000.0
    device_call_s: float = 10e-6
    h2d_gbps: float = 22.0
    copy_call_s: float = 10e-6
    per_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    shared_cores: bool = False
    dtype: str = "bfloat16"
    source: str = "analytic"

    def __post_init__(self) -> None:
        if not isinstance(self.shared_cores, bool):
            raise ValueError(f"AnalyticCostModel: shared_cores must be true or false, got {self.shared_cores!r}")
        for name in RATE_FIELDS + ("h2d_gbps", "copy_call_s"):
            _check_rate("AnalyticCostModel", name, getattr(self, name))
        for kind, overrides in self.per_kind.items():
            if kind not in KINDS:
                raise ValueError(f"AnalyticCostModel: per_kind has unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
            if not isinstance(overrides, dict):
                raise ValueError(f"AnalyticCostModel: per_kind[{kind!r}] must be a dict of rate fields")
            for name, value in overrides.items():
                if name not in RATE_FIELDS:
                    raise ValueError(
                        f"AnalyticCostModel: per_kind[{kind!r}] sets {name!r}; settable fields are {', '.join(RATE_FIELDS)}"
                    )
                _check_rate(f"AnalyticCostModel per_kind[{kind!r}]", name, value)
        # Resolved (bytes/s, FLOP/s, call s) per (kind, side), so a time costs one lookup.
        self._rates = {}
        for kind in KINDS:
            over = self.per_kind.get(kind, {})
            for side in ("cpu", "device"):
                get = lambda name: float(over.get(f"{side}_{name}", getattr(self, f"{side}_{name}")))  # noqa: E731
                self._rates[kind, side] = (get("read_gbps") * 1e9, get("gflops") * 1e9, get("call_s"))

    @classmethod
    def defaults(cls, device: str = "cuda") -> AnalyticCostModel:
        """Bandwidth-based defaults for `device` ("cuda", or "cpu" when the fast tier is the CPU itself).

        With device="cpu" the "device" runs on the same cores and memory (shared_cores) and
        a "copy" is a host memcpy: the model then only keeps the bookkeeping path honest,
        it does not promise a speed-up.
        """
        if device == "cuda":
            return cls()
        if device == "cpu":
            return cls(device_read_gbps=40.0, device_gflops=400.0, device_call_s=30e-6, h2d_gbps=10.0,
                       copy_call_s=5e-6, shared_cores=True)
        raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda'")

    def _time(self, item: WorkItem, side: str) -> float:
        if item.tokens == 0:
            return 0.0
        read_bps, flops, call_s = self._rates[item.kind, side]
        nbytes = item.cpu_bytes_read if side == "cpu" else item.bytes_read
        return call_s + max(nbytes / read_bps, item.tokens * item.flops_per_token / flops)

    def cpu_time(self, item: WorkItem) -> float:
        return self._time(item, "cpu")

    def device_time(self, item: WorkItem) -> float:
        return self._time(item, "device")

    def copy_time(self, nbytes: int) -> float:
        if nbytes < 0:
            raise ValueError(f"copy_time: nbytes must be >= 0, got {nbytes}")
        if nbytes == 0:
            return 0.0
        return self.copy_call_s + nbytes / (self.h2d_gbps * 1e9)

    def to_dict(self) -> dict:
        """JSON-ready fields (the inverse of `from_dict`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> AnalyticCostModel:
        """Build from `to_dict()` output; unknown fields are an error naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"cost model must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"cost model has unknown fields {unknown}; known fields are {sorted(known)}")
        data = dict(data)
        if "per_kind" in data:
            data["per_kind"] = {k: dict(v) for k, v in data["per_kind"].items()}
        return cls(**data)
