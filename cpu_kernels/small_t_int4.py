"""Small-batch (2 <= T <= SMALL_T) matmul for int4 weights, group 128, rows of whole
32-bit words: out_TR = x_TK @ dequant(p_RP, scale_RG).T.

Shape key: T tokens, K input columns, R weight rows, P packed bytes per row, W = P / 4
words per row, G groups per row, L = 16 lanes.

The word-lane layout of int4_gemv.py, with the token loop of small_t.py: for four rows
and one group, each half group (nibble planes 0-3, then 4-7: 64 columns per row) is
decoded once into 16 vector registers with the group scale folded in, ((n - 8) * s),
and then every token's matching 64 permuted columns are multiplied into its four
16-lane partial sums. x is permuted per token once per call (int4_gemv.permute_x). The
shorter last group of a row, if any, is dotted byte by byte per token
(int4_kernels._int4_tail_dot).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from .gemv import PF_BYTES, prefetch_rows4
from .int4_gemv import _PERMUTE_LUT, GROUP, permute_x
from .int4_kernels import _int4_tail_dot
from .numba_util import njit_kernel
from .small_t import SMALL_T
from .tiles import wide_vectors as _wide_vectors

__all__ = ["SMALL_T", "matmul_small_int4", "matmul_small_int4_serial"]

_LANES = 16
_WG = GROUP // 8  # 32-bit words per group: one per lane


@intrinsic
def _group4_tokens(typingctx, w_flat, wi, S, s_flat, si, G, xp_flat, xi, xs, T, acc_flat):
    """For t in range(T), rows j = 0..3 and lanes l:
    acc_flat[64t + 16j + l] += s_flat[si + jG] * sum over nibbles m of word
    w_flat[wi + jS + l] of (nibble_m - 8) * xp_flat[xi + t xs + 16m + l]
    (one group of 128 columns of four rows). Callers keep indices in bounds.
    """
    sig = types.none(w_flat, wi, S, s_flat, si, G, xp_flat, xi, xs, T, acc_flat)

    def codegen(context, builder, signature, args):
        w_ty, s_ty, x_ty, a_ty = (signature.args[k] for k in (0, 3, 6, 10))
        i32, f32 = ir.IntType(32), ir.FloatType()
        vi, vf = ir.VectorType(i32, _LANES), ir.VectorType(f32, _LANES)
        fast = ("contract",)

        def ptr(arr_ty, arr, index, ty):
            ary = context.make_array(arr_ty)(context, builder, arr)
            return builder.bitcast(builder.gep(ary.data, [index]), ty.as_pointer())

        def idx(k):
            return context.cast(builder, args[k], signature.args[k], types.intp)

        wbase, stride, sbase, gstride = idx(1), idx(2), idx(4), idx(5)
        xbase, xstride, count = idx(7), idx(8), idx(9)
        intp = wbase.type

        def c(v):
            return ir.Constant(intp, v)

        permute = table = None
        if _PERMUTE_LUT:
            fnty = ir.FunctionType(vf, [vf, vi])
            permute = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.permvar.sf.512")
            table = ir.Constant(vf, [float(n - 8) for n in range(16)])
        mask = ir.Constant(vi, [15] * _LANES)
        minus8 = ir.Constant(vf, [-8.0] * _LANES)
        words, scales = [], []
        for j in range(4):
            words.append(builder.load(ptr(w_ty, args[0], builder.add(wbase, builder.mul(stride, c(j))), vi),
                                      align=4))
            sc = builder.load(ptr(s_ty, args[3], builder.add(sbase, builder.mul(gstride, c(j))), f32))
            splat = builder.insert_element(ir.Constant(vf, ir.Undefined), sc, ir.Constant(i32, 0))
            scales.append(builder.shuffle_vector(splat, ir.Constant(vf, ir.Undefined),
                                                 ir.Constant(vi, [0] * _LANES)))
        for half in range(2):
            ws = []  # ws[j][m]: nibble plane 4 half + m of row j, decoded and scaled
            for j in range(4):
                row = []
                for m in range(4 * half, 4 * half + 4):
                    t = words[j] if m == 0 else builder.lshr(words[j], ir.Constant(vi, [4 * m] * _LANES))
                    if permute is not None:
                        f = builder.call(permute, [table, t])  # the table reads bits 0-3 only
                    else:
                        f = builder.fadd(builder.sitofp(t if m == 7 else builder.and_(t, mask), vf), minus8)
                    row.append(builder.fmul(f, scales[j], flags=fast))
                ws.append(row)
            with cgutils.for_range(builder, count) as loop:
                xrow = builder.add(builder.add(xbase, builder.mul(loop.index, xstride)), c(64 * half))
                xv = [builder.load(ptr(x_ty, args[6], builder.add(xrow, c(_LANES * m)), vf), align=4)
                      for m in range(4)]
                abase = builder.mul(loop.index, c(4 * _LANES))
                for j in range(4):
                    aptr = ptr(a_ty, args[10], builder.add(abase, c(_LANES * j)), vf)
                    acc = builder.load(aptr, align=4)
                    for m in range(4):
                        acc = builder.fadd(acc, builder.fmul(ws[j][m], xv[m], flags=fast), flags=fast)
                    builder.store(acc, aptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit_kernel(parallel=False)
def _rows(x_TK, xp_TK, xsum_TG, p_RP, w_RW, scale_RG, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR (see the module note); xp_TK, xsum_TG from _permute."""
    _wide_vectors()
    T, K = x_TK.shape
    full = K // GROUP
    S = w_RW.shape[1]
    G = scale_RG.shape[1]
    flat = w_RW.ravel()
    s_flat = scale_RG.ravel()
    xp_flat = xp_TK.ravel()
    dist = PF_BYTES // 4
    tail = K > full * GROUP
    acc = np.zeros(T * 4 * _LANES, np.float32)
    r = r_lo
    while r + 4 <= r_hi:
        acc[:] = 0.0
        for g in range(full):
            prefetch_rows4(flat, S, r, g * _WG, full * _WG, 0, dist)
            _group4_tokens(flat, r * S + g * _WG, S, s_flat, r * G + g, G, xp_flat, g * GROUP, K, T, acc)
        for t in range(T):
            for j in range(4):
                o = (4 * t + j) * _LANES
                a = np.float32(0.0)
                for i in range(_LANES):
                    a += acc[o + i]
                if tail:
                    a += _int4_tail_dot(x_TK[t], p_RP[r + j], scale_RG[r + j], xsum_TG[t], GROUP)
                out_TR[t, r + j] = a
        r += 4
    for r in range(r, r_hi):  # fewer than four rows left: the dequantising dot per token
        for t in range(T):
            a = np.float32(0.0)
            x_K = x_TK[t]
            for g in range(full):
                sc = scale_RG[r, g]
                p_h = p_RP[r, g * (GROUP // 2):(g + 1) * (GROUP // 2)]
                part = np.float32(0.0)
                for i in range(GROUP // 2):
                    b = np.int32(p_h[i])
                    part += (np.float32(np.int32(b & 15)) - np.float32(8.0)) * x_K[g * GROUP + i]
                    part += (np.float32(np.int32(b >> 4)) - np.float32(8.0)) * x_K[g * GROUP + GROUP // 2 + i]
                a += part * sc
            if tail:
                a += _int4_tail_dot(x_K, p_RP[r], scale_RG[r], xsum_TG[t], GROUP)
            out_TR[t, r] = a


@njit_kernel(parallel=False)
def _permute(x_TK, G):
    """Each token permuted for the word lanes, and its group sums (int4_gemv.permute_x)."""
    T, K = x_TK.shape
    xp_TK = np.empty((T, K), np.float32)
    xsum_TG = np.empty((T, G), np.float32)
    for t in range(T):
        permute_x(x_TK[t], GROUP, xp_TK[t], xsum_TG[t])
    return xp_TK, xsum_TG


@njit_kernel(parallel=False)
def matmul_small_int4_serial(x_TK, p_RP, w_RW, scale_RG, out_TR):
    """out_TR = x_TK @ dequant(p_RP, scale_RG).T on the calling thread; w_RW: p_RP as int32 words."""
    xp_TK, xsum_TG = _permute(x_TK, scale_RG.shape[1])
    _rows(x_TK, xp_TK, xsum_TG, p_RP, w_RW, scale_RG, out_TR, 0, p_RP.shape[0])


@njit_kernel()
def matmul_small_int4(x_TK, p_RP, w_RW, scale_RG, out_TR, nch):
    """matmul_small_int4_serial split into nch row ranges (multiples of 4) on the thread pool."""
    R = p_RP.shape[0]
    xp_TK, xsum_TG = _permute(x_TK, scale_RG.shape[1])
    blocks = (R + 3) // 4
    for c in prange(nch):
        _rows(x_TK, xp_TK, xsum_TG, p_RP, w_RW, scale_RG, out_TR,
              min(R, 4 * (c * blocks // nch)), min(R, 4 * ((c + 1) * blocks // nch)))
