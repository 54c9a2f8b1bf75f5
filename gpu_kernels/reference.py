"""Plain-torch references of the fused-MoE kernels: the ground truth of the tests, and the
path the runtime takes on CPU devices. They run on any device.

Shape key: T tokens, D hidden size, F expert intermediate size, E weight slots (dim 0 of
w13/w2), G global experts (length of expert_map), K experts per token, P padded rows,
B row blocks (P / block_size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn

from .checks import check_align_inputs, check_index_values, check_moe_inputs

__all__ = ["fused_moe_reference", "moe_align_reference", "max_padded_rows"]


def max_padded_rows(num_pairs: int, block_size: int, num_slots: int) -> int:
    """Upper bound on P for `num_pairs` = T*K routed pairs.

    Each non-empty slot pads its rows up to a multiple of block_size, adding at most
    block_size - 1 rows, and at most min(num_slots, num_pairs) slots are non-empty. The
    bound is known on the host without reading the ids, so the GPU path never syncs.
    """
    return num_pairs + min(num_slots, num_pairs) * (block_size - 1)


def _slots_of(topk_ids_TK: torch.Tensor, expert_map_G) -> torch.Tensor:
    ids = topk_ids_TK.long()
    return ids if expert_map_G is None else expert_map_G.long()[ids]


def moe_align_reference(topk_ids_TK, block_size: int, num_slots: int, expert_map_E=None):
    """Sort routed (token, k) pairs by weight slot and pad each slot to a multiple of block_size.

    Pairs are numbered by their flat index i = t * K + k into topk_ids_TK. A pair's slot is
    expert_map_E[id] (or id itself without a map); pairs whose slot is -1 are dropped (that
    expert runs elsewhere). Each GEMM program takes block_size consecutive rows and must see
    a single expert's weights, so every slot's rows are padded up to a multiple of
    block_size with the sentinel T*K (a row the kernels skip).

    Returns:
        sorted_token_ids_P: int32 [P_max], P_max = max_padded_rows(T*K, block_size, E): flat
            pair indices grouped by slot in ascending slot order, ascending within a slot,
            each slot's group padded with T*K; entries from num_tokens_post_padded on are T*K.
        expert_ids_B: int32 [ceil(P_max / block_size)]: the slot of each row block; -1 for
            blocks from num_tokens_post_padded / block_size on.
        num_tokens_post_padded: int32 [1]: P, the number of rows in use (a multiple of block_size).
    """
    check_align_inputs(topk_ids_TK, block_size, num_slots, expert_map_E)
    check_index_values(topk_ids_TK, num_slots, expert_map_E)
    device = topk_ids_TK.device
    num_pairs = topk_ids_TK.numel()
    p_max = max_padded_rows(num_pairs, block_size, num_slots)
    b_max = -(-p_max // block_size)
    slots = _slots_of(topk_ids_TK, expert_map_E).flatten()
    sorted_ids = torch.full((p_max,), num_pairs, dtype=torch.int32, device=device)
    expert_ids = torch.full((b_max,), -1, dtype=torch.int32, device=device)
    start = 0
    for e in range(num_slots):
        rows = torch.nonzero(slots == e).flatten()
        if rows.numel() == 0:
            continue
        padded = -(-rows.numel() // block_size) * block_size
        sorted_ids[start:start + rows.numel()] = rows.to(torch.int32)
        expert_ids[start // block_size:(start + padded) // block_size] = e
        start += padded
    return sorted_ids, expert_ids, torch.tensor([start], dtype=torch.int32, device=device)


def fused_moe_reference(x_TD, w13_E2FD, w2_EDF, topk_ids_TK, topk_weights_TK, expert_map_E=None):
    """y_TD = sum_k topk_weights_TK[t, k] * expert_{slot(t, k)}(x_TD[t]), one expert at a time.

    expert_e(x) = w2[e] @ (silu(w13[e, :F] @ x) * (w13[e, F:] @ x)).

    Args:
        x_TD: [T, D] float32/float16/bfloat16 activations.
        w13_E2FD: [E, 2F, D] gate (rows 0..F-1) and up (rows F..2F-1) projections per slot.
        w2_EDF: [E, D, F] down projection per slot, same dtype as w13.
        topk_ids_TK: [T, K] int32/int64 expert ids (global ids when expert_map_E is given).
        topk_weights_TK: [T, K] float routing weights.
        expert_map_E: optional int32/int64 [G]: global expert id -> slot, or -1 for experts
            that are not here; those pairs contribute nothing.
    Returns:
        y_TD: [T, D] in x_TD's dtype, computed in float32.
    """
    check_moe_inputs(x_TD, w13_E2FD, w2_EDF, topk_ids_TK, topk_weights_TK, expert_map_E)
    check_index_values(topk_ids_TK, w13_E2FD.shape[0], expert_map_E)
    F = w2_EDF.shape[2]
    slots_TK = _slots_of(topk_ids_TK, expert_map_E)
    y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for e in torch.unique(slots_TK).tolist():
        if e < 0:
            continue
        t_idx, k_idx = torch.nonzero(slots_TK == e, as_tuple=True)
        x_nD = x_TD[t_idx].float()
        h_n2F = x_nD @ w13_E2FD[e].float().t()
        act_nF = Fn.silu(h_n2F[:, :F]) * h_n2F[:, F:]
        out_nD = act_nF @ w2_EDF[e].float().t()
        gate_n1 = topk_weights_TK[t_idx, k_idx].float().unsqueeze(1)
        y_TD.index_add_(0, t_idx, out_nD * gate_n1)
    return y_TD.to(x_TD.dtype)
