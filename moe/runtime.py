"""Hybrid runtime: per MoE layer, place each active expert on the device cache, on the
device after a copy, or on the CPU, run both sides concurrently and combine.

Shape key: T tokens, D model dim, E experts, K top-k, N cache slots.

    ids_TK -> counting sort by expert -> placement (scheduler rule)
           -> CPU pool: gather rows -> expert_ffn -> * weight      (threads, GIL released)
           -> copy stream: store -> cache slots                    (pinned, async)
           -> device: fused MoE over slots (expert_map: id -> slot | -1)
           -> y_TD = y_device + y_cpu
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from moe.config import RuntimeConfig
from moe.cpu_kernels.routing import group_by_expert
from moe.expert_cache.device_cache import DeviceExpertCache
from moe.expert_cache.store import HostExpertStore
from moe.kernels import cpu_expert_ffn, device_fused_moe

__all__ = ["HybridRuntime", "RoutedExperts", "RoutingObserver"]

RoutingObserver = Callable[[int, torch.Tensor, torch.Tensor], None]

_STAT_KEYS = ("cache_hits", "cache_misses", "h2d_bytes", "cpu_expert_calls", "gpu_expert_calls",
              "prefetch_hits", "copies", "evictions", "layer_calls", "tokens")


@dataclass
class _Counters:
    values: dict = field(default_factory=lambda: dict.fromkeys(_STAT_KEYS, 0))

    def add(self, key: str, n: int = 1) -> None:
        self.values[key] += n


class HybridRuntime:
    """State shared by the MoE layers of one model: store, device cache, CPU pool, stats."""

    def __init__(self, *, store: HostExpertStore, cache: DeviceExpertCache,
                 config: RuntimeConfig, device: torch.device) -> None:
        self.store, self.cache, self.config, self.device = store, cache, config, torch.device(device)
        self.counters = _Counters()
        self.observers: list[RoutingObserver] = []
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        if config.scheduler == "static":
            self.cache.pin(self._static_hot_keys())

    # -- plumbing ----------------------------------------------------------------------
    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.config.threads,
                                            thread_name_prefix="moe-cpu")
        return self._pool

    def routed(self, layer: int) -> "RoutedExperts":
        return RoutedExperts(self, layer)

    def stats(self) -> dict:
        out = dict(self.counters.values)
        out["h2d_bytes"] = self.cache.h2d_bytes
        out["copies"] = self.cache.loads
        out["evictions"] = self.cache.evictions
        looked = out["cache_hits"] + out["cache_misses"]
        out["hit_rate"] = out["cache_hits"] / looked if looked else 0.0
        out["cache_slots"] = self.cache.num_slots
        out["expert_bytes"] = self.store.expert_bytes
        out["scheduler"] = self.config.scheduler
        out["cache_policy"] = self.config.cache_policy
        out["device"] = str(self.device)
        return out

    def reset_stats(self) -> None:
        self.counters = _Counters()
        self.cache.h2d_bytes = self.cache.loads = self.cache.evictions = 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _static_hot_keys(self) -> list[tuple[int, int]]:
        """Experts pinned by scheduler="static": the configured set, else as many experts
        per layer as fit, spread evenly over layers."""
        hot = self.config.static_hot
        if hot is not None:
            keys = [(int(l), int(e)) for l, es in hot.items() for e in es]
        else:
            L, E = self.store.num_layers, self.store.num_experts
            per_layer = self.cache.num_slots // L
            keys = [(l, e) for l in range(L) for e in range(min(per_layer, E))]
        if len(keys) > self.cache.num_slots:
            raise ValueError(f"static hot set has {len(keys)} experts but the device budget "
                             f"holds only {self.cache.num_slots} expert slots")
        return keys

    # -- placement ---------------------------------------------------------------------
    def place(self, layer: int, experts: list[int], counts: list[int]) -> dict[int, str]:
        """"device" (resident), "copy" (load then device) or "cpu" for each active expert."""
        rule, cache = self.config.scheduler, self.cache
        out = {}
        for e, n in zip(experts, counts):
            resident = cache.resident(layer, e)
            if rule == "cpu-only":
                out[e] = "cpu"
            elif resident:
                out[e] = "device"
            elif rule == "static" or cache.num_slots == 0:
                out[e] = "cpu"
            elif rule == "gpu-only":
                out[e] = "copy"
            else:  # simple / fiddler / dynamic until a cost model is present
                out[e] = "copy" if (n >= self.config.copy_threshold_tokens or cache.free_slots) else "cpu"
        return out


class RoutedExperts:
    """`block.routed` for one MoE layer: (x_TD, ids_TK, weights_TK) -> y_TD."""

    def __init__(self, runtime: HybridRuntime, layer: int) -> None:
        self.rt, self.layer = runtime, layer

    def __call__(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        rt, layer, cache = self.rt, self.layer, self.rt.cache
        T, K = ids_TK.shape
        E = rt.store.num_experts
        if T == 0:
            return torch.zeros_like(x_TD)
        ids_cpu_TK = ids_TK.to("cpu")
        w_cpu_TK = weights_TK.detach().to("cpu")
        for fn in rt.observers:
            fn(layer, ids_cpu_TK, w_cpu_TK)

        order_N, offsets_E1 = group_by_expert(ids_cpu_TK, E)
        counts_E = (offsets_E1[1:] - offsets_E1[:-1])
        active = counts_E.nonzero().flatten().tolist()
        counts = [int(counts_E[e]) for e in active]
        scores_E = torch.zeros(E, dtype=torch.float32).index_add_(
            0, ids_cpu_TK.reshape(-1), w_cpu_TK.reshape(-1).float()) / T
        cache.policy.observe_routing(layer, scores_E.numpy(), active)

        placement = rt.place(layer, active, counts)
        device_experts, cpu_experts = [], []
        protect = [(layer, e) for e, p in placement.items() if p != "cpu"]
        for e in active:
            p, key = placement[e], (layer, e)
            if p == "device":
                rt.counters.add("cache_hits")
                cache.policy.on_hit(key)
                device_experts.append(e)
                continue
            rt.counters.add("cache_misses")
            if p == "copy" and cache.load(layer, e, protect=protect) >= 0:
                device_experts.append(e)
            else:
                cpu_experts.append(e)
        rt.counters.add("gpu_expert_calls", len(device_experts))
        rt.counters.add("cpu_expert_calls", len(cpu_experts))
        rt.counters.add("layer_calls")
        rt.counters.add("tokens", T)

        # CPU experts start first so they overlap the device work below.
        futures = []
        if cpu_experts:
            x_host_TD = x_TD.detach().to("cpu")
            flat_w_N = w_cpu_TK.reshape(-1)
            for e in cpu_experts:
                pairs = order_N[offsets_E1[e]:offsets_E1[e + 1]]
                futures.append(rt.pool.submit(_cpu_expert, rt.store, layer, e, x_host_TD,
                                              pairs // K, flat_w_N[pairs]))
        if device_experts:
            cache.wait()
            emap_E = cache.expert_map(layer, device_experts)
            y_TD = device_fused_moe(x_TD, cache.w13_N2FD, cache.w2_NDF, ids_TK, weights_TK, emap_E)
        else:
            y_TD = torch.zeros_like(x_TD)
        if futures:
            y_cpu_TD = torch.zeros(x_TD.shape, dtype=x_TD.dtype)
            for f in futures:  # fixed order: results do not depend on thread timing
                tok_M, y_MD = f.result()
                y_cpu_TD.index_add_(0, tok_M, y_MD)
            y_TD = y_TD + y_cpu_TD.to(y_TD.device, non_blocking=True)
        return y_TD


def _cpu_expert(store: HostExpertStore, layer: int, e: int, x_TD: torch.Tensor,
                tok_M: torch.Tensor, w_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert on the CPU for its M routed rows; returns (rows, weighted output)."""
    w13_2FD, w2_DF = store.expert(layer, e)
    y_MD = cpu_expert_ffn(x_TD.index_select(0, tok_M), w13_2FD, w2_DF)
    return tok_M, (y_MD * w_M[:, None]).to(x_TD.dtype)
