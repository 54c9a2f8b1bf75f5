"""Cache policies on hand-made traces with known answers, Belady against brute force, prefetch queue."""
import itertools

import numpy as np
import pytest

from moe.expert_cache.policies import (
    POLICY_NAMES,
    BeladyPolicy,
    PredictivePolicy,
    StaticHotPolicy,
    make_policy,
)
from moe.expert_cache.policy import LRUPolicy
from moe.expert_cache.prefetch import PrefetchQueue
from moe.expert_cache.replay import ReplayConfig, replay


def _one_layer(steps, k=1):
    """[T, 1, k] ids from a list of per-step expert lists."""
    return np.array(steps, dtype=np.int64).reshape(len(steps), 1, k)


def _run(name, steps, capacity, k=1, num_experts=8, **kw):
    ids = _one_layer(steps, k)
    if name == "belady":
        kw["future_TLK"] = ids
    return replay(ids, make_policy(name, **kw), ReplayConfig(capacity=capacity, num_experts=num_experts))


def test_policy_lru_known_answer():
    """LRU evicts expert 0 before its reuse in 0,1,2,0 with two slots: no hit."""
    r = _run("lru", [[0], [1], [2], [0]], capacity=2)
    assert (r.hits, r.misses, r.loads) == (0, 4, 4)


def test_policy_lfu_keeps_frequent_expert():
    """LFU keeps the twice-used expert 0 where LRU drops it."""
    steps = [[0], [0], [1], [2], [0]]
    assert _run("lfu", steps, capacity=2).hits == 2
    assert _run("lru", steps, capacity=2).hits == 1


def test_policy_score_uses_router_weights():
    """The score cache evicts the expert with the lower running router score."""
    ids = _one_layer([[0, 1], [0, 2], [1, 3], [0, 1]], k=2)
    w = np.array([[0.9, 0.1], [0.9, 0.1], [0.5, 0.5], [0.5, 0.5]]).reshape(4, 1, 2)
    cfg = ReplayConfig(capacity=3, num_experts=4)
    r = replay(ids, make_policy("score", decay=0.5), cfg, weights_TLK=w)
    # step 3 must evict 0 or 2: 0 has the high score, so 2 goes and step 4 hits 0 and 1.
    assert (r.hits, r.misses) == (4, 4)
    assert replay(ids, make_policy("lru"), cfg).hits == 3


def test_policy_static_hot_pins_experts():
    """A pinned expert survives a scan of other experts."""
    steps = [[0], [1], [2], [3], [0]]
    r = replay(_one_layer(steps), StaticHotPolicy({0: [0]}), ReplayConfig(capacity=2, num_experts=4))
    assert r.hits == 1
    hot = StaticHotPolicy.from_counts(np.array([[1, 5, 3, 0]]), per_layer=2)
    assert hot.hot == {(0, 1), (0, 2)}


def test_policy_predictive_prefetches_forecast():
    """A confident forecast of layer 1 is prefetched: a hit, counted as a load."""
    ids = np.array([[[0], [3]], [[1], [2]]])  # [T=2, L=2, K=1]
    table = {(0, 0): [0, 0, 0, 0.9], (1, 0): [0, 0, 0.9, 0]}

    def forecaster(t, l, ids_lK, prev_LK):
        return np.array([table[(t, l)]])

    cfg = ReplayConfig(capacity=1, num_experts=4)
    pol = make_policy("predictive", prefetch_threshold=0.5, max_prefetch=1)
    r = replay(ids, pol, cfg, forecaster=forecaster)
    assert (r.accesses, r.hits, r.misses, r.prefetches, r.useful_prefetches) == (4, 2, 2, 2, 2)
    assert r.loads == 4
    off = replay(ids, make_policy("predictive", prefetch_threshold=1.0), cfg, forecaster=forecaster)
    assert (off.hits, off.prefetches) == (0, 0)


def test_policy_predictive_protects_forecast_from_eviction():
    """A forecast expert is not chosen as victim while its forecast is pending."""
    pol = PredictivePolicy(prefetch_threshold=1.0)
    for e in (0, 1):
        pol.on_insert((2, e))
    pol.observe_forecast(2, np.array([0.0, 0.8]))
    assert pol.victim([(2, 0), (2, 1)]) == (2, 0)
    pol.observe_forecast(2, np.array([0.8, 0.0]))
    assert pol.victim([(2, 0), (2, 1)]) == (2, 1)


def _brute_force_hits(steps, capacity):
    """Most hits any demand-fetch eviction sequence achieves on one layer (exhaustive)."""
    best = {frozenset(): 0}
    for active in steps:
        a = frozenset(active)
        nxt = {}
        for state, hits in best.items():
            h = hits + len(a & state)
            union = state | a
            over = len(union) - capacity
            if over <= 0:
                choices = [union]
            else:
                choices = [union - frozenset(ev) for ev in itertools.combinations(sorted(state - a), over)]
            for s in choices:
                nxt[s] = max(nxt.get(s, -1), h)
        best = nxt
    return max(best.values())


BELADY_CASES = [  # (tokens, experts, top-k, capacity, seed)
    (9, 4, 1, 2, 0),
    (10, 5, 2, 3, 1),
    (11, 6, 2, 2, 2),
    (12, 5, 1, 3, 3),
    (10, 7, 3, 4, 4),
    (13, 6, 2, 4, 5),
]


@pytest.mark.parametrize("tokens,experts,k,capacity,seed", BELADY_CASES)
def test_policy_belady_matches_brute_force(tokens, experts, k, capacity, seed):
    """Belady's hits equal the exhaustive optimum on tiny random traces, layer by layer."""
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.permutation(experts)[:k] for _ in range(2)]) for _ in range(tokens)])
    r = replay(ids, BeladyPolicy(ids), ReplayConfig(capacity=capacity, num_experts=experts))
    expect = sum(_brute_force_hits(ids[:, l].tolist(), capacity) for l in range(2))
    assert r.hits == expect
    for name in ("lru", "lfu", "score"):
        assert replay(ids, make_policy(name), ReplayConfig(capacity=capacity, num_experts=experts)).hits <= expect


def test_policy_factory_names_and_errors():
    """make_policy builds every named policy and rejects unknown names and options."""
    ids = _one_layer([[0], [1]])
    for name in POLICY_NAMES:
        kw = {"future_TLK": ids} if name == "belady" else {}
        assert make_policy(name, **kw).name == name
    with pytest.raises(ValueError, match="unknown cache policy 'mru'"):
        make_policy("mru")
    with pytest.raises(ValueError, match="future_TLK"):
        make_policy("belady")
    with pytest.raises(ValueError, match="no options"):
        make_policy("lru", decay=0.5)
    with pytest.raises(ValueError, match="decay"):
        make_policy("score", decay=1.5)


def test_policy_replay_rejects_bad_input():
    """Replay names a capacity below top-k, out-of-range ids and an invalid victim."""
    with pytest.raises(ValueError, match="below top-k"):
        replay(_one_layer([[0, 1]], k=2), LRUPolicy(), ReplayConfig(capacity=1, num_experts=4))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        replay(_one_layer([[5]]), LRUPolicy(), ReplayConfig(capacity=1, num_experts=4))

    class Bad(LRUPolicy):
        def victim(self, candidates):
            return (0, 99)

    with pytest.raises(ValueError, match="chose victim"):
        replay(_one_layer([[0], [1]]), Bad(), ReplayConfig(capacity=1, num_experts=4))


def test_policy_prefetch_queue_order_cancel_reprioritise():
    """The queue pops by priority (FIFO on ties), skips cancelled keys and honours new priorities."""
    q = PrefetchQueue()
    q.push((1, 3), 0.5)
    q.push((1, 4), 0.9)
    q.push((2, 0), 0.5)
    q.push((2, 1), 0.1)
    assert len(q) == 4 and (1, 4) in q
    assert q.cancel((1, 4)) and not q.cancel((1, 4))
    assert q.reprioritise((2, 1), 0.95) and not q.reprioritise((9, 9), 1.0)
    assert q.peek() == ((2, 1), 0.95)
    assert [q.pop() for _ in range(3)] == [((2, 1), 0.95), ((1, 3), 0.5), ((2, 0), 0.5)]
    assert len(q) == 0 and q.peek() is None
    with pytest.raises(IndexError):
        q.pop()
    with pytest.raises(ValueError, match="NaN"):
        q.push((0, 0), float("nan"))


def test_policy_predictive_learns_next_step_online():
    """On a 3-cycle with 2 slots LRU never hits; the online next-step table reaches Belady."""
    steps = [[i % 3] for i in range(60)]
    cfg = ReplayConfig(capacity=2, num_experts=3)
    ids = _one_layer(steps)
    lru = replay(ids, make_policy("lru"), cfg).hits
    pred = replay(ids, make_policy("predictive", prefetch_threshold=1.0, decay=0.0), cfg).hits
    best = replay(ids, make_policy("belady", future_TLK=ids), cfg).hits
    assert lru == 0 and best >= 28 and pred >= best - 3
    off = replay(ids, make_policy("predictive", prefetch_threshold=1.0, decay=0.0, temporal_weight=0.0), cfg).hits
    assert off < pred


def test_policy_compare_tunes_on_fit_trace_only():
    """compare_policies picks settings from the fit trace alone and reports every policy."""
    from moe.expert_cache.compare import CompareConfig, ReplayTrace, compare_policies, tune_predictive

    rng = np.random.default_rng(0)
    fit_ids = np.stack([np.stack([rng.permutation(6)[:2] for _ in range(3)]) for _ in range(40)])
    meas_ids = np.stack([np.stack([rng.permutation(6)[:2] for _ in range(3)]) for _ in range(30)])

    def fc(t, l, ids_lK, prev):
        return np.full((1, 6), 1.0 / 3)

    fit = ReplayTrace(ids_TLK=fit_ids, seq_starts=[0, 40], forecaster=fc)
    meas = ReplayTrace(ids_TLK=meas_ids, seq_starts=[0, 30], forecaster=fc)
    cfg = CompareConfig(capacity=3, num_experts=6, thresholds=(0.3, 0.9), decays=(0.5,), max_prefetches=(1,))
    out = compare_policies(meas, fit, cfg)
    expect, _ = tune_predictive(fit, cfg)
    assert out["tuned"]["predictive"]["prefetch_threshold"] == expect.prefetch_threshold
    assert set(out["policies"]) == set(cfg.policies)
    assert out["policies"]["belady"]["of_belady"] == 1.0
    for r in out["policies"].values():
        assert r["accesses"] == 30 * 3 * 2 and r["loads"] == r["misses"] + r["prefetches"]


def test_policy_replay_config_rejects_capacity_beyond_experts():
    """A capacity above the layer's expert count is rejected with the valid range."""
    with pytest.raises(ValueError, match=r"1\.\.8 slots"):
        ReplayConfig(capacity=9, num_experts=8)


def test_policy_replay_trace_head_keeps_alignment():
    """A replay trace's head keeps whole leading tokens and clips sequence starts."""
    from moe.expert_cache.compare import ReplayTrace

    ids = np.arange(10 * 2).reshape(10, 1, 2) % 5
    rt = ReplayTrace(ids_TLK=ids, seq_starts=[0, 4, 8, 10], weights_TLK=np.ones((10, 1, 2)))
    h = rt.head(6)
    assert h.seq_starts == [0, 4, 6] and h.ids_TLK.shape == (6, 1, 2) and h.weights_TLK.shape == (6, 1, 2)
    assert rt.head(99) is rt
