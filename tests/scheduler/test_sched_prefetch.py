"""Impact-driven prefetch choice and the memoising LayerPlanner."""
import math
import random

import pytest
from sched_helpers import TableCost, random_expert_layer

from moe.scheduler.cost_model import AnalyticCostModel
from moe.scheduler.planner import LayerPlanner, plan_layer
from moe.scheduler.prefetch import LayerForecast, choose_prefetch
from moe.scheduler.work import WorkItem

D, F = 2048, 1408  # DeepSeek-V2-Lite expert
NBYTES = 3 * D * F * 2
# A machine where a copied expert with many tokens beats the CPU by far, and one token does not.
COST = AnalyticCostModel(cpu_read_gbps=40, cpu_gflops=400, h2d_gbps=25, device_read_gbps=2000, device_gflops=2e5)


def _layer(tokens, cached=(), layer=1):
    return [WorkItem(key=(layer, e), tokens=t, weight_bytes=NBYTES, flops_per_token=6 * D * F, cached=e in cached)
            for e, t in enumerate(tokens)]


def test_prefers_the_likely_heavy_expert():
    """The probable expert with many tokens is copied first; improbable or cached ones are not."""
    items = _layer([64, 64, 64, 64], cached={0})
    fc = LayerForecast(items=items, probs={(1, 0): 1.0, (1, 1): 0.9, (1, 2): 0.1, (1, 3): 0.05}, start_s=0.01)
    assert choose_prefetch([fc], COST, free_slots=1) == [(1, 1)]
    picks = choose_prefetch([fc], COST, free_slots=3)
    assert picks[0] == (1, 1) and (1, 0) not in picks


def test_no_gain_no_copy():
    """A one-token expert that the CPU runs faster than a copy lands is not prefetched."""
    items = _layer([1, 1])
    fc = LayerForecast(items=items, probs={(1, 0): 1.0, (1, 1): 1.0}, start_s=0.0)
    slow_link = AnalyticCostModel(h2d_gbps=1.0)
    assert choose_prefetch([fc], slow_link, free_slots=2) == []


def test_respects_slots_link_idle_time_and_in_flight():
    """Never more picks than free slots, every copy lands within the idle window, in-flight items are skipped."""
    items = _layer([64] * 6)
    items[2] = WorkItem(key=(1, 2), tokens=64, weight_bytes=NBYTES, flops_per_token=6 * D * F, copy_ready_s=0.001)
    fc = LayerForecast(items=items, probs={it.key: 1.0 for it in items}, start_s=0.05)
    assert choose_prefetch([fc], COST, free_slots=0) == []
    picks = choose_prefetch([fc], COST, free_slots=4)
    assert len(picks) == 4 and (1, 2) not in picks and len(set(picks)) == 4
    one_copy = COST.copy_time(NBYTES)
    assert len(choose_prefetch([fc], COST, free_slots=4, link_idle_s=2.5 * one_copy)) == 2
    assert choose_prefetch([fc], COST, free_slots=4, link_idle_s=2.5 * one_copy, link_free_s=2 * one_copy) == []


def test_nearer_layer_wins_when_only_it_can_use_the_copy_in_time():
    """With one slot, the copy goes to whichever layer's expert saves more given when each layer starts."""
    near = LayerForecast(items=_layer([64, 1], layer=1), probs={(1, 0): 1.0, (1, 1): 1.0}, start_s=0.0)
    far = LayerForecast(items=_layer([64, 1], layer=2), probs={(2, 0): 1.0, (2, 1): 1.0}, start_s=1.0)
    # The far layer has time for the copy to land, so its expert becomes fully cached: larger gain.
    assert choose_prefetch([near, far], COST, free_slots=1) == [(2, 0)]


def test_bad_forecasts_are_rejected():
    """Probabilities outside [0, 1], duplicate keys, negative times and bad slot counts raise."""
    items = _layer([4, 4])
    with pytest.raises(ValueError, match="probability"):
        LayerForecast(items=items, probs={(1, 0): 1.5})
    with pytest.raises(ValueError, match="unique"):
        LayerForecast(items=items + items[:1], probs={})
    with pytest.raises(ValueError, match="start_s"):
        LayerForecast(items=items, probs={}, start_s=-1.0)
    fc = LayerForecast(items=items, probs={(1, 0): 1.0})
    with pytest.raises(ValueError, match="free_slots"):
        choose_prefetch([fc], COST, free_slots=-1)
    with pytest.raises(ValueError, match="link_idle_s"):
        choose_prefetch([fc], COST, free_slots=1, link_idle_s=-1.0)
    with pytest.raises(ValueError, match="same cost model"):
        choose_prefetch([fc], COST, free_slots=1, planner=LayerPlanner(AnalyticCostModel()))


@pytest.mark.parametrize("rule", ["dynamic", "simple", "static", "fiddler"])
def test_layer_planner_matches_plan_layer(rule):
    """Memoised plans have the makespan plan_layer gives, and repeated layer shapes hit the memo."""
    rng = random.Random(3)
    layers = [random_expert_layer(rng, rng.randint(1, 8)) for _ in range(5)]
    for items, cost, max_copies, link_free_s in layers:
        planner = LayerPlanner(cost, rule=rule)
        hot = {it.key for it in items[::2]}
        want = plan_layer(items, cost, rule=rule, max_copies=max_copies, hot=hot, link_free_s=link_free_s)
        first = planner.plan(items, max_copies=max_copies, hot=hot, link_free_s=link_free_s)
        # Same shapes under other keys and in another order: served from the memo.
        renamed = [WorkItem(**{**it.__dict__, "key": ("x", it.key)}) for it in reversed(items)]
        hot2 = {("x", k) for k in hot}
        again = planner.plan(renamed, max_copies=max_copies, hot=hot2, link_free_s=link_free_s)
        assert planner.hits == 1 and planner.misses == 1
        assert math.isclose(first.makespan_s, want.makespan_s, rel_tol=1e-12)
        assert math.isclose(again.makespan_s, want.makespan_s, rel_tol=1e-12)


def test_layer_planner_bounded_memo():
    """The memo keeps at most cache_size plans."""
    planner = LayerPlanner(TableCost({i: (1.0, 0.5) for i in range(50)}), cache_size=3)
    for t in range(1, 10):
        planner.plan([WorkItem(key=0, tokens=t, weight_bytes=10, flops_per_token=1)])
    assert len(planner._memo) == 3 and planner.misses == 9
