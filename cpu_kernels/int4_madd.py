"""T == 1 (decode) GEMV for int4 weights (group 128) by 16-bit integer multiply-add:
out_R[r] = dequant(W)[r] . x for rows r_lo:r_hi (whole rows), with x = xs * x16
(gemv_madd.quantize_x16).

Shape key: N columns, R rows, P packed bytes per row, W = P / 4 words per row, G groups.

Why: on AVX2 cores the fp32 path of int4_gemv.py spends five vector ops on every 8
weights (shift, mask, convert, offset, FMA) and is compute-bound at ~10 G values/s per
core, about 40% of the read bandwidth of a 2-core Zen 3 VM. Here a group's 64 bytes are
read as 32 16-bit lanes, each holding four nibbles; every nibble plane costs a shift
pair and one vpmaddwd per 16 lanes, so a group of 128 weights takes about 40 ops.

Layout (quant.py): byte i of a group holds column i (low nibble) and i + 64 (high).
16-bit lane j of a group holds bytes 2j and 2j + 1, so its nibble p (bits 4p..4p+3) is
column 2j + p // 2 (+ 64 when p is odd). `permute_x16` reorders the 16-bit token once
per call to match: xq[32p + j] = x16[col(p, j)].

Nibbles are stored as v + 8 (v in -8..7). XOR with 8 turns that into v's 4-bit two's
complement, which a left shift and an arithmetic right shift sign-extend: the products
use v itself, so no group-sum correction is needed. A group's eight int32 lanes hold at
most 8 * 2 * 8 * 32767 < 2^24 each, so they convert to fp32 exactly before the FMA with
the group's scale; groups accumulate in fp32. The row's shorter last group, if any, is
dotted in fp32 with the unrounded token (int4_kernels._int4_tail_dot).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic

from .gemv_madd import PF_BYTES, pair_sums
from .int4_kernels import _int4_tail_dot
from .numba_util import njit_kernel
from .tiles import prefetch_l2 as _prefetch_l2

__all__ = ["permute_x16", "gemv_int4_madd", "GROUP"]

GROUP = 128
_W = GROUP // 8  # 32-bit words per group
_LANES16 = 16  # 16-bit lanes per load (256 bits)


@njit_kernel(parallel=False)
def permute_x16(x16_N, xq_N):
    """xq_N = x16_N reordered for the 16-bit lane layout, full groups of 128 (the rest
    copied unchanged)."""
    N = x16_N.shape[0]
    full = N // GROUP
    for g in range(full):
        x_g = x16_N[g * GROUP:(g + 1) * GROUP]
        xq_g = xq_N[g * GROUP:(g + 1) * GROUP]
        for j in range(32):
            xq_g[j] = x_g[2 * j]
            xq_g[32 + j] = x_g[64 + 2 * j]
            xq_g[64 + j] = x_g[2 * j + 1]
            xq_g[96 + j] = x_g[64 + 2 * j + 1]
    for k in range(full * GROUP, N):
        xq_N[k] = x16_N[k]


@intrinsic
def _group_madd(typingctx, w_W, wi, xq_N, xi, acc_L, scale):
    """acc_L[0:8] += scale * c, c[i] = int32 lane i of the sums over the group at word wi
    of v * xq (v: the signed nibble values), fp32 lanes; vpmaddwd on AVX2, the same sums
    in generic vector IR elsewhere. Callers keep every index in bounds."""
    if not (isinstance(w_W, types.Array) and w_W.dtype == types.int32
            and isinstance(xq_N, types.Array) and xq_N.dtype == types.int16):
        return None
    sig = types.none(w_W, wi, xq_N, xi, acc_L, scale)

    def codegen(context, builder, signature, args):
        w_arr, wi_v, x_arr, xi_v, a_arr, sc = args
        i16, i32, f32 = ir.IntType(16), ir.IntType(32), ir.FloatType()
        v16i16, v8i32, v8f32 = ir.VectorType(i16, 16), ir.VectorType(i32, 8), ir.VectorType(f32, 8)

        def ptr(arr_ty, arr, index, vty):
            ary = context.make_array(arr_ty)(context, builder, arr)
            return builder.bitcast(builder.gep(ary.data, [index]), vty.as_pointer())

        wbase = context.cast(builder, wi_v, signature.args[1], types.intp)
        xbase = context.cast(builder, xi_v, signature.args[3], types.intp)
        flip = ir.Constant(v16i16, [0x8888 - 0x10000] * 16)  # v + 8 -> v's 4-bit two's complement
        twelve = ir.Constant(v16i16, [12] * 16)
        acc_i = None
        for h in range(2):
            w = builder.load(ptr(signature.args[0], w_arr, builder.add(wbase, ir.Constant(wbase.type, 8 * h)),
                                 v16i16), align=4)
            w = builder.xor(w, flip)
            for p in range(4):
                t = w if p == 3 else builder.shl(w, ir.Constant(v16i16, [12 - 4 * p] * 16))
                t = builder.ashr(t, twelve)
                x = builder.load(ptr(signature.args[2], x_arr,
                                     builder.add(xbase, ir.Constant(xbase.type, 32 * p + 16 * h)), v16i16), align=2)
                s = pair_sums(builder, t, x)
                acc_i = s if acc_i is None else builder.add(acc_i, s)
        scv = context.cast(builder, sc, signature.args[5], types.float32)
        splat = builder.insert_element(ir.Constant(v8f32, ir.Undefined), scv, ir.Constant(i32, 0))
        splat = builder.shuffle_vector(splat, ir.Constant(v8f32, ir.Undefined), ir.Constant(v8i32, [0] * 8))
        aptr = ptr(signature.args[4], a_arr, ir.Constant(wbase.type, 0), v8f32)
        acc = builder.load(aptr, align=4)
        prod = builder.fmul(builder.sitofp(acc_i, v8f32), splat, flags=("contract",))
        builder.store(builder.fadd(acc, prod, flags=("contract",)), aptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit_kernel(parallel=False)
def gemv_int4_madd(xq_N, xs, x_N, xsum_G, p_RP, w_RW, scale_RG, out_R, r_lo, r_hi):
    """out_R[r] = dequant(p_RP, scale_RG)[r] . x for r in r_lo:r_hi (group 128, whole rows).

    xq_N: permute_x16 of the token's 16-bit form with scale xs; x_N, xsum_G: the fp32
    token and its group sums (int4_gemv.permute_x), for the shorter last group only;
    w_RW: p_RP viewed as int32 words (P % 4 == 0).
    """
    N = x_N.shape[0]
    full = N // GROUP
    S = w_RW.shape[1]
    flat = w_RW.ravel()
    last = flat.shape[0] - 1
    dist = PF_BYTES // 4
    acc_L = np.zeros(8, np.float32)
    tail = N > full * GROUP
    for r in range(r_lo, r_hi):
        base = r * S
        acc_L[:] = 0.0
        sc = scale_RG[r]
        for g in range(full):  # a group is one 64-byte line: prefetch one PF_BYTES ahead
            _prefetch_l2(flat, min(base + g * _W + dist, last))
            _group_madd(flat, base + g * _W, xq_N, g * GROUP, acc_L, sc[g])
        tot = np.float32(0.0)
        for i in range(8):
            tot += acc_L[i]
        out_R[r] = tot * np.float32(xs)
        if tail:
            out_R[r] += _int4_tail_dot(x_N, p_RP[r], sc, xsum_G, GROUP)
