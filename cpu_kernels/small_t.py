"""Small-batch (2 <= T <= SMALL_T) matmuls for fp32, bf16 and int8 weights: out_TR = x_TK @ W.T.

Shape key: T tokens, K input columns, R weight rows, S row stride, L = 16 lanes.

At a handful of tokens the work is still bound by streaming the weights: each weight is
read once and used T times. So the loop is the T == 1 GEMV (gemv.py) with a token loop
inside each step: four rows x 64 columns of weights are loaded and widened to fp32 once (bf16, int8),
held in 16 vector registers, and then every token's 64 columns of x are multiplied into
that token's four 16-lane partial sums (`_step4_tokens`). Per token and step that is 16
FMAs for 4 loads of x and 4 loads + 4 stores of partial sums, all in L1 (the partial
sums of T tokens are T x 4 x 16 floats, 4 KiB at T = 16). The row streams are prefetched
as in the GEMV, and the lanes are reduced once per row at its end.

The T > SMALL_T path (decode chunks into an fp32 scratch, then the register tiles of
tiles.py) re-reads each decoded weight from L1 per tile of 3 tokens and reduces per
tile, which spends its time in loads and reductions at small T.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from .gemv import PF_BYTES, STEP, prefetch_rows4
from .gemv import _itemsize
from .numba_util import njit_kernel
from .tiles import wide_vectors as _wide_vectors

__all__ = ["SMALL_T", "rows_small_f32", "rows_small_bf16", "rows_small_int8"]

SMALL_T = 16  # largest T that takes this path
_LANES = 16
_LINE = 64


@intrinsic
def _step4_tokens(typingctx, w_flat, wi, S, x_flat, xi, xs, T, acc_flat):
    """For t in range(T) and rows j = 0..3:
    acc_flat[64t + 16j + l] += sum over v of widen(w_flat[wi + jS + 16v + l]) * x_flat[xi + t xs + 16v + l]
    (v = 0..3, l = 0..15); w_flat float32, int8 or bf16 bits (uint16). Callers keep indices in bounds.
    """
    if not (isinstance(w_flat, types.Array) and w_flat.dtype in (types.int8, types.uint16, types.float32)):
        return None
    sig = types.none(w_flat, wi, S, x_flat, xi, xs, T, acc_flat)

    def codegen(context, builder, signature, args):
        w_arr, wi_v, s_v, x_arr, xi_v, xs_v, t_v, a_arr = args
        w_ty, x_ty, a_ty = signature.args[0], signature.args[3], signature.args[7]
        i32, f32 = ir.IntType(32), ir.FloatType()
        vi, vf = ir.VectorType(i32, _LANES), ir.VectorType(f32, _LANES)
        welt = {types.int8: ir.IntType(8), types.uint16: ir.IntType(16), types.float32: f32}[w_ty.dtype]
        vw = ir.VectorType(welt, _LANES)
        fast = ("contract",)
        nv = STEP // _LANES

        def ptr(arr_ty, arr, index, vty):
            ary = context.make_array(arr_ty)(context, builder, arr)
            return builder.bitcast(builder.gep(ary.data, [index]), vty.as_pointer())

        def idx(k):
            return context.cast(builder, args[k], signature.args[k], types.intp)

        wbase, stride, xbase, xstride, count = idx(1), idx(2), idx(4), idx(5), idx(6)
        intp = wbase.type
        ws = []  # ws[j][v]: the 4 x 64 weights, widened once
        for j in range(4):
            row = builder.add(wbase, builder.mul(stride, ir.Constant(intp, j)))
            wrow = []
            for v in range(nv):
                wv = builder.load(ptr(w_ty, w_arr, builder.add(row, ir.Constant(intp, _LANES * v)), vw),
                                  align=1)
                if w_ty.dtype == types.float32:
                    wf = wv
                elif w_ty.dtype == types.int8:
                    wf = builder.sitofp(builder.sext(wv, vi), vf)
                else:  # bf16: the bits are the top half of the fp32 pattern
                    wf = builder.bitcast(builder.shl(builder.zext(wv, vi), ir.Constant(vi, [16] * _LANES)), vf)
                wrow.append(wf)
            ws.append(wrow)
        with cgutils.for_range(builder, count) as loop:
            t = loop.index
            xrow = builder.add(xbase, builder.mul(t, xstride))
            xs = [builder.load(ptr(x_ty, x_arr, builder.add(xrow, ir.Constant(intp, _LANES * v)), vf), align=4)
                  for v in range(nv)]
            abase = builder.mul(t, ir.Constant(intp, 4 * _LANES))
            for j in range(4):
                aptr = ptr(a_ty, a_arr, builder.add(abase, ir.Constant(intp, _LANES * j)), vf)
                acc = builder.load(aptr, align=4)
                for v in range(nv):
                    acc = builder.fadd(acc, builder.fmul(ws[j][v], xs[v], flags=fast), flags=fast)
                builder.store(acc, aptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _widen(typingctx, v):
    """A weight element as float32: itself, an int8 value, or bf16 bits (uint16) exactly."""
    if v not in (types.int8, types.uint16, types.float32):
        return None

    def codegen(context, builder, signature, args):
        if signature.args[0] == types.float32:
            return args[0]
        if signature.args[0] == types.int8:
            return builder.sitofp(args[0], ir.FloatType())
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(v), codegen


@njit_kernel(parallel=False)
def _rows_small(x_TK, w_RK, out_TR, r_lo, r_hi):
    """out_TR[:, r] = x_TK @ widen(w_RK[r]) for r in r_lo:r_hi, unscaled (x_TK C-contiguous)."""
    _wide_vectors()
    T, K = x_TK.shape
    flat = w_RK.ravel()
    x_flat = x_TK.ravel()
    esize = _itemsize(w_RK)
    line = _LINE // esize
    dist = PF_BYTES // esize
    nb = K // STEP
    acc = np.zeros(T * 4 * _LANES, np.float32)
    r = r_lo
    while r + 4 <= r_hi:
        acc[:] = 0.0
        base = r * K
        for b in range(nb):
            for k in range(b * STEP, (b + 1) * STEP, line):  # one or two lines per row
                prefetch_rows4(flat, K, r, k, K, 0, dist)
            _step4_tokens(flat, base + b * STEP, K, x_flat, b * STEP, K, T, acc)
        for t in range(T):
            x_K = x_TK[t]
            for j in range(4):
                w_K = w_RK[r + j]
                a = np.float32(0.0)
                for k in range(nb * STEP, K):
                    a += _widen(w_K[k]) * x_K[k]
                o = (4 * t + j) * _LANES
                for i in range(_LANES):
                    a += acc[o + i]
                out_TR[t, r + j] = a
        r += 4
    for r in range(r, r_hi):
        w_K = w_RK[r]
        for t in range(T):
            x_K = x_TK[t]
            a = np.float32(0.0)
            for k in range(K):
                a += _widen(w_K[k]) * x_K[k]
            out_TR[t, r] = a


@njit_kernel(parallel=False)
def rows_small_f32(x_TK, w_RK, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR = x_TK @ w_RK.T (float32 weights)."""
    _rows_small(x_TK, w_RK, out_TR, r_lo, r_hi)


@njit_kernel(parallel=False)
def rows_small_bf16(x_TK, w_RK, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR = x_TK @ w_RK.T (bf16 weights as uint16)."""
    _rows_small(x_TK, w_RK, out_TR, r_lo, r_hi)


@njit_kernel(parallel=False)
def rows_small_int8(x_TK, q_RK, scale_R, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR = x_TK @ (q_RK * scale_R[:, None]).T."""
    _rows_small(x_TK, q_RK, out_TR, r_lo, r_hi)
    # The row scale factors out of the dot products: one multiply per row and token.
    for t in range(x_TK.shape[0]):
        for r in range(r_lo, r_hi):
            out_TR[t, r] *= scale_R[r]
