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

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from moe.config import RuntimeConfig
from moe.cpu_kernels.combine import combine_rows
from moe.cpu_kernels.routing import group_by_expert
from moe.expert_cache.device_cache import DeviceExpertCache
from moe.expert_cache.store import HostExpertStore
from moe.kernels import cpu_expert_ffn, device_fused_moe
from moe.scheduler import CostModel, LayerExecutor, LayerPlanner, WorkItem, load_profile

__all__ = ["HybridRuntime", "RoutedExperts", "RoutingObserver"]

RoutingObserver = Callable[[int, torch.Tensor, torch.Tensor], None]

# Counted here; copies, evictions and h2d_bytes are the cache's own counters (stats()).
_STAT_KEYS = ("cache_hits", "cache_misses", "cpu_expert_calls", "gpu_expert_calls",
              "prefetch_hits", "prefetches", "layer_calls", "tokens")


@dataclass
class _Counters:
    values: dict = field(default_factory=lambda: dict.fromkeys(_STAT_KEYS, 0))

    def add(self, key: str, n: int = 1) -> None:
        self.values[key] += n


class HybridRuntime:
    """State shared by the MoE layers of one model: store, device cache, CPU pool, stats."""

    def __init__(self, *, store: HostExpertStore, cache: DeviceExpertCache,
                 config: RuntimeConfig, device: torch.device, cost_model: CostModel | None = None) -> None:
        self.store, self.cache, self.config, self.device = store, cache, config, torch.device(device)
        self.counters = _Counters()
        self.observers: list[RoutingObserver] = []
        self.flops_per_token = 6 * store.hidden * store.inter  # three D x F matmuls, 2 flops each
        # Quantized CPU experts read their packed copy: the planner must see the smaller bytes.
        self.cpu_expert_bytes = store.cpu_expert_bytes
        self.planner = LayerPlanner(cost_model or load_profile(self.device.type, path=config.cost_profile),
                                    rule=config.scheduler,
                                    copy_threshold_tokens=config.copy_threshold_tokens)
        # One pool thread: CPU experts run one after another, each on all cores (the
        # parallel Numba kernel), which is the CPU model the planner optimises for.
        # With a CPU "device", CPU experts run on the calling thread. Overlap would gain
        # nothing (same cores), and both libraries use OpenMP: once torch has run parallel
        # regions from this thread, numba regions started from another thread cost far
        # more (DeepSeek-V2-Lite int8 expert ~530 vs ~380 us on the 2-core test VM), from
        # this thread they do not, and with torch held to one thread the gap disappears.
        self.executor = LayerExecutor(cpu_threads=1, inline=device.type == "cpu")
        self._hot: dict[int, frozenset[int]] = {}
        self.prefetcher = None  # set by install_runtime when a predictor is configured
        if config.scheduler == "static" and config.ep_shard is None:
            keys = self._static_hot_keys()
            self.cache.pin(keys)
            for l, e in keys:
                self._hot[l] = self._hot.get(l, frozenset()) | {e}

    # -- plumbing ----------------------------------------------------------------------
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
        out["plan_cache_hits"] = self.planner.hits
        out["cache_policy"] = self.config.cache_policy
        out["device"] = str(self.device)
        return out

    def reset_stats(self) -> None:
        self.counters = _Counters()
        self.cache.h2d_bytes = self.cache.loads = self.cache.evictions = 0

    def close(self) -> None:
        self.executor.close()

    def release_device_experts(self) -> None:
        """Stop caching and prefetching experts on the device and free the cache's memory:
        the model now runs its routed experts elsewhere (expert parallelism)."""
        self.prefetcher = None
        self.cache.release()

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
    def hot_experts(self, layer: int) -> frozenset[int]:
        """Experts of `layer` pinned on the device (scheduler="static")."""
        return self._hot.get(layer, frozenset())


class RoutedExperts:
    """`block.routed` for one MoE layer: (x_TD, ids_TK, weights_TK) -> y_TD."""

    def __init__(self, runtime: HybridRuntime, layer: int) -> None:
        self.rt, self.layer = runtime, layer

    def __call__(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        rt, layer, cache, store = self.rt, self.layer, self.rt.cache, self.rt.store
        T, K = ids_TK.shape
        E = store.num_experts
        if T == 0:
            return torch.zeros_like(x_TD)
        ids_cpu_TK = ids_TK.to("cpu")
        w_cpu_TK = weights_TK.detach().to("cpu")
        for fn in rt.observers:
            fn(layer, ids_cpu_TK, w_cpu_TK)
        prefetcher = rt.prefetcher

        # Routing bookkeeping in Python lists and numpy rather than one small torch op per
        # value: at decode these run from cold caches between expert kernels, where each
        # torch call costs several microseconds (see _OneTokenCPU).
        ids_N = ids_cpu_TK.numpy().reshape(-1)
        w_N = w_cpu_TK.float().numpy().reshape(-1)
        scores_E = np.zeros(E, np.float32)
        ids = ids_N.tolist() if T == 1 else None
        if ids is not None and len(set(ids)) == K:  # one token, distinct ids: one row each
            counts = dict.fromkeys(ids, 1)
            active = sorted(counts)
            scores_E[ids_N] = w_N
            order_N = offsets = None  # the general CPU path is not taken (_OneTokenCPU)
        else:
            order_N, offsets_E1 = group_by_expert(ids_cpu_TK, E)
            offsets = offsets_E1.tolist()
            counts = {e: offsets[e + 1] - offsets[e] for e in range(E)}
            active = [e for e in range(E) if counts[e]]
            np.add.at(scores_E, ids_N, w_N)
            scores_E /= np.float32(T)
        cache.policy.observe_routing(layer, scores_E, active)
        if prefetcher is not None:
            prefetcher.observe(layer, ids_cpu_TK, active)

        items = [WorkItem(key=e, tokens=counts[e], weight_bytes=store.expert_bytes,
                          flops_per_token=rt.flops_per_token, cached=bool(cache.resident(layer, e)),
                          cpu_read_bytes=rt.cpu_expert_bytes)
                 for e in active]
        resident_active = [(layer, it.key) for it in items if it.cached]
        plan = rt.planner.plan(items, max_copies=cache.evictable(protect=resident_active),
                               hot=rt.hot_experts(layer))
        for it in items:
            rt.counters.add("cache_hits" if it.cached else "cache_misses")
            if it.cached:
                cache.policy.on_hit((layer, it.key))
        device_keys = plan.device_keys()
        protect = resident_active + [(layer, e) for e in plan.copy_order]
        rt.counters.add("gpu_expert_calls", len(device_keys))
        rt.counters.add("cpu_expert_calls", len(items) - len(device_keys))
        rt.counters.add("layer_calls")
        rt.counters.add("tokens", T)

        x_host_TD = x_TD.detach().to("cpu") if len(device_keys) < len(items) else None
        cpu_out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        result: list[torch.Tensor] = []
        one = _OneTokenCPU(x_host_TD, ids, w_N) if order_N is None and x_host_TD is not None else None
        flat_w_N = w_cpu_TK.reshape(-1) if one is None else None  # the general path's routing weights

        def run_cpu(e: int) -> None:
            if one is not None:
                one.run(store, layer, e, rt.config.cpu_threads)
                return
            pairs = order_N[offsets[e]:offsets[e + 1]]
            cpu_out[e] = _cpu_expert(store, layer, e, x_host_TD, pairs // K, flat_w_N[pairs],
                                     rt.config.cpu_threads)

        def start_copy(e: int) -> None:
            if cache.load(layer, e, protect=protect) < 0:
                raise RuntimeError(f"no evictable cache slot for expert {e} of MoE layer {layer}")

        prefetched = []

        def run_device(keys) -> None:
            cache.wait()  # this layer's copies only: prefetches below must not delay it
            if prefetcher is not None:
                prefetched.append(prefetcher.issue(layer, x_TD, [(layer, e) for e in keys],
                                                   plan.makespan_s))
            emap_E = cache.expert_map(layer, keys)
            result.append(device_fused_moe(x_TD, cache.w13_N2FD, cache.w2_NDF, ids_TK, weights_TK, emap_E))

        rt.executor.run(plan, run_cpu=run_cpu, start_copy=start_copy, run_device=run_device)
        if prefetcher is not None and not prefetched:
            prefetcher.issue(layer, x_TD, [], plan.makespan_s)
        y_cpu_TD = one.combine() if one is not None else None
        if cpu_out:  # weighted rows summed in fp32, rounded once to x's dtype
            y_cpu_TD = torch.zeros(x_TD.shape, dtype=torch.float32)
            for e in sorted(cpu_out):  # fixed order: results do not depend on thread timing
                tok_M, y_MD = cpu_out[e]
                y_cpu_TD.index_add_(0, tok_M, y_MD)
            y_cpu_TD = y_cpu_TD.to(x_TD.dtype)
        if not result:
            return y_cpu_TD.to(x_TD.device) if y_cpu_TD is not None else torch.zeros_like(x_TD)
        if y_cpu_TD is None:
            return result[0]
        return result[0] + y_cpu_TD.to(x_TD.device, non_blocking=True)


class _OneTokenCPU:
    """CPU experts of a one-token layer call (decode at batch 1), with few torch calls.

    Between two experts the caches hold weight bytes, so every torch op here runs from
    cold caches at several microseconds each (cpu_kernels/decode.py, "Why addresses").
    The general path (_cpu_expert: slice the routing, gather rows, kernel, scale, cast,
    then index_add) cost ~100 us per expert on top of the kernel on the 2-core test VM;
    here each expert is one kernel call writing its own row of y_KD, and the layer
    scales and sums the rows in one compiled call (cpu_kernels/combine.py: fp32, in
    expert order, rounded once: the general path's arithmetic).
    """

    def __init__(self, x_1D: torch.Tensor, ids: list[int], w_K: np.ndarray) -> None:
        """ids: the token's K distinct expert ids, as the layer already listed them;
        w_K: their routing weights as float32 numpy, as the layer already made them."""
        self.x_1D = x_1D.contiguous()  # once here, not in every kernel call
        self.slot = {e: k for k, e in enumerate(ids)}
        self.w_K = w_K
        self.y_KD = torch.empty((len(ids), x_1D.shape[1]), dtype=x_1D.dtype)
        self.rows = self.y_KD.view(len(ids), 1, -1).unbind(0)  # [1, D] views, made once
        self.done: list[int] = []

    def run(self, store: HostExpertStore, layer: int, e: int, threads: int | None) -> None:
        w13_2FD, w2_DF = store.cpu_weights(layer, e)
        cpu_expert_ffn(self.x_1D, w13_2FD, w2_DF, out=self.rows[self.slot[e]], num_threads=threads)
        self.done.append(e)  # list.append is atomic: items may finish on several threads

    def combine(self) -> torch.Tensor | None:
        """sum over the finished experts of weight * row, in fp32 and expert order, then
        rounded once to x's dtype (as the general path)."""
        if not self.done:
            return None
        slots = np.array([self.slot[e] for e in sorted(self.done)], np.int64)  # fixed order
        K, D = self.y_KD.shape
        y_1D = torch.empty((1, D), dtype=self.y_KD.dtype)  # float32 or bf16: all expert_ffn takes
        combine_rows(y_1D.data_ptr(), self.y_KD.data_ptr(), self.y_KD.dtype == torch.bfloat16, K, D, self.w_K, slots)
        return y_1D


def _cpu_expert(store: HostExpertStore, layer: int, e: int, x_TD: torch.Tensor,
                tok_M: torch.Tensor, w_M: torch.Tensor,
                threads: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert on the CPU for its M routed rows; returns (rows, weighted output in fp32)."""
    w13_2FD, w2_DF = store.cpu_weights(layer, e)
    y_MD = cpu_expert_ffn(x_TD.index_select(0, tok_M), w13_2FD, w2_DF, num_threads=threads)
    return tok_M, y_MD.float() * w_M[:, None].float()
