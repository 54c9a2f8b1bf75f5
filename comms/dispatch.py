"""Deduplicated all-to-all dispatch and combine for expert parallelism.

Shape key: T local tokens, D hidden size, K experts per token, R ranks,
S rows this rank sends (distinct (token, destination rank) pairs), N rows it receives.

```
[x_TD, topk_ids_TK, dest_TK] --plan--> one row per distinct (token, dest rank)
   --all_to_all_single(x_SD)--> [expert ranks: sum_k w_k * expert_k(x) over their own k]
   --all_to_all_single(y_ND)--> index_add into y_TD
```

A token that uses two experts on one remote rank is sent once, with the ids of the
experts that rank serves (other slots are -1); that rank returns one partial sum, so
dispatch and combine each move `distinct remote ranks x D` elements per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

__all__ = ["DispatchPlan", "plan_dispatch", "all_to_all", "apply_local_experts", "reference_moe",
           "ExpertFn"]

# expert_fn(expert_id, x_ND) -> y_ND for one MoE layer.
ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DispatchPlan:
    """Rows to send, sorted by destination rank.

    send_counts: rows for each rank, length R (self included: it never leaves the host).
    token_S: int64 [S] local token of each row.
    ids_SK: int64 [S, K] expert ids the destination serves for that row; -1 elsewhere.
    weights_SK: float32 [S, K] routing weights, 0 where ids_SK is -1.
    """

    send_counts: list[int]
    token_S: torch.Tensor
    ids_SK: torch.Tensor
    weights_SK: torch.Tensor


def plan_dispatch(topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, dest_TK: torch.Tensor,
                  world_size: int) -> DispatchPlan:
    """Group activations into one row per distinct (token, destination rank), by rank."""
    if topk_ids_TK.shape != dest_TK.shape or topk_ids_TK.shape != topk_weights_TK.shape:
        raise ValueError(
            f"topk_ids {tuple(topk_ids_TK.shape)}, topk_weights {tuple(topk_weights_TK.shape)} and "
            f"dest {tuple(dest_TK.shape)} must all be [tokens, k]"
        )
    ids_TK, dest_TK = topk_ids_TK.long().cpu(), dest_TK.long().cpu()
    w_TK = topk_weights_TK.float().cpu()
    hit_RTK = dest_TK[None] == torch.arange(world_size)[:, None, None]
    rank_S, token_S = hit_RTK.any(dim=2).nonzero(as_tuple=True)  # sorted by rank, then token
    hit_SK = hit_RTK[rank_S, token_S]
    ids_SK = torch.where(hit_SK, ids_TK[token_S], -1)
    weights_SK = torch.where(hit_SK, w_TK[token_S], 0.0)
    counts = torch.bincount(rank_S, minlength=world_size).tolist()
    return DispatchPlan(send_counts=counts, token_S=token_S, ids_SK=ids_SK, weights_SK=weights_SK)


def all_to_all(send: torch.Tensor, send_counts: list[int], recv_counts: list[int],
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Variable-split all_to_all_single over dim 0; returns the [sum(recv_counts), ...] rows."""
    recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
    dist.all_to_all_single(recv, send.contiguous(), output_split_sizes=recv_counts,
                           input_split_sizes=send_counts, group=group)
    return recv


def apply_local_experts(x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor,
                        expert_fn: ExpertFn, local_experts: list[int]) -> torch.Tensor:
    """y_ND = sum over k with ids_NK[n, k] in local_experts of weights * expert(x_n).

    Accumulates in float32 and returns x's dtype. An id that is neither -1 nor local is a
    placement mismatch between ranks and raises.
    """
    y_ND = torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)
    if x_ND.shape[0] == 0:
        return y_ND.to(x_ND.dtype)
    ids_NK = ids_NK.to(x_ND.device)
    weights_NK = weights_NK.to(device=x_ND.device, dtype=torch.float32)
    seen = torch.zeros_like(ids_NK, dtype=torch.bool)
    for e in local_experts:
        rows_M, slot_M = (ids_NK == e).nonzero(as_tuple=True)
        if len(rows_M) == 0:
            continue
        seen[rows_M, slot_M] = True
        out_MD = expert_fn(e, x_ND[rows_M]).float()
        y_ND.index_add_(0, rows_M, out_MD * weights_NK[rows_M, slot_M, None])
    stray = (ids_NK >= 0) & ~seen
    if stray.any():
        e = int(ids_NK[stray][0])
        raise RuntimeError(f"received a token for expert {e}, which this rank does not hold "
                           f"(holds {local_experts}): ranks disagree on the expert placement")
    return y_ND.to(x_ND.dtype)


def reference_moe(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                  expert_fn: ExpertFn) -> torch.Tensor:
    """Single-process plain-torch reference: y_t = sum_k w_tk * expert_{id_tk}(x_t)."""
    y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for e in topk_ids_TK.unique().tolist():
        tok_M, slot_M = (topk_ids_TK == e).nonzero(as_tuple=True)
        w_M1 = topk_weights_TK[tok_M, slot_M].float()[:, None]
        y_TD.index_add_(0, tok_M, expert_fn(e, x_TD[tok_M]).float() * w_M1)
    return y_TD.to(x_TD.dtype)
