"""Alignment op: group routed (token, k) pairs by weight slot, padded to the GEMM block size.

[Router] -> [moe_align] -> [grouped GEMMs over padded row blocks] -> [combine]

The grouped GEMMs give each program block_size consecutive rows of one expert, so each
slot's rows are padded up to a multiple of block_size. One Triton launch does it all; the
output sizes use a host-side upper bound, so nothing synchronises with the host. The
plain-torch twin is `reference.moe_align_reference`, which the tests compare against for
exact equality.

Shape key: T tokens, K experts per token, G global experts, E weight slots, P padded rows,
B row blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_align_inputs, check_index_values
from .reference import max_padded_rows

__all__ = ["moe_align", "launch_moe_align", "check_triton_device", "INTERPRETED"]

# Pairs scanned per step; a power of two large enough that decode shapes take one step.
_CHUNK = 256


@triton.jit
def _pair_slots(topk_ids_ptr, expert_map_ptr, offs, num_pairs, num_global, num_slots, HAS_MAP: tl.constexpr):
    """Slot of each flat pair index in `offs`, or -1 (past the end, out of range, or not here)."""
    in_range = offs < num_pairs
    ids = tl.load(topk_ids_ptr + offs, mask=in_range, other=-1)
    # Out-of-range ids are dropped rather than read out of bounds; the host does not check
    # values on CUDA because that would synchronise every layer.
    valid = in_range & (ids >= 0) & (ids < num_global)
    if HAS_MAP:
        slot = tl.load(expert_map_ptr + ids, mask=valid, other=-1).to(tl.int32)
    else:
        slot = tl.where(valid, ids, -1).to(tl.int32)
    return tl.where((slot >= 0) & (slot < num_slots), slot, -1)


@triton.jit
def _moe_align_kernel(
    topk_ids_ptr, expert_map_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    num_pairs, num_global, num_slots, p_max, b_max,
    HAS_MAP: tl.constexpr, BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr, SLOTS_POW2: tl.constexpr,
):
    # One program per slot. Every program counts all slots (cheap: a histogram per chunk)
    # so it knows where its own padded group starts without a second launch.
    slot = tl.program_id(0)
    bins = tl.arange(0, SLOTS_POW2)
    counts = tl.zeros([SLOTS_POW2], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        s = _pair_slots(topk_ids_ptr, expert_map_ptr, offs, num_pairs, num_global, num_slots, HAS_MAP)
        counts += tl.histogram(tl.maximum(s, 0), SLOTS_POW2, mask=s >= 0)
    padded = (counts + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
    my_start = tl.sum(tl.where(bins < slot, padded, 0))
    my_count = tl.sum(tl.where(bins == slot, counts, 0))
    my_padded = tl.sum(tl.where(bins == slot, padded, 0))
    total = tl.sum(padded)

    # Own pairs in ascending flat order: rank = running count + inclusive prefix sum - 1.
    written = my_count * 0
    for start in range(0, num_pairs, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        s = _pair_slots(topk_ids_ptr, expert_map_ptr, offs, num_pairs, num_global, num_slots, HAS_MAP)
        hit = (s == slot).to(tl.int32)
        rank = written + tl.cumsum(hit, axis=0) - 1
        tl.store(sorted_ids_ptr + my_start + rank, offs.to(tl.int32), mask=hit > 0)
        written += tl.sum(hit)

    # Padding rows of this group point at the sentinel pair index T*K.
    pad = tl.arange(0, BLOCK_SIZE)
    tl.store(sorted_ids_ptr + my_start + my_count + pad, num_pairs + pad * 0, mask=pad < my_padded - my_count)
    first_block = my_start // BLOCK_SIZE
    my_blocks = my_padded // BLOCK_SIZE
    for b in range(0, my_blocks, CHUNK):
        blk = b + tl.arange(0, CHUNK)
        tl.store(expert_ids_ptr + first_block + blk, slot + blk * 0, mask=blk < my_blocks)

    # The last program also fills the unused tail of both outputs (disjoint from the groups).
    if slot == num_slots - 1:
        tl.store(num_post_ptr, total)
        for p in range(total, p_max, CHUNK):
            rows = p + tl.arange(0, CHUNK)
            tl.store(sorted_ids_ptr + rows, num_pairs + rows * 0, mask=rows < p_max)
        for b in range(total // BLOCK_SIZE, b_max, CHUNK):
            blk = b + tl.arange(0, CHUNK)
            tl.store(expert_ids_ptr + blk, blk * 0 - 1, mask=blk < b_max)


# Kernels decorated while TRITON_INTERPRET=1 are interpreter objects and take CPU tensors.
INTERPRETED = type(_moe_align_kernel).__name__ == "InterpretedFunction"


def check_triton_device(device: torch.device, op: str, reference: str) -> None:
    """Raise unless the Triton kernels can run on `device` (CUDA, or CPU under the interpreter)."""
    if device.type == "cuda" or (device.type == "cpu" and INTERPRETED):
        return
    raise ValueError(
        f"{op} runs Triton kernels on CUDA tensors, got tensors on {device}; use {reference} "
        "there, or set TRITON_INTERPRET=1 before triton is first imported to run the kernels "
        "in Triton's interpreter on CPU"
    )


def moe_align(topk_ids_TK, block_size: int, num_slots: int, expert_map_E=None):
    """Triton alignment op; the same contract and outputs as `moe_align_reference`.

    Args:
        topk_ids_TK: int32/int64 [T, K] expert ids (global ids when expert_map_E is given).
        block_size: rows per GEMM program (the block_m of the launch settings).
        num_slots: E, the number of weight slots.
        expert_map_E: optional int32/int64 [G]: global id -> slot in [0, E) or -1 (not here).
    Returns:
        sorted_token_ids_P: int32 [P_max]: flat pair indices t*K+k grouped by slot, each
            group padded to a multiple of block_size with the sentinel T*K; the tail is T*K.
        expert_ids_B: int32 [ceil(P_max / block_size)]: slot of each row block, -1 past the end.
        num_tokens_post_padded: int32 [1]: rows in use, P.
    On CUDA ids are not range-checked (that would synchronise); out-of-range ids are
    dropped. On other devices they are checked and raise ValueError.
    """
    check_align_inputs(topk_ids_TK, block_size, num_slots, expert_map_E)
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two for the Triton kernel, got {block_size}")
    device = topk_ids_TK.device
    check_triton_device(device, "moe_align", "moe_align_reference")
    if device.type != "cuda":
        check_index_values(topk_ids_TK, num_slots, expert_map_E)
    elif device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):  # Triton launches on the current device
            return launch_moe_align(topk_ids_TK, block_size, num_slots, expert_map_E)
    return launch_moe_align(topk_ids_TK, block_size, num_slots, expert_map_E)


def launch_moe_align(topk_ids_TK, block_size: int, num_slots: int, expert_map_E=None):
    """`moe_align` after its arguments were checked: allocates outputs and launches."""
    num_pairs = topk_ids_TK.numel()
    if num_pairs >= 2**31 - num_slots * block_size:
        raise ValueError(f"topk_ids_TK has {num_pairs} pairs; int32 row indices need fewer than 2**31")
    device = topk_ids_TK.device
    p_max = max_padded_rows(num_pairs, block_size, num_slots)
    b_max = -(-p_max // block_size)
    sorted_ids = torch.empty((p_max,), dtype=torch.int32, device=device)
    expert_ids = torch.empty((b_max,), dtype=torch.int32, device=device)
    num_post = torch.empty((1,), dtype=torch.int32, device=device)
    if num_pairs == 0:
        # Nothing routed: no rows, and an empty launch would pass null pointers.
        num_post.zero_()
        return sorted_ids, expert_ids, num_post
    ids = topk_ids_TK.contiguous()
    emap = ids if expert_map_E is None else expert_map_E.contiguous()
    num_global = num_slots if expert_map_E is None else expert_map_E.shape[0]
    _moe_align_kernel[(num_slots,)](
        ids, emap, sorted_ids, expert_ids, num_post,
        num_pairs, num_global, num_slots, p_max, b_max,
        HAS_MAP=expert_map_E is not None, BLOCK_SIZE=block_size, CHUNK=_CHUNK,
        SLOTS_POW2=max(16, triton.next_power_of_2(num_slots)),  # tiny blocks gain nothing
    )
    return sorted_ids, expert_ids, num_post
