"""Expert placement: which ranks hold which experts of every MoE layer.

Shape key: L MoE layers, E experts per layer, R ranks (expert-parallel world size),
T tokens, K experts per token.

A placement is a boolean mask `holds_LER[l, e, r]`: rank r holds a copy of expert e of
layer l. Every expert has at least one copy. Several copies of one expert are replicas
(EPLB-style, for hot experts). Which copy serves an activation is decided by the sender
alone, deterministically, so the receiving rank never needs to be told:

- a local copy always wins (no bytes move);
- otherwise copy number `(token_index + rank_offset) % n_copies` in ascending rank order,
  which spreads a hot expert's remote tokens evenly over its replicas.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ExpertPlacement"]


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

    def with_replicas(self, load_LE: torch.Tensor, extra_per_rank: int) -> "ExpertPlacement":
        """Add `extra_per_rank` replica slots on every rank, filled EPLB-style.

        load_LE: [L, E] expected activations per expert (e.g. counts from a profile trace).
        Greedy per layer: repeatedly give the expert with the highest load per copy one more
        copy, on the rank with the lowest expected load that has a free slot and no copy yet.
        """
        load_LE = torch.as_tensor(load_LE, dtype=torch.float64)
        if load_LE.shape != self.holds_LER.shape[:2]:
            raise ValueError(f"load_LE must be {tuple(self.holds_LER.shape[:2])}, got {tuple(load_LE.shape)}")
        if extra_per_rank < 0:
            raise ValueError(f"extra_per_rank must be >= 0, got {extra_per_rank}")
        holds = self.holds_LER.clone()
        R = self.world_size
        for l in range(self.num_layers):
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
        pick_TK = (token_index_T.long().cpu()[:, None] + src_T1) % n_TK
        dest_TK = copies_TKC.gather(2, pick_TK[..., None]).squeeze(2)
        local_TK = self.holds_LER[layer][ids_TK, src_T1]
        return torch.where(local_TK, src_T1, dest_TK)

    def primary_rank(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Lowest rank holding each expert id (any shape -> same shape)."""
        return self._copies_LEC[layer][ids.long().cpu(), 0]

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
