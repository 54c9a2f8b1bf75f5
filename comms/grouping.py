"""Offline expert grouping: place experts that tokens use together on one rank.

Shape key: T profiled tokens, L layers, K experts per token, E experts, R ranks.

From a profiling trace we count, per layer, how often two experts serve one token
(intra-layer co-activation C_l[e, e']) and how often expert e at layer l is followed by
e' at layer l+1 for one token (inter-layer affinity A_l[e, e'], ExFlow's signal). We then
choose, layer by layer, which rank holds which expert to maximise

    intra_weight * sum_l sum_{e<e' same rank} C_l[e, e']
  + inter_weight * sum_l sum_{e at l, e' at l+1 on the same rank} A_l[e, e']

(the co-clustering objective of Sem-MoE, in the pairwise form), with every rank holding
the same number of experts per layer (its memory) and at most `load_cap` times the mean
activation load per layer (where no layout meets the cap, the search first minimises the
heaviest rank; replicas, `ExpertPlacement.with_replicas`, are then the remedy). With
`load_folds` > 1 the cap must also hold on each of that many consecutive parts of the
profile: expert popularity drifts from one context to the next, and a layout balanced on
the pooled counts alone can pair two experts that are hot together in one part. On small
profiles a part's own sampling noise already exceeds the cap, and the search then spends
its freedom on balance instead of locality, so the default is the whole profile only.
Intra-layer co-location shrinks the set of ranks a token is sent to; inter-layer
co-location lets a token shuffled to one of its layer-l ranks find a layer-(l+1) expert
there.

Search: from the contiguous layout and a few random layouts, block coordinate ascent
over layers. Where a layer has at most `exact_layouts` layouts with the per-rank expert
counts (8 experts on 4 ranks: 2,520), each step takes the best feasible layout of one
layer given its neighbours, by enumeration; otherwise repeated best-improving swaps of
two experts on two ranks of one layer (swaps keep the per-rank expert count), each
swap's gain for all pairs at once coming from the expert-to-rank affinity matrix.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import torch

from moe.comms.placement import ExpertPlacement

__all__ = ["GroupingConfig", "AffinityStats", "affinity_stats", "load_shares", "layouts", "fit_grouped_placement",
           "grouping_score"]


@dataclass(kw_only=True)
class GroupingConfig:
    """load_cap: max per-rank activation load per layer over its mean (on the profile).
    intra_weight, inter_weight: weights of co-activation and inter-layer affinity.
    restarts: random starting layouts besides the contiguous one (the swap search stops in
    local optima; on the Mixtral profiles the objective still rises from 4 to 16 restarts).
    seed: their seed.
    max_sweeps: passes over all layers of the swap search.
    load_folds: consecutive parts of the profile (token order) on which the cap must hold
    too, besides the whole; 1 = the whole profile only.
    exact_layouts: largest per-layer layout count searched by enumeration (0: swaps only).
    """

    load_cap: float = 1.2
    intra_weight: float = 1.0
    inter_weight: float = 1.0
    restarts: int = 16
    seed: int = 0
    max_sweeps: int = 20
    load_folds: int = 1
    exact_layouts: int = 20_000

    def __post_init__(self) -> None:
        if not self.load_cap >= 1.0:
            raise ValueError(f"load_cap must be >= 1.0 (max over mean load), got {self.load_cap}")
        if self.intra_weight < 0 or self.inter_weight < 0:
            raise ValueError("intra_weight and inter_weight must be >= 0")
        if self.restarts < 0 or self.max_sweeps < 1:
            raise ValueError("restarts must be >= 0 and max_sweeps >= 1")
        if self.exact_layouts < 0:
            raise ValueError(f"exact_layouts must be >= 0, got {self.exact_layouts}")
        if self.load_folds < 1:
            raise ValueError(f"load_folds must be >= 1 (1 = the whole profile only), got {self.load_folds}")


@dataclass(frozen=True)
class AffinityStats:
    """load_LE: activations per expert; co_LEE: co-activation counts (zero diagonal);
    next_LEE: A_l[e, e'] for l < L-1 (last layer all zero)."""

    load_LE: torch.Tensor
    co_LEE: torch.Tensor
    next_LEE: torch.Tensor


def affinity_stats(expert_ids_TLK: torch.Tensor, num_experts: int) -> AffinityStats:
    """Count loads, co-activations and inter-layer affinities of a routing trace."""
    if expert_ids_TLK.dim() != 3:
        raise ValueError(f"expert_ids must be [tokens, layers, k], got shape {tuple(expert_ids_TLK.shape)}")
    T, L, _ = expert_ids_TLK.shape
    hot_TLE = torch.zeros(T, L, num_experts, dtype=torch.float64)
    hot_TLE.scatter_(2, expert_ids_TLK.long(), 1.0)
    load_LE = hot_TLE.sum(0)
    co_LEE = torch.einsum("tle,tlf->lef", hot_TLE, hot_TLE)
    co_LEE -= torch.diag_embed(torch.diagonal(co_LEE, dim1=1, dim2=2))
    next_LEE = torch.zeros(L, num_experts, num_experts, dtype=torch.float64)
    if L > 1:
        next_LEE[:-1] = torch.einsum("tle,tlf->lef", hot_TLE[:, :-1], hot_TLE[:, 1:])
    return AffinityStats(load_LE=load_LE, co_LEE=co_LEE, next_LEE=next_LEE)


def grouping_score(rank_LE: torch.Tensor, stats: AffinityStats, config: GroupingConfig) -> float:
    """The objective above for a one-copy layout rank_LE [L, E]."""
    R = int(rank_LE.max()) + 1
    onehot_LER = torch.nn.functional.one_hot(rank_LE, R).double()
    same_LEE = onehot_LER @ onehot_LER.transpose(1, 2)
    intra = (stats.co_LEE * same_LEE).sum() / 2
    cross_LEE = onehot_LER[:-1] @ onehot_LER[1:].transpose(1, 2)
    inter = (stats.next_LEE[:-1] * cross_LEE).sum()
    return float(config.intra_weight * intra + config.inter_weight * inter)


def _rank_affinity(l: int, rank_LE: torch.Tensor, stats: AffinityStats, config: GroupingConfig,
                   R: int) -> torch.Tensor:
    """S[e, r]: objective gained by expert e of layer l sitting on rank r, given the rest."""
    L = rank_LE.shape[0]
    S_ER = config.intra_weight * stats.co_LEE[l] @ torch.nn.functional.one_hot(rank_LE[l], R).double()
    if l > 0:
        S_ER += config.inter_weight * stats.next_LEE[l - 1].T @ torch.nn.functional.one_hot(rank_LE[l - 1], R).double()
    if l < L - 1:
        S_ER += config.inter_weight * stats.next_LEE[l] @ torch.nn.functional.one_hot(rank_LE[l + 1], R).double()
    return S_ER


def _improve_layer(l: int, rank_LE: torch.Tensor, stats: AffinityStats, config: GroupingConfig,
                   R: int, share_VE: torch.Tensor) -> bool:
    """Apply best-improving feasible swaps in layer l until none is left; True if any.

    share_VE: per view V (whole profile, its folds) each expert's load over the cap of one
    rank, so a rank is within the cap in a view where its summed share is <= 1.
    """
    changed = False
    E = share_VE.shape[1]
    for _ in range(E * E):
        p_E = rank_LE[l]
        S_ER = _rank_affinity(l, rank_LE, stats, config, R)
        own_E = S_ER.gather(1, p_E[:, None]).squeeze(1)
        # gain of swapping a (on p_a) with b (on p_b): both move, their mutual term stays
        cross_EE = S_ER[:, p_E]  # S[a, p_b]
        gain_EE = cross_EE + cross_EE.T - own_E[:, None] - own_E[None, :] \
            - 2 * config.intra_weight * stats.co_LEE[l]
        rank_VR = torch.zeros(share_VE.shape[0], R, dtype=torch.float64).index_add_(1, p_E, share_VE)
        at_VE = rank_VR[:, p_E]  # share of the rank each expert sits on
        new_a_VEE = at_VE[:, :, None] - share_VE[:, :, None] + share_VE[:, None, :]  # a's rank after the swap
        worst_EE = torch.maximum(new_a_VEE, new_a_VEE.transpose(1, 2)).amax(0)  # b's rank: by symmetry
        old_EE = torch.maximum(at_VE[:, :, None], at_VE[:, None, :]).amax(0)
        if bool((rank_VR > 1 + 1e-9).any()):  # repair first: take the swap that lowers the heaviest rank most
            ok_EE = (p_E[:, None] != p_E[None, :]) & (worst_EE < old_EE - 1e-9) & (old_EE >= rank_VR.max() - 1e-9)
            score_EE = torch.where(ok_EE, old_EE - worst_EE, -1.0)
        else:
            ok_EE = (p_E[:, None] != p_E[None, :]) & (worst_EE <= 1 + 1e-9)
            score_EE = torch.where(ok_EE, gain_EE, -1.0)
        best = int(score_EE.argmax())
        a, b = divmod(best, E)
        if score_EE[a, b] <= 1e-9:
            break
        rank_LE[l, a], rank_LE[l, b] = int(p_E[b]), int(p_E[a])
        changed = True
    return changed


def layouts(counts_R: list[int], limit: int) -> torch.Tensor | None:
    """int64 [N, E]: every assignment of E = sum(counts_R) experts to ranks with rank r
    holding counts_R[r] of them; None when there are more than `limit`."""
    n, left = 1, sum(counts_R)
    for c in counts_R:
        n *= math.comb(left, c)
        left -= c
    if n > limit:
        return None
    out: list[list[int]] = []
    rank_E = [0] * sum(counts_R)

    def fill(r: int, free: list[int]) -> None:
        if r == len(counts_R):
            out.append(rank_E.copy())
            return
        for group in itertools.combinations(free, counts_R[r]):
            for e in group:
                rank_E[e] = r
            fill(r + 1, [e for e in free if e not in group])

    fill(0, list(range(sum(counts_R))))
    return torch.tensor(out, dtype=torch.int64)


@dataclass(frozen=True)
class _LayerTable:
    """Every layout of one layer, scored once: N layouts, X = E * R."""

    layouts_NE: torch.Tensor  # int64 [N, E]
    onehot_NX: torch.Tensor  # float64 [N, E*R], layout n puts expert e on rank r
    intra_N: torch.Tensor  # float64 [N], weighted co-activation kept on one rank
    heavy_N: torch.Tensor  # float64 [N], heaviest rank's share of its cap over all views


def _layer_table(l: int, layouts_NE: torch.Tensor, stats: AffinityStats, config: GroupingConfig, R: int,
                 share_VE: torch.Tensor) -> _LayerTable:
    onehot_NER = torch.nn.functional.one_hot(layouts_NE, R).double()
    intra_N = config.intra_weight * torch.einsum("ner,ef,nfr->n", onehot_NER, stats.co_LEE[l], onehot_NER) / 2
    heavy_N = torch.einsum("ner,ve->nvr", onehot_NER, share_VE).amax((1, 2))
    return _LayerTable(layouts_NE, onehot_NER.flatten(1), intra_N, heavy_N)


def _best_layout(l: int, rank_LE: torch.Tensor, stats: AffinityStats, config: GroupingConfig, R: int,
                 table: _LayerTable) -> bool:
    """Set layer l to its best layout given the other layers; True if it changed.

    Best: within the cap in every view, the highest objective; where no layout is, the
    lowest heaviest rank. Ties keep the current layout.
    """
    keep = rank_LE[l].clone()
    S_ER = _rank_affinity(l, rank_LE, stats, replace(config, intra_weight=0.0), R)  # no term of layer l itself
    score_N = table.intra_N + table.onehot_NX @ S_ER.flatten()
    ok_N = table.heavy_N <= 1 + 1e-9
    current = int((table.layouts_NE == keep).all(1).nonzero()[0, 0])
    if bool(ok_N.any()):
        score_N = torch.where(ok_N, score_N, float("-inf"))
        best = int(score_N.argmax())
        better = bool(score_N[best] > score_N[current] + 1e-9) or not bool(ok_N[current])
    else:
        best = int(table.heavy_N.argmin())
        better = bool(table.heavy_N[best] < table.heavy_N[current] - 1e-9)
    if better:
        rank_LE[l] = table.layouts_NE[best]
    return better


def load_shares(expert_ids_TLK: torch.Tensor, num_experts: int, world_size: int,
                config: GroupingConfig) -> torch.Tensor:
    """float64 [L, V, E]: each expert's load over one rank's cap, in the views the cap holds on.

    Views: the whole profile, then its `load_folds` consecutive parts (empty parts dropped).
    """
    T = expert_ids_TLK.shape[0]
    bounds = [round(T * i / config.load_folds) for i in range(config.load_folds + 1)]
    parts = [expert_ids_TLK]
    if config.load_folds > 1:
        parts += [expert_ids_TLK[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    views = []
    for part in parts:
        load_LE = affinity_stats(part, num_experts).load_LE
        cap_L1 = (config.load_cap * load_LE.sum(1, keepdim=True) / world_size).clamp(min=1e-12)
        views.append(load_LE / cap_L1)
    return torch.stack(views, 1)


def fit_grouped_placement(expert_ids_TLK: torch.Tensor, num_experts: int, world_size: int,
                          config: GroupingConfig | None = None) -> ExpertPlacement:
    """A one-copy placement for `world_size` ranks fitted on a profiling trace (see module doc)."""
    config = config or GroupingConfig()
    E, R = num_experts, world_size
    if R > E:
        raise ValueError(f"{R} ranks cannot each hold one of only {E} experts")
    stats = affinity_stats(expert_ids_TLK, E)
    L = stats.load_LE.shape[0]
    share_LVE = load_shares(expert_ids_TLK, E, R, config)
    base_LE = ExpertPlacement.contiguous(L, E, R).holds_LER.long().argmax(2)
    g = torch.Generator().manual_seed(config.seed)
    starts = [base_LE] + [torch.stack([base_LE[l][torch.randperm(E, generator=g)] for l in range(L)])
                          for _ in range(config.restarts)]
    layouts_NE = layouts(torch.bincount(base_LE[0], minlength=R).tolist(), config.exact_layouts)
    tables = None if layouts_NE is None else [
        _layer_table(l, layouts_NE, stats, config, R, share_LVE[l]) for l in range(L)]
    best, best_score = None, (0.0, 0.0)
    for rank_LE in starts:
        rank_LE = rank_LE.clone()
        for _ in range(config.max_sweeps):
            if tables is not None:
                moved = [_best_layout(l, rank_LE, stats, config, R, tables[l]) for l in range(L)]
            else:
                moved = [_improve_layer(l, rank_LE, stats, config, R, share_LVE[l]) for l in range(L)]
            if not any(moved):
                break
        # Feasibility first (where no layout meets the cap, the least overloaded), then score.
        rank_LVR = torch.zeros(L, share_LVE.shape[1], R, dtype=torch.float64).scatter_add_(
            2, rank_LE[:, None, :].expand_as(share_LVE), share_LVE)
        excess = float((rank_LVR.amax((1, 2)) - 1).clamp(min=0).sum())
        score = (-round(excess, 6), grouping_score(rank_LE, stats, config))
        if best is None or score > best_score:
            best, best_score = rank_LE, score
    return ExpertPlacement.from_ranks(best, R)
