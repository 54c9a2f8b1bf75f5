"""Expert-parallel MoE executor: one collective round per MoE-layer call.

Shape key: T local tokens, D hidden size, K experts per token, R ranks.

Every rank must enter every all_to_all, so a round is a collective. Each round starts
with a small header all_to_all (rows per destination, layer, done flag, D, dtype, K), then
dispatches rows, runs the local experts and combines (see comms.dispatch). Ranks whose
data-parallel shard is exhausted call `drain()`: they keep joining rounds with no tokens
of their own, serving other ranks' tokens, until every rank is draining. So ranks need
not run the same number of batches or decode steps; they only need to call the MoE
layers of one model in the same order, which the header checks (a mismatch raises on
every rank instead of hanging).

With replicas and balanced replica dispatch (the default), a round is preceded by one
all_gather of per-rank counts (ExpertPlacement.dispatch_counts): from them every rank
computes the same split of the replicated experts' remote activations over their copies
(ExpertPlacement.balanced_quota). Draining ranks join these gathers too, with zeros.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from moe.comms.dispatch import all_to_all, apply_local_experts, plan_dispatch
from moe.comms.placement import REPLICA_DISPATCH, ExpertPlacement

__all__ = ["EPConfig", "ExpertParallel", "LayerExpertFn", "LayerGroupedFn"]

# expert_fn(layer, expert, x_ND) -> y_ND: one local expert at a time
LayerExpertFn = Callable[[int, int, torch.Tensor], torch.Tensor]
# grouped_fn(layer, x_ND, ids_NK, weights_NK) -> y_ND: every local expert of a layer in one
# call (a fused kernel); ids_NK is -1 where the slot is served on another rank.
LayerGroupedFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_HEADER = 6  # count, layer, done, D, dtype code, K


@dataclass(kw_only=True)
class EPConfig:
    """comm_dtype: dtype of hidden rows on the wire (None: the activations' dtype).
    replica_dispatch: "balanced" (split replicated experts' remote activations over their
    copies from counts shared by every rank: one small all_gather per round, only where
    the placement has replicas) or "hash" (a hash of the token index, no extra collective).
    """

    comm_dtype: torch.dtype | None = None
    replica_dispatch: str = "balanced"

    def __post_init__(self) -> None:
        if self.comm_dtype is not None and self.comm_dtype not in _DTYPES:
            raise ValueError(f"comm_dtype must be one of {_DTYPES} or None, got {self.comm_dtype}")
        if self.replica_dispatch not in REPLICA_DISPATCH:
            raise ValueError(f"replica_dispatch must be one of {REPLICA_DISPATCH}, got {self.replica_dispatch!r}")


@dataclass
class EPStats:
    """Counters of this rank: rounds, rows it sent to other ranks, local/remote activations."""

    rounds: int = 0
    remote_rows: int = 0
    local_rows: int = 0
    local_activations: int = 0
    activations: int = 0
    wire_bytes: int = 0  # dispatch + combine bytes this rank sent to others
    expert_calls: int = 0  # (round, local expert) pairs that had rows to serve
    expert_rows: int = 0  # (row, expert) activations this rank's experts served, own and others'


class ExpertParallel:
    """Runs the routed experts of every MoE layer across the ranks of `group`.

    placement: which rank holds which experts (same object on every rank).
    expert_fn: computes one local expert: (layer, expert, x_ND) -> y_ND; or
    grouped_fn: computes all local experts of a layer in one call (see LayerGroupedFn).
    Exactly one of the two is given.
    """

    def __init__(self, *, placement: ExpertPlacement, expert_fn: LayerExpertFn | None = None,
                 grouped_fn: LayerGroupedFn | None = None,
                 group: dist.ProcessGroup | None = None, config: EPConfig | None = None) -> None:
        if (expert_fn is None) == (grouped_fn is None):
            raise ValueError("give exactly one of expert_fn (one expert per call) and grouped_fn "
                             "(all local experts of a layer per call)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if placement.world_size != self.world_size:
            raise ValueError(f"placement is for {placement.world_size} ranks, the process group has "
                             f"{self.world_size}")
        self.placement = placement
        self.expert_fn, self.grouped_fn = expert_fn, grouped_fn
        # local_LE[l, e]: this rank holds expert e of layer l (checks what other ranks send)
        self.local_LE = placement.holds_LER[:, :, self.rank].clone()
        self.config = config or EPConfig()
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(group) == "nccl" else torch.device("cpu")
        self.stats = EPStats()
        self._drained = False
        self._balanced = self.config.replica_dispatch == "balanced" and placement.has_replicas

    def __call__(self, layer: int, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                 topk_weights_TK: torch.Tensor, token_index_T: torch.Tensor | None = None) -> torch.Tensor:
        """y_TD = sum_k w_tk * expert_{layer, id_tk}(x_t), experts wherever they live.

        token_index_T: stable per-token index used to spread tokens over replicas (hash dispatch).
        """
        if self._drained:
            raise RuntimeError("this rank already called drain(); it can join no more MoE rounds")
        if not 0 <= layer < self.placement.num_layers:
            raise ValueError(f"layer {layer} outside the placement's {self.placement.num_layers} layers")
        if x_TD.dim() != 2 or topk_ids_TK.shape[0] != x_TD.shape[0]:
            raise ValueError(f"x_TD {tuple(x_TD.shape)} and topk_ids_TK {tuple(topk_ids_TK.shape)} "
                             "must be [tokens, hidden] and [tokens, k]")
        wire = self.config.comm_dtype or x_TD.dtype
        if wire not in _DTYPES:
            raise ValueError(f"activations in {wire} cannot go on the wire; use one of {_DTYPES} "
                             "(EPConfig.comm_dtype)")
        if self._balanced:
            fixed_R, remote_E = self.placement.dispatch_counts(layer, topk_ids_TK, self.rank)
            counts_S = self._share_counts(layer, fixed_R, remote_E, done=False)
            quota_SER = self.placement.balanced_quota(layer, counts_S[:, 2:2 + self.world_size],
                                                      counts_S[:, 2 + self.world_size:])
            dest_TK = self.placement.assign_with_quota(layer, topk_ids_TK, self.rank, quota_SER[self.rank])
        else:
            dest_TK = self.placement.dest_ranks(layer, topk_ids_TK, self.rank, token_index_T)
        plan = plan_dispatch(topk_ids_TK, topk_weights_TK, dest_TK, self.world_size)
        x_SD = x_TD.to(self.device)[plan.token_S.to(self.device)].to(wire)
        self._count(plan, dest_TK, x_SD)
        y_SD = self._round(layer, plan.send_counts, x_SD, plan.ids_SK, plan.weights_SK, done=False)
        y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=self.device)
        y_TD.index_add_(0, plan.token_S.to(self.device), y_SD.float())
        return y_TD.to(device=x_TD.device, dtype=x_TD.dtype)

    def drain(self) -> None:
        """Serve other ranks' tokens until every rank has drained; then return."""
        if self._drained:
            return
        zero = [0] * self.world_size
        empty_K = torch.empty((0, 0), dtype=torch.int64)
        none_R = torch.zeros(self.world_size, dtype=torch.int64)
        none_E = torch.zeros(self.placement.num_experts, dtype=torch.int64)
        while True:
            if self._balanced and bool(self._share_counts(-1, none_R, none_E, done=True)[:, 1].all()):
                break  # every rank is draining: nobody will start a round
            if self._round(-1, zero, None, empty_K, empty_K.float(), done=True) is None:
                break
        self._drained = True

    def _share_counts(self, layer: int, fixed_R: torch.Tensor, remote_E: torch.Tensor, done: bool) -> torch.Tensor:
        """all_gather of [layer, done, fixed_R..., remote_E...] from every rank -> int64 [R, 2+R+E].

        Active ranks then run the round; the layer check stays in the round's header."""
        row = torch.cat([torch.tensor([layer, int(done)]), fixed_R.long(), remote_E.long()]).to(self.device)
        rows = [torch.empty_like(row) for _ in range(self.world_size)]
        dist.all_gather(rows, row, group=self.group)
        return torch.stack(rows).cpu()

    # --- one collective round -----------------------------------------------------------
    def _round(self, layer: int, send_counts: list[int], x_SD: torch.Tensor | None,
               ids_SK: torch.Tensor, weights_SK: torch.Tensor, done: bool) -> torch.Tensor | None:
        R, dev = self.world_size, self.device
        D = x_SD.shape[1] if x_SD is not None else 0
        code = _DTYPES.index(x_SD.dtype) if x_SD is not None else 0
        head_R6 = torch.tensor([[c, layer, int(done), D, code, ids_SK.shape[1]] for c in send_counts],
                               dtype=torch.int64, device=dev).reshape(R, _HEADER)
        got_R6 = all_to_all(head_R6, [1] * R, [1] * R, self.group).cpu()
        self.stats.rounds += 1
        active = got_R6[:, 2] == 0
        if not active.any():
            return None
        ref = got_R6[active][0]
        layer_now, D, code, K = int(ref[1]), int(ref[3]), int(ref[4]), int(ref[5])
        bad = active & ((got_R6[:, 1] != layer_now) | (got_R6[:, 3] != D) | (got_R6[:, 4] != code)
                        | (got_R6[:, 5] != K))
        if bad.any():
            r = int(bad.nonzero()[0])
            raise RuntimeError(
                f"expert-parallel ranks are out of step: a rank is at MoE layer {layer_now} "
                f"(hidden {D}, {_DTYPES[code]}) while rank {r} is at layer {int(got_R6[r, 1])} "
                f"(hidden {int(got_R6[r, 3])}); every rank must call the MoE layers in the same order"
            )
        recv_counts = got_R6[:, 0].tolist()
        if x_SD is None:  # draining: nothing of our own to send
            x_SD = torch.empty((0, D), dtype=_DTYPES[code], device=dev)
        meta_S2K = torch.cat([ids_SK.double(), weights_SK.double()], dim=1).reshape(-1, 2 * K).to(dev)
        meta_N2K = all_to_all(meta_S2K, send_counts, recv_counts, self.group)
        x_ND = all_to_all(x_SD, send_counts, recv_counts, self.group)
        ids_NK, w_NK = meta_N2K[:, :K].long(), meta_N2K[:, K:].float()
        self._count_served(layer_now, ids_NK)
        if self.grouped_fn is None:
            y_ND = apply_local_experts(
                x_ND, ids_NK, w_NK, lambda e, x: self.expert_fn(layer_now, e, x),
                self.placement.local_experts(layer_now, self.rank),
            )
        elif x_ND.shape[0]:
            y_ND = self.grouped_fn(layer_now, x_ND, ids_NK, w_NK).to(x_ND.dtype)
        else:
            y_ND = torch.zeros_like(x_ND)
        return all_to_all(y_ND, recv_counts, send_counts, self.group)

    def _count_served(self, layer: int, ids_NK: torch.Tensor) -> None:
        """Count the rows this rank's experts serve; refuse ids it does not hold."""
        ids = ids_NK[ids_NK >= 0].cpu()
        if ids.numel() == 0:
            return
        held_E = self.local_LE[layer]
        if ids.max() >= held_E.numel() or not bool(held_E[ids].all()):
            e = int(ids[(ids >= held_E.numel()) | ~held_E[ids.clamp(max=held_E.numel() - 1)]][0])
            raise RuntimeError(
                f"received a token for expert {e} of MoE layer {layer}, which this rank does not hold "
                f"(holds {self.placement.local_experts(layer, self.rank)}): ranks disagree on the "
                "expert placement")
        self.stats.expert_rows += ids.numel()
        self.stats.expert_calls += int(torch.unique(ids).numel())

    def _count(self, plan, dest_TK: torch.Tensor, x_SD: torch.Tensor) -> None:
        s = self.stats
        own = plan.send_counts[self.rank]
        s.local_rows += own
        s.remote_rows += sum(plan.send_counts) - own
        s.activations += dest_TK.numel()
        s.local_activations += int((dest_TK == self.rank).sum())
        s.wire_bytes += 2 * (sum(plan.send_counts) - own) * x_SD.shape[1] * x_SD.element_size()
