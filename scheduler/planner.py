"""Intra-layer planner: place each active item on the device (cached / after a copy) or the CPU.

Rules (`RuntimeConfig.scheduler`):

- dynamic: minimal makespan under the three-resource model of `scheduler/makespan.py`
  (CPU items one after another using all cores; copies one after another on the link;
  device compute of an item after its copy lands). A two-ended list schedule (HybriMoE)
  followed by local improvement; checked against exhaustive search in the tests.
- simple: cached -> DEVICE; copy in flight or tokens >= copy_threshold_tokens -> COPY; else CPU.
- gpu-only: every item on the device (uncached ones copied).
- cpu-only: every item on the CPU, cached or not.
- static: items in `hot` run on the device (copied if not yet cached); all else on the CPU.
- fiddler: cached -> DEVICE; otherwise COPY when copy + device time < CPU time for that
  item alone (no overlap assumed), else CPU.

Every rule honours `max_copies` (free or evictable device slots): at most that many new
copies; the items that would have been copied with the least benefit go to the CPU
instead. Copies already in flight need no new slot. All rules get Johnson's copy order
and the makespan predicted by the same simulator, so their plans compare directly.
"""
from __future__ import annotations

import collections
import functools
import itertools
from collections.abc import Collection, Hashable, Sequence

import numpy as np

from moe.scheduler.cost_model import CostModel
from moe.scheduler.makespan import LayerCosts
from moe.scheduler.work import LayerPlan, Placement, WorkItem

__all__ = ["plan_layer", "LayerPlanner", "RULES", "plan_from_device_set"]

RULES = ("dynamic", "simple", "gpu-only", "cpu-only", "static", "fiddler")

# Flipping k items at once costs O(n^(k+1)) per pass; larger layers try fewer at once,
# which is where the list schedule is already close (many small items even out).
_PAIR_LIMIT = 64
_TRIPLE_LIMIT = 16
# Largest move tried from every start on small / large layers (the best local optimum
# then gets every move its size allows).
_START_K_SMALL, _START_K_LARGE = 2, 1
# Starts improved on large layers (the best ones by their own makespan).
_LARGE_STARTS = 3
# Relative slack under which two makespans count as equal (then fewer busy seconds win).
_REL_EPS = 1e-9


def plan_layer(
    items: Sequence[WorkItem],
    cost: CostModel,
    *,
    rule: str = "dynamic",
    max_copies: int | None = None,
    hot: Collection[Hashable] = frozenset(),
    copy_threshold_tokens: int = 8,
    link_free_s: float = 0.0,
) -> LayerPlan:
    """Plan one layer.

    items: the layer's active work items (unique keys).
    max_copies: bound on new copies (free/evictable device slots); None = unbounded.
    hot: keys pinned on the device for rule="static".
    copy_threshold_tokens: token threshold of rule="simple".
    link_free_s: seconds until the copy stream is free of earlier work (e.g. prefetches).
    Returns a LayerPlan whose makespan_s is the simulated makespan with Johnson's copy order.
    """
    if rule not in RULES:
        raise ValueError(f"unknown scheduler rule {rule!r}; choose one of {', '.join(RULES)}")
    if max_copies is not None and (isinstance(max_copies, bool) or not isinstance(max_copies, int) or max_copies < 0):
        raise ValueError(f"max_copies must be None or an int >= 0, got {max_copies!r}")
    if copy_threshold_tokens < 1:
        raise ValueError(f"copy_threshold_tokens must be >= 1, got {copy_threshold_tokens}")
    costs = LayerCosts(items, cost, link_free_s=link_free_s)
    limit = costs.n if max_copies is None else max_copies
    if rule == "dynamic":
        on_dev = _dynamic(costs, limit)
    else:
        want = _rule_choice(costs, rule, set(hot), copy_threshold_tokens)
        on_dev = _cap_copies(costs, want, limit)
    return plan_from_device_set(costs, on_dev)


def plan_from_device_set(costs: LayerCosts, on_dev: Sequence[bool]) -> LayerPlan:
    """LayerPlan for a device set: placements, Johnson copy order, simulated makespan."""
    placement = {}
    for i, key in enumerate(costs.keys):
        if not on_dev[i]:
            placement[key] = Placement.CPU
        else:
            placement[key] = Placement.DEVICE if costs.cached[i] else Placement.COPY
    order = [costs.keys[i] for i in costs.new_order if on_dev[i]]
    return LayerPlan(placement=placement, copy_order=order, makespan_s=costs.evaluate(on_dev).makespan_s)


def _rule_choice(costs: LayerCosts, rule: str, hot: set, threshold: int) -> list[bool]:
    items = costs.items
    if rule == "cpu-only":
        return [False] * costs.n
    if rule == "gpu-only":
        return [True] * costs.n
    if rule == "static":
        return [it.key in hot for it in items]
    if rule == "simple":
        return [it.cached or it.in_flight or it.tokens >= threshold for it in items]
    # fiddler: each item on its own, no overlap between copy and compute.
    out = []
    for i, it in enumerate(items):
        if it.cached:
            out.append(True)
            continue
        wait = it.copy_ready_s if it.in_flight else costs.copy[i]
        out.append(wait + costs.dev[i] < costs.cpu[i])
    return out


def _cap_copies(costs: LayerCosts, on_dev: list[bool], limit: int) -> list[bool]:
    """Send the least useful new copies to the CPU until at most `limit` remain."""
    copies = [i for i in range(costs.n) if on_dev[i] and costs.needs_copy[i]]
    if len(copies) <= limit:
        return on_dev
    # Benefit of copying = CPU seconds saved minus device-side seconds spent.
    copies.sort(key=lambda i: (costs.cpu[i] - costs.copy[i] - costs.dev[i], costs.items[i].tokens), reverse=True)
    out = list(on_dev)
    for i in copies[limit:]:
        out[i] = False
    return out


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """a strictly better than b: lower makespan, or equal makespan and fewer busy seconds."""
    tol = _REL_EPS * max(abs(a[0]), abs(b[0]), 1e-30)
    if a[0] < b[0] - tol:
        return True
    return abs(a[0] - b[0]) <= tol and a[1] < b[1] - _REL_EPS * max(abs(a[1]), abs(b[1]), 1e-30)


@functools.lru_cache(maxsize=64)
def _flip_masks(n: int, k: int) -> np.ndarray:
    """bool [C(n,k), n]: one row per way of choosing k of n items to flip."""
    groups_GK = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64).reshape(-1, k)
    masks_GN = np.zeros((groups_GK.shape[0], n), dtype=bool)
    np.put_along_axis(masks_GN, groups_GK, True, axis=1)
    masks_GN.flags.writeable = False
    return masks_GN


def _two_ended(costs: LayerCosts, limit: int) -> list[bool]:
    """HybriMoE's list schedule: device takes cached then high-load items, CPU takes low-load ones.

    Items are sorted so the device end sees cached items first, then copies in flight,
    then the rest by tokens (descending); the CPU end sees the lowest loads. At each step
    the end whose finishing time after taking its next item is lower takes it. The device
    end's time assumes copies in the order taken (an upper bound on Johnson's order,
    and O(1) per step); local search then works with exact makespans.
    """
    n = costs.n
    order = sorted(
        range(n),
        key=lambda i: (not costs.cached[i], costs.ready[i] is None, -costs.items[i].tokens, -costs.cpu[i]),
    )
    on_dev = [False] * n
    lo, hi, cpu_s, copies = 0, n - 1, 0.0, 0
    dev_s, link_s = 0.0, costs.link_start
    while lo <= hi:
        i, j = order[lo], order[hi]
        if costs.needs_copy[i] and copies >= limit:
            lo += 1  # no slot left: this item can only run on the CPU
            cpu_s += costs.cpu[i]
            continue
        ready = 0.0
        if costs.needs_copy[i]:
            ready = link_s + costs.copy[i]
        elif costs.ready[i] is not None:
            ready = costs.ready[i]
        dev_finish = max(dev_s, ready) + costs.dev[i]
        if dev_finish <= cpu_s + costs.cpu[j]:
            on_dev[i] = True
            dev_s = dev_finish
            if costs.needs_copy[i]:
                copies += 1
                link_s = ready
            lo += 1
        else:
            cpu_s += costs.cpu[j]
            hi -= 1
    return on_dev


def _local_search(
    costs: LayerCosts, on_dev: list[bool], limit: int, max_k: int = 3
) -> tuple[list[bool], tuple[float, float]]:
    """Flip the side of 1, then 2, then 3 items at a time (best improvement), back to 1 after any gain.

    Pairs cover swaps between the ends; triples catch the exchanges where a cached item
    must leave the device for a copied item to fit while a third changes side. Larger k
    runs only on smaller layers; each neighbourhood is scored in one vectorised call.
    """
    n = costs.n
    cur_N = np.asarray(on_dev, dtype=bool)
    ms, busy = costs.evaluate_many(cur_N[None, :])
    best = (float(ms[0]), float(busy[0]))
    while True:
        for k, max_n in ((1, n), (2, _PAIR_LIMIT), (3, _TRIPLE_LIMIT)):
            if k > max_k or n < k or n > max_n:
                continue
            cand_GN = cur_N[None, :] ^ _flip_masks(n, k)
            ms_G, busy_G = costs.evaluate_many(cand_GN)
            copies_G = (cand_GN & costs.needs_copy_N).sum(axis=1)
            ms_G = np.where(copies_G > limit, np.inf, ms_G)
            floor = ms_G.min()
            if not np.isfinite(floor):
                continue
            near_G = ms_G <= floor + _REL_EPS * max(abs(floor), 1e-30)
            g = int(np.argmin(np.where(near_G, busy_G, np.inf)))
            cand = (float(ms_G[g]), float(busy_G[g]))
            if _better(cand, best):
                cur_N, best = cand_GN[g].copy(), cand
                break
        else:
            return cur_N.tolist(), best


def _dynamic(costs: LayerCosts, limit: int) -> list[bool]:
    """Local search from the list schedule and three simple plans; larger moves polish the best."""
    if costs.n == 0:
        return []
    starts = [
        _two_ended(costs, limit),
        [bool(c) for c in costs.cached],  # keep what is cached, compute the rest on the CPU
        _cap_copies(costs, _rule_choice(costs, "fiddler", set(), 1), limit),
        _cap_copies(costs, [True] * costs.n, limit),
    ]
    small = costs.n <= _TRIPLE_LIMIT
    if not small:
        # Large layers: a pass costs O(n^2) and a far start needs O(n) passes, so only
        # the most promising starts are improved.
        ms_S, busy_S = costs.evaluate_many(np.asarray(starts, dtype=bool))
        ranked = sorted(range(len(starts)), key=lambda s: (ms_S[s], busy_S[s]))
        starts = [starts[s] for s in ranked[:_LARGE_STARTS]]
    start_k = _START_K_SMALL if small else _START_K_LARGE
    best_set, best_score = None, None
    seen = set()
    for start in starts:
        sig = tuple(start)
        if sig in seen:
            continue
        seen.add(sig)
        cand, score = _local_search(costs, start, limit, max_k=start_k)
        if best_score is None or _better(score, best_score):
            best_set, best_score = cand, score
    if costs.n <= _PAIR_LIMIT:  # larger moves left to try on the best local optimum
        best_set, _ = _local_search(costs, best_set, limit, max_k=3)
    return best_set


class LayerPlanner:
    """`plan_layer` with one cost model and rule, remembering the plans of layers it has seen.

    Decode repeats the same layer shapes over and over (same token counts, same cached
    flags; only the expert ids differ), so plans are memoised by the items' cost-relevant
    fields, not their keys. The cost model must not change while the planner lives
    (make a new planner after re-calibrating).
    """

    def __init__(self, cost: CostModel, *, rule: str = "dynamic", copy_threshold_tokens: int = 8,
                 cache_size: int = 4096) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown scheduler rule {rule!r}; choose one of {', '.join(RULES)}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        if copy_threshold_tokens < 1:
            raise ValueError(f"copy_threshold_tokens must be >= 1, got {copy_threshold_tokens}")
        self.cost = cost
        self.rule = rule
        self.copy_threshold_tokens = copy_threshold_tokens
        self.cache_size = cache_size
        self._memo: collections.OrderedDict = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def plan(self, items: Sequence[WorkItem], *, max_copies: int | None = None,
             hot: Collection[Hashable] = frozenset(), link_free_s: float = 0.0) -> LayerPlan:
        """plan_layer(items, self.cost, rule=self.rule, ...), up to swapping interchangeable items."""
        hot = set(hot)
        sigs = [
            (it.tokens, it.weight_bytes, it.flops_per_token, it.cached, it.copy_ready_s if it.in_flight else -1.0,
             it.kind, it.bytes_read, it.cpu_bytes_read, self.rule == "static" and it.key in hot)
            for it in items
        ]
        order = sorted(range(len(items)), key=lambda i: sigs[i])
        memo_key = (tuple(sigs[i] for i in order), max_copies, float(link_free_s))
        sorted_on_dev = self._memo.get(memo_key)
        if sorted_on_dev is not None:
            self.hits += 1
            self._memo.move_to_end(memo_key)
            costs = LayerCosts(items, self.cost, link_free_s=link_free_s)
            on_dev = [False] * len(items)
            for j, i in enumerate(order):
                on_dev[i] = sorted_on_dev[j]
            return plan_from_device_set(costs, on_dev)
        self.misses += 1
        plan = plan_layer(items, self.cost, rule=self.rule, max_copies=max_copies, hot=hot,
                          copy_threshold_tokens=self.copy_threshold_tokens, link_free_s=link_free_s)
        if self.cache_size:
            self._memo[memo_key] = tuple(plan.placement[items[i].key] is not Placement.CPU for i in order)
            if len(self._memo) > self.cache_size:
                self._memo.popitem(last=False)
        return plan
