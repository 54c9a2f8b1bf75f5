"""Impact-driven prefetch: copy the experts of later layers whose presence saves the most time.

A predictor forecasts, for each of the next layers, which items may be active and with
what probability. Prefetching an item that will not be used wastes link time and a slot;
prefetching one that runs on the CPU anyway (few tokens, fast CPU) saves nothing. So
each candidate is scored by what its copy does to that layer's planned makespan:

    gain(k) = p_k * (M(S_k) - M(S_k with k's copy issued now))

where S_k is the layer's most likely active set given that k is active (the round(sum p)
most probable items, k taking the place of the least probable one if it is not among
them: top-k routing activates about as many items either way),
M is the planner's makespan for a set of items (the same rule the runtime will use),
and a copy issued now lands after the copies chosen before it: if it lands before the
layer starts the item counts as cached, otherwise as a copy in flight. Candidates are
picked greedily by gain, re-scored after each pick (a second copy into the same layer is
worth less once the first is there), until the free slots or the link's idle time run
out or no candidate saves more than `min_gain_s`. Later layers are scored with unbounded
copy slots (their evictions are not known yet). The returned order is the issue order;
the runtime cancels what is not yet issued when the forecast changes.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from moe.scheduler.cost_model import CostModel
from moe.scheduler.planner import LayerPlanner
from moe.scheduler.work import WorkItem

__all__ = ["LayerForecast", "choose_prefetch"]


@dataclass(frozen=True, kw_only=True)
class LayerForecast:
    """Forecast of one later layer.

    items: candidate work items; `tokens` is the expected token count if the item is
        active, `cached`/`copy_ready_s` describe the device now.
    probs: key -> probability the item is active (0..1); items without an entry get 0.
        A predictor that gives expected token counts E can pass p = min(1, E / tokens).
    start_s: expected seconds from now until this layer starts (a copy landing by then
        is as good as cached).
    """

    items: Sequence[WorkItem]
    probs: Mapping[Hashable, float]
    start_s: float = 0.0

    def __post_init__(self) -> None:
        keys = [it.key for it in self.items]
        if len(set(keys)) != len(keys):
            raise ValueError("LayerForecast: item keys must be unique within a layer")
        for key, p in self.probs.items():
            if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
                raise ValueError(f"LayerForecast: probability of {key!r} must be in [0, 1], got {p!r}")
        if not (math.isfinite(self.start_s) and self.start_s >= 0):
            raise ValueError(f"LayerForecast: start_s must be a finite number >= 0, got {self.start_s!r}")


def _likely_set(fc: LayerForecast) -> list[WorkItem]:
    """The round(sum p) most probable items (at least one when any p > 0)."""
    probs = [fc.probs.get(it.key, 0.0) for it in fc.items]
    m = min(len(fc.items), max(1 if any(probs) else 0, round(sum(probs))))
    order = sorted(range(len(fc.items)), key=lambda i: -probs[i])
    return [fc.items[i] for i in order[:m]]


def choose_prefetch(
    forecast: Sequence[LayerForecast],
    cost: CostModel,
    *,
    free_slots: int,
    link_idle_s: float | None = None,
    link_free_s: float = 0.0,
    rule: str = "dynamic",
    min_gain_s: float = 0.0,
    planner: LayerPlanner | None = None,
) -> list[Hashable]:
    """Keys to copy now, in issue order (see the module docstring).

    forecast: the next layers, nearest first.
    free_slots: device slots the prefetches may fill (>= 0).
    link_idle_s: seconds the link is free for prefetches before it is needed again
        (None: no bound); every chosen copy lands within it.
    link_free_s: seconds until the link has finished its current work.
    rule: scheduler rule used to score a layer (the one the runtime will plan with).
    min_gain_s: a copy must shorten the expected makespan by more than this.
    planner: a LayerPlanner to reuse (its memo makes repeated scoring cheap).
    """
    if isinstance(free_slots, bool) or not isinstance(free_slots, int) or free_slots < 0:
        raise ValueError(f"free_slots must be an int >= 0, got {free_slots!r}")
    if link_idle_s is not None and not link_idle_s >= 0:
        raise ValueError(f"link_idle_s must be None or >= 0 seconds, got {link_idle_s!r}")
    if not link_free_s >= 0:
        raise ValueError(f"link_free_s must be >= 0 seconds, got {link_free_s!r}")
    if planner is None:
        planner = LayerPlanner(cost, rule=rule, cache_size=1024)
    elif planner.cost is not cost or planner.rule != rule:
        raise ValueError("choose_prefetch: planner must use the same cost model and rule")

    seen: set = set()
    candidates = []  # (layer index, item, probability)
    for li, fc in enumerate(forecast):
        for it in fc.items:
            p = fc.probs.get(it.key, 0.0)
            if p > 0 and not it.cached and not it.in_flight and it.key not in seen and it.tokens > 0:
                seen.add(it.key)
                candidates.append((li, it, p))
    likely = [_likely_set(fc) for fc in forecast]
    # Items whose copies were chosen so far, per layer: key -> seconds after the layer starts.
    landed: list[dict[Hashable, float]] = [{} for _ in forecast]

    def layer_items(li: int, extra: WorkItem, extra_ready: float | None) -> list[WorkItem]:
        out = []
        chosen = landed[li]
        base = likely[li]
        if all(extra.key != x.key for x in base):
            # Top-k routing activates about as many items either way: k takes the place
            # of the least probable of the likely ones.
            base = base[:-1] + [extra] if base else [extra]
        for it in base:
            ready = extra_ready if it.key == extra.key else chosen.get(it.key)
            if ready is not None:
                it = dataclasses.replace(it, cached=ready <= 0.0, copy_ready_s=ready if ready > 0.0 else None)
            out.append(it)
        return out

    picks: list[Hashable] = []
    link_s = link_free_s
    while len(picks) < free_slots and candidates:
        best = None
        for ci, (li, it, p) in enumerate(candidates):
            land = link_s + cost.copy_time(it.weight_bytes)
            if link_idle_s is not None and land > link_idle_s:
                continue
            ready = max(0.0, land - forecast[li].start_s)
            before = planner.plan(layer_items(li, it, None)).makespan_s
            after = planner.plan(layer_items(li, it, ready)).makespan_s
            gain = p * (before - after)
            if gain > min_gain_s and (best is None or gain > best[0]):
                best = (gain, ci, land, ready)
        if best is None:
            break
        _, ci, land, ready = best
        li, it, _ = candidates.pop(ci)
        landed[li][it.key] = ready
        picks.append(it.key)
        link_s = land
    return picks
