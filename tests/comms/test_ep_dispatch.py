"""Expert placement, dispatch planning and the distributed EP executor (gloo on loopback)."""
import pytest
import torch

from moe.comms.dispatch import apply_local_experts, plan_dispatch, reference_moe
from moe.comms.group import run_local
from moe.comms.placement import ExpertPlacement
from moe.comms.selfcheck import CheckCase, SwigluExperts, check_rank

# (tokens, experts, k, ranks)
PLAN_SHAPES = [(0, 8, 2, 2), (1, 8, 2, 4), (33, 8, 2, 4), (17, 6, 3, 4), (64, 16, 4, 3), (5, 3, 1, 2)]


def test_contiguous_placement_layout():
    """Contiguous placement gives rank r the r-th block of experts in every layer."""
    p = ExpertPlacement.contiguous(3, 8, 4)
    assert [p.local_experts(2, r) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert ExpertPlacement.contiguous(1, 6, 4).holds_LER.sum().item() == 6


def test_placement_rejects_orphan_expert():
    """A placement where an expert has no rank is refused with a message naming it."""
    holds = torch.ones(2, 4, 2, dtype=torch.bool)
    holds[1, 3] = False
    with pytest.raises(ValueError, match="expert 3 of layer 1"):
        ExpertPlacement(holds_LER=holds)


def test_placement_json_roundtrip(tmp_path):
    """A placement with replicas survives save/load unchanged."""
    p = ExpertPlacement.contiguous(2, 8, 4).with_replicas(torch.arange(16.0).reshape(2, 8), 1)
    p.save(tmp_path / "p.json")
    assert torch.equal(ExpertPlacement.load(tmp_path / "p.json").holds_LER, p.holds_LER)


def test_replicas_go_to_hot_experts():
    """EPLB-style replicas are given to the experts with the highest load per copy."""
    load = torch.tensor([[100.0, 1, 1, 1, 1, 1, 1, 90]])
    p = ExpertPlacement.contiguous(1, 8, 4).with_replicas(load, 1)
    n_E = p.holds_LER[0].sum(1)
    assert n_E[0] >= 2 and n_E[7] >= 2 and n_E.sum() == 12


def test_dest_prefers_local_copy_and_spreads_replicas():
    """A local copy serves locally; remote replicas are used round-robin by token index."""
    holds = torch.zeros(1, 4, 4, dtype=torch.bool)
    holds[0, 0, [1, 2]] = True
    holds[0, 1, 0] = holds[0, 2, 3] = holds[0, 3, 3] = True
    p = ExpertPlacement(holds_LER=holds)
    ids = torch.zeros(6, 1, dtype=torch.long)
    assert p.dest_ranks(0, ids, 2).flatten().tolist() == [2] * 6
    assert sorted(p.dest_ranks(0, ids, 0).flatten().tolist()) == [1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("T,E,K,R", PLAN_SHAPES)
def test_plan_dedups_per_destination(T, E, K, R):
    """The plan sends exactly one row per distinct (token, destination rank) and keeps every activation once."""
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]) if T else torch.empty(0, K, dtype=torch.long)
    w = torch.rand(T, K)
    p = ExpertPlacement.contiguous(1, E, R)
    dest = p.dest_ranks(0, ids, 0)
    plan = plan_dispatch(ids, w, dest, R)
    want_pairs = {(t, int(r)) for t in range(T) for r in dest[t].tolist()}
    got_pairs = set(zip(plan.token_S.tolist(), [r for r, c in enumerate(plan.send_counts) for _ in range(c)]))
    assert got_pairs == want_pairs and len(plan.token_S) == len(want_pairs)
    kept = plan.ids_SK[plan.ids_SK >= 0]
    assert torch.equal(kept.sort().values, ids.flatten().sort().values)
    assert torch.allclose(plan.weights_SK.sum(), w.sum())


@pytest.mark.parametrize("T,E,K,R", PLAN_SHAPES)
def test_local_apply_over_all_ranks_equals_reference(T, E, K, R):
    """Summing every rank's partial outputs of the plan reproduces the plain-torch MoE."""
    case = CheckCase(layers=1, experts=E, k=K, d=12, f=7)
    experts = SwigluExperts(case)
    x = torch.randn(T, 12)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]) if T else torch.empty(0, K, dtype=torch.long)
    w = torch.rand(T, K)
    p = ExpertPlacement.contiguous(1, E, R)
    plan = plan_dispatch(ids, w, p.dest_ranks(0, ids, 0), R)
    y = torch.zeros(T, 12)
    start = 0
    for r, c in enumerate(plan.send_counts):
        rows = slice(start, start + c)
        part = apply_local_experts(x[plan.token_S[rows]], plan.ids_SK[rows], plan.weights_SK[rows],
                                   lambda e, xx: experts(0, e, xx), p.local_experts(0, r))
        y.index_add_(0, plan.token_S[rows], part)
        start += c
    torch.testing.assert_close(y, reference_moe(x, ids, w, lambda e, xx: experts(0, e, xx)))


def test_apply_rejects_foreign_expert():
    """A row naming an expert the rank does not hold raises instead of being dropped."""
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="does not hold"):
        apply_local_experts(x, torch.tensor([[0, 5], [1, -1]]), torch.ones(2, 2), lambda e, v: v, [0, 1])


CASES_2 = (
    CheckCase(layers=2, experts=8, k=2, d=16, f=24, max_tokens=9, steps=3),
    CheckCase(layers=1, experts=3, k=3, d=33, f=5, max_tokens=0, steps=2),
    CheckCase(layers=2, experts=6, k=2, d=8, f=8, max_tokens=5, steps=2, replicas=1),
    CheckCase(layers=2, experts=6, k=2, d=8, f=8, max_tokens=5, steps=3, replicas=1, replica_dispatch="hash"),
    CheckCase(layers=1, experts=8, k=2, d=16, f=16, max_tokens=7, steps=2, dtype=torch.bfloat16),
)
CASES_4 = (
    CheckCase(layers=2, experts=8, k=2, d=16, f=24, max_tokens=11, steps=4),
    CheckCase(layers=2, experts=16, k=4, d=5, f=9, max_tokens=3, steps=2, replicas=2),
    CheckCase(layers=2, experts=8, k=2, d=6, f=4, max_tokens=6, steps=3, replicas=1, replica_dispatch="hash"),
    CheckCase(layers=1, experts=4, k=1, d=7, f=3, max_tokens=1, steps=1),
)


def _worker(rank, world_size, cases):
    assert check_rank(rank, world_size, cases) > 0
    if world_size == 2:  # ranks at different layers: both must raise, neither may hang
        from moe.comms.ep import ExpertParallel

        case = CheckCase(layers=2, experts=4, k=2, d=4, f=4)
        ep = ExpertParallel(placement=ExpertPlacement.contiguous(2, 4, 2), expert_fn=SwigluExperts(case))
        with pytest.raises(RuntimeError, match="out of step"):
            ep(rank, torch.randn(2, 4), torch.tensor([[0, 3], [1, 2]]), torch.ones(2, 2))
        _silent_peer(rank, ExpertParallel, case, timeout_s=2.0)


def _silent_peer(rank, ExpertParallel, case, timeout_s):
    """Rank 1 never joins a round; rank 0 must raise after the group timeout, not hang."""
    import datetime
    import time

    import torch.distributed as dist

    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=timeout_s))
    if rank == 1:
        time.sleep(timeout_s + 1.5)
        return
    ep = ExpertParallel(placement=ExpertPlacement.contiguous(1, 4, 2), expert_fn=SwigluExperts(case), group=group)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError):
        ep(0, torch.randn(3, 4), torch.tensor([[0, 3]] * 3), torch.ones(3, 2))
    assert time.monotonic() - t0 < timeout_s + 3


def test_ep_two_ranks_match_reference():
    """With 2 gloo ranks and uneven batches EP equals the single-process MoE; out-of-step or silent ranks raise."""
    run_local(2, _worker, CASES_2, timeout_s=30)


def test_ep_four_ranks_match_reference():
    """With 4 gloo ranks (replicas, k=1..4, empty steps), EP outputs equal the single-process MoE."""
    run_local(4, _worker, CASES_4, timeout_s=30)



def test_hash_spread_reaches_every_replica_from_round_robin_homes():
    """Tokens dealt round-robin over ranks still reach both copies of a replicated expert
    (an index + rank rule sends every one of them to the same copy)."""
    holds = torch.zeros(1, 4, 4, dtype=torch.bool)
    holds[0, 0, [0, 1]] = True
    holds[0, 1, 2] = holds[0, 2, 3] = holds[0, 3, 3] = True
    p = ExpertPlacement(holds_LER=holds)
    T = 400
    src_T = torch.arange(T) % 4
    dest = p.dest_ranks(0, torch.zeros(T, 1, dtype=torch.long), src_T, torch.arange(T))[:, 0]
    remote = dest[src_T >= 2]
    share = float((remote == 0).double().mean())
    assert 0.4 < share < 0.6, share
    assert torch.equal(dest[src_T < 2], src_T[src_T < 2])  # a local copy always serves


@pytest.mark.parametrize("loads,n", [([3, 0, 5], 4), ([0, 0], 5), ([2], 3), ([1, 4, 4, 9], 0), ([7, 7, 1], 13)])
def test_water_fill_raises_lowest_bins_first(loads, n):
    from moe.comms.placement import _water_fill

    add = _water_fill(loads, n)
    after = [a + x for a, x in zip(add, loads)]
    assert sum(add) == n and min(add) >= 0
    # no unit went to a bin that ends more than one above a bin that got nothing more
    for i, a in enumerate(add):
        if a:
            assert all(after[i] - 1 <= after[j] for j in range(len(loads)))


def _replicated(L=3, E=8, R=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    load_LE = torch.rand(L, E, generator=g) * 10
    return ExpertPlacement.contiguous(L, E, R).with_replicas(load_LE, 1), g


@pytest.mark.parametrize("seed", range(4))
def test_balanced_dispatch_keeps_locality_copies_and_counts(seed):
    """Balanced replica dispatch: a local copy always serves, only holders serve, every
    sender's quota matches its activations, and the same decision comes out per sender
    (as each rank computes it) and for all tokens at once (as the replay does)."""
    p, g = _replicated(seed=seed)
    T, K, R = 60, 2, 4
    for l in range(p.num_layers):
        ids = torch.stack([torch.randperm(8, generator=g)[:K] for _ in range(T)])
        src = torch.randint(0, R, (T,), generator=g)
        dest = p.balanced_dest_ranks(l, ids, src)
        assert bool(p.holds_LER[l][ids, dest].all())
        local = p.holds_LER[l][ids, src[:, None]]
        assert torch.equal(dest[local], src[:, None].expand(T, K)[local])
        counts = [p.dispatch_counts(l, ids[src == s], s) for s in range(R)]
        quota = p.balanced_quota(l, torch.stack([c[0] for c in counts]), torch.stack([c[1] for c in counts]))
        for s in range(R):
            assert torch.equal(quota[s].sum(1), counts[s][1])
            assert torch.equal(p.assign_with_quota(l, ids[src == s], s, quota[s]), dest[src == s])
        with pytest.raises(ValueError, match="disagree"):
            bad = quota[0].clone()
            bad[bad.sum(1).argmax(), 0] += 1
            p.assign_with_quota(l, ids[src == 0], 0, bad)


def test_balanced_dispatch_evens_out_a_hot_expert():
    """Expert 0 has copies on ranks 1 and 2, expert 1 lives on rank 1 only, and every
    token sits on rank 0 and uses both: the balanced split sends all of expert 0 to rank
    2, since expert 1 already loads rank 1; the hash halves it and overloads rank 1."""
    holds = torch.zeros(1, 2, 4, dtype=torch.bool)
    holds[0, 0, [1, 2]] = True
    holds[0, 1, 1] = True
    p = ExpertPlacement(holds_LER=holds)
    T = 90
    ids = torch.tensor([[0, 1]] * T)
    src = torch.zeros(T, dtype=torch.long)
    assert torch.bincount(p.balanced_dest_ranks(0, ids, src).flatten(), minlength=4).tolist() == [0, 90, 90, 0]
    hashed = torch.bincount(p.dest_ranks(0, ids, src).flatten(), minlength=4)
    assert hashed[1] > 120


def test_with_replicas_limited_to_most_imbalanced_layers():
    load_LE = torch.ones(4, 8)
    load_LE[2, 0] = 20.0  # layer 2 is by far the most imbalanced under the contiguous layout
    load_LE[0, 3] = 5.0   # layer 0 next
    base = ExpertPlacement.contiguous(4, 8, 4)
    p = base.with_replicas(load_LE, 1, layers=2)
    extra_L = (p.holds_LER.sum((1, 2)) - base.holds_LER.sum((1, 2))).tolist()
    assert extra_L == [4, 0, 4, 0]
    assert p.holds_LER[2, 0].sum() >= 2
    with pytest.raises(ValueError, match="layers must be in"):
        base.with_replicas(load_LE, 1, layers=5)
