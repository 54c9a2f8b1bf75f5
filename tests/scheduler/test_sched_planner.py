"""Intra-layer planner: rule semantics, slot bounds, and the heuristic against exhaustive search."""
import math
import random

import numpy as np
import pytest
from sched_helpers import TableCost, random_expert_layer, random_table_layer

from moe.scheduler.exhaustive import all_makespans, plan_exhaustive
from moe.scheduler.makespan import LayerCosts, makespan
from moe.scheduler.planner import RULES, plan_layer
from moe.scheduler.work import Placement, WorkItem

C, D, P = Placement.CPU, Placement.DEVICE, Placement.COPY


def _layer():
    """Five experts: two cached, one in flight, two uncached with few and many tokens."""
    cost = TableCost({"c1": (4.0, 1.0), "c2": (3.0, 1.0), "f": (5.0, 1.0), "big": (20.0, 2.0), "small": (0.5, 1.0)})
    items = [
        WorkItem(key="c1", tokens=4, weight_bytes=1000, flops_per_token=1, cached=True),
        WorkItem(key="c2", tokens=1, weight_bytes=1000, flops_per_token=1, cached=True),
        WorkItem(key="f", tokens=2, weight_bytes=1000, flops_per_token=1, copy_ready_s=0.5),
        WorkItem(key="big", tokens=64, weight_bytes=1000, flops_per_token=1),
        WorkItem(key="small", tokens=1, weight_bytes=1000, flops_per_token=1),
    ]
    return items, cost


EXPECTED = {
    "cpu-only": {"c1": C, "c2": C, "f": C, "big": C, "small": C},
    "gpu-only": {"c1": D, "c2": D, "f": P, "big": P, "small": P},
    "simple": {"c1": D, "c2": D, "f": P, "big": P, "small": C},
    "static": {"c1": D, "c2": C, "f": C, "big": P, "small": C},
    # fiddler: big 1 + 2 < 20 copies; small 1 + 1 > 0.5 stays; f waits 0.5 + 1 < 5.
    "fiddler": {"c1": D, "c2": D, "f": P, "big": P, "small": C},
}


@pytest.mark.parametrize("rule", sorted(EXPECTED))
def test_fixed_rules_place_as_documented(rule):
    """Each non-optimising rule places items exactly as its definition says."""
    items, cost = _layer()
    plan = plan_layer(items, cost, rule=rule, hot={"c1", "big"})
    assert plan.placement == EXPECTED[rule]
    assert math.isclose(plan.makespan_s, makespan(items, plan.placement, cost, plan.copy_order))


def test_dynamic_finds_the_optimum_on_the_example():
    """On the example layer the dynamic rule equals the exhaustive optimum."""
    items, cost = _layer()
    plan = plan_layer(items, cost)
    assert math.isclose(plan.makespan_s, plan_exhaustive(items, cost).makespan_s)
    assert plan.placement["big"] is P and plan.placement["small"] is C


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("max_copies", [0, 1, 2])
def test_every_rule_honours_max_copies(rule, max_copies):
    """No rule issues more new copies than there are free slots; copies in flight need none."""
    rng = random.Random(max_copies)
    for n in (1, 3, 6, 11):
        items, cost, _, link_free_s = random_expert_layer(rng, n)
        plan = plan_layer(items, cost, rule=rule, max_copies=max_copies, hot={it.key for it in items[::2]},
                          link_free_s=link_free_s)
        new = [k for k in plan.copy_order]
        assert len(new) <= max_copies
        assert set(plan.placement) == {it.key for it in items}
        in_flight = {it.key for it in items if it.in_flight}
        assert set(plan.keys(P)) - in_flight == set(new)
        assert math.isclose(plan.makespan_s,
                            makespan(items, plan.placement, cost, plan.copy_order, link_free_s=link_free_s))


def test_dynamic_is_no_worse_than_its_starting_rules():
    """dynamic never loses to fiddler, gpu-only or keeping only the cached items on the device."""
    rng = random.Random(5)
    sizes = [rng.randint(1, 12) for _ in range(200)] + [20, 40, 64, 100, 128]  # large layers take another path
    for n in sizes:
        items, cost, max_copies, link_free_s = random_expert_layer(rng, n)
        dyn = plan_layer(items, cost, max_copies=max_copies, link_free_s=link_free_s).makespan_s
        for rule in ("fiddler", "gpu-only"):
            other = plan_layer(items, cost, rule=rule, max_copies=max_copies, link_free_s=link_free_s).makespan_s
            assert dyn <= other * (1 + 1e-9)
        cached = plan_layer(items, cost, rule="static", hot={it.key for it in items if it.cached},
                            link_free_s=link_free_s).makespan_s
        assert dyn <= cached * (1 + 1e-9)


def test_empty_layer_and_bad_arguments():
    """An empty layer plans to nothing; unknown rules and bad slot counts are rejected."""
    plan = plan_layer([], TableCost({}))
    assert plan.placement == {} and plan.copy_order == [] and plan.makespan_s == 0.0
    items, cost = _layer()
    with pytest.raises(ValueError, match="dynamc"):
        plan_layer(items, cost, rule="dynamc")
    with pytest.raises(ValueError, match="max_copies"):
        plan_layer(items, cost, max_copies=-1)
    with pytest.raises(ValueError, match="copy_threshold_tokens"):
        plan_layer(items, cost, copy_threshold_tokens=0)


@pytest.mark.parametrize("make", [random_expert_layer, random_table_layer], ids=["experts", "unrelated-times"])
def test_heuristic_against_exhaustive_search(make):
    """Over 1,000 random layers of 1..10 items: within 5% of the optimum in >= 99%, never over 15%."""
    rng = random.Random(2024)
    ratios, sizes = [], []
    for case in range(1000):
        n = case % 10 + 1  # every size 1..10 appears 100 times
        items, cost, max_copies, link_free_s = make(rng, n)
        plan = plan_layer(items, cost, max_copies=max_copies, link_free_s=link_free_s)
        _, ms_S = all_makespans(LayerCosts(items, cost, link_free_s=link_free_s), max_copies)
        best = float(ms_S.min())
        assert plan.makespan_s >= best * (1 - 1e-9)  # the optimum is a lower bound
        ratios.append(plan.makespan_s / best if best > 0 else 1.0)
        sizes.append(n)
    ratios = np.array(ratios)
    assert sorted(set(sizes)) == list(range(1, 11))
    assert (ratios <= 1.05).mean() >= 0.99
    assert ratios.max() <= 1.15


def test_exhaustive_plan_is_optimal_and_bounded():
    """plan_exhaustive beats or ties every rule and refuses layers too large to enumerate."""
    rng = random.Random(9)
    for _ in range(30):
        items, cost, max_copies, link_free_s = random_expert_layer(rng, rng.randint(0, 8))
        best = plan_exhaustive(items, cost, max_copies=max_copies, link_free_s=link_free_s)
        assert len(best.copy_order) <= (len(items) if max_copies is None else max_copies)
        for rule in RULES:
            other = plan_layer(items, cost, rule=rule, max_copies=max_copies, link_free_s=link_free_s)
            assert best.makespan_s <= other.makespan_s * (1 + 1e-9)
    many = [WorkItem(key=i, tokens=1, weight_bytes=1, flops_per_token=1) for i in range(21)]
    with pytest.raises(ValueError, match="limited"):
        plan_exhaustive(many, TableCost({i: (1.0, 1.0) for i in range(21)}))


class SharedTableCost(TableCost):
    """TableCost for a run whose "device" is the CPU itself."""

    shared_cores = True


def test_shared_cores_pick_the_cheaper_side_per_item():
    """When nothing overlaps, the best plan runs each item where it costs least, and dynamic finds it."""
    rng = random.Random(11)
    for n in range(1, 11):
        times = {i: (rng.uniform(0.1, 5), rng.uniform(0.1, 5)) for i in range(n)}
        cost = SharedTableCost(times)
        items = [WorkItem(key=i, tokens=1, weight_bytes=rng.randint(0, 3000), flops_per_token=1,
                          cached=rng.random() < 0.4) for i in range(n)]
        want = sum(min(cost.cpu_time(it), cost.device_time(it) + (0 if it.cached else cost.copy_time(it.weight_bytes)))
                   for it in items)
        assert math.isclose(plan_layer(items, cost).makespan_s, want, rel_tol=1e-12)
        assert math.isclose(plan_exhaustive(items, cost).makespan_s, want, rel_tol=1e-12)
