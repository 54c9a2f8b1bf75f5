"""Compare cache policies on one routing trace, tuning online policies on another.

Shape key: T tokens, L layers, K top-k, E experts, d forecast depth.

Every policy replays the same measured trace (see replay.py). Online policies may be
tuned, but only on the *fit* trace, never on the measured one:
- score: its decay, for the best hit rate on the fit trace;
- predictive: decay, prefetch threshold and prefetches per layer, for the best hit rate
  on the fit trace whose loads stay within `load_budget` x LRU's loads there (prefetches
  cost copies: without a budget, prefetching everything maximises hits);
- static-hot: pins the fit trace's C-1 most used experts per layer (one slot stays free
  for misses, else a miss could never be cached).
Belady gets the measured trace's future; it is the optimum for demand fetch.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from moe.expert_cache.policies import POLICY_NAMES, PredictiveConfig, ScoreConfig, make_policy
from moe.expert_cache.replay import Forecaster, ReplayConfig, ReplayResult, replay

__all__ = ["CompareConfig", "ReplayTrace", "compare_policies", "tune_score", "tune_predictive"]


@dataclass(kw_only=True)
class ReplayTrace:
    """ids_TLK int [T, L, K]; weights_TLK float [T, L, K] or None; seq_starts [S+1];
    forecaster: forecasts for this trace made from past information only (or None)."""

    ids_TLK: np.ndarray
    seq_starts: list[int]
    weights_TLK: np.ndarray | None = None
    forecaster: Forecaster | None = None

    def head(self, tokens: int) -> "ReplayTrace":
        """The first `tokens` tokens (forecasts index tokens from 0, so they stay aligned)."""
        if tokens >= len(self.ids_TLK):
            return self
        starts = [s for s in self.seq_starts if s < tokens] + [tokens]
        w = None if self.weights_TLK is None else self.weights_TLK[:tokens]
        return ReplayTrace(ids_TLK=self.ids_TLK[:tokens], seq_starts=starts, weights_TLK=w, forecaster=self.forecaster)

    def run(self, policy, config: ReplayConfig) -> ReplayResult:
        return replay(self.ids_TLK, policy, config, weights_TLK=self.weights_TLK, seq_starts=self.seq_starts,
                      forecaster=self.forecaster)


@dataclass(kw_only=True)
class CompareConfig:
    """capacity: slots per layer; num_experts: E; load_budget: predictive's load cap as a
    multiple of LRU's on the fit trace; policies: names to run (see POLICY_NAMES);
    tune_tokens: tuning replays at most this many leading tokens of the fit trace (each
    setting of the grid is one replay, so long traces would make tuning slow)."""

    capacity: int
    num_experts: int
    load_budget: float = 1.25
    policies: tuple[str, ...] = POLICY_NAMES
    decays: tuple[float, ...] = (0.5, 0.7, 0.9)
    thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    max_prefetches: tuple[int, ...] = (1, 2)
    tune_tokens: int = 4000

    def __post_init__(self) -> None:
        ReplayConfig(capacity=self.capacity, num_experts=self.num_experts)  # validates both
        if self.tune_tokens < 1:
            raise ValueError(f"tune_tokens must be >= 1, got {self.tune_tokens}")
        if self.load_budget < 1.0:
            raise ValueError(f"load_budget must be >= 1.0 (a multiple of LRU's loads), got {self.load_budget}")
        unknown = set(self.policies) - set(POLICY_NAMES)
        if unknown:
            raise ValueError(f"unknown cache policies {sorted(unknown)}; choose from {', '.join(POLICY_NAMES)}")

    @property
    def replay(self) -> ReplayConfig:
        return ReplayConfig(capacity=self.capacity, num_experts=self.num_experts)


def tune_score(fit: ReplayTrace, cfg: CompareConfig) -> ScoreConfig:
    """The decay with the best hit rate on the fit trace (ties: the first)."""
    best = max(cfg.decays, key=lambda d: fit.run(make_policy("score", decay=d), cfg.replay).hits)
    return ScoreConfig(decay=best)


def tune_predictive(fit: ReplayTrace, cfg: CompareConfig) -> tuple[PredictiveConfig, dict]:
    """Best hit rate on the fit trace with loads <= load_budget x LRU's; returns config and info."""
    lru_loads = fit.run(make_policy("lru"), cfg.replay).loads
    cap = cfg.load_budget * lru_loads
    best, best_key = PredictiveConfig(prefetch_threshold=1.0), None
    for decay, th, mp in itertools.product(cfg.decays, cfg.thresholds, cfg.max_prefetches):
        pc = PredictiveConfig(decay=decay, prefetch_threshold=th, max_prefetch=mp)
        r = fit.run(make_policy("predictive", **vars(pc)), cfg.replay)
        key = (r.hits, -r.loads)
        if r.loads <= cap and (best_key is None or key > best_key):
            best, best_key = pc, key
    info = {"fit_lru_loads": lru_loads, "load_cap": cap}
    return best, info


def compare_policies(measure: ReplayTrace, fit: ReplayTrace, cfg: CompareConfig) -> dict:
    """Replay every policy in cfg.policies on `measure` after tuning on `fit`.

    Returns {"capacity": C, "policies": {name: ReplayResult.as_dict() + "of_belady"},
    "tuned": {...settings chosen on the fit trace}}.
    """
    out: dict = {"capacity": cfg.capacity, "policies": {}, "tuned": {}}
    ids = np.asarray(measure.ids_TLK)
    tune = fit.head(cfg.tune_tokens)
    for name in cfg.policies:
        if name == "belady":
            pol = make_policy("belady", future_TLK=ids)
        elif name == "score":
            sc = tune_score(tune, cfg)
            out["tuned"]["score"] = vars(sc)
            pol = make_policy("score", **vars(sc))
        elif name == "predictive":
            if measure.forecaster is None or fit.forecaster is None:
                raise ValueError("policy 'predictive' needs forecasters for the fit and the measured trace")
            pc, info = tune_predictive(tune, cfg)
            out["tuned"]["predictive"] = {**vars(pc), **info}
            pol = make_policy("predictive", **vars(pc))
        elif name == "static-hot":
            counts_LE = _counts(np.asarray(fit.ids_TLK), cfg.num_experts)
            per_layer = max(cfg.capacity - 1, 0)
            out["tuned"]["static-hot"] = {"pinned_per_layer": per_layer}
            pol = make_policy("static-hot", counts_LE=counts_LE, per_layer=per_layer)
        else:
            pol = make_policy(name)
        out["policies"][name] = measure.run(pol, cfg.replay).as_dict()
    bel = out["policies"].get("belady")
    if bel and bel["hit_rate"] > 0:
        for row in out["policies"].values():
            row["of_belady"] = row["hit_rate"] / bel["hit_rate"]
    return out


def _counts(ids_TLK: np.ndarray, num_experts: int) -> np.ndarray:
    """Uses [L, E] of each (layer, expert) in a trace."""
    T, L, K = ids_TLK.shape
    counts = np.zeros((L, num_experts), dtype=np.int64)
    for l in range(L):
        counts[l] = np.bincount(ids_TLK[:, l].reshape(-1), minlength=num_experts)[:num_experts]
    return counts
