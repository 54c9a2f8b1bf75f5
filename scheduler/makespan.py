"""Exact makespan of one layer under a placement: three resources running concurrently.

Resource model (what `plan_layer` optimises):

- CPU: one resource. CPU items run one after another, each using all CPU workers, from
  time 0; the CPU finishes at the sum of their `cpu_time`s.
- Link (copy stream): copies run one after another in `copy_order`. Copies already in
  flight (`copy_ready_s`) hold the link until the last of them lands, whether or not
  their item ends up on the device (a DMA in flight is not cancelled), and the link may
  be busy with earlier work until `link_free_s`; new copies start after both.
- Device: runs its items one after another. A cached item can start at once; an item
  that waits for a copy starts when its copy has landed and the device is free.

Makespan = max(CPU finish, device finish). When the cost model says `shared_cores` (the
"device" is the CPU itself, as in CPU-only runs), nothing overlaps: the makespan is also
at least the link's earlier work plus every CPU, copy and device second, one after another.

Given which items go to the device, the best
order is fixed, so it needs no search:
- the device takes items in order of readiness (cached, then copies in flight by
  landing time, then new copies): earliest-release-date order is optimal for one
  machine with release times;
- new copies go in Johnson's order (copy time < device time first, by copy time
  ascending; then the rest by device time descending). Copy then device compute is a
  two-machine flow shop; the cached and in-flight work only delays when the device is
  free for new copies, which acts like one fixed first job, so Johnson's rule stays
  optimal (`tests/scheduler/test_sched_makespan.py` checks it against all orders).
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from moe.scheduler.cost_model import CostModel
from moe.scheduler.work import Placement, WorkItem

__all__ = ["makespan", "simulate", "Timeline", "johnson_order", "LayerCosts"]

# evaluate_many scores batches of at most this many (set, item) cells in plain Python.
_SCALAR_CELLS = 96


@dataclass(frozen=True)
class Timeline:
    """Finishing times (seconds from the start of the layer) of the three resources.

    device_busy_s: seconds the device computes (device_s minus its idle waits for copies).
    """

    cpu_s: float
    link_s: float
    device_s: float
    device_busy_s: float = 0.0

    @property
    def makespan_s(self) -> float:
        return max(self.cpu_s, self.device_s)


class LayerCosts:
    """Per-item times of one layer, computed once, and a fast evaluator over device sets.

    Item i goes to the device side when `on_dev[i]` is true: DEVICE if cached, else COPY
    (a new copy, or the copy already in flight). Everything else runs on the CPU.
    """

    def __init__(self, items: Sequence[WorkItem], cost: CostModel, *, link_free_s: float = 0.0) -> None:
        if link_free_s < 0:
            raise ValueError(f"link_free_s must be >= 0, got {link_free_s}")
        keys = [it.key for it in items]
        if len(set(keys)) != len(keys):
            seen: set = set()
            dup = next(k for k in keys if k in seen or seen.add(k))
            raise ValueError(f"work item keys must be unique within a layer; {dup!r} appears twice")
        self.items = list(items)
        self.keys = keys
        self.n = len(items)
        self.cpu = [float(cost.cpu_time(it)) for it in items]
        self.dev = [float(cost.device_time(it)) for it in items]
        self.copy = [0.0 if it.cached or it.in_flight else float(cost.copy_time(it.weight_bytes)) for it in items]
        self.cached = [it.cached for it in items]
        self.ready = [it.copy_ready_s for it in items]
        self.needs_copy = [not it.cached and not it.in_flight for it in items]
        in_flight = [r for r in self.ready if r is not None]
        self.link_start = max([float(link_free_s)] + in_flight)
        self.shared_cores = bool(cost.shared_cores)
        cached_idx = [i for i in range(self.n) if self.cached[i]]
        flight_idx = sorted((i for i in range(self.n) if self.ready[i] is not None), key=lambda i: self.ready[i])
        new_idx = johnson_order([i for i in range(self.n) if self.needs_copy[i]], self.copy, self.dev)
        self.old_order = cached_idx + flight_idx
        self.new_order = new_idx
        self._cpu_N = np.asarray(self.cpu, dtype=np.float64)
        self._dev_N = np.asarray(self.dev, dtype=np.float64)
        self.needs_copy_N = np.asarray(self.needs_copy, dtype=bool)
        self._cached_idx = np.asarray(cached_idx, dtype=np.int64)
        self._flight_idx = flight_idx
        self._copy_new_M = np.asarray([self.copy[i] for i in new_idx], dtype=np.float64)
        self._dev_new_M = np.asarray([self.dev[i] for i in new_idx], dtype=np.float64)

    def evaluate(self, on_dev: Sequence[bool]) -> Timeline:
        """Timeline with new copies in Johnson order (optimal for this device set)."""
        return self._run(on_dev, self.new_order)

    def evaluate_many(self, on_dev_SN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score many device sets at once (the vectorised twin of `evaluate`).

        on_dev_SN: bool [S, n], one device set per row.
        Returns (makespan_S, busy_S) float64 [S]: makespan, and the busy seconds of all
        three resources together (used to break ties toward less work).
        """
        n_sets = on_dev_SN.shape[0]
        if n_sets * self.n <= _SCALAR_CELLS:
            # Tiny batches: numpy's per-call overhead outweighs the work; score row by row.
            rows = [self._score(row) for row in on_dev_SN.tolist()]
            return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
        on_f_SN = on_dev_SN.astype(np.float64)
        cpu_S = (1.0 - on_f_SN) @ self._cpu_N
        # Cached items run back to back from time 0; copies in flight wait for landing.
        dev_S = on_f_SN[:, self._cached_idx] @ self._dev_N[self._cached_idx]
        for i in self._flight_idx:
            dev_S = np.where(on_dev_SN[:, i], np.maximum(dev_S, self.ready[i]) + self.dev[i], dev_S)
        # New copies in Johnson order: copy j lands at link_j (prefix sum); the device
        # finishes at the latest of "free after old work, then all new runs" and, for each
        # chosen j, "start at link_j, then run j and every later new item".
        on_new_SM = on_f_SN[:, self.new_order]
        link_SM = self.link_start + np.cumsum(on_new_SM * self._copy_new_M, axis=1)
        run_SM = on_new_SM * self._dev_new_M
        tail_SM = np.cumsum(run_SM[:, ::-1], axis=1)[:, ::-1]
        if self.new_order:
            blocks_S = np.where(on_new_SM > 0, link_SM + tail_SM, -np.inf).max(axis=1)
            dev_S = np.maximum(dev_S + tail_SM[:, 0], blocks_S)
            link_S = link_SM[:, -1]
        else:
            link_S = np.full(n_sets, self.link_start)
        dev_busy_S = on_f_SN @ self._dev_N
        busy_S = cpu_S + (link_S - self.link_start) + dev_busy_S
        if self.shared_cores:
            dev_S = np.maximum(dev_S, self.link_start + busy_S)
        return np.maximum(cpu_S, dev_S), busy_S

    def _score(self, on_dev: Sequence[bool]) -> tuple[float, float]:
        """(makespan, busy seconds of all three resources) of one device set, Johnson copy order."""
        t = self._run(on_dev, self.new_order)
        return t.makespan_s, t.cpu_s + (t.link_s - self.link_start) + t.device_busy_s

    def _run(self, on_dev: Sequence[bool], new_order: Sequence[int]) -> Timeline:
        cpu_s = 0.0
        for i in range(self.n):
            if not on_dev[i]:
                cpu_s += self.cpu[i]
        dev_s = dev_busy_s = 0.0
        for i in self.old_order:
            if on_dev[i]:
                dev_busy_s += self.dev[i]
                r = self.ready[i]
                dev_s = (dev_s if r is None or r <= dev_s else r) + self.dev[i]
        link_s = self.link_start
        for i in new_order:
            if on_dev[i]:
                dev_busy_s += self.dev[i]
                link_s += self.copy[i]
                dev_s = (dev_s if dev_s >= link_s else link_s) + self.dev[i]
        if self.shared_cores:
            # One pool of cores does everything, one item after another.
            dev_s = max(dev_s, cpu_s + link_s + dev_busy_s)
        return Timeline(cpu_s=cpu_s, link_s=link_s, device_s=dev_s, device_busy_s=dev_busy_s)


def johnson_order(idx: Sequence[int], a: Sequence[float], b: Sequence[float]) -> list[int]:
    """Johnson's optimal order for a two-machine flow shop (machine 1 times a, machine 2 times b)."""
    first = sorted((i for i in idx if a[i] < b[i]), key=lambda i: (a[i], i))
    last = sorted((i for i in idx if a[i] >= b[i]), key=lambda i: (-b[i], i))
    return first + last


def _check_placement(costs: LayerCosts, placement: Mapping[Hashable, Placement]) -> list[bool]:
    missing = [k for k in costs.keys if k not in placement]
    if missing:
        raise ValueError(f"placement has no entry for work items {missing[:5]}")
    extra = set(placement) - set(costs.keys)
    if extra:
        raise ValueError(f"placement names keys that are not work items of this layer: {sorted(map(repr, extra))[:5]}")
    on_dev = []
    for it in costs.items:
        p = placement[it.key]
        if not isinstance(p, Placement):
            raise ValueError(f"placement of {it.key!r} must be a Placement, got {p!r}")
        if p is Placement.DEVICE and not it.cached:
            raise ValueError(f"{it.key!r} is placed DEVICE but its weights are not cached; use COPY")
        if p is Placement.COPY and it.cached:
            raise ValueError(f"{it.key!r} is cached; place it DEVICE (copying it again only costs link time)")
        on_dev.append(p is not Placement.CPU)
    return on_dev


def simulate(
    items: Sequence[WorkItem],
    placement: Mapping[Hashable, Placement],
    cost: CostModel,
    copy_order: Sequence[Hashable] | None = None,
    *,
    link_free_s: float = 0.0,
) -> Timeline:
    """Finishing times of CPU, link and device for `placement`.

    copy_order: the keys that need a new copy (COPY items with no copy in flight), each
    once, in issue order; None uses Johnson's order, the optimal one.
    """
    costs = LayerCosts(items, cost, link_free_s=link_free_s)
    on_dev = _check_placement(costs, placement)
    if copy_order is None:
        return costs.evaluate(on_dev)
    pos = {k: i for i, k in enumerate(costs.keys)}
    want = {costs.keys[i] for i in range(costs.n) if on_dev[i] and costs.needs_copy[i]}
    order = list(copy_order)
    if len(order) != len(set(order)) or set(order) != want:
        raise ValueError(
            "copy_order must list each COPY item without a copy in flight exactly once; "
            f"expected {sorted(map(repr, want))}, got {[repr(k) for k in order]}"
        )
    return costs._run(on_dev, [pos[k] for k in order])


def makespan(
    items: Sequence[WorkItem],
    placement: Mapping[Hashable, Placement],
    cost: CostModel,
    copy_order: Sequence[Hashable] | None = None,
    *,
    link_free_s: float = 0.0,
) -> float:
    """Seconds until the layer's last item finishes (see the module docstring for the model)."""
    return simulate(items, placement, cost, copy_order, link_free_s=link_free_s).makespan_s
