"""Small-batch (T >= 2) matmul for bf16 weights against bf16 tokens by bf16
dot products (vdpbf16ps, AVX-512 BF16): out_TR = x16_TK @ W.T, accumulated in fp32.

Shape key: T tokens, K input columns, R weight rows, G tokens per group (4, 2 or 1),
L = 16 fp32 lanes.

Why: small_t.py spends one fp32 FMA per weight and token, keeping each token's partial
sums in L1; on Zen 4 (one 512-bit FMA per cycle per core) that loop runs at the FMA rate,
~16 cycles per token and 4 x 64-column step, and at T = 16 it was 0.77-0.82x torch. One
vdpbf16ps multiplies 32 bf16 pairs and adds each pair's products into 16 fp32 lanes,
but with the partial sums still loaded and stored per token it measured only ~12 cycles:
the sums' traffic then bounds the loop. So here the sums of a group of G tokens x 4 rows
stay in registers over the whole row (`_block`), and the 4-row weight block is read
once per group (from DRAM for the first group, from L1/L2 after it): ~8.5-9 cycles per
token and step with the rows in L2, one thread (G = 4).

Any T >= 2 takes it where expert_ffn selects it, not only small batches, with the
tokens in L2-sized panels (reg_block.py says why).

Numerics: the products of two bf16 values are exact in fp32, so the result equals the
fp32 loop's up to the summation order, except that the instruction treats denormal
inputs as zero and flushes denormal results (bf16 magnitudes below ~1.2e-38). Only
bf16 tokens take this path (expert_ffn: the token of a bf16 model against w13); fp32
inputs (the hidden vector) keep small_t.py.

Without AVX-512 BF16 the same sums are written as generic vector IR (correct, slower);
expert_ffn selects this path only where BF16DP_SMALL_T holds.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils

from .gemv import STEP
from .ir_loop import hsum_f32
from .numba_util import AVX512BF16, REG_GEMV, njit_kernel
from .reg_block import ROWS as _ROWS
from .reg_block import make_block, token_group, token_panel
from .tiles import bf16_to_f32

__all__ = ["BF16DP_SMALL_T", "rows_small_bf16dp", "matmul_small_bf16dp"]

_LANES = 16
# How far ahead the first token group prefetches its rows (elements: 8 KiB), into L2
# (reg_block.py; the later groups read the block again). Cold DeepSeek-V2-Lite bf16
# experts, 8 KiB into L2 against 4 KiB into L1: T=2 1.12x, T=4 1.06x, T=16 1.03x.
_PF_ELEMS = 4096
# Where expert_ffn takes this path: Zen 4 (numba_util.REG_GEMV on an AVX-512 core) with
# AVX-512 BF16, where it was measured; small_t.py's fp32 loop elsewhere.
BF16DP_SMALL_T = REG_GEMV and AVX512BF16


class _BFloat(ir.Type):
    """LLVM's bfloat scalar type, which llvmlite has no name for: the operand type of
    the BF16 dot-product intrinsic."""

    def _to_string(self) -> str:
        return "bfloat"

    def __eq__(self, other) -> bool:
        return isinstance(other, _BFloat)

    def __hash__(self) -> int:
        return hash("bfloat")


def _dot_pairs(b: ir.IRBuilder, acc: ir.Value, w: ir.Value, x: ir.Value) -> ir.Value:
    """acc (16 x f32) + lane sums w[2i] * x[2i] + w[2i+1] * x[2i+1] of two vectors of 32
    bf16 values carried as <16 x i32>: one vdpbf16ps with AVX-512 BF16, the same sums
    as generic vector IR elsewhere."""
    i32, f32 = ir.IntType(32), ir.FloatType()
    v16i, v16f = ir.VectorType(i32, _LANES), ir.VectorType(f32, _LANES)
    if AVX512BF16:
        vb = ir.VectorType(_BFloat(), 2 * _LANES)
        fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(v16f, [v16f, vb, vb]),
                                            "llvm.x86.avx512bf16.dpbf16ps.512")
        return b.call(fn, [acc, b.bitcast(w, vb), b.bitcast(x, vb)])

    def half(v, shift):  # the even (shift 16: low half) or odd bf16 of each lane as fp32
        bits = b.shl(v, ir.Constant(v16i, [16] * _LANES)) if shift else b.and_(v, ir.Constant(v16i, [-65536] * _LANES))
        return b.bitcast(bits, v16f)

    acc = b.fadd(acc, b.fmul(half(w, True), half(x, True)))
    return b.fadd(acc, b.fmul(half(w, False), half(x, False)))


def _load16(b: ir.IRBuilder, ptr: ir.Value, index: ir.Value) -> ir.Value:
    """32 bf16 values (bits) from ptr[index] as <16 x i32>."""
    v16i = ir.VectorType(ir.IntType(32), _LANES)
    return b.load(b.bitcast(b.gep(ptr, [index]), v16i.as_pointer()), align=2)


def _make_block(G: int):
    """The register-blocked kernel (reg_block.py) for groups of G tokens: bf16 bits
    against bf16 bits by _dot_pairs, each of the 4 x G sums reduced to one float32."""
    return make_block(G, types.uint16, types.uint16, types.float32, _load16, _load16, _dot_pairs,
                      lambda: ir.Constant(ir.VectorType(ir.FloatType(), _LANES), [0.0] * _LANES), hsum_f32)


_block4, _block2, _block1 = _make_block(4), _make_block(2), _make_block(1)


@njit_kernel(parallel=False)
def _dot_bf16(w_K, x_K, k0, k1):
    """fp32 dot of two bf16 rows over columns k0:k1 (row tails and the last rows)."""
    a = np.float32(0.0)
    for k in range(k0, k1):
        a += bf16_to_f32(w_K[k]) * bf16_to_f32(x_K[k])
    return a


@njit_kernel(parallel=False)
def rows_small_bf16dp(x16_TK, w_RK, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR = x16_TK @ w_RK.T, both bf16 bits (uint16, C-contiguous,
    the same row length K), in fp32."""
    T, K = x16_TK.shape
    flat = w_RK.ravel()
    x_flat = x16_TK.ravel()
    steps = K // STEP
    kt = steps * STEP
    o = np.empty(4 * _ROWS, np.float32)
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
                # The first group streams the rows from memory (prefetched); later ones find
                # them in L1/L2.
                ahead = _PF_ELEMS if t0 == c0 else 0
                if g == 4:
                    _block4(flat, r * K, K, x_flat, t0 * K, steps, ahead, o)
                elif g == 2:
                    _block2(flat, r * K, K, x_flat, t0 * K, steps, ahead, o)
                else:
                    _block1(flat, r * K, K, x_flat, t0 * K, steps, ahead, o)
                for t in range(g):
                    for j in range(_ROWS):
                        a = o[_ROWS * t + j]
                        if kt < K:
                            a += _dot_bf16(w_RK[r + j], x16_TK[t0 + t], kt, K)
                        out_TR[t0 + t, r + j] = a
                t0 += g
            r += _ROWS
    r = r_lo + (r_hi - r_lo) // _ROWS * _ROWS
    for r in range(r, r_hi):
        for t in range(T):
            out_TR[t, r] = _dot_bf16(w_RK[r], x16_TK[t], 0, K)


@njit_kernel()
def matmul_small_bf16dp(x16_TK, w_RK, out_TR, nch):
    """out_TR = x16_TK @ w_RK.T (bf16 bits both) in nch chunks of whole 4-row blocks on
    the thread pool."""
    R = w_RK.shape[0]
    if x16_TK.shape[0] == 0 or R == 0:
        return
    units = (R + _ROWS - 1) // _ROWS
    for c in prange(nch):
        rows_small_bf16dp(x16_TK, w_RK, out_TR, min(R, c * units // nch * _ROWS),
                          min(R, (c + 1) * units // nch * _ROWS))
