"""Temporal shuffle feature, in-profile selection of the shuffle, fold-robust load caps, replicas row."""
import itertools

from dataclasses import replace

import pytest
import torch

from moe.comms.a2a_bench import (A2ABenchConfig, _halves, _label, imbalance_spread, random_layout_imbalance,
                                 run_a2a_bench, select_shuffle)
from moe.comms.grouping import (GroupingConfig, affinity_stats, fit_grouped_placement, grouping_score, layouts,
                                load_shares)
from moe.comms.placement import ExpertPlacement
from moe.comms.replay import ReplayConfig, replay
from moe.comms.shuffle import DecodeView, ShuffleConfig, TransitionShuffler, previous_experts, previous_token
from moe.router_predictor.trace import RoutingTrace

# (seq_starts, expected previous token of every token)
PREV_CASES = [
    ([0, 3], [-1, 0, 1]),
    ([0, 1, 1, 4], [-1, -1, 1, 2]),  # an empty sequence in the middle
    ([0, 2, 5], [-1, 0, -1, 2, 3]),
    ([0], []),
]


def _random_ids(T, L, E, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T * L)]).reshape(T, L, K).short()


def _temporal_ids(T, L, seed=0):
    """8 experts, top-2, one sequence; a token repeats its predecessor's pair at every layer with
    probability 0.9, else draws a fresh random pair, so only the previous token predicts it."""
    g = torch.Generator().manual_seed(seed)
    ids = _random_ids(T, L, 8, 2, seed=seed + 100).long()
    for t in range(1, T):
        keep = torch.rand(L, generator=g) < 0.9
        ids[t, keep] = ids[t - 1, keep]
    return ids.short()


@pytest.mark.parametrize("starts,expected", PREV_CASES)
def test_previous_token_is_exact(starts, expected):
    """previous_token gives t-1 inside a sequence and -1 for every first token."""
    s = torch.tensor(starts)
    assert previous_token(s, int(s[-1])).tolist() == expected


def test_previous_experts_masks_first_tokens():
    """A first token's previous-expert row is all -1; others copy the previous token's layer."""
    ids = _random_ids(5, 3, 8, 2).long()
    prev = previous_token(torch.tensor([0, 2, 5]), 5)
    got = previous_experts(ids, prev, 2)
    assert got[0].tolist() == [-1, -1] and got[2].tolist() == [-1, -1]
    assert torch.equal(got[[1, 3, 4]], ids[[0, 2, 3], 2])


def test_temporal_feature_learns_repeated_routing():
    """On a trace where tokens repeat their predecessor's routing, the temporal shuffle guesses far better."""
    prof, meas = _temporal_ids(300, 4, seed=0), _temporal_ids(200, 4, seed=1)
    pl = ExpertPlacement.contiguous(4, 8, 4)
    starts_p, starts_m = torch.tensor([0, 300]), torch.tensor([0, 200])
    plain = replay(meas, starts_m, pl, TransitionShuffler(pl, prof, ShuffleConfig(history=2), starts_p))
    temporal = replay(meas, starts_m, pl,
                      TransitionShuffler(pl, prof, ShuffleConfig(history=2, temporal=True), starts_p))
    assert temporal.spec_hit > plain.spec_hit + 0.1
    assert temporal.bytes < plain.bytes


SHUFFLE_CONFIGS = [ShuffleConfig(), ShuffleConfig(temporal=True), ShuffleConfig(kernel_temperature=2.0),
                   ShuffleConfig(history=1, temporal=True, kernel_temperature=0.5, kernel_decay=1.0, online=True)]


@pytest.mark.parametrize("config", SHUFFLE_CONFIGS)
def test_shuffle_variants_move_only_to_free_candidates(config):
    """With the temporal feature or the kernel, the chosen rank is still a free candidate of the combine."""
    ids = _random_ids(50, 4, 8, 2, seed=1).long()
    pl = ExpertPlacement.contiguous(4, 8, 4)
    sh = TransitionShuffler(pl, _random_ids(80, 4, 8, 2, seed=2), config, torch.tensor([0, 40, 80]))
    loc, view = torch.arange(50) % 4, DecodeView.from_trace(ids, torch.tensor([0, 25, 50]))
    for l in range(3):
        cand = pl.holds_LER[l][ids[:, l]].any(1)
        cand[torch.arange(50), loc] = True
        nxt = sh.choose(l, ids[:, : l + 1].flip(1), cand, loc, view)
        assert bool(cand[torch.arange(50), nxt].all())
        loc = nxt


@pytest.mark.parametrize("config", SHUFFLE_CONFIGS[1:])
def test_decode_features_read_only_earlier_tokens(config):
    """Changing a token's routing never changes the guesses of tokens before it or in other sequences."""
    prof, ids = _random_ids(40, 5, 8, 2, seed=3), _random_ids(30, 5, 8, 2, seed=4).long()
    starts = torch.tensor([0, 12, 30])
    pl = ExpertPlacement.contiguous(5, 8, 4)
    sh = TransitionShuffler(pl, prof, config, torch.tensor([0, 40]))
    changed = ids.clone()
    changed[20:] = (changed[20:] + 3) % 8  # tokens 20.. of the second sequence
    for l in range(4):
        s0 = sh.scores(l, ids[:, : l + 1].flip(1), DecodeView.from_trace(ids, starts))
        s1 = sh.scores(l, changed[:, : l + 1].flip(1), DecodeView.from_trace(changed, starts))
        assert torch.equal(s0[:20], s1[:20])


def test_online_kernel_matches_a_per_token_loop():
    """With online learning a token's kernel also weighs the earlier tokens of its own sequence."""
    prof, ids = _random_ids(11, 3, 8, 2, seed=5).long(), _random_ids(7, 3, 8, 2, seed=6).long()
    starts = torch.tensor([0, 3, 7])
    pl = ExpertPlacement.contiguous(3, 8, 4)
    cfg = ShuffleConfig(kernel_temperature=1.0, kernel_decay=0.5, online=True)
    sh = TransitionShuffler(pl, prof, cfg)
    layer = 1
    got = sh._kernel(layer, ids[:, : layer + 1].flip(1), DecodeView.from_trace(ids, starts))
    base = pl.holds_LER[layer + 1][prof[:, layer + 1]].any(1).double().mean(0).clamp(1e-3, 1 - 1e-3)
    seq = [0, 0, 0, 1, 1, 1, 1]
    for t in range(7):
        refs = [prof[u] for u in range(11)] + [ids[u] for u in range(t) if seq[u] == seq[t]]
        sim = torch.tensor([sum(0.5 ** h * len(set(ids[t, layer - h].tolist()) & set(r[layer - h].tolist()))
                                for h in range(layer + 1)) for r in refs], dtype=torch.float64)
        served = torch.stack([pl.holds_LER[layer + 1][r[layer + 1]].any(0) for r in refs]).double()
        w = torch.softmax(sim, 0)
        p = ((w @ served) * len(refs) + cfg.prior * base) / (len(refs) + cfg.prior)
        torch.testing.assert_close(got[t], torch.log(p) - torch.log1p(-p))


def test_configs_reject_bad_values():
    """Invalid temporal, load_folds, histories and replicas settings raise naming the field."""
    with pytest.raises(ValueError, match="temporal"):
        ShuffleConfig(temporal="yes")
    with pytest.raises(ValueError, match="load_folds"):
        GroupingConfig(load_folds=0)
    with pytest.raises(ValueError, match="exact_layouts"):
        GroupingConfig(exact_layouts=-1)
    with pytest.raises(ValueError, match="histories"):
        A2ABenchConfig(histories=(2, 0))
    with pytest.raises(ValueError, match="replicas"):
        A2ABenchConfig(replicas=-1)
    with pytest.raises(ValueError, match="replica_layers"):
        A2ABenchConfig(replica_layers=-1)
    with pytest.raises(ValueError, match="replica_dispatch"):
        ReplayConfig(replica_dispatch="random")
    with pytest.raises(ValueError, match="batch_tokens"):
        ReplayConfig(batch_tokens=-2)
    with pytest.raises(ValueError, match="kernel_temperature"):
        ShuffleConfig(kernel_temperature=-1.0)
    with pytest.raises(ValueError, match="kernel_decay"):
        ShuffleConfig(kernel_decay=0.0)
    with pytest.raises(ValueError, match="kernel_weight"):
        ShuffleConfig(kernel_weight=1.5)
    with pytest.raises(ValueError, match="kernel_weights"):
        A2ABenchConfig(kernel_weights=())
    with pytest.raises(ValueError, match="kernel_temperature > 0"):
        ShuffleConfig(online=True)
    with pytest.raises(ValueError, match="kernel_decays"):
        A2ABenchConfig(kernel_decays=(1.5,))


def test_load_shares_are_exact():
    """Shares are each expert's count over one rank's cap, for the whole profile and each fold."""
    ids = torch.tensor([[[0, 1]], [[0, 2]], [[1, 3]], [[0, 1]]], dtype=torch.int16)  # 4 tokens, 1 layer
    cfg = GroupingConfig(load_cap=1.0, load_folds=2)
    sh = load_shares(ids, 4, 2, cfg)  # [L=1, V=3, E=4]; cap of a rank = total / 2 = 4, then 2, 2
    expected = torch.tensor([[3, 3, 1, 1], [2, 1, 1, 0], [1, 2, 0, 1]], dtype=torch.float64)
    assert torch.equal(sh[0] * torch.tensor([[4.0], [2.0], [2.0]]), expected)
    assert load_shares(ids, 4, 2, GroupingConfig(load_folds=1)).shape == (1, 1, 4)
    assert load_shares(ids[:1], 4, 2, GroupingConfig(load_folds=3)).shape == (1, 2, 4)  # empty folds dropped


def test_fold_robust_cap_holds_on_each_fold():
    """With load_folds=2 the fitted layout meets the cap on the whole profile and on both halves."""
    ids = _random_ids(400, 2, 8, 2, seed=4)
    cfg = GroupingConfig(load_cap=1.3, load_folds=2)
    pl = fit_grouped_placement(ids, 8, 4, cfg)
    for part in (ids, ids[:200], ids[200:]):
        load_LE = affinity_stats(part, 8).load_LE
        load_LR = (pl.holds_LER.double() * load_LE[:, :, None]).sum(1)
        assert bool((load_LR.max(1).values <= cfg.load_cap * load_LR.mean(1) + 1e-9).all())


def test_halves_split_sequences_exactly():
    """The two halves partition the tokens in order and keep sequence boundaries."""
    ids = _random_ids(7, 1, 8, 2)
    (a, sa), (b, sb) = _halves(ids, torch.tensor([0, 2, 5, 7]))
    assert torch.equal(torch.cat([a, b]), ids)
    assert sa.tolist() == [0, 2, 3] and sb.tolist() == [0, 2, 4]


def test_select_shuffle_reports_cross_validated_bytes():
    """The chosen setting has the fewest held-out bytes, each equal to a by-hand two-way replay."""
    ids = _random_ids(60, 4, 8, 2, seed=6).long()
    starts = torch.tensor([0, 30, 60])
    pl = ExpertPlacement.contiguous(4, 8, 4)
    cfg = A2ABenchConfig(histories=(1, 3), kernel_temperatures=(2.0,), kernel_decays=(0.5, 1.0),
                         kernel_weights=(0.75,), replay=ReplayConfig(hidden_size=8))
    chosen, tried = select_shuffle(pl, ids, starts, cfg)
    assert len(tried) == 4  # two histories, then the kernel grid (the chosen history is reused)
    assert tried[_label(chosen)] == min(tried.values())
    (a, sa), (b, sb) = _halves(ids, starts)
    for sc in (ShuffleConfig(history=3), ShuffleConfig(history=chosen.history, kernel_temperature=2.0,
                                                       kernel_decay=0.5, kernel_weight=0.75)):
        by_hand = replay(b, sb, pl, TransitionShuffler(pl, a, sc, sa), cfg.replay).bytes \
            + replay(a, sa, pl, TransitionShuffler(pl, b, sc, sb), cfg.replay).bytes
        assert tried[_label(sc)] == by_hand


def test_kernel_matches_a_per_token_loop():
    """The trajectory kernel's log-odds equal a plain loop over reference tokens."""
    prof, meas = _random_ids(23, 4, 8, 2, seed=8).long(), _random_ids(9, 4, 8, 2, seed=9).long()
    pl = ExpertPlacement.contiguous(4, 8, 4)
    cfg = ShuffleConfig(history=2, kernel_temperature=1.5, kernel_decay=0.6)
    sh = TransitionShuffler(pl, prof, cfg)
    layer = 2
    got = sh._kernel(layer, meas[:, : layer + 1].flip(1), None)
    served = pl.holds_LER[layer + 1][prof[:, layer + 1]].any(1).double()
    base = served.mean(0).clamp(1e-3, 1 - 1e-3)
    for t in range(9):
        sim = torch.tensor([sum(0.6 ** h * len(set(meas[t, layer - h].tolist()) & set(prof[u, layer - h].tolist()))
                                for h in range(layer + 1)) for u in range(23)], dtype=torch.float64)
        w = torch.softmax(1.5 * sim, 0)
        p = ((w @ served) * 23 + cfg.prior * base) / (23 + cfg.prior)
        torch.testing.assert_close(got[t], torch.log(p) - torch.log1p(-p))


def test_replicas_row_is_apart_from_the_headline():
    """The replicas and balanced rows are reported apart; the headline bytes stay those of grouping + shuffling."""
    def trace(seed):
        return RoutingTrace(expert_ids=_random_ids(40, 3, 8, 2, seed=seed), seq_starts=torch.tensor([0, 40]),
                            num_experts=8, top_k=2)
    small = GroupingConfig(restarts=1)
    res = run_a2a_bench(trace(0), trace(1), A2ABenchConfig(ranks=4, histories=(1, 2), kernel_temperatures=(1.0,),
                                                           kernel_decays=(1.0,), replicas=1, grouping=small))
    assert res["summary"]["bytes"] == res["rows"]["ours"]["bytes"]
    assert res["summary"]["replicas_reduction"] == res["rows"]["replicas"]["reduction"]
    assert res["summary"]["imbalance_balanced"] == res["rows"]["balanced"]["imbalance"]
    assert res["summary"]["imbalance_random"] == random_layout_imbalance(trace(1).expert_ids, 8, 4)
    assert res["summary"]["replicas_extra_memory"] == 0.5  # 4 extra slots on 8 experts in all 3 layers
    quick = A2ABenchConfig(ranks=4, replicas=0, histories=(1,), kernel_temperatures=(), grouping=small)
    assert not {"replicas", "rep_only"} & set(run_a2a_bench(trace(0), trace(1), quick)["rows"])
    assert res["summary"]["rep_only_reduction"] == res["rows"]["rep_only"]["reduction"]
    assert res["rows"]["rep_only"]["spec_hit"] is None  # tokens stay home: no speculation
    one = run_a2a_bench(trace(0), trace(1), replace(quick, replicas=1, replica_layers=1))
    assert one["summary"]["replicas_extra_memory"] == pytest.approx(1 / 6)
    held = ExpertPlacement.from_json(one["replicated_placement"]).holds_LER.sum((1, 2))
    assert sorted(held.tolist()) == [8, 8, 12]


def test_imbalance_spread_is_bootstrap_noise():
    """Identical tokens have no sampling noise; varied tokens have some; replicated layouts report 0."""
    pl = ExpertPlacement.contiguous(2, 8, 4)
    same = torch.tensor([[[0, 3], [5, 6]]] * 20, dtype=torch.int16)
    assert imbalance_spread(pl, same) == 0.0
    assert imbalance_spread(pl, _random_ids(40, 2, 8, 2, seed=2), draws=20) > 0.0
    replicated = pl.with_replicas(torch.ones(2, 8), 1)
    assert imbalance_spread(replicated, _random_ids(40, 2, 8, 2, seed=2)) == 0.0


def test_random_layout_imbalance_averages_every_layout():
    """4 experts on 2 ranks: the mean over the 6 layouts, by brute force; equal loads give 1."""
    ids = torch.tensor([[[0, 1]], [[0, 2]], [[0, 3]], [[1, 2]]], dtype=torch.int16)  # loads 3, 2, 2, 1
    want = []
    for pair in itertools.combinations(range(4), 2):
        a = sum((3, 2, 2, 1)[e] for e in pair)
        want.append(max(a, 8 - a) / 4)
    assert random_layout_imbalance(ids, 4, 2) == pytest.approx(sum(want) / len(want))
    even = torch.tensor([[[0, 1]], [[2, 3]]], dtype=torch.int16)
    assert random_layout_imbalance(even, 4, 2) == 1.0
    # sampled, not enumerated, when there are more layouts than draws; still deterministic
    many = _random_ids(30, 2, 16, 2, seed=4)
    assert random_layout_imbalance(many, 16, 4, draws=50) == random_layout_imbalance(many, 16, 4, draws=50) >= 1.0


# (expert count per rank, number of distinct layouts)
LAYOUT_CASES = [([2, 2, 2, 2], 2520), ([1, 1], 2), ([3, 2], 10), ([2, 1, 1], 12), ([1], 1)]


@pytest.mark.parametrize("counts,n", LAYOUT_CASES)
def test_layouts_enumerate_every_assignment_once(counts, n):
    """layouts lists each assignment with the given per-rank counts exactly once, and refuses past its limit."""
    got = layouts(counts, 10_000)
    assert got.shape == (n, sum(counts))
    assert len({tuple(r) for r in got.tolist()}) == n
    assert all(torch.bincount(r, minlength=len(counts)).tolist() == counts for r in got)
    assert layouts(counts, n - 1) is None


def test_exact_search_reaches_at_least_the_swap_objective():
    """From the same start, per-layer enumeration ends at or above the swap search's objective here."""
    ids = _random_ids(200, 4, 8, 2, seed=11)
    st = affinity_stats(ids, 8)
    score = {}
    for exact in (0, 20_000):
        cfg = GroupingConfig(load_cap=1.5, restarts=0, exact_layouts=exact)
        score[exact] = grouping_score(fit_grouped_placement(ids, 8, 4, cfg).holds_LER.long().argmax(2), st, cfg)
    assert score[20_000] >= score[0] - 1e-9


def test_replay_balanced_rounds():
    """The balanced split per round of B tokens: B >= T is the one-round replay, local
    copies serve at every round size, and one round leaves no more imbalance than the hash."""
    ids = _random_ids(48, 3, 8, 2, seed=3).long()
    starts = torch.tensor([0, 48])
    pl = ExpertPlacement.contiguous(3, 8, 4).with_replicas(affinity_stats(ids, 8).load_LE, 1)
    one = replay(ids, starts, pl, None, ReplayConfig(hidden_size=8))
    assert replay(ids, starts, pl, None, ReplayConfig(hidden_size=8, batch_tokens=48)) == one
    hashed = replay(ids, starts, pl, None, ReplayConfig(hidden_size=8, replica_dispatch="hash"))
    for B in (1, 7, 16):
        r = replay(ids, starts, pl, None, ReplayConfig(hidden_size=8, batch_tokens=B))
        assert r.lar == one.lar  # local copies serve either way
    assert one.imbalance <= hashed.imbalance
