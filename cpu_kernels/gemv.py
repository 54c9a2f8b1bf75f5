"""T == 1 (decode) GEMV kernels for bf16 and int8 weights over a window of columns:
out_R[r] = W[r, c0:c0+n] . x_N for rows r_lo:r_hi (int8: times scale_R[r]).

Shape key: N window columns (x_N), R weight rows, S row stride (W is C-contiguous [R, S]).

A column window lets the fused decode path (decode.py) split w2 [D, F] by columns
between threads, so no thread waits for another's hidden units. Whole rows are c0 = 0,
n = S.

Decode is memory-bound, so the loops are shaped for the memory system, measured on a
2-core Xeon VM (AVX-512):

* four rows stream side by side, sharing each load of x (four concurrent streams keep
  more DRAM requests in flight than one);
* every row stream is software-prefetched PF_BYTES ahead, counted on through the next
  blocks of four rows when that reaches past the end of the window. The hardware
  prefetcher restarts at every row (and every 4 KiB page), which cost up to ~30% on the
  short rows of small experts (DeepSeek-V2-Lite: 1408 columns);
* the dot products run in 16 fp32 lanes per row, written as explicit vector IR
  (`_step4`: 4 rows x 64 columns per call) that keep their partial sums across the
  whole row and are reduced once at its end. LLVM's own vectorisation of the same
  scalar loop reduced to a scalar every step and needed a fully unrolled 256-column
  step to amortise that, which made each compiled copy of the loop cost seconds of
  compile time; this form compiles small and runs at least as fast.

Widening in the lanes: int8 -> int32 -> fp32 (vpmovsxbd + vcvtdq2ps); bf16 bits
<< 16 reinterpreted as fp32 (exact). The int8 row scale is applied once per row after
the fp32 dot product.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic

from .gemv_reg import gemv_bf16_reg
from .numba_util import REG_GEMV, njit_kernel
from .tiles import prefetch as _prefetch
from .tiles import wide_vectors as _wide_vectors

__all__ = ["gemv_bf16", "gemv_int8", "prefetch_rows4", "PF_BYTES", "STEP"]

STEP = 64  # columns per _step4 call: one 64-byte line of int8 per row, two of bf16
PF_BYTES = 1024  # how far ahead each row stream is prefetched (512..2048 measured alike)
_LINE = 64
_LANES = 16


@intrinsic
def _step4(typingctx, w_flat, wi, S, x_N, xi, acc_4L):
    """acc_4L[16j:16j+16] += widen(w_flat[wi + jS + k]) * x_N[xi + k] lane-wise over
    k = 0..63 (lane k % 16), for rows j = 0..3; w_flat int8 or bf16 bits (uint16).

    Generic vector IR (no target intrinsics); callers keep every index in bounds.
    """
    if not (isinstance(w_flat, types.Array) and w_flat.dtype in (types.int8, types.uint16)):
        return None
    sig = types.none(w_flat, wi, S, x_N, xi, acc_4L)

    def codegen(context, builder, signature, args):
        w_arr, wi_v, s_v, x_arr, xi_v, a_arr = args
        w_ty = signature.args[0]
        i32, f32 = ir.IntType(32), ir.FloatType()
        vi, vf = ir.VectorType(i32, _LANES), ir.VectorType(f32, _LANES)
        welt = ir.IntType(8) if w_ty.dtype == types.int8 else ir.IntType(16)
        vw = ir.VectorType(welt, _LANES)
        fast = ("contract",)

        def ptr(arr_ty, arr, index, vty):
            ary = context.make_array(arr_ty)(context, builder, arr)
            return builder.bitcast(builder.gep(ary.data, [index]), vty.as_pointer())

        def idx(value, ty, extra=0):
            v = context.cast(builder, value, ty, types.intp)
            return builder.add(v, ir.Constant(v.type, extra)) if extra else v

        x_ty, a_ty = signature.args[3], signature.args[5]
        wbase = idx(wi_v, signature.args[1])
        stride = idx(s_v, signature.args[2])
        xs = [builder.load(ptr(x_ty, x_arr, idx(xi_v, signature.args[4], _LANES * v), vf), align=4)
              for v in range(STEP // _LANES)]
        for j in range(4):
            aptr = ptr(a_ty, a_arr, ir.Constant(wbase.type, _LANES * j), vf)
            acc = builder.load(aptr, align=4)
            row = builder.add(wbase, builder.mul(stride, ir.Constant(wbase.type, j)))
            for v in range(STEP // _LANES):
                wv = builder.load(ptr(w_ty, w_arr, builder.add(row, ir.Constant(row.type, _LANES * v)), vw),
                                  align=1)
                if w_ty.dtype == types.int8:
                    wf = builder.sitofp(builder.sext(wv, vi), vf)
                else:  # bf16: the bits are the top half of the fp32 pattern
                    wide = builder.shl(builder.zext(wv, vi), ir.Constant(vi, [16] * _LANES))
                    wf = builder.bitcast(wide, vf)
                acc = builder.fadd(acc, builder.fmul(wf, xs[v], flags=fast), flags=fast)
            builder.store(acc, aptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit_kernel(parallel=False)
def prefetch_rows4(flat, S, r, k, n, c0, dist):
    """Prefetch the line holding element k + dist of the window of rows r..r+3 (flat: W
    raveled, row stride S), counting on through the windows of rows r+4..r+7, r+8.. (the
    order the loop reads them) when dist reaches past this window's end.
    The start is clamped so that no hint points outside the array (needs 4 rows)."""
    kp = k + dist
    rp = r
    while kp >= n:  # windows shorter than dist: the target is several blocks ahead
        kp -= n
        rp += 4
    b = max(0, min(rp * S + c0 + kp, flat.shape[0] - 1 - 3 * S))
    _prefetch(flat, b)
    _prefetch(flat, b + S)
    _prefetch(flat, b + 2 * S)
    _prefetch(flat, b + 3 * S)


@intrinsic
def _itemsize(typingctx, arr):
    """Bytes per element of an array, as a compile-time constant."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, signature, args):
        return ir.Constant(context.get_value_type(types.intp), signature.args[0].dtype.bitwidth // 8)

    return types.intp(arr), codegen


@intrinsic
def _widen(typingctx, v):
    """A weight element as float32: an int8 value, or bf16 bits (uint16) exactly."""
    if v not in (types.int8, types.uint16):
        return None

    def codegen(context, builder, signature, args):
        if signature.args[0] == types.int8:
            return builder.sitofp(args[0], ir.FloatType())
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(v), codegen


@njit_kernel(parallel=False)
def _gemv_rows(x_N, w_RS, out_R, r_lo, r_hi, c0, n):
    """out_R[r] = widen(w_RS[r, c0:c0+n]) . x_N for r in r_lo:r_hi, unscaled."""
    _wide_vectors()
    S = w_RS.shape[1]
    flat = w_RS.ravel()
    esize = _itemsize(w_RS)
    line = _LINE // esize
    dist = PF_BYTES // esize
    nb = n // STEP
    acc_4L = np.zeros(4 * _LANES, np.float32)
    r = r_lo
    while r + 4 <= r_hi:
        acc_4L[:] = 0.0
        base = r * S + c0
        for b in range(nb):
            for k in range(b * STEP, (b + 1) * STEP, line):  # one or two lines per row
                prefetch_rows4(flat, S, r, k, n, c0, dist)
            _step4(flat, base + b * STEP, S, x_N, b * STEP, acc_4L)
        for j in range(4):
            w_n = w_RS[r + j, c0:c0 + n]
            a = np.float32(0.0)
            for k in range(nb * STEP, n):
                a += _widen(w_n[k]) * x_N[k]
            for i in range(_LANES):
                a += acc_4L[j * _LANES + i]
            out_R[r + j] = a
        r += 4
    for r in range(r, r_hi):
        w_n = w_RS[r, c0:c0 + n]
        a = np.float32(0.0)
        for k in range(n):
            a += _widen(w_n[k]) * x_N[k]
        out_R[r] = a


@njit_kernel(parallel=False)
def gemv_bf16(x_N, w_RS, out_R, r_lo, r_hi, c0, n):
    """out_R[r] = widen(w_RS[r, c0:c0+n]) . x_N for r in r_lo:r_hi (w_RS: bf16 bits, uint16).

    With register accumulators where measured faster (gemv_reg.py, numba_util.REG_GEMV);
    elsewhere the four-row kernel above."""
    if REG_GEMV:
        gemv_bf16_reg(x_N, w_RS, out_R, r_lo, r_hi, c0, n)
    else:
        _gemv_rows(x_N, w_RS, out_R, r_lo, r_hi, c0, n)


@njit_kernel(parallel=False)
def gemv_int8(x_N, q_RS, scale_R, out_R, r_lo, r_hi, c0, n):
    """out_R[r] = scale_R[r] * (q_RS[r, c0:c0+n] . x_N) for r in r_lo:r_hi."""
    _gemv_rows(x_N, q_RS, out_R, r_lo, r_hi, c0, n)
    # The row scale factors out of the dot product: one multiply per row.
    for r in range(r_lo, r_hi):
        out_R[r] *= scale_R[r]
