"""Expert grouping, token shuffling and the all-to-all replay on synthetic traces."""
import itertools
import json

import pytest
import torch

import argparse

from moe.cli import bench_a2a
from moe.comms.grouping import GroupingConfig, affinity_stats, fit_grouped_placement, grouping_score
from moe.comms.placement import ExpertPlacement
from moe.comms.replay import ReplayConfig, replay
from moe.comms.shuffle import TransitionShuffler
from moe.router_predictor.trace import RoutingTrace, save_trace

# (tokens, layers, experts, k, ranks)
REPLAY_SHAPES = [(1, 1, 2, 1, 2), (7, 3, 8, 2, 4), (33, 4, 6, 2, 3), (20, 2, 16, 4, 4), (0, 2, 4, 2, 2)]


def _random_ids(T, L, E, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    if T == 0:
        return torch.zeros(0, L, K, dtype=torch.int16)
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T * L)]).reshape(T, L, K).short()


def _planted_ids(T, L, seed=0):
    """8 experts, top-2; at layer l tokens use a pair {a, a+4} of a chain a -> a+1 (mod 4) across layers."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 4, (T,), generator=g)
    a_TL = (start[:, None] + torch.arange(L)[None]) % 4
    return torch.stack([a_TL, a_TL + 4], dim=2).short()


def _bench(argv):
    """Run `moe bench a2a ARGV` through its own parser (the suite alone, not the whole CLI)."""
    parser = argparse.ArgumentParser(prog="moe bench")
    bench_a2a.register(parser.add_subparsers())
    args = parser.parse_args(["a2a", *argv])
    return args.func(args)


def _brute_rows(ids_TLK, placement, home_T):
    """Per-token loop over the replay's rules without shuffling."""
    T, L, K = ids_TLK.shape
    rows = 0
    for t in range(T):
        for l in range(L):
            dests = set(placement.dest_ranks(l, ids_TLK[t:t + 1, l], int(home_T[t]), torch.tensor([t]))[0].tolist())
            rows += 2 * len(dests - {int(home_T[t])})
    return rows


@pytest.mark.parametrize("T,L,E,K,R", REPLAY_SHAPES)
def test_replay_baseline_rows_match_brute_force(T, L, E, K, R):
    """Without shuffling, replayed rows equal a per-token count of distinct remote ranks, both directions."""
    ids = _random_ids(T, L, E, K)
    pl = ExpertPlacement.contiguous(L, E, R)
    res = replay(ids, torch.tensor([0, T]), pl, None, ReplayConfig(hidden_size=10, bytes_per_element=2))
    assert res.dispatch_rows == res.combine_rows
    assert res.dispatch_rows + res.combine_rows == _brute_rows(ids, pl, torch.arange(T) % R)
    assert res.bytes == (res.dispatch_rows + res.combine_rows) * 10 * 2
    remote = sum(int((pl.dest_ranks(l, ids[:, l], torch.arange(T) % R) != (torch.arange(T) % R)[:, None]).sum())
                 for l in range(L))
    assert res.naive_bytes == 2 * remote * 10 * 2 >= res.bytes


def test_replay_counts_replicas_and_sequence_homes():
    """A replica on the home rank serves locally; sequence homes place whole sequences."""
    ids = torch.tensor([[[0, 1]], [[0, 1]], [[2, 3]]], dtype=torch.int16)
    holds = torch.zeros(1, 4, 2, dtype=torch.bool)
    holds[0, 0, :] = True  # expert 0 on both ranks
    holds[0, 1, 1] = holds[0, 2, 0] = holds[0, 3, 1] = True
    pl = ExpertPlacement(holds_LER=holds)
    starts = torch.tensor([0, 2, 3])
    res = replay(ids, starts, pl, None, ReplayConfig(hidden_size=1, bytes_per_element=1, home="sequence"))
    # seq 0 (tokens 0, 1) on rank 0: expert 0 local, expert 1 remote; seq 1 (token 2) on rank 1: expert 2 remote
    assert (res.dispatch_rows, res.lar) == (3, pytest.approx(3 / 6))


def test_oracle_speculation_is_always_right():
    """With perfect speculation every token sits on a rank serving it from layer 1 on."""
    ids = _random_ids(40, 5, 8, 2, seed=3)
    res = replay(ids, torch.tensor([0, 40]), ExpertPlacement.contiguous(5, 8, 4), "oracle")
    assert res.spec_hit == 1.0


def test_shuffle_moves_only_to_free_candidates():
    """The shuffle picks a rank already in the combine (serving or current), so combine rows never grow."""
    ids = _random_ids(50, 4, 8, 2, seed=1)
    pl = ExpertPlacement.contiguous(4, 8, 4)
    sh = TransitionShuffler(pl, _random_ids(80, 4, 8, 2, seed=2))
    loc = torch.arange(50) % 4
    for l in range(3):
        cand = pl.holds_LER[l][ids[:, l].long()].any(1)
        cand[torch.arange(50), loc] = True
        nxt = sh.choose(l, ids[:, : l + 1].long().flip(1), cand, loc)
        assert bool(cand[torch.arange(50), nxt].all())
        loc = nxt


def test_grouping_recovers_planted_structure():
    """On a trace with planted pairs and a planted inter-layer chain, grouping and shuffling remove most bytes."""
    prof, meas = _planted_ids(200, 6, seed=0), _planted_ids(100, 6, seed=1)
    pl = fit_grouped_placement(prof, 8, 4, GroupingConfig(load_cap=1.3))
    for l in range(6):
        assert all(len(set(pl.holds_LER[l, [a, a + 4]].long().argmax(1).tolist())) == 1 for a in range(4))
    starts = torch.tensor([0, 100])
    base = replay(meas, starts, ExpertPlacement.contiguous(6, 8, 4))
    ours = replay(meas, starts, pl, TransitionShuffler(pl, prof))
    assert ours.spec_hit == 1.0 and ours.bytes < 0.5 * base.bytes


@pytest.mark.parametrize("exact_layouts", [0, 20_000])
def test_grouping_respects_load_cap(exact_layouts):
    """Every rank's profiled load per layer stays within the cap, with the same expert count per rank."""
    ids = _planted_ids(300, 3)
    ids[:60, :, 1] = 5  # make expert 5 hot; the planted pairs alone would overload a rank
    cfg = GroupingConfig(load_cap=1.25, exact_layouts=exact_layouts)
    pl = fit_grouped_placement(ids, 8, 4, cfg)
    st = affinity_stats(ids, 8)
    for l in range(3):
        load_R = (pl.holds_LER[l].double() * st.load_LE[l][:, None]).sum(0)
        assert load_R.max() <= cfg.load_cap * load_R.mean() + 1e-9
        assert pl.holds_LER[l].sum(0).tolist() == [2, 2, 2, 2]


def test_grouping_minimises_overload_when_cap_is_unreachable():
    """When one expert alone exceeds the cap, it is paired with the lightest expert."""
    ids = _random_ids(300, 1, 8, 2, seed=5)
    ids[:200, 0, 0] = torch.where(ids[:200, 0, 1] == 0, 1, 0).short()  # expert 0 very hot
    pl = fit_grouped_placement(ids, 8, 4, GroupingConfig(load_cap=1.0))
    load_E = affinity_stats(ids, 8).load_LE[0]
    r0 = int(pl.holds_LER[0, 0].long().argmax())
    partner = [e for e in pl.local_experts(0, r0) if e != 0]
    assert load_E[partner[0]] == load_E[1:].min()


@pytest.mark.parametrize("exact_layouts", [0, 100])
def test_grouping_matches_exhaustive_search_on_small_case(exact_layouts):
    """On 2 layers x 4 experts x 2 ranks both searches (swaps, per-layer enumeration) find the exhaustive optimum."""
    ids = _random_ids(60, 2, 4, 2, seed=7)
    cfg = GroupingConfig(load_cap=2.0, exact_layouts=exact_layouts)
    st = affinity_stats(ids, 4)
    layouts = [torch.tensor(p) for p in set(itertools.permutations([0, 0, 1, 1]))]
    best = max(grouping_score(torch.stack([a, b]), st, cfg) for a in layouts for b in layouts)
    got = fit_grouped_placement(ids, 4, 2, cfg).holds_LER.long().argmax(2)
    assert grouping_score(got, st, cfg) == pytest.approx(best)


def test_bench_a2a_cli_prints_json_last(tmp_path, capsys):
    """`moe bench a2a` runs on two trace files and ends in one JSON object with the documented keys."""
    for name, seed in (("p", 0), ("t", 1)):
        ids = _planted_ids(60, 4, seed=seed)
        save_trace(RoutingTrace(expert_ids=ids, seq_starts=torch.tensor([0, 30, 60]), num_experts=8, top_k=2),
                   tmp_path / f"{name}.safetensors")
    code = _bench(["--profile", str(tmp_path / "p.safetensors"), "--trace",
                 str(tmp_path / "t.safetensors"), "--ranks", "4", "--hidden-size", "64",
                 "--save-placement", str(tmp_path / "pl.json"), "--replica-layers", "2",
                 "--save-replicated", str(tmp_path / "rep.json")])
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert code == 0 and {"baseline_bytes", "bytes", "lar_baseline", "lar", "imbalance"} <= set(res)
    assert res["bytes"] < res["baseline_bytes"]
    assert ExpertPlacement.load(tmp_path / "pl.json").world_size == 4
    rep = ExpertPlacement.load(tmp_path / "rep.json")
    assert res["replicas_extra_memory"] == 0.25 and int(rep.holds_LER.sum()) == 4 * 8 + 2 * 4
    assert res["replica_dispatch"] == "balanced"
    with pytest.raises(ValueError, match="--save-replicated needs --replicas"):
        _bench(["--profile", str(tmp_path / "p.safetensors"), "--trace", str(tmp_path / "t.safetensors"),
                "--replicas", "0", "--save-replicated", str(tmp_path / "x.json")])


def test_bench_a2a_rejects_mismatched_traces(tmp_path):
    """Traces of different models are refused with a message naming both shapes."""
    save_trace(RoutingTrace(expert_ids=_random_ids(5, 2, 8, 2), seq_starts=torch.tensor([0, 5]), num_experts=8,
                            top_k=2), tmp_path / "a.safetensors")
    save_trace(RoutingTrace(expert_ids=_random_ids(5, 3, 8, 2), seq_starts=torch.tensor([0, 5]), num_experts=8,
                            top_k=2), tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="must come from one model"):
        _bench(["--profile", str(tmp_path / "a.safetensors"), "--trace", str(tmp_path / "b.safetensors")])
