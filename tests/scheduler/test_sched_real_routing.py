"""The planner on real Mixtral-8x7B routing (HumanEval trace): near-optimal layer by layer, best overall."""
import collections
from pathlib import Path

import numpy as np
import pytest

from moe.router_predictor.trace import import_vllm_jsonl
from moe.scheduler.cost_model import AnalyticCostModel
from moe.scheduler.exhaustive import plan_exhaustive
from moe.scheduler.planner import RULES, LayerPlanner
from moe.scheduler.work import WorkItem

TRACE = Path("/work/shared/data/traces/mixtral-8x7b/humaneval_routing.jsonl")
D, F, LAYERS, SLOTS_PER_LAYER = 4096, 14336, 32, 4
NBYTES = 3 * D * F * 2  # one bf16 expert
# (tokens per batch, batches used): decode batches and prefill-like chunks.
BATCHES = [(1, 40), (8, 20), (32, 10)]


@pytest.fixture(scope="module")
def tokens():
    """Per token (sequences in order), the experts of each of the 32 layers: int [T, L, K] as lists."""
    if not TRACE.exists():
        pytest.skip(f"routing trace {TRACE} is not available on this machine")
    trace, _ = import_vllm_jsonl(TRACE, num_experts=8)
    assert trace.expert_ids.shape[1] == LAYERS
    return trace.expert_ids.tolist()


def _layers(tokens, batch: int, n_batches: int):
    """(layer, items) for consecutive token batches, cached = a per-layer LRU of SLOTS_PER_LAYER experts."""
    lru = [collections.OrderedDict() for _ in range(LAYERS)]
    for b in range(n_batches):
        chunk = tokens[b * batch:(b + 1) * batch]
        if len(chunk) < batch:
            return
        for layer in range(LAYERS):
            counts = collections.Counter(e for tok in chunk for e in tok[layer])
            yield [WorkItem(key=(layer, e), tokens=n, weight_bytes=NBYTES, flops_per_token=6 * D * F,
                            cached=e in lru[layer]) for e, n in sorted(counts.items())]
            for e in counts:
                lru[layer][e] = True
                lru[layer].move_to_end(e)
                if len(lru[layer]) > SLOTS_PER_LAYER:
                    lru[layer].popitem(last=False)


@pytest.mark.parametrize("batch,n_batches", BATCHES)
def test_dynamic_on_real_routing(tokens, batch, n_batches):
    """Per layer within 5% of the exhaustive optimum (>= 99%), and the lowest total of all rules."""
    cost = AnalyticCostModel.defaults("cuda")
    planners = {rule: LayerPlanner(cost, rule=rule) for rule in RULES}
    totals = dict.fromkeys(RULES, 0.0)
    ratios = []
    for items in _layers(tokens, batch, n_batches):
        hot = {it.key for it in items if it.cached}
        for rule, planner in planners.items():
            totals[rule] += planner.plan(items, hot=hot).makespan_s
        best = plan_exhaustive(items, cost).makespan_s
        ratios.append(planners["dynamic"].plan(items).makespan_s / best)
    ratios = np.array(ratios)
    assert len(ratios) == LAYERS * n_batches
    assert (ratios <= 1.05).mean() >= 0.99 and ratios.max() <= 1.15
    assert totals["dynamic"] <= min(totals.values()) * (1 + 1e-9)
