"""Predictor-driven prefetch: while layer l runs, copy the experts that layers l+1..l+d
are forecast to need into the device cache.

The forecast reaches the cache policy (`observe_forecast`, so forecast experts are
protected from eviction), and copies are issued on the copy stream right after layer l's
own copies and before its device kernel, so they overlap layer l's CPU and device
compute. Which experts: the scheduler's impact-driven choice (`choose_prefetch`:
probability times the makespan the copy saves in that layer's plan, so an expert that
would run on the CPU just as fast is not copied), among the policy's own
`prefetch_requests()` when it has them (the predictive policy weighs a forecast against
what it would evict). Every prefetch is one expert copy and is counted in h2d_bytes;
`prefetch_hits` counts prefetched experts that a later layer then used.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from moe.router_predictor.predictors import RoutingContext, RoutingPredictor
from moe.scheduler import LayerForecast, WorkItem, choose_prefetch

__all__ = ["Prefetcher", "step_probabilities"]


def step_probabilities(probs_TE: torch.Tensor) -> torch.Tensor:
    """P(expert used by at least one of the T tokens), from per-token probabilities [T, E]."""
    return 1.0 - torch.prod(1.0 - probs_TE.clamp(0.0, 1.0), dim=0)


class Prefetcher:
    def __init__(self, *, predictor: RoutingPredictor, cache, counters, planner=None,
                 weight_bytes: int = 0, flops_per_token: int = 0, depth: int = 1,
                 threshold: float = 0.5) -> None:
        """planner: the runtime's LayerPlanner (cost model and rule), which scores
        prefetches for policies without their own rule; threshold: smallest forecast
        probability considered."""
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.predictor, self.cache, self.counters = predictor, cache, counters
        self.planner = planner
        self.weight_bytes, self.flops_per_token = weight_bytes, flops_per_token
        self.depth, self.threshold = depth, threshold
        self._step_ids: list[torch.Tensor] = []  # this forward's ids_TK of layers 0..l
        self._prev_TLK: torch.Tensor | None = None  # last forward's routing (decode predecessor)
        self._prefetched: set[tuple[int, int]] = set()

    # -- bookkeeping ------------------------------------------------------------------
    def observe(self, layer: int, ids_TK: torch.Tensor, active: Sequence[int]) -> None:
        """Record layer l's routing; count hits on experts that a prefetch brought in."""
        if layer == 0:
            if self._step_ids and len(self._step_ids) == self.predictor.num_layers:
                self._prev_TLK = torch.stack(self._step_ids, dim=1)
            self._step_ids = []
        if len(self._step_ids) != layer:  # a forward that skipped layers: start afresh
            self._step_ids = []
            return
        self._step_ids.append(ids_TK.long())
        for e in active:
            if (layer, e) in self._prefetched and self.cache.resident(layer, e):
                self.counters.add("prefetch_hits")
        self._prefetched = {k for k in self._prefetched if k[0] != layer and self.cache.resident(*k)}

    # -- forecasting and copies --------------------------------------------------------
    def issue(self, layer: int, hidden_TD: torch.Tensor | None,
              protect: Sequence[tuple[int, int]], layer_time_s: float = 0.0) -> int:
        """Forecast layers after `layer` and copy what is worth it. Returns copies issued.

        layer_time_s: predicted makespan of the current layer; the next layers are
        expected to start that far apart, which is how long a prefetch has to land."""
        if len(self._step_ids) != layer + 1 or layer + 1 >= self.predictor.num_layers:
            return 0
        T = self._step_ids[0].shape[0]
        prev = self._prev_TLK if self._prev_TLK is not None and self._prev_TLK.shape[0] == T else None
        ctx = RoutingContext(layer=layer, ids_TlK=torch.stack(self._step_ids, dim=1),
                             prev_ids_TLK=prev,
                             hidden_TD=None if hidden_TD is None else hidden_TD.detach())
        probs_TdE = self.predictor.predict(ctx, depth=self.depth).float().cpu()
        policy = self.cache.policy
        forecasts = []
        for j in range(probs_TdE.shape[1]):
            target = layer + 1 + j
            p_E = step_probabilities(probs_TdE[:, j])
            policy.observe_forecast(target, p_E.numpy())
            if self.planner is not None:
                forecasts.append(self._forecast(target, probs_TdE[:, j], p_E, (j + 1) * layer_time_s))
        keys: list = []
        if forecasts:
            if hasattr(policy, "prefetch_requests"):
                # The policy proposes (it weighs each copy against what it would evict);
                # the cost model disposes: only copies that shorten a layer are issued.
                wanted = set(k for k in policy.prefetch_requests() if not self.cache.resident(*k))
                forecasts = [LayerForecast(items=fc.items, start_s=fc.start_s,
                                           probs={k: p for k, p in fc.probs.items() if k in wanted})
                             for fc in forecasts]
            keys = choose_prefetch(forecasts, self.planner.cost, planner=self.planner,
                                   rule=self.planner.rule,
                                   free_slots=self.cache.evictable(protect=protect))
        issued = 0
        protected = list(protect)
        for key in keys:
            if self.cache.evictable(protect=protected) == 0:
                break
            if self.cache.load(*key, protect=protected) >= 0:
                self._prefetched.add(key)
                protected.append(key)  # a later prefetch must not evict this one
                issued += 1
        self.counters.add("prefetches", issued)
        return issued

    def _forecast(self, layer: int, probs_TE: torch.Tensor, p_E: torch.Tensor,
                  start_s: float) -> LayerForecast:
        """Scheduler view of one forecast layer: a work item per likely expert, with the
        tokens it would get if active, and its probability of being active."""
        tokens_E = probs_TE.clamp(0.0, 1.0).sum(dim=0)
        items, probs = [], {}
        for e in range(p_E.shape[0]):
            p = float(p_E[e])
            if p < self.threshold:
                continue
            key = (layer, e)
            items.append(WorkItem(key=key, tokens=max(1, round(float(tokens_E[e]) / p)),
                                  weight_bytes=self.weight_bytes,
                                  flops_per_token=self.flops_per_token,
                                  cached=bool(self.cache.resident(layer, e))))
            probs[key] = min(1.0, p)
        return LayerForecast(items=items, probs=probs, start_s=start_s)


def gate_callables(blocks) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Per MoE layer, hidden_TD -> router probabilities [T, E], with each block's own
    score function (softmax or sigmoid plus correction bias)."""
    def make(block):
        def gate(h_TD: torch.Tensor) -> torch.Tensor:
            logits = block.logits(h_TD).float()
            if block.gating.score == "softmax":
                return torch.softmax(logits, dim=-1)
            s = torch.sigmoid(logits)
            bias = block.correction_bias()
            return s if bias is None else s + bias.float()
        return gate
    return [make(b) for b in blocks]
