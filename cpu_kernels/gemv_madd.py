"""T == 1 (decode) GEMV for int8 weights by 16-bit integer multiply-add:
out_R[r] = scale_R[r] * xs * (q_RS[r] . x16_N) for rows r_lo:r_hi (whole rows).

Shape key: N = S columns, R rows, I = 8 int32 lanes.

Why: on AVX2 cores (no AVX-512) the fp32 path of gemv.py spends three vector ops on
every 8 weights (sign-extend, convert, FMA) and runs at ~13-16 G values/s per core with
the rows in L2; streaming from DRAM it then overlaps so little with the memory system
that a DeepSeek-V2-Lite int8 expert reached only ~0.55 of the measured read bandwidth
on a 2-core Zen 3 VM. Here the token is first rounded to 16-bit fixed point
(`quantize_x16`), and one vpmaddwd multiplies 16 sign-extended weights by 16 token
values and adds adjacent pairs into 8 int32 lanes: three ops per 16 weights. The loop
runs inside one intrinsic (`_madd_run`) so that its accumulators stay in registers
(ir_loop.py). Through memory they held one core to ~14 G values/s from L3; in registers
~25 G values/s. From DRAM, same-process A/B on cold experts against the
memory-accumulator form: 1.09-1.15x (DeepSeek-V2-Lite), 1.09x (Mixtral).

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

from .ir_loop import counted_loop
from .numba_util import njit_kernel

__all__ = ["MADD_DECODE", "quantize_x16", "gemv_int8_madd", "BLOCK"]

BLOCK = 2048  # columns summed in int32 before a flush: 2048 * 128 * 32767 < 2^31
_STEP = 64  # columns per step of _madd_run: one 64-byte line of int8 weights
PF_BYTES = 4096  # prefetch distance of the int4 row stream (int4_madd.py; 2-8 KiB measured alike)


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
def _madd_run(typingctx, w_flat, wi, x16_N, xi, steps):
    """sum over k < 64 * steps of w[wi + k] * x16[xi + k], exactly, as int64 (int32
    lanes: callers keep steps * 64 <= BLOCK). The loop and its two accumulators live in
    the IR (ir_loop.counted_loop), so the accumulators stay in registers. vpmaddwd on
    AVX2, the same sums in generic vector IR elsewhere. Callers keep every index in
    bounds."""
    if not (isinstance(w_flat, types.Array) and w_flat.dtype == types.int8
            and isinstance(x16_N, types.Array) and x16_N.dtype == types.int16):
        return None
    sig = types.int64(w_flat, wi, x16_N, xi, steps)

    def codegen(context, builder, signature, args):
        w_arr, wi_v, x_arr, xi_v, n_v = args
        i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
        v16i16, v8i32 = ir.VectorType(i16, 16), ir.VectorType(i32, 8)
        intp = context.get_value_type(types.intp)

        def arg(k):
            return context.cast(builder, args[k], signature.args[k], types.intp)

        wdata = context.make_array(signature.args[0])(context, builder, w_arr).data
        xdata = context.make_array(signature.args[2])(context, builder, x_arr).data
        wbase, xbase, count = arg(1), arg(3), arg(4)
        zero = ir.Constant(v8i32, [0] * 8)

        def step(b, i, accs):
            off = b.mul(i, ir.Constant(intp, 64))
            w0, x0 = b.add(wbase, off), b.add(xbase, off)
            accs = list(accs)
            for h in range(4):
                c = ir.Constant(intp, 16 * h)
                wp = b.bitcast(b.gep(wdata, [b.add(w0, c)]), ir.VectorType(i8, 16).as_pointer())
                xp = b.bitcast(b.gep(xdata, [b.add(x0, c)]), v16i16.as_pointer())
                w = b.sext(b.load(wp, align=1), v16i16)
                accs[h % 2] = b.add(accs[h % 2], pair_sums(b, w, b.load(xp, align=2)))
            return accs

        acc0, acc1 = counted_loop(builder, count, [zero, zero], step)
        lanes = builder.add(acc0, acc1)
        total = ir.Constant(i64, 0)
        for k in range(8):
            total = builder.add(total, builder.sext(builder.extract_element(lanes, ir.Constant(i32, k)), i64))
        return total

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
def _row_dot(flat, base, x16_N, n):
    """q[base:base+n] . x16_N exactly, in float64 (int32 within blocks of BLOCK columns)."""
    tot = 0.0
    for b0 in range(0, n, BLOCK):
        b1 = min(n, b0 + BLOCK)
        steps = (b1 - b0) // _STEP
        blk = _madd_run(flat, base + b0, x16_N, b0, steps)
        k = b0 + steps * _STEP
        w_n = flat[base + k:base + b1]
        for j in range(w_n.shape[0]):
            blk += np.int64(w_n[j]) * np.int64(x16_N[k + j])
        tot += float(blk)
    return tot


@njit_kernel(parallel=False)
def gemv_int8_madd(x16_N, xs, q_RS, scale_R, out_R, r_lo, r_hi):
    """out_R[r] = scale_R[r] * xs * (q_RS[r, :] . x16_N) for r in r_lo:r_hi (whole rows).

    Rows are streamed one after another: one sequential stream per thread, which the
    hardware prefetcher follows across rows. Measured on the 2-core Zen 3 VM with the
    accumulators in registers (cold int8 matrices of DeepSeek-V2-Lite's shapes, two
    threads, alternating in one process): without software prefetch the GEMV streamed
    4-14% faster than with one line 4 KiB ahead into L2 (which the memory-accumulator
    form needed), a prefetch 1 KiB ahead into L1 alike; whole experts alike within
    noise. Two or four rows side by side (four streams per thread) streamed 20-35%
    slower than one row at a time, though faster from cache.
    """
    S = q_RS.shape[1]
    flat = q_RS.ravel()
    for r in range(r_lo, r_hi):
        out_R[r] = np.float32(_row_dot(flat, r * S, x16_N, S) * xs * scale_R[r])
