"""T == 1 (decode) GEMV for int8 weights by 16-bit integer multiply-add:
out_R[r] = scale_R[r] * xs * (q_RS[r] . x16_N) for rows r_lo:r_hi (whole rows).

Shape key: N = S columns, R rows, I = 8 int32 lanes.

Why: on AVX2 cores (no AVX-512) the fp32 path of gemv.py spends three vector ops on
every 8 weights (sign-extend, convert, FMA) and runs at ~13-16 G values/s per core with
the rows in L2; streaming from DRAM it then overlaps so little with the memory system
that a DeepSeek-V2-Lite int8 expert reached only ~0.55 of the measured read bandwidth
on a 2-core Zen 3 VM. Here the token is first rounded to 16-bit fixed point
(`quantize_x16`), and one vpmaddwd multiplies 16 sign-extended weights by 16 token
values and adds adjacent pairs into 8 int32 lanes: three ops per 16 weights, ~31 G
values/s per core on the same rows, and a 256 MB int8 matrix streams at the probe's rate.

Numerics: the weights are used exactly; the token is rounded to x16 * xs with xs a
power of two such that |x16| <= 32767, so every bf16 element within a factor 128 of the
largest is exact and the error of any element is at most xs / 2 <= max|x| / 32768.
Products are summed exactly in int32 over blocks of BLOCK columns (|sum| <= 2048 * 128
* 32767 < 2^31 for any int8 code), blocks in float64. Against an fp32 dot product of the
dequantised row the relative difference is ~1e-5; over a whole expert (the hidden
vector's heavy tail sets its scale) 1e-4 to 4e-4 of the largest output, still well
below the int8 rounding of the weights themselves. A vector holding inf or NaN has no
fixed-point form: `quantize_x16` returns -1 and callers use the fp32 path (gemv.py), so
bad values still propagate.

Where: the decode path (decode.py) uses this on hosts with AVX2 and without AVX-512;
on AVX-512 cores the 16-lane fp32 path is the measured one (see gemv.py). The kernel
itself runs anywhere: without AVX2 the same arithmetic is written as generic vector IR.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from .numba_util import njit_kernel
from .tiles import prefetch_l2 as _prefetch_l2

__all__ = ["MADD_DECODE", "quantize_x16", "gemv_int8_madd", "BLOCK"]

BLOCK = 2048  # columns summed in int32 before a flush: 2048 * 128 * 32767 < 2^31
_CALL = 32  # columns per _madd32 call
PF_BYTES = 4096  # prefetch distance ahead in the row-major stream (2-8 KiB measured alike)


def _host_features() -> dict:
    try:
        import llvmlite.binding as llvm
        from numba.core import config
        if config.CPU_NAME is not None:  # compiling for another CPU: no host assumptions
            return {}
        return dict(llvm.get_host_cpu_features())
    except Exception:  # noqa: BLE001 - the generic IR is always correct
        return {}


_FEATURES = _host_features()
_AVX2 = bool(_FEATURES.get("avx2"))
# The decode path's choice (decode.py): measured faster on AVX2-only cores; AVX-512
# cores keep their measured fp32 path.
MADD_DECODE = _AVX2 and not bool(_FEATURES.get("avx512f"))


def pair_sums(builder: ir.IRBuilder, t: ir.Value, x: ir.Value) -> ir.Value:
    """IR for int32 [8] lanes i = t[2i] * x[2i] + t[2i+1] * x[2i+1] of two int16 [16]
    vectors: one vpmaddwd on AVX2, the same sums as generic vector IR elsewhere."""
    i16, i32 = ir.IntType(16), ir.IntType(32)
    v16i16, v8i32, v16i32 = ir.VectorType(i16, 16), ir.VectorType(i32, 8), ir.VectorType(i32, 16)
    if _AVX2:
        fnty = ir.FunctionType(v8i32, [v16i16, v16i16])
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx2.pmadd.wd"), [t, x])
    prod = builder.mul(builder.sext(t, v16i32), builder.sext(x, v16i32))
    undef = ir.Constant(v16i32, ir.Undefined)
    even = builder.shuffle_vector(prod, undef, ir.Constant(v8i32, list(range(0, 16, 2))))
    odd = builder.shuffle_vector(prod, undef, ir.Constant(v8i32, list(range(1, 16, 2))))
    return builder.add(even, odd)


@intrinsic
def _madd32(typingctx, w_flat, wi, x16_N, xi, acc_I):
    """acc_I[i] += sum over h in 0, 1 and j in 0, 1 of w[wi + 16h + 2i + j] * x16[xi + 16h + 2i + j]
    (int32 lanes; vpmaddwd on AVX2, the same sums in generic vector IR elsewhere).
    Callers keep every index in bounds."""
    if not (isinstance(w_flat, types.Array) and w_flat.dtype == types.int8
            and isinstance(x16_N, types.Array) and x16_N.dtype == types.int16):
        return None
    sig = types.none(w_flat, wi, x16_N, xi, acc_I)

    def codegen(context, builder, signature, args):
        w_arr, wi_v, x_arr, xi_v, a_arr = args
        i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
        v16i16, v8i32 = ir.VectorType(i16, 16), ir.VectorType(i32, 8)

        def ptr(arr_ty, arr, index, vty):
            ary = context.make_array(arr_ty)(context, builder, arr)
            return builder.bitcast(builder.gep(ary.data, [index]), vty.as_pointer())

        wbase = context.cast(builder, wi_v, signature.args[1], types.intp)
        xbase = context.cast(builder, xi_v, signature.args[3], types.intp)
        aptr = ptr(signature.args[4], a_arr, ir.Constant(wbase.type, 0), v8i32)
        acc = builder.load(aptr, align=4)
        for h in range(2):
            off = ir.Constant(wbase.type, 16 * h)
            w = builder.load(ptr(signature.args[0], w_arr, builder.add(wbase, off), ir.VectorType(i8, 16)), align=1)
            x = builder.load(ptr(signature.args[2], x_arr, builder.add(xbase, off), v16i16), align=2)
            acc = builder.add(acc, pair_sums(builder, builder.sext(w, v16i16), x))
        builder.store(acc, aptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit_kernel(parallel=False)
def quantize_x16(x_N, x16_N):
    """x16_N = round(x_N / xs) with xs a power of two and |x16| <= 32767; returns xs
    (0.0 for an all-zero token) or -1.0 when x_N holds inf or NaN (no fixed-point form)."""
    amax = np.float32(0.0)
    big = np.float32(np.finfo(np.float32).max)
    for k in range(x_N.shape[0]):
        a = abs(x_N[k])
        if not a <= big:  # inf, or NaN (every comparison with NaN is false)
            return -1.0
        if a > amax:
            amax = a
    if amax == 0.0:
        x16_N[:] = 0
        return 0.0
    _, e = math.frexp(amax)  # amax = m * 2^e, 0.5 <= m < 1, so amax / 2^(e-15) < 32768
    xs = math.ldexp(1.0, e - 15)
    inv = 1.0 / xs
    for k in range(x_N.shape[0]):
        x16_N[k] = min(32767.0, max(-32767.0, np.rint(x_N[k] * inv)))
    return xs


@njit_kernel(parallel=False)
def _row_dot(flat, base, x16_N, n, acc_I):
    """q[base:base+n] . x16_N exactly, in float64 (int32 within blocks of BLOCK columns),
    prefetching one line PF_BYTES ahead for every line read."""
    last = flat.shape[0] - 1
    tot = 0.0
    for b0 in range(0, n, BLOCK):
        b1 = min(n, b0 + BLOCK)
        acc_I[:] = 0
        k = b0
        while k + 2 * _CALL <= b1:
            _prefetch_l2(flat, min(base + k + PF_BYTES, last))
            _madd32(flat, base + k, x16_N, k, acc_I)
            _madd32(flat, base + k + _CALL, x16_N, k + _CALL, acc_I)
            k += 2 * _CALL
        if k + _CALL <= b1:
            _madd32(flat, base + k, x16_N, k, acc_I)
            k += _CALL
        blk = np.int64(0)
        for i in range(8):
            blk += acc_I[i]
        w_n = flat[base + k:base + b1]
        for j in range(w_n.shape[0]):
            blk += np.int64(w_n[j]) * np.int64(x16_N[k + j])
        tot += float(blk)
    return tot


@njit_kernel(parallel=False)
def gemv_int8_madd(x16_N, xs, q_RS, scale_R, out_R, r_lo, r_hi):
    """out_R[r] = scale_R[r] * xs * (q_RS[r, :] . x16_N) for r in r_lo:r_hi (whole rows).

    Rows are streamed one after another (one sequential stream per thread, which the
    hardware prefetcher follows across rows), every line also prefetched PF_BYTES ahead
    into L2 as the line before it is read. (Prefetching a whole row at its start, a
    burst of up to 224 hints on Mixtral's w2 rows, overflowed the miss queues: 14%
    slower there than the fp32 kernel.)
    """
    S = q_RS.shape[1]
    flat = q_RS.ravel()
    acc_I = np.zeros(8, np.int32)
    for r in range(r_lo, r_hi):
        out_R[r] = np.float32(_row_dot(flat, r * S, x16_N, S, acc_I) * xs * scale_R[r])
