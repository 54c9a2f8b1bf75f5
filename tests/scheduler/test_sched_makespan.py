"""Makespan simulator: hand-checked timelines, optimal orders against brute force, validation."""
import itertools
import math
import random

import numpy as np
import pytest
from sched_helpers import TableCost, random_expert_layer, random_table_layer

from moe.scheduler.makespan import LayerCosts, johnson_order, makespan, simulate
from moe.scheduler.work import Placement, WorkItem

C, D, P = Placement.CPU, Placement.DEVICE, Placement.COPY


def _item(key, nbytes=1, cached=False, ready=None):
    return WorkItem(key=key, tokens=1, weight_bytes=nbytes, flops_per_token=1, cached=cached, copy_ready_s=ready)


def test_hand_computed_timeline():
    """Cached work starts at once, copies queue on the link, the device waits for each copy."""
    # times: key -> (cpu, device); copy = bytes * 1e-3
    cost = TableCost({"a": (5.0, 1.0), "b": (4.0, 2.0), "c": (3.0, 1.5), "d": (2.0, 9.0)})
    items = [_item("a", cached=True), _item("b", 3000), _item("c", 1000), _item("d", 500)]
    # Device: a [0,1]; c copy [0,1] -> run [1,2.5]; b copy [1,4] -> run [4,6]. CPU: d = 2.
    t = simulate(items, {"a": D, "b": P, "c": P, "d": C}, cost, ["c", "b"])
    assert (t.cpu_s, t.link_s, t.device_s) == (2.0, 4.0, 6.0)
    # Order b first: b copy [0,3] -> run [3,5]; c copy [3,4] -> run [5,6.5].
    assert makespan(items, {"a": D, "b": P, "c": P, "d": C}, cost, ["b", "c"]) == 6.5
    # None picks Johnson's order, the better one here.
    assert makespan(items, {"a": D, "b": P, "c": P, "d": C}, cost) == 6.0


def test_in_flight_copies_hold_the_link():
    """A copy in flight delays new copies even when its own item runs on the CPU."""
    cost = TableCost({"x": (1.0, 1.0), "y": (9.0, 1.0)})
    items = [_item("x", ready=4.0), _item("y", 1000)]
    assert simulate(items, {"x": C, "y": P}, cost).device_s == 6.0  # link free at 4, copy 1, run 1
    # x runs [4,5]; y's copy [4,5] then runs [5,6]. With the link busy until 6: y lands 7, runs [7,8].
    assert simulate(items, {"x": P, "y": P}, cost).device_s == 6.0
    assert simulate(items, {"x": P, "y": P}, cost, link_free_s=6.0).device_s == 8.0


def _brute_force(items, on_dev, cost, link_free_s):
    """Independent reference: try every copy order and every device order."""
    cpu = sum(cost.cpu_time(it) for it, d in zip(items, on_dev) if not d)
    link0 = max([link_free_s] + [it.copy_ready_s for it in items if it.in_flight])
    new = [it for it, d in zip(items, on_dev) if d and not it.cached and not it.in_flight]
    dev = [it for it, d in zip(items, on_dev) if d]
    best = math.inf
    for copy_perm in itertools.permutations(new):
        ready, t = {}, link0
        for it in copy_perm:
            t += cost.copy_time(it.weight_bytes)
            ready[it.key] = t
        for it in dev:
            if it.cached:
                ready[it.key] = 0.0
            elif it.in_flight:
                ready[it.key] = it.copy_ready_s
        for dev_perm in itertools.permutations(dev):
            t = 0.0
            for it in dev_perm:
                t = max(t, ready[it.key]) + cost.device_time(it)
            best = min(best, max(cpu, t))
    return best


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_fixed_orders_are_optimal(n):
    """Readiness order on the device and Johnson's copy order match the best of all orders."""
    rng = random.Random(100 + n)
    for _ in range(60 if n < 5 else 12):
        make = random_table_layer if rng.random() < 0.5 else random_expert_layer
        items, cost, _, link_free_s = make(rng, n)
        on_dev = [rng.random() < 0.7 for _ in range(n)]
        placement = {it.key: (C if not d else D if it.cached else P) for it, d in zip(items, on_dev)}
        got = makespan(items, placement, cost, link_free_s=link_free_s)
        assert math.isclose(got, _brute_force(items, on_dev, cost, link_free_s), rel_tol=1e-12, abs_tol=1e-15)


def test_johnson_order_rule():
    """Short copies before long device runs first (ascending copy), the rest by device time descending."""
    a = [3.0, 1.0, 5.0, 2.0, 4.0]
    b = [6.0, 2.0, 1.0, 2.0, 7.0]
    assert johnson_order(range(5), a, b) == [1, 0, 4, 3, 2]


@pytest.mark.parametrize("n", [0, 1, 4, 9])
def test_vectorised_evaluation_matches_scalar(n):
    """evaluate_many scores each device set as evaluate does."""
    rng = random.Random(n)
    for _ in range(20):
        items, cost, _, link_free_s = random_expert_layer(rng, n)
        costs = LayerCosts(items, cost, link_free_s=link_free_s)
        sets_SN = np.array([[rng.random() < 0.5 for _ in range(n)] for _ in range(128)], dtype=bool).reshape(128, n)
        ms_S, _ = costs.evaluate_many(sets_SN)
        for s in range(128):
            assert math.isclose(ms_S[s], costs.evaluate(sets_SN[s].tolist()).makespan_s, rel_tol=1e-12, abs_tol=1e-18)


BAD_PLACEMENTS = [
    ({"a": D}, "no entry"),
    ({"a": D, "b": C, "z": C}, "not work items"),
    ({"a": D, "b": D}, "not cached"),
    ({"a": P, "b": C}, "cached"),
    ({"a": "device", "b": C}, "Placement"),
]


@pytest.mark.parametrize("placement,word", BAD_PLACEMENTS)
def test_bad_placement_is_rejected(placement, word):
    """Missing, extra, impossible or mistyped placements raise an error naming the problem."""
    cost = TableCost({"a": (1.0, 1.0), "b": (1.0, 1.0)})
    items = [_item("a", cached=True), _item("b", 10)]
    with pytest.raises(ValueError, match=word):
        makespan(items, placement, cost)


def test_bad_copy_order_and_duplicate_keys():
    """A copy order that misses or repeats copies, and duplicate item keys, are rejected."""
    cost = TableCost({"a": (1.0, 1.0), "b": (1.0, 1.0)})
    items = [_item("a", 10), _item("b", 10)]
    with pytest.raises(ValueError, match="copy_order"):
        makespan(items, {"a": P, "b": P}, cost, ["a"])
    with pytest.raises(ValueError, match="copy_order"):
        makespan(items, {"a": P, "b": C}, cost, ["a", "a"])
    with pytest.raises(ValueError, match="unique"):
        makespan([_item("a"), _item("a")], {"a": C}, cost)
    with pytest.raises(ValueError, match="link_free_s"):
        makespan(items, {"a": C, "b": C}, cost, link_free_s=-1.0)


class SharedTableCost(TableCost):
    """TableCost for a run whose "device" is the CPU itself."""

    shared_cores = True


def test_shared_cores_serialise_everything():
    """With shared cores the makespan is every CPU, copy and device second added up (plus earlier link work)."""
    cost = SharedTableCost({"a": (5.0, 1.0), "b": (4.0, 2.0), "c": (3.0, 1.5), "d": (2.0, 9.0)})
    items = [_item("a", cached=True), _item("b", 3000), _item("c", 1000), _item("d", 500)]
    placement = {"a": D, "b": P, "c": P, "d": C}
    assert makespan(items, placement, cost) == 2.0 + (3.0 + 1.0) + (1.0 + 2.0 + 1.5)
    assert makespan(items, placement, cost, link_free_s=1.0) == 1.0 + 2.0 + 4.0 + 4.5
    costs = LayerCosts(items, cost)
    ms_S, _ = costs.evaluate_many(np.ones((40, 4), dtype=bool))
    assert np.allclose(ms_S, (3.0 + 1.0 + 0.5) + (1.0 + 2.0 + 1.5 + 9.0))  # copies b, c, d; runs a..d
