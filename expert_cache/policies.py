"""Eviction and prefetch policies of the expert cache, and their factory.

All policies implement `expert_cache.policy.CachePolicy`; keys are `(layer, expert)`.
They see only what a running system knows when it asks: router scores of steps already
taken and predictor forecasts made from them. The one exception is `BeladyPolicy`, the
offline optimum, which is handed the future and exists only to evaluate the others.

Policy       | evicts                                    | source
-------------|-------------------------------------------|---------------------------------
lru          | least recently used                       | policy.py
lfu          | fewest uses so far (ties: LRU)            | classic
score        | lowest exponential average of router      | HybriMoE's score-based cache
             | scores per (layer, expert)                |
predictive   | lowest score plus forecast and next-step  | ExpertFlow / ProMoE-style prefetch
             | estimate; forecast experts are protected  |
             | and prefetched into the next layer        |
static-hot   | never the pinned hottest experts          | Fiddler, llama.cpp --n-cpu-moe
belady       | the entry used farthest in the future     | Belady's MIN (offline optimum)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from moe.expert_cache.policy import CachePolicy, Key, LRUPolicy

__all__ = [
    "LFUPolicy", "ScorePolicy", "PredictivePolicy", "StaticHotPolicy", "BeladyPolicy",
    "PrefetchMixin", "ResidencyMixin", "make_policy", "POLICY_NAMES",
]

POLICY_NAMES = ("lru", "lfu", "score", "predictive", "static-hot", "belady")


def _need(candidates: Sequence[Key]) -> None:
    if not candidates:
        raise ValueError("no evictable entry: every resident expert is in use by this step")


class ResidencyMixin:
    """Tracks which keys are resident, per layer, from on_insert / on_evict."""

    def _init_residency(self) -> None:
        self.resident: dict[int, set[Key]] = {}  # layer -> resident keys

    def _mark_insert(self, key: Key) -> None:
        self.resident.setdefault(key[0], set()).add(key)

    def _mark_evict(self, key: Key) -> None:
        self.resident.get(key[0], set()).discard(key)

    def is_resident(self, key: Key) -> bool:
        return key in self.resident.get(key[0], ())


class PrefetchMixin:
    """A policy that asks for prefetches: after each step (and its forecasts) the cache calls
    `prefetch_requests()` and loads the returned non-resident keys, best first, evicting
    `victim(...)` of that key's layer for each. Every prefetch is one expert load."""

    def prefetch_requests(self) -> list[Key]:
        return []


class LFUPolicy(LRUPolicy):
    """Evict the entry used least often so far (counts survive eviction); ties go to LRU."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self._count: dict[Key, int] = {}

    def on_hit(self, key: Key) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        super().on_hit(key)

    on_insert = on_hit

    def victim(self, candidates: Sequence[Key]) -> Key:
        _need(candidates)
        rank = {key: i for i, key in enumerate(self._order)}  # older first
        return min(candidates, key=lambda k: (self._count.get(k, 0), rank.get(k, -1)))


@dataclass(kw_only=True)
class ScoreConfig:
    """decay: weight of the old average per step of the entry's layer (HybriMoE's score
    cache); `score = decay * score + (1 - decay) * router_score`."""

    decay: float = 0.7

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"score decay must be in [0, 1), got {self.decay}")


class ScorePolicy(CachePolicy):
    """Evict the lowest exponential moving average of router scores (HybriMoE).

    Each step of layer l updates all E scores of that layer with the step's router
    probabilities (scores_E; without them, 1/k for each active expert). Ties go to the
    entry used longest ago.
    """

    name = "score"

    def __init__(self, config: ScoreConfig | None = None, **kw) -> None:
        self.config = config or ScoreConfig(**kw)
        self._score: dict[int, np.ndarray] = {}  # layer -> [E]
        self._clock = 0
        self._last: dict[Key, int] = {}

    @staticmethod
    def _step_scores(scores_E: np.ndarray | None, active: Sequence[int], num_experts: int) -> np.ndarray:
        if scores_E is not None:
            return np.asarray(scores_E, dtype=np.float64)
        s_E = np.zeros(num_experts)
        if len(active):
            s_E[list(active)] = 1.0 / len(active)
        return s_E

    def observe_routing(self, layer: int, scores_E: np.ndarray | None, active: Sequence[int]) -> None:
        n = len(scores_E) if scores_E is not None else max(list(active) + [-1]) + 1
        old = self._score.get(layer)
        if old is not None and old.size < n:
            old = np.pad(old, (0, n - old.size))
        step_E = self._step_scores(scores_E, active, max(n, 0 if old is None else old.size))
        d = self.config.decay
        self._score[layer] = step_E * (1.0 - d) if old is None else d * old + (1.0 - d) * step_E

    def score(self, key: Key) -> float:
        layer, expert = key
        s = self._score.get(layer)
        return float(s[expert]) if s is not None and expert < s.size else 0.0

    def on_hit(self, key: Key) -> None:
        self._clock += 1
        self._last[key] = self._clock

    on_insert = on_hit

    def on_evict(self, key: Key) -> None:
        self._last.pop(key, None)

    def victim(self, candidates: Sequence[Key]) -> Key:
        _need(candidates)
        return min(candidates, key=lambda k: (self.score(k), self._last.get(k, -1)))


@dataclass(kw_only=True)
class PredictiveConfig:
    """decay: score average as in ScoreConfig.
    forecast_weight: how much a fresh forecast of a layer adds to its experts' scores
        when choosing victims there (protects forecast experts).
    prefetch_threshold: prefetch a forecast expert whose forecast probability is at least
        this and above the victim's value; 1.0 or more disables prefetch.
    max_prefetch: prefetches per forecast layer and step, at most.
    temporal_weight: weight of the online next-step estimate (see PredictivePolicy).
    """

    # Defaults: what tuning on either Mixtral-8x7B trace picked (see `moe bench cache`).
    decay: float = 0.9
    forecast_weight: float = 1.0
    prefetch_threshold: float = 0.7
    max_prefetch: int = 2
    temporal_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"predictive decay must be in [0, 1), got {self.decay}")
        if self.forecast_weight < 0:
            raise ValueError(f"predictive forecast_weight must be >= 0, got {self.forecast_weight}")
        if self.prefetch_threshold < 0:
            raise ValueError(f"predictive prefetch_threshold must be >= 0, got {self.prefetch_threshold}")
        if self.max_prefetch < 0:
            raise ValueError(f"predictive max_prefetch must be >= 0, got {self.max_prefetch}")
        if self.temporal_weight < 0:
            raise ValueError(f"predictive temporal_weight must be >= 0, got {self.temporal_weight}")


class PredictivePolicy(ResidencyMixin, PrefetchMixin, ScorePolicy):
    """Score cache plus a routing-path predictor's forecasts (protect, then prefetch).

    `observe_forecast(l, p_E)` gives, before layer l runs, the probability that each
    expert of layer l is used by the coming step (e.g. from a transition table over the
    current token's routing at earlier layers). Until layer l's step is observed, its
    forecast experts get `forecast_weight * p` added to their score, so that neither a
    demand miss elsewhere nor another prefetch evicts them, and the likeliest
    non-resident ones are requested for prefetch if they beat the entry they would evict.

    Demand evictions at layer l decide what the *next* step of layer l finds, which no
    forecast covers yet. For them the policy also keeps, per layer, counts of which experts
    the step after a step with expert e used (learned online from the steps it has seen),
    and adds `temporal_weight * P(e' next | this step's experts)` to each entry's value.
    """

    name = "predictive"

    def __init__(self, config: PredictiveConfig | None = None, **kw) -> None:
        cfg = config or PredictiveConfig(**kw)
        super().__init__(ScoreConfig(decay=cfg.decay))
        self.pconfig = cfg
        self._forecast: dict[int, np.ndarray] = {}  # layer -> [E], pending until the layer runs
        self._follow: dict[int, np.ndarray] = {}  # layer -> [E, E] counts: e at a step, e' at the next
        self._last_active: dict[int, list[int]] = {}
        self._next: dict[int, np.ndarray] = {}  # layer -> [E], P(used at the layer's next step)
        self._init_residency()

    def observe_forecast(self, layer: int, scores_E: np.ndarray) -> None:
        self._forecast[layer] = np.asarray(scores_E, dtype=np.float64)

    def observe_routing(self, layer: int, scores_E: np.ndarray | None, active: Sequence[int]) -> None:
        super().observe_routing(layer, scores_E, active)
        self._forecast.pop(layer, None)  # it was about this step, which has now come
        if self.pconfig.temporal_weight == 0 or not len(active):
            return
        act = [int(e) for e in active]
        n = max(len(scores_E) if scores_E is not None else 0, max(act) + 1)
        counts = self._follow.get(layer)
        if counts is None or counts.shape[0] < n:
            grown = np.ones((n, n))  # add-one prior: unseen pairs are possible
            if counts is not None:
                grown[: counts.shape[0], : counts.shape[1]] = counts
            counts = self._follow[layer] = grown
        prev = self._last_active.get(layer)
        if prev:
            counts[np.ix_(prev, act)] += 1.0
        self._last_active[layer] = act
        rows = counts[act]
        self._next[layer] = (rows / rows.sum(1, keepdims=True)).mean(0)

    def value(self, key: Key) -> float:
        layer, expert = key
        cfg = self.pconfig
        f = self._forecast.get(layer)
        bonus = cfg.forecast_weight * float(f[expert]) if f is not None and expert < f.size else 0.0
        nx = self._next.get(layer)
        if nx is not None and expert < nx.size:
            bonus += cfg.temporal_weight * float(nx[expert])
        return self.score(key) + bonus

    def on_insert(self, key: Key) -> None:
        super().on_insert(key)
        self._mark_insert(key)

    def on_evict(self, key: Key) -> None:
        super().on_evict(key)
        self._mark_evict(key)

    def victim(self, candidates: Sequence[Key]) -> Key:
        _need(candidates)
        return min(candidates, key=lambda k: (self.value(k), self._last.get(k, -1)))

    def prefetch_requests(self) -> list[Key]:
        cfg = self.pconfig
        if cfg.max_prefetch == 0 or cfg.prefetch_threshold >= 1.0:
            return []
        wanted: list[tuple[float, Key]] = []
        for layer, f_E in self._forecast.items():
            residents = self.resident.get(layer, ())
            floor = min((self.value(k) for k in residents), default=0.0)
            order = np.argsort(-f_E, kind="stable")[: cfg.max_prefetch]
            for e in order.tolist():
                key = (layer, e)
                p = float(f_E[e])
                # Worth a copy only if likely used now and worth more than what it displaces.
                if not self.is_resident(key) and p >= cfg.prefetch_threshold and self.value(key) > floor:
                    wanted.append((p, key))
        wanted.sort(key=lambda pk: -pk[0])
        return [k for _, k in wanted]


class StaticHotPolicy(LRUPolicy):
    """Pinned hottest experts are evicted only when nothing else can go; the rest is LRU.

    hot: {layer: [expert ids]} pinned per layer (as Fiddler or llama.cpp's --n-cpu-moe
    keep fixed experts on the GPU), usually the most frequent on a calibration trace; see
    `from_counts`.
    """

    name = "static-hot"

    def __init__(self, hot: dict[int, Sequence[int]] | None = None) -> None:
        super().__init__()
        self.hot = {(int(l), int(e)) for l, es in (hot or {}).items() for e in es}

    @classmethod
    def from_counts(cls, counts_LE: np.ndarray, per_layer: int) -> "StaticHotPolicy":
        """Pin the `per_layer` most used experts of each layer (counts_LE: uses [L, E])."""
        counts_LE = np.asarray(counts_LE)
        if counts_LE.ndim != 2 or per_layer < 0:
            raise ValueError(f"static-hot needs counts [layers, experts] and per_layer >= 0, got "
                             f"{counts_LE.shape} and {per_layer}")
        order = np.argsort(-counts_LE, axis=1, kind="stable")[:, :per_layer]
        return cls({l: order[l].tolist() for l in range(counts_LE.shape[0])})

    def victim(self, candidates: Sequence[Key]) -> Key:
        _need(candidates)
        cold = [k for k in candidates if k not in self.hot]
        return super().victim(cold or list(candidates))


class BeladyPolicy(CachePolicy):
    """Belady's MIN: evict the entry whose next use lies farthest ahead. Offline only.

    future_TLK: the whole access sequence, int [T, L, K]: step t of layer l uses
    future_TLK[t, l]. The cache must report each step through observe_routing (in
    order per layer). With demand fetch and no prefetch this is optimal per layer.
    """

    name = "belady"

    def __init__(self, future_TLK) -> None:
        ids = np.asarray(future_TLK)
        if ids.ndim != 3:
            raise ValueError(f"belady needs the future as [tokens, layers, k], got shape {ids.shape}")
        self._T, L, _ = ids.shape
        # next_use[l][e]: sorted steps at which layer l uses expert e.
        self._uses: dict[Key, np.ndarray] = {}
        for l in range(L):
            for e in np.unique(ids[:, l]).tolist():
                self._uses[(l, e)] = np.nonzero((ids[:, l] == e).any(axis=1))[0]
        self._step = [-1] * L

    def observe_routing(self, layer: int, scores_E: np.ndarray | None, active: Sequence[int]) -> None:
        self._step[layer] += 1

    def next_use(self, key: Key) -> int:
        uses = self._uses.get(key)
        now = self._step[key[0]]
        if uses is None:
            return self._T + 1
        i = int(np.searchsorted(uses, now, side="right"))
        return int(uses[i]) if i < uses.size else self._T + 1

    def victim(self, candidates: Sequence[Key]) -> Key:
        _need(candidates)
        # Ties (never used again) go to the lowest key, so the result is deterministic.
        return max(candidates, key=lambda k: (self.next_use(k), -k[1]))


def make_policy(name: str, **kw) -> CachePolicy:
    """A policy by name: "lru", "lfu", "score", "predictive", "static-hot" (the runtime's
    RuntimeConfig.cache_policy values) or "belady" (evaluation; needs `future_TLK`).

    Keyword arguments go to the policy: score -> ScoreConfig fields; predictive ->
    PredictiveConfig fields; static-hot -> `hot` ({layer: [experts]}) or `counts_LE` and
    `per_layer`; belady -> `future_TLK`.
    """
    if name in ("lru", "lfu"):
        _no_kw(name, kw)
        return LRUPolicy() if name == "lru" else LFUPolicy()
    if name == "score":
        return ScorePolicy(ScoreConfig(**kw))
    if name == "predictive":
        return PredictivePolicy(PredictiveConfig(**kw))
    if name == "static-hot":
        if "counts_LE" in kw:
            counts, per_layer = kw.pop("counts_LE"), kw.pop("per_layer", 1)
            _no_kw(name, kw)
            return StaticHotPolicy.from_counts(counts, per_layer)
        hot = kw.pop("hot", None)
        _no_kw(name, kw)
        return StaticHotPolicy(hot)
    if name == "belady":
        if "future_TLK" not in kw:
            raise ValueError("policy 'belady' is the offline optimum and needs future_TLK (the whole trace)")
        future = kw.pop("future_TLK")
        _no_kw(name, kw)
        return BeladyPolicy(future)
    raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


def _no_kw(name: str, kw: dict) -> None:
    if kw:
        raise ValueError(f"cache policy {name!r} takes no options {sorted(kw)}")
