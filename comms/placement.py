"""Expert placement: which ranks hold which experts of every MoE layer.

Shape key: L MoE layers, E experts per layer, R ranks (expert-parallel world size),
T tokens, K experts per token.

A placement is a boolean mask `holds_LER[l, e, r]`: rank r holds a copy of expert e of
layer l. Every expert has at least one copy. Several copies of one expert are replicas
(EPLB-style, for hot experts). Which copy serves an activation is decided by the sender
alone, deterministically, so the receiving rank never needs to be told:

- a local copy always wins (no bytes move);
- otherwise copy number `hash(token_index) % n_copies` in ascending rank order, which
  spreads a hot expert's remote tokens evenly over its replicas. The index is hashed
  (multiplicative hashing) because token indices and home ranks are often correlated
  (tokens dealt round-robin over ranks): `(token_index + rank) % 2` is the same for every
  token of a round-robin batch, and sent all of them to one copy.

Balanced replica dispatch (`balanced_quota`, `assign_with_quota`) replaces the hash for
the activations that have no local copy: every rank first shares two small counts per
layer (activations it sends to fixed ranks, and activations of each replicated expert
it must send away), then every rank computes the same water-filling split of each
replicated expert's remote activations over its copies, starting from the load the
fixed activations already put on each rank. A hash spreads evenly in expectation only;
on a batch it leaves the sampling noise of the expert loads, which is what dominates the
imbalance of small batches.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ExpertPlacement", "REPLICA_DISPATCH"]

# How an activation with no local copy picks among an expert's replicas (module docstring).
REPLICA_DISPATCH = ("balanced", "hash")

_GOLDEN_32 = 0x9E3779B1  # 2^32 / golden ratio, odd: Knuth's multiplicative hash


def _spread_hash(index_T: torch.Tensor) -> torch.Tensor:
    """int64 [T] -> well-mixed non-negative int64 [T] (bits 16..31 of index * golden)."""
    return ((index_T * _GOLDEN_32) & 0xFFFFFFFF) >> 16


def _water_fill(load_C: list[int], n: int) -> list[int]:
    """Integer units to add to each bin so that n units raise the lowest bins first:
    the highest level h with sum(max(0, h - load)) <= n, the remainder one unit each to
    the bins then at h, lowest index first."""
    lo, hi = min(load_C), min(load_C) + n
    while lo < hi:  # largest h whose fill fits in n
        mid = (lo + hi + 1) // 2
        if sum(max(0, mid - x) for x in load_C) <= n:
            lo = mid
        else:
            hi = mid - 1
    add = [max(0, lo - x) for x in load_C]
    left = n - sum(add)
    for c, x in enumerate(load_C):
        if left and x + add[c] == lo:
            add[c] += 1
            left -= 1
    return add


@dataclass(frozen=True, kw_only=True)
class ExpertPlacement:
    """Expert-to-rank map of every MoE layer.

    holds_LER: bool [L, E, R]; True where rank r holds expert e of layer l.
    """

    holds_LER: torch.Tensor

    def __post_init__(self) -> None:
        h = self.holds_LER
        if not isinstance(h, torch.Tensor) or h.dtype != torch.bool or h.dim() != 3:
            raise ValueError("holds_LER must be a bool tensor [layers, experts, ranks]")
        if min(h.shape) < 1:
            raise ValueError(f"placement needs >= 1 layer, expert and rank, got shape {tuple(h.shape)}")
        missing = (~h.any(dim=2)).nonzero()
        if len(missing):
            l, e = missing[0].tolist()
            raise ValueError(f"expert {e} of layer {l} is held by no rank ({len(missing)} such experts)")
        object.__setattr__(self, "holds_LER", h.contiguous().cpu())
        # Replica ranks of each (layer, expert), padded with -1; used on the hot path.
        n_copies_LE = h.sum(dim=2)
        order_LER = torch.sort((~h).to(torch.int8), dim=2, stable=True).indices
        copies_LEC = torch.where(
            torch.arange(h.shape[2])[None, None, :] < n_copies_LE[..., None], order_LER, -1
        )
        object.__setattr__(self, "_copies_LEC", copies_LEC)
        object.__setattr__(self, "_n_copies_LE", n_copies_LE)

    # --- shape --------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.holds_LER.shape[0]

    @property
    def num_experts(self) -> int:
        return self.holds_LER.shape[1]

    @property
    def world_size(self) -> int:
        return self.holds_LER.shape[2]

    # --- constructors -------------------------------------------------------------------
    @classmethod
    def from_ranks(cls, rank_LE: torch.Tensor, world_size: int) -> "ExpertPlacement":
        """One copy per expert: rank_LE int [L, E] gives the rank of expert e of layer l."""
        rank_LE = torch.as_tensor(rank_LE, dtype=torch.int64)
        if rank_LE.dim() != 2:
            raise ValueError(f"rank_LE must be [layers, experts], got shape {tuple(rank_LE.shape)}")
        if len(rank_LE.flatten()) and (rank_LE.min() < 0 or rank_LE.max() >= world_size):
            raise ValueError(f"expert ranks must lie in [0, {world_size}), got {rank_LE.min()}..{rank_LE.max()}")
        holds = torch.nn.functional.one_hot(rank_LE, world_size).bool()
        return cls(holds_LER=holds)

    @classmethod
    def contiguous(cls, num_layers: int, num_experts: int, world_size: int) -> "ExpertPlacement":
        """The usual EP layout: rank r holds experts [r*E/R, (r+1)*E/R) of every layer."""
        if num_layers < 1 or num_experts < 1 or world_size < 1:
            raise ValueError("contiguous placement needs num_layers, num_experts, world_size >= 1")
        if world_size > num_experts:
            raise ValueError(f"{world_size} ranks cannot each hold one of only {num_experts} experts")
        rank_E = torch.arange(num_experts) * world_size // num_experts
        return cls.from_ranks(rank_E.expand(num_layers, num_experts), world_size)

    def with_replicas(self, load_LE: torch.Tensor, extra_per_rank: int,
                      layers: int | None = None) -> "ExpertPlacement":
        """Add `extra_per_rank` replica slots on every rank, filled EPLB-style.

        load_LE: [L, E] expected activations per expert (e.g. counts from a profile trace).
        layers: give the slots only to this many layers, those whose heaviest rank carries
        the most load over the mean under this placement (None: every layer). Replicas
        cost expert memory; the most imbalanced layers gain the most from them.
        Greedy per layer: repeatedly give the expert with the highest load per copy one more
        copy, on the rank with the lowest expected load that has a free slot and no copy yet.
        """
        load_LE = torch.as_tensor(load_LE, dtype=torch.float64)
        if load_LE.shape != self.holds_LER.shape[:2]:
            raise ValueError(f"load_LE must be {tuple(self.holds_LER.shape[:2])}, got {tuple(load_LE.shape)}")
        if extra_per_rank < 0:
            raise ValueError(f"extra_per_rank must be >= 0, got {extra_per_rank}")
        if layers is not None and not 0 <= layers <= self.num_layers:
            raise ValueError(f"layers must be in [0, {self.num_layers}] (layers given replica slots), got {layers}")
        rank_LR = torch.einsum("le,ler->lr", load_LE, self.holds_LER.double())
        imbalance_L = rank_LR.amax(1) / rank_LR.mean(1).clamp(min=1e-12)
        n_chosen = self.num_layers if layers is None else layers
        chosen = sorted(torch.sort(-imbalance_L, stable=True).indices[:n_chosen].tolist())
        holds = self.holds_LER.clone()
        R = self.world_size
        for l in chosen:
            free_R = torch.full((R,), extra_per_rank)
            for _ in range(extra_per_rank * R):
                n_E = holds[l].sum(1).double()
                rank_load_R = (holds[l].double() * (load_LE[l] / n_E)[:, None]).sum(0)
                for e in torch.argsort(load_LE[l] / n_E, descending=True).tolist():
                    ok_R = (free_R > 0) & ~holds[l, e]
                    if ok_R.any():
                        r = int(torch.where(ok_R, rank_load_R, float("inf")).argmin())
                        holds[l, e, r] = True
                        free_R[r] -= 1
                        break
                else:
                    break
        return ExpertPlacement(holds_LER=holds)

    # --- queries ------------------------------------------------------------------------
    def local_experts(self, layer: int, rank: int) -> list[int]:
        """Experts of `layer` that `rank` holds, ascending."""
        return self.holds_LER[layer, :, rank].nonzero().flatten().tolist()

    def dest_ranks(self, layer: int, topk_ids_TK: torch.Tensor, src_rank: int | torch.Tensor,
                   token_index_T: torch.Tensor | None = None) -> torch.Tensor:
        """Rank that serves each activation, int64 [T, K] (rule in the module docstring).

        src_rank: the rank the tokens live on, an int or int64 [T] (one per token).
        token_index_T: a stable index per token used to spread replicas (default arange(T)).
        """
        ids_TK = topk_ids_TK.long().cpu()
        T = ids_TK.shape[0]
        src = torch.as_tensor(src_rank, dtype=torch.int64).cpu()
        src_T1 = src.expand(T)[:, None] if src.dim() == 0 else src[:, None]
        copies_TKC = self._copies_LEC[layer][ids_TK]
        n_TK = self._n_copies_LE[layer][ids_TK]
        if token_index_T is None:
            token_index_T = torch.arange(T)
        pick_TK = _spread_hash(token_index_T.long().cpu())[:, None] % n_TK
        dest_TK = copies_TKC.gather(2, pick_TK[..., None]).squeeze(2)
        local_TK = self.holds_LER[layer][ids_TK, src_T1]
        return torch.where(local_TK, src_T1, dest_TK)

    def primary_rank(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Lowest rank holding each expert id (any shape -> same shape)."""
        return self._copies_LEC[layer][ids.long().cpu(), 0]

    # --- balanced replica dispatch ------------------------------------------------------
    def _bound(self, layer: int, ids: torch.Tensor, src_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks over `ids` (expert ids of layer, any shape): served by a copy on src_rank,
        and otherwise by the expert's only copy: the activations no split can move."""
        local = self.holds_LER[layer][ids, src_rank]
        return local, ~local & (self._n_copies_LE[layer][ids] == 1)

    def dispatch_counts(self, layer: int, topk_ids_TK: torch.Tensor,
                        src_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What one rank contributes to the balanced split of `layer`.

        Returns fixed_R (int64 [R]: activations whose serving rank is decided already, a
        local copy or the only copy) and remote_E (int64 [E]: activations of each
        replicated expert with no copy on src_rank, to be split over its copies).
        """
        ids = topk_ids_TK.long().cpu().flatten()
        local, single = self._bound(layer, ids, src_rank)
        fixed_R = torch.zeros(self.world_size, dtype=torch.int64)
        fixed_R[src_rank] = int(local.sum())
        fixed_R += torch.bincount(self._copies_LEC[layer, ids[single], 0], minlength=self.world_size)
        remote_E = torch.bincount(ids[~local & ~single], minlength=self.num_experts)
        return fixed_R, remote_E

    def balanced_quota(self, layer: int, fixed_SR: torch.Tensor, remote_SE: torch.Tensor) -> torch.Tensor:
        """int64 [S=R, E, R]: how many of sender s's remote activations of expert e go to rank r.

        fixed_SR, remote_SE: every rank's `dispatch_counts` stacked (row s = rank s).
        Experts are taken hottest first (ties: lower id); each is water-filled over its
        copies on top of the load so far, and senders, in rank order, take their share
        from the copies in rank order. Pure and deterministic: every rank gets the same.
        """
        R, E = self.world_size, self.num_experts
        load_R = fixed_SR.long().sum(0).tolist()
        remote_SE = remote_SE.long()
        total_E = remote_SE.sum(0)
        quota_SER = torch.zeros(R, E, R, dtype=torch.int64)
        for e in sorted(range(E), key=lambda e: (-int(total_E[e]), e)):
            n = int(total_E[e])
            if n == 0:
                continue
            copies = [int(r) for r in self._copies_LEC[layer, e] if r >= 0]
            add = _water_fill([load_R[r] for r in copies], n)
            c = 0
            for s in range(R):
                need = int(remote_SE[s, e])
                while need:
                    while add[c] == 0:
                        c += 1
                    take = min(need, add[c])
                    quota_SER[s, e, copies[c]] += take
                    add[c] -= take
                    load_R[copies[c]] += take
                    need -= take
        return quota_SER

    def assign_with_quota(self, layer: int, topk_ids_TK: torch.Tensor, src_rank: int,
                          quota_ER: torch.Tensor) -> torch.Tensor:
        """dest_TK int64 [T, K] of one sender: local copy, else the only copy, else its
        replicated activations in token order filling quota_ER[e] in rank order.

        quota_ER: `balanced_quota(...)[src_rank]`; its row sums must equal the sender's
        `dispatch_counts` remote_E (raises ValueError otherwise: the ranks disagree)."""
        ids_TK = topk_ids_TK.long().cpu()
        T, K = ids_TK.shape
        local_TK, single_TK = self._bound(layer, ids_TK, src_rank)
        dest_TK = torch.where(local_TK, src_rank, self._copies_LEC[layer][ids_TK][..., 0])
        rest = (~local_TK & ~single_TK).flatten().nonzero().flatten()
        if len(rest) == 0:
            return dest_TK
        e_N = ids_TK.flatten()[rest]
        count_E = torch.bincount(e_N, minlength=self.num_experts)
        if not torch.equal(quota_ER.long().sum(1), count_E):
            raise ValueError(f"replica quota of layer {layer} does not match rank {src_rank}'s activations: "
                             "the ranks disagree on the placement or the counts")
        # rank n of each activation among those of its expert (stable, token order), then
        # the copy whose cumulative quota covers it
        order = torch.sort(e_N, stable=True).indices
        nth = torch.empty_like(e_N)
        nth[order] = torch.arange(len(e_N)) - (torch.cumsum(count_E, 0) - count_E)[e_N[order]]
        cum_ER = torch.cumsum(quota_ER.long(), 1)
        out = dest_TK.flatten().clone()
        out[rest] = torch.searchsorted(cum_ER[e_N], nth[:, None], right=True).squeeze(1)
        return out.view(T, K)

    def balanced_dest_ranks(self, layer: int, topk_ids_TK: torch.Tensor, src_T: torch.Tensor) -> torch.Tensor:
        """dest_TK for tokens living on several ranks (src_T int64 [T]) as the balanced
        dispatch decides it when every rank sends its own tokens: what a replay needs."""
        ids_TK = topk_ids_TK.long().cpu()
        src_T = torch.as_tensor(src_T, dtype=torch.int64).cpu().expand(ids_TK.shape[0])
        R = self.world_size
        parts = [(src_T == s).nonzero().flatten() for s in range(R)]
        counts = [self.dispatch_counts(layer, ids_TK[p], s) for s, p in enumerate(parts)]
        quota_SER = self.balanced_quota(layer, torch.stack([c[0] for c in counts]),
                                        torch.stack([c[1] for c in counts]))
        dest_TK = torch.empty_like(ids_TK)
        for s, p in enumerate(parts):
            if len(p):
                dest_TK[p] = self.assign_with_quota(layer, ids_TK[p], s, quota_SER[s])
        return dest_TK

    @property
    def has_replicas(self) -> bool:
        return bool((self._n_copies_LE > 1).any())

    # --- files --------------------------------------------------------------------------
    def to_json(self) -> dict:
        """A JSON-able dict: {"world_size", "num_experts", "layers": [[[ranks of e] for e] for l]}."""
        layers = [[self.holds_LER[l, e].nonzero().flatten().tolist() for e in range(self.num_experts)]
                  for l in range(self.num_layers)]
        return {"format": "moe-placement/1", "world_size": self.world_size,
                "num_experts": self.num_experts, "layers": layers}

    @classmethod
    def from_json(cls, obj: dict) -> "ExpertPlacement":
        """Inverse of to_json; raises ValueError naming what is malformed."""
        try:
            R, E, layers = int(obj["world_size"]), int(obj["num_experts"]), obj["layers"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"placement JSON needs world_size, num_experts and layers: {exc}") from None
        holds = torch.zeros(len(layers), E, R, dtype=torch.bool)
        for l, experts in enumerate(layers):
            if len(experts) != E:
                raise ValueError(f"placement layer {l} lists {len(experts)} experts, expected {E}")
            for e, ranks in enumerate(experts):
                for r in ranks:
                    if not 0 <= int(r) < R:
                        raise ValueError(f"placement layer {l} expert {e}: rank {r} not in [0, {R})")
                    holds[l, e, int(r)] = True
        return cls(holds_LER=holds)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ExpertPlacement":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"placement file {p} does not exist")
        try:
            obj = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"placement file {p} is not valid JSON: {exc}") from None
        return cls.from_json(obj)
