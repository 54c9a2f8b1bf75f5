"""Runtime configuration: one keyword-only dataclass, validated on construction."""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["RuntimeConfig", "EPShard", "parse_size", "SCHEDULERS", "CACHE_POLICIES", "PREDICTORS"]

# Placement rules (moe.scheduler.planner): "dynamic" minimises each layer's makespan on
# the cost model; the others are the single rules offload systems use.
SCHEDULERS = ("dynamic", "simple", "gpu-only", "cpu-only", "static", "fiddler")
CACHE_POLICIES = ("lru", "lfu", "score", "predictive", "static-hot")
PREDICTORS = (None, "gate-lookahead", "transition", "learned", "frequency")

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "8GiB", "500MB", "1.5g" (binary for bare k/m/g)."""
    if isinstance(size, bool):
        raise TypeError(f"memory size must be an int or a string like '8GiB', got {size!r}")
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"memory size must be >= 0 bytes, got {size}")
        return size
    if isinstance(size, float) and size.is_integer() and size >= 0:
        return int(size)
    if not isinstance(size, str):
        raise TypeError(f"memory size must be an int or a string like '8GiB', got {size!r}")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", size)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(
            f"cannot read memory size {size!r}: expected a number with an optional unit "
            "(B, KB, MB, GB, KiB, MiB, GiB), e.g. '8GiB' or '500MB'"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(kw_only=True, frozen=True)
class EPShard:
    """This process is rank `rank` of `world_size` expert-parallel ranks.

    placement: a placement JSON file (`moe bench a2a --save-placement`), None for the
    contiguous layout. The rank keeps only the routed experts the placement gives it.
    """

    rank: int
    world_size: int
    placement: str | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"ep_shard rank {self.rank} of world_size {self.world_size}: need "
                             "world_size >= 1 and 0 <= rank < world_size")


@dataclass(kw_only=True)
class RuntimeConfig:
    """How the hybrid runtime places and caches experts.

    cache_policy: eviction policy of the device expert cache. The default, "predictive"
        (router-score average plus the predictor's forecasts, which it protects and
        prefetches), measured closest to the offline optimum on real Mixtral routing
        (`moe bench cache`); "lru" is the classic baseline.
    predictor: routing-path predictor used for prefetch (None: no prefetch).
        "gate-lookahead" needs nothing; "transition" and "frequency" are fitted on the
        routing trace at `predictor_file`; "learned" loads the predictor saved there by
        `moe trace train-predictor`.
    scheduler: per-layer placement rule (see SCHEDULERS).
    cpu_threads: threads for CPU experts (None: all cores).
    copy_threshold_tokens: for the "simple"/"fiddler" rules, an uncached expert with at
        least this many tokens is copied to the device instead of running on the CPU.
    prefetch_depth: how many layers ahead the predictor's forecast is prefetched.
    prefetch_threshold: smallest forecast probability worth a copy (policies with their
        own prefetch rule, e.g. "predictive", decide themselves).
    static_hot: for scheduler="static" / cache_policy="static-hot": experts pinned on the
        device, as {moe_layer_index: [expert ids]}; None picks by slot order.
    pin_memory: pin the host expert store (None: when CUDA is the device).
    quantization: None, "int8" or "int4": CPU experts run on quantized copies of the
        expert weights (int8 per-row scales; int4 with `quant_group_size` in 32/64/128
        columns per scale), which they read 2x / ~3.5x faster than bf16. Lossy: outputs
        then only approximate the model's. Device copies keep the original weights, so
        the host holds both formats.
    cost_profile: cost-model profile JSON (`moe calibrate` writes one); None loads
        $MOE_PROFILE or this host's calibrated profile, else bandwidth-based defaults.
    ep_shard: an EPShard when this process is one rank of expert parallelism: only that
        rank's routed experts are loaded (the others are never read from the checkpoint)
        and no device expert cache is built; `moe.ep.enable_expert_parallel` with the same
        placement must then run the model (`moe launch` does both).
    """

    cache_policy: str = "predictive"
    predictor: str | None = "gate-lookahead"
    scheduler: str = "dynamic"
    cpu_threads: int | None = None
    copy_threshold_tokens: int = 8
    prefetch_depth: int = 1
    prefetch_threshold: float = 0.5
    predictor_file: str | None = None
    cost_profile: str | None = None
    quantization: str | None = None
    quant_group_size: int = 128
    static_hot: dict[int, list[int]] | None = None
    pin_memory: bool | None = None
    ep_shard: EPShard | None = None

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.cache_policy not in CACHE_POLICIES:
            raise ValueError(
                f"unknown cache_policy {self.cache_policy!r}; choose one of {', '.join(CACHE_POLICIES)}"
            )
        if self.predictor not in PREDICTORS:
            names = ", ".join(str(p) for p in PREDICTORS)
            raise ValueError(f"unknown predictor {self.predictor!r}; choose one of {names}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1, got {self.cpu_threads}")
        if self.copy_threshold_tokens < 1:
            raise ValueError(f"copy_threshold_tokens must be >= 1, got {self.copy_threshold_tokens}")
        if self.prefetch_depth < 1:
            raise ValueError(f"prefetch_depth must be >= 1, got {self.prefetch_depth}")
        if not 0.0 <= self.prefetch_threshold <= 1.0:
            raise ValueError(f"prefetch_threshold must be in [0, 1], got {self.prefetch_threshold}")
        if self.quantization not in (None, "int8", "int4"):
            raise ValueError(f"quantization must be None, 'int8' or 'int4', got {self.quantization!r}")
        if self.quant_group_size not in (32, 64, 128):
            raise ValueError(f"quant_group_size must be 32, 64 or 128, got {self.quant_group_size}")
        if self.ep_shard is not None and not isinstance(self.ep_shard, EPShard):
            raise TypeError(f"ep_shard must be a moe.config.EPShard or None, got {type(self.ep_shard).__name__}")
        if self.predictor in ("transition", "frequency", "learned") and not self.predictor_file:
            raise ValueError(f"predictor {self.predictor!r} needs predictor_file: a routing trace "
                             "(transition, frequency) or a trained predictor (learned)")
