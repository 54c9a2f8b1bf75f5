"""Fused MoE layer in Triton: two grouped GEMMs over slot-sorted, padded rows.

    [Router] -> [moe_align] -> [gate/up GEMM, SiLU(gate) * up fused] -> [down GEMM * weight]
             -> [combine: sum over k]

Shape key: T tokens, D hidden size, F expert intermediate size, E weight slots, K experts per
token, P padded rows (see `moe_align`), B = P / block_m row blocks.

Rows of the GEMMs are routed (token, k) pairs, numbered t*K+k. `moe_align` lists them
grouped by slot and padded per slot to a multiple of block_m, so each program multiplies
block_m rows by a single expert's weights; padding rows carry the sentinel T*K and are
masked. Both GEMMs accumulate in float32. The gate/up result is stored in the weights'
dtype (the down GEMM's tensor-core input), the down result in float32, and the combine
casts to x's dtype. Its plain-torch twin is `reference.fused_moe_reference`.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .align import INTERPRETED, check_triton_device, launch_moe_align
from .checks import check_index_values, check_moe_inputs
from .launch_config import FusedMoELaunchConfig, GemmLaunchConfig, fit_shared_memory, get_launch_config

__all__ = ["fused_moe", "invoke_fused_moe"]


@triton.jit
def _block_coords(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row block, column block) of program `pid`; GROUP_M row blocks share a column band so
    the weight tiles they read stay in L2."""
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _gate_up_kernel(
    x_ptr, w13_ptr, act_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    num_pairs, top_k, D, F, num_pid_m,
    stride_xt, stride_xd, stride_we, stride_wn, stride_wd, stride_ap, stride_af,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """act[pair, n] = silu(x[tok] . w13[slot, n]) * (x[tok] . w13[slot, F + n]) for a
    [BLOCK_M pairs, BLOCK_N columns] tile; tok = pair // K."""
    num_pid_n = (F + BLOCK_N - 1) // BLOCK_N
    pid_m, pid_n = _block_coords(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    # The grid covers the worst-case padding; blocks past the real end do nothing.
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pair < num_pairs
    tok = (pair // top_k).to(tl.int64)
    slot = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < F
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xd
    g_ptrs = w13_ptr + slot * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wd
    u_ptrs = g_ptrs + F * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = offs_k < D - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a = a.to(g.dtype)
        if UPCAST_DOT:
            a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
        acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_xd
        g_ptrs += BLOCK_K * stride_wd
        u_ptrs += BLOCK_K * stride_wd
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    out_ptrs = act_ptr + pair[:, None].to(tl.int64) * stride_ap + offs_n[None, :] * stride_af
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr, w2_ptr, out_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    num_pairs, top_k, D, F, num_pid_m,
    stride_ap, stride_af, stride_we, stride_wd, stride_wf, stride_op, stride_od, stride_gt, stride_gk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """out[pair, d] = topk_weight[pair] * (act[pair] . w2[slot, d]) for a [BLOCK_M pairs,
    BLOCK_N columns] tile, in float32."""
    num_pid_n = (D + BLOCK_N - 1) // BLOCK_N
    pid_m, pid_n = _block_coords(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pair < num_pairs
    pair64 = pair.to(tl.int64)
    slot = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + pair64[:, None] * stride_ap + offs_k[None, :] * stride_af
    b_ptrs = w2_ptr + slot * stride_we + offs_n[None, :].to(tl.int64) * stride_wd + offs_k[:, None] * stride_wf
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        k_ok = offs_k < F - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST_DOT:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_af
        b_ptrs += BLOCK_K * stride_wf
    gate_ptrs = topk_weights_ptr + (pair64 // top_k) * stride_gt + (pair64 % top_k) * stride_gk
    gate = tl.load(gate_ptrs, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * gate[:, None]
    out_ptrs = out_ptr + pair64[:, None] * stride_op + offs_n[None, :] * stride_od
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])


_INTERPRETED = INTERPRETED  # same process-wide Triton mode as the alignment kernel


def _check_device(device: torch.device) -> None:
    check_triton_device(device, "fused_moe", "fused_moe_reference")


def _fit(cfg: GemmLaunchConfig, device: torch.device, a_bytes: int, b_bytes: int, b_tiles: int):
    if device.type != "cuda":
        return cfg
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    # Keep a margin for the epilogue's scratch and the compiler's own buffers.
    return fit_shared_memory(cfg, a_bytes=a_bytes, b_bytes=b_bytes, b_tiles=b_tiles, limit_bytes=int(limit * 0.85))


def _launch_opts(cfg: GemmLaunchConfig) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def invoke_fused_moe(x_TD, w13_E2FD, w2_EDF, topk_ids_TK, topk_weights_TK, expert_map_E=None, *,
                     config: FusedMoELaunchConfig):
    """`fused_moe` with explicit launch settings (for tuning and tests); same contract."""
    check_moe_inputs(x_TD, w13_E2FD, w2_EDF, topk_ids_TK, topk_weights_TK, expert_map_E)
    if not isinstance(config, FusedMoELaunchConfig):
        raise TypeError(f"config must be a FusedMoELaunchConfig, got {type(config).__name__}")
    _check_device(x_TD.device)
    return _fused_moe_checked(x_TD, w13_E2FD, w2_EDF, topk_ids_TK, topk_weights_TK, expert_map_E, config)


def _fused_moe_checked(x_TD, w13_E2FD, w2_EDF, topk_ids_TK, topk_weights_TK, expert_map_E, config):
    device = x_TD.device
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        # Triton launches on the current device, which need not be the tensors' device.
        with torch.cuda.device(device):
            return _fused_moe_checked(x_TD, w13_E2FD, w2_EDF, topk_ids_TK, topk_weights_TK, expert_map_E, config)
    E, D, F = w2_EDF.shape
    T, K = topk_ids_TK.shape
    if device.type != "cuda":
        check_index_values(topk_ids_TK, E, expert_map_E)
    if T == 0 or K == 0:
        return torch.zeros_like(x_TD)
    sorted_ids_P, expert_ids_B, num_post = launch_moe_align(topk_ids_TK, config.block_m, E, expert_map_E)
    num_pid_m = expert_ids_B.shape[0]
    num_pairs = T * K
    wdt = w13_E2FD.dtype
    precision = "ieee" if wdt == torch.float32 else "tf32"
    # Triton's interpreter multiplies bfloat16 tiles as raw 16-bit integers; widening the
    # operands to float32 first gives the exact products a tensor core accumulates.
    upcast = _INTERPRETED and wdt == torch.bfloat16

    act_PF = torch.empty((num_pairs, F), dtype=wdt, device=device)  # rows indexed by pair t*K+k
    # x tiles are staged in x's dtype and widened or narrowed after the load.
    cfg1 = _fit(config.gate_up, device, x_TD.element_size(), wdt.itemsize, b_tiles=2)
    grid1 = (num_pid_m * triton.cdiv(F, cfg1.block_n),)
    _gate_up_kernel[grid1](
        x_TD, w13_E2FD, act_PF, sorted_ids_P, expert_ids_B, num_post,
        num_pairs, K, D, F, num_pid_m,
        x_TD.stride(0), x_TD.stride(1), *w13_E2FD.stride(), act_PF.stride(0), act_PF.stride(1),
        DOT_PRECISION=precision, UPCAST_DOT=upcast, **_launch_opts(cfg1),
    )

    # Pairs dropped by expert_map_E are never written; zeros make them contribute nothing.
    out_PD = torch.zeros((num_pairs, D), dtype=torch.float32, device=device)
    cfg2 = _fit(config.down, device, wdt.itemsize, wdt.itemsize, b_tiles=1)
    grid2 = (num_pid_m * triton.cdiv(D, cfg2.block_n),)
    _down_kernel[grid2](
        act_PF, w2_EDF, out_PD, topk_weights_TK, sorted_ids_P, expert_ids_B, num_post,
        num_pairs, K, D, F, num_pid_m,
        act_PF.stride(0), act_PF.stride(1), *w2_EDF.stride(), out_PD.stride(0), out_PD.stride(1),
        topk_weights_TK.stride(0), topk_weights_TK.stride(1),
        DOT_PRECISION=precision, UPCAST_DOT=upcast, **_launch_opts(cfg2),
    )
    y_TD = out_PD.view(T, K, D).sum(dim=1) if K > 1 else out_PD
    return y_TD.to(x_TD.dtype)


@functools.lru_cache(maxsize=4096)
def _config_for(num_tokens: int, num_slots: int, intermediate: int, hidden: int, device_index: int | None):
    # Cached: the decode loop asks for the same few keys every layer.
    name = None if device_index is None else torch.cuda.get_device_name(device_index)
    return get_launch_config(num_tokens=num_tokens, num_slots=num_slots, intermediate=intermediate,
                             hidden=hidden, device_name=name)


def fused_moe(x_TD, w13_E2FD, w2_EDF, topk_ids_TK, topk_weights_TK, expert_map_E=None):
    """y_TD = sum_k topk_weights_TK[t, k] * expert_{slot(t, k)}(x_TD[t]) with Triton kernels.

    expert_e(x) = w2[e] @ (silu(w13[e, :F] @ x) * (w13[e, F:] @ x)).

    Args:
        x_TD: [T, D] float32/float16/bfloat16 activations.
        w13_E2FD: [E, 2F, D] gate rows 0..F-1 then up rows F..2F-1, per slot (e.g. the
            device cache's slot pool); bfloat16/float16, or float32.
        w2_EDF: [E, D, F] down projection per slot, same dtype as w13_E2FD.
        topk_ids_TK: [T, K] int32/int64 expert ids (global ids when expert_map_E is given).
        topk_weights_TK: [T, K] float routing weights.
        expert_map_E: optional int32/int64 [G]: global expert id -> slot in [0, E), or -1
            for experts not on this device; their pairs contribute nothing.
    Returns:
        y_TD: [T, D] in x_TD's dtype (float32 accumulation).

    Launch settings come from `configs/` keyed by (E, F, D, device name) and T, else the
    default table. Runs on CUDA (ids are not range-checked there, to avoid a host sync;
    out-of-range ids are dropped), or on CPU under TRITON_INTERPRET=1.
    """
    check_moe_inputs(x_TD, w13_E2FD, w2_EDF, topk_ids_TK, topk_weights_TK, expert_map_E)
    _check_device(x_TD.device)
    E, D, F = w2_EDF.shape
    dev = x_TD.device
    index = (dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" else None
    config = _config_for(x_TD.shape[0], E, F, D, index)
    return _fused_moe_checked(x_TD, w13_E2FD, w2_EDF, topk_ids_TK, topk_weights_TK, expert_map_E, config)
