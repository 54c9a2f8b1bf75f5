"""Small-batch (T >= 2) matmul for int8 weights by 16-bit integer dot
products (vpdpwssd, AVX-512 VNNI): out_TR = x_TK @ (q_RK * scale_R[:, None]).T with
each token rounded to 16-bit fixed point as at T == 1 (gemv_madd.quantize_x16).

Shape key: T tokens, K input columns, R weight rows, G tokens per group (4, 2 or 1),
L = 16 int32 lanes.

Why: small_t.py widens each weight to fp32 and spends one FMA per weight and token,
keeping each token's partial sums in L1; on Zen 4 that loop runs at the core's FMA rate
and at T = 16 int8 measured 0.85-0.92x torch. Here 32 weights are sign-extended to
16 bits once per token group, and one vpdpwssd multiplies them by 32 token values and
adds pairs into 16 int32 lanes; the lanes of 4 tokens x 4 rows stay in registers over
a block of columns (`_block`), as in small_t_bf16dp.py.

Any T >= 2 takes it where expert_ffn selects it, not only small batches, with the
tokens in L2-sized panels (reg_block.py says why).

Numerics: those of the T == 1 path on the same hosts (gemv_madd.py): the token is
x16 * xs with xs a power of two (|x16| <= 32767), products are summed exactly in int32
over blocks of BLOCK columns and the blocks in float64, so a token's output does not
depend on the batch it came in. A token holding inf or NaN has no fixed-point form: the
whole call then takes small_t.py's fp32 loop, so bad values propagate.

Without AVX-512 VNNI/BW the same sums are written as generic vector IR (correct,
slower); expert_ffn selects this path only where INT8DP_SMALL_T holds.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils

from .gemv import STEP
from .gemv_madd import BLOCK, quantize_x16
from .numba_util import AVX512VNNI, REG_GEMV, njit_kernel
from .reg_block import ROWS as _ROWS
from .reg_block import make_block, token_group, token_panel
from .small_t import rows_small_int8

__all__ = ["INT8DP_SMALL_T", "MIN_T", "matmul_small_int8dp", "rows_small_int8dp"]

_LANES = 16
_PF_BYTES = 8192  # the first token group's prefetch distance (into L2, reg_block.py)
# Where expert_ffn takes this path: Zen 4 (numba_util.REG_GEMV on an AVX-512 core)
# with AVX-512 VNNI, where it was measured, from MIN_T tokens; small_t.py's fp32 loop
# elsewhere. Cold DeepSeek-V2-Lite int8 experts through expert_ffn, against the fp32
# loop, with the first group's prefetch 4 KiB ahead into L1: T=2 0.87x, T=4 0.95x,
# T=8 1.02x, T=16 1.29x (Mixtral T=16 1.66x); 8 KiB ahead into L2 then gave T=2 1.34x,
# T=4 1.46x, T=8 1.37x, T=16 1.24x over that (Mixtral T=4 1.11x, T=16 1.01x).
INT8DP_SMALL_T = REG_GEMV and AVX512VNNI
MIN_T = 2


def _dot_pairs16(b: ir.IRBuilder, acc: ir.Value, w: ir.Value, x: ir.Value) -> ir.Value:
    """acc (16 x i32) + lane sums w[2i] * x[2i] + w[2i+1] * x[2i+1] of two vectors of 32
    int16: one vpdpwssd with AVX-512 VNNI, the same sums as generic vector IR elsewhere."""
    v16i, v32s = ir.VectorType(ir.IntType(32), _LANES), ir.VectorType(ir.IntType(16), 2 * _LANES)
    if AVX512VNNI:
        fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(v16i, [v16i, v16i, v16i]),
                                            "llvm.x86.avx512.vpdpwssd.512")
        return b.call(fn, [acc, b.bitcast(w, v16i), b.bitcast(x, v16i)])
    v32i = ir.VectorType(ir.IntType(32), 2 * _LANES)
    prod = b.mul(b.sext(w, v32i), b.sext(x, v32i))
    undef = ir.Constant(v32i, ir.Undefined)
    even = b.shuffle_vector(prod, undef, ir.Constant(v16i, list(range(0, 2 * _LANES, 2))))
    odd = b.shuffle_vector(prod, undef, ir.Constant(v16i, list(range(1, 2 * _LANES, 2))))
    return b.add(acc, b.add(even, odd))


def _load_q(b: ir.IRBuilder, ptr: ir.Value, index: ir.Value) -> ir.Value:
    """32 int8 weights from ptr[index], sign-extended to <32 x i16>."""
    v32b, v32s = ir.VectorType(ir.IntType(8), 2 * _LANES), ir.VectorType(ir.IntType(16), 2 * _LANES)
    return b.sext(b.load(b.bitcast(b.gep(ptr, [index]), v32b.as_pointer()), align=1), v32s)


def _load_x16(b: ir.IRBuilder, ptr: ir.Value, index: ir.Value) -> ir.Value:
    """32 int16 token values from ptr[index]."""
    v32s = ir.VectorType(ir.IntType(16), 2 * _LANES)
    return b.load(b.bitcast(b.gep(ptr, [index]), v32s.as_pointer()), align=2)


def _lane_total(b: ir.IRBuilder, acc: ir.Value) -> ir.Value:
    """The exact int64 sum of 16 int32 lanes, widened then summed as a vector (a halving
    tree): the scalar chain of 16 extracts and adds ran once per token, row and block and
    cost ~1/5 of the loop at T=16..64 (hot, 1.2x faster without it)."""
    i64 = ir.IntType(64)
    v16q = ir.VectorType(i64, _LANES)
    fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(i64, [v16q]), "llvm.vector.reduce.add.v16i64")
    return b.call(fn, [b.sext(acc, v16q)])


def _make_block(G: int):
    """The register-blocked kernel (reg_block.py) for groups of G tokens: int8 weights
    against the 16-bit token by _dot_pairs16, each of the 4 x G sums an exact int64 (callers
    keep a call to at most BLOCK columns)."""
    return make_block(G, types.int8, types.int16, types.int64, _load_q, _load_x16, _dot_pairs16,
                      lambda: ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [0] * _LANES), _lane_total)


_block4, _block2, _block1 = _make_block(4), _make_block(2), _make_block(1)


@njit_kernel(parallel=False)
def _dot_exact(q_K, x16_K, k0, k1):
    """q_K[k0:k1] . x16_K[k0:k1] exactly, as int64 (column tails and the last rows)."""
    a = np.int64(0)
    for k in range(k0, k1):
        a += np.int64(q_K[k]) * np.int64(x16_K[k])
    return a


@njit_kernel(parallel=False)
def rows_small_int8dp(x16_TK, xs_T, q_RK, scale_R, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR = (x16_TK * xs_T[:, None]) @ (q_RK * scale_R[:, None]).T
    (x16_TK int16 and q_RK int8, C-contiguous, the same row length K)."""
    T, K = x16_TK.shape
    flat = q_RK.ravel()
    x_flat = x16_TK.ravel()
    o = np.empty(4 * _ROWS, np.int64)
    tot = np.empty(4 * _ROWS, np.float64)
    # Tokens in panels that stay in L2 while every row block of the range passes over
    # them (reg_block.token_panel).
    panel = token_panel(T, 2 * K)
    for c0 in range(0, T, panel):
        c1 = min(T, c0 + panel)
        r = r_lo
        while r + _ROWS <= r_hi:
            t0 = c0
            while t0 < c1:
                g = token_group(c1 - t0)
                tot[:] = 0.0
                for b0 in range(0, K, BLOCK):
                    b1 = min(K, b0 + BLOCK)
                    steps = (b1 - b0) // STEP
                    # The first group streams the rows from memory (prefetched ahead);
                    # later groups find them in L1/L2.
                    ahead = _PF_BYTES if t0 == c0 else 0
                    if g == 4:
                        _block4(flat, r * K + b0, K, x_flat, t0 * K + b0, steps, ahead, o)
                    elif g == 2:
                        _block2(flat, r * K + b0, K, x_flat, t0 * K + b0, steps, ahead, o)
                    else:
                        _block1(flat, r * K + b0, K, x_flat, t0 * K + b0, steps, ahead, o)
                    k0 = b0 + steps * STEP
                    for t in range(g):
                        for j in range(_ROWS):
                            d = o[_ROWS * t + j]
                            if k0 < b1:
                                d += _dot_exact(q_RK[r + j], x16_TK[t0 + t], k0, b1)
                            tot[_ROWS * t + j] += float(d)
                for t in range(g):
                    for j in range(_ROWS):
                        out_TR[t0 + t, r + j] = np.float32(tot[_ROWS * t + j] * xs_T[t0 + t] * scale_R[r + j])
                t0 += g
            r += _ROWS
    r = r_lo + (r_hi - r_lo) // _ROWS * _ROWS
    for r in range(r, r_hi):
        for t in range(T):
            acc = 0.0
            for b0 in range(0, K, BLOCK):
                acc += float(_dot_exact(q_RK[r], x16_TK[t], b0, min(K, b0 + BLOCK)))
            out_TR[t, r] = np.float32(acc * xs_T[t] * scale_R[r])


@njit_kernel(parallel=False)
def _tokens16(x_TK):
    """Each token row rounded to 16-bit fixed point (quantize_x16): (x16, scales, all usable)."""
    T, K = x_TK.shape
    x16_TK = np.empty((T, K), np.int16)
    xs_T = np.empty(T, np.float64)
    ok = True
    for t in range(T):
        xs_T[t] = quantize_x16(x_TK[t], x16_TK[t])
        if xs_T[t] < 0:
            ok = False
    return x16_TK, xs_T, ok


@njit_kernel()
def matmul_small_int8dp(x_TK, q_RK, scale_R, out_TR, nch):
    """out_TR = x_TK @ (q_RK * scale_R[:, None]).T for fp32 tokens x_TK (any T),
    in nch chunks of whole 4-row blocks on the thread pool (nch = 1: on the
    calling thread, no launch). A token holding inf or NaN sends the whole call to
    small_t.py's fp32 loop."""
    R = q_RK.shape[0]
    if x_TK.shape[0] == 0 or R == 0:
        return
    x16_TK, xs_T, ok = _tokens16(x_TK)
    if nch == 1:
        if ok:
            rows_small_int8dp(x16_TK, xs_T, q_RK, scale_R, out_TR, 0, R)
        else:
            rows_small_int8(x_TK, q_RK, scale_R, out_TR, 0, R)
        return
    units = (R + _ROWS - 1) // _ROWS
    for c in prange(nch):
        lo = min(R, c * units // nch * _ROWS)
        hi = min(R, (c + 1) * units // nch * _ROWS)
        if ok:
            rows_small_int8dp(x16_TK, xs_T, q_RK, scale_R, out_TR, lo, hi)
        else:
            rows_small_int8(x_TK, q_RK, scale_R, out_TR, lo, hi)
