"""Exhaustive reference planner: the exact optimum of the makespan model on small layers.

The plan space is 3^n placements, but for each item only two are ever worth trying:
DEVICE is only valid for a cached item, and COPY of a cached item is dominated by DEVICE
(same device time, ready later, link time spent). So every placement that matters is one
of 2^n device sets, and for each set the best order is fixed (readiness order on the
device, Johnson's order for new copies; see scheduler/makespan.py). This module scores
all 2^n sets at once with numpy, one vectorised step per item.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moe.scheduler.cost_model import CostModel
from moe.scheduler.makespan import LayerCosts
from moe.scheduler.planner import plan_from_device_set
from moe.scheduler.work import LayerPlan, WorkItem

__all__ = ["plan_exhaustive", "all_makespans", "MAX_EXHAUSTIVE_ITEMS"]

MAX_EXHAUSTIVE_ITEMS = 20  # 2^20 device sets x n steps is about the limit of a quick reference


def all_makespans(costs: LayerCosts, max_copies: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Makespan of every device set.

    Returns (on_dev_SN bool [2^n, n], makespan_S float64 [2^n]); sets with more than
    `max_copies` new copies get +inf.
    """
    n = costs.n
    if n > MAX_EXHAUSTIVE_ITEMS:
        raise ValueError(f"exhaustive search is limited to {MAX_EXHAUSTIVE_ITEMS} items, got {n}")
    s = np.arange(1 << n, dtype=np.int64)
    on_dev_SN = ((s[:, None] >> np.arange(n)) & 1).astype(bool)
    makespan_S, _ = costs.evaluate_many(on_dev_SN)
    if max_copies is not None:
        n_copies_S = (on_dev_SN & costs.needs_copy_N).sum(axis=1)
        makespan_S = np.where(n_copies_S > max_copies, np.inf, makespan_S)
    return on_dev_SN, makespan_S


def plan_exhaustive(
    items: Sequence[WorkItem],
    cost: CostModel,
    *,
    max_copies: int | None = None,
    link_free_s: float = 0.0,
) -> LayerPlan:
    """The makespan-optimal plan of one layer (reference for `plan_layer(rule="dynamic")`)."""
    costs = LayerCosts(items, cost, link_free_s=link_free_s)
    on_dev_SN, makespan_S = all_makespans(costs, max_copies)
    best = int(np.argmin(makespan_S))
    return plan_from_device_set(costs, on_dev_SN[best].tolist())
