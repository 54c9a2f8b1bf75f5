"""Replay a routing trace through per-layer expert caches and count hits and loads.

Shape key: T tokens, L MoE layers, K top-k, E experts per layer, C slots per layer.

Order is decode order: for each token, for each layer, the step of (token t, layer l)
1. tells the policy the step's routing (`observe_routing`, router scores if known),
2. looks up its K experts: a resident one is a hit; a missing one is loaded on demand
   (no bypass), evicting the policy's victim among this layer's residents that the step
   does not use,
3. hands the forecaster what is known now (this token's routing at layers 0..l and the
   previous token's routing) and passes its forecast of layers l+1.. to the policy,
4. loads what a prefetching policy asks for (each prefetch is one load, as a miss is).
Caches persist across sequences, as they do in a server.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from moe.expert_cache.policies import PrefetchMixin
from moe.expert_cache.policy import CachePolicy

__all__ = ["ReplayConfig", "ReplayResult", "replay", "Forecaster"]

# forecaster(token t, layer l, this token's ids [l+1, K], previous token's ids [L, K] or None)
#   -> scores [d, E] for layers l+1 .. l+d (probability that each expert is used there).
# It may use only its arguments and tokens before t (a precomputed table built from
# such contexts is equivalent, see router_predictor.evaluate.forecast_table).
Forecaster = Callable[[int, int, np.ndarray, "np.ndarray | None"], np.ndarray]


@dataclass(kw_only=True)
class ReplayConfig:
    """capacity: cache slots per layer (C >= K). num_experts: E per layer."""

    capacity: int
    num_experts: int

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"replay num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.capacity <= self.num_experts:
            raise ValueError(
                f"replay capacity must be 1..{self.num_experts} slots per layer (the layer's experts), got {self.capacity}"
            )


@dataclass(kw_only=True)
class ReplayResult:
    """Counts of one replay; `loads` = misses + prefetches (each is one expert copy)."""

    policy: str
    capacity: int
    accesses: int = 0
    hits: int = 0
    misses: int = 0
    prefetches: int = 0
    useful_prefetches: int = 0  # prefetched entries used before their eviction

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def loads(self) -> int:
        return self.misses + self.prefetches

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, loads=self.loads)
        return d


def _check_ids(ids_TLK: np.ndarray, cfg: ReplayConfig) -> np.ndarray:
    ids = np.asarray(ids_TLK)
    if ids.ndim != 3:
        raise ValueError(f"replay needs expert ids [tokens, layers, k], got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.num_experts):
        raise ValueError(f"replay expert ids must lie in [0, {cfg.num_experts}), got {ids.min()}..{ids.max()}")
    if ids.shape[2] > cfg.capacity:
        raise ValueError(
            f"replay capacity {cfg.capacity} is below top-k {ids.shape[2]}: a step's experts must fit at once"
        )
    return ids.astype(np.int64)


def replay(
    ids_TLK,
    policy: CachePolicy,
    config: ReplayConfig,
    *,
    weights_TLK=None,
    seq_starts: Sequence[int] | None = None,
    forecaster: Forecaster | None = None,
) -> ReplayResult:
    """Replay `ids_TLK` through one C-slot cache per layer under `policy`; see module doc.

    weights_TLK: router weights of the chosen experts, float [T, L, K]; passed to the policy
        as scores over E (zeros for unchosen experts). None: the policy gets None.
    seq_starts: token offsets of sequences; the forecaster sees no previous token at a start.
    """
    ids = _check_ids(ids_TLK, config)
    T, L, K = ids.shape
    w = None if weights_TLK is None else np.asarray(weights_TLK, dtype=np.float64)
    if w is not None and w.shape != ids.shape:
        raise ValueError(f"replay weights shape {w.shape} differs from ids shape {ids.shape}")
    starts = set(int(s) for s in (seq_starts if seq_starts is not None else [0]))
    prefetching = isinstance(policy, PrefetchMixin)
    res = ReplayResult(policy=getattr(policy, "name", type(policy).__name__), capacity=config.capacity)
    resident: list[set[int]] = [set() for _ in range(L)]
    unused_prefetch: set[tuple[int, int]] = set()
    E, C = config.num_experts, config.capacity

    def evict_for(layer: int, protect: set[int]) -> None:
        cand = [(layer, e) for e in sorted(resident[layer]) if e not in protect]
        victim = policy.victim(cand)
        if victim not in cand:
            raise ValueError(f"policy {res.policy!r} chose victim {victim!r}, not one of {cand}")
        resident[layer].discard(victim[1])
        unused_prefetch.discard(victim)
        policy.on_evict(victim)

    for t in range(T):
        prev = ids[t - 1] if t > 0 and t not in starts else None
        for l in range(L):
            active = list(dict.fromkeys(ids[t, l].tolist()))  # distinct, in rank order
            scores_E = None
            if w is not None:
                scores_E = np.zeros(E)
                np.add.at(scores_E, ids[t, l], w[t, l])
            policy.observe_routing(l, scores_E, active)
            for e in active:
                key = (l, e)
                res.accesses += 1
                if e in resident[l]:
                    res.hits += 1
                    if key in unused_prefetch:
                        unused_prefetch.discard(key)
                        res.useful_prefetches += 1
                    policy.on_hit(key)
                    continue
                res.misses += 1
                if len(resident[l]) >= C:
                    evict_for(l, set(active))
                resident[l].add(e)
                policy.on_insert(key)
            if forecaster is not None and l + 1 < L:
                f_dE = np.asarray(forecaster(t, l, ids[t, : l + 1], prev), dtype=np.float64)
                for j in range(min(f_dE.shape[0], L - 1 - l)):
                    policy.observe_forecast(l + 1 + j, f_dE[j])
            if prefetching:
                fetched: dict[int, set[int]] = {}
                for key in policy.prefetch_requests():
                    pl, pe = int(key[0]), int(key[1])
                    if not (l < pl < L and 0 <= pe < E):
                        raise ValueError(f"policy {res.policy!r} asked to prefetch {key!r}: only layers "
                                         f"after the current one ({l}) can be prefetched")
                    if pe in resident[pl]:
                        continue
                    done = fetched.setdefault(pl, set())
                    if len(resident[pl]) >= C:
                        if len(resident[pl] - done) == 0:
                            continue  # this round's prefetches already fill the layer
                        evict_for(pl, done)
                    resident[pl].add(pe)
                    done.add(pe)
                    unused_prefetch.add((pl, pe))
                    res.prefetches += 1
                    policy.on_insert((pl, pe))
    return res
