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
runs inside one intrinsic (`_madd_rows`) so that its accumulators stay in registers
(ir_loop.py). Through memory they held one core to ~14 G values/s from L3; in registers
~25 G values/s. From DRAM, same-process A/B on cold whole experts against the
memory-accumulator form (one row at a time, prefetch 4 KiB ahead): 1.03-1.15x
(DeepSeek-V2-Lite); Mixtral 0.97-0.98x with its rows four side by side (see
gemv_int8_madd), where the one-row register form measured 0.88-1.09x.

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

Where: the decode path (decode.py) uses this where numba_util.REG_GEMV holds: AVX2-only
cores, and Zen 4 (AVX-512), where it measured 1.70x the fp32 path on cold DeepSeek-V2-Lite
experts and alike on Mixtral's. On other AVX-512 cores the 16-lane fp32 path is the
measured one (see gemv.py). The kernel itself runs anywhere: without AVX2 the same
arithmetic is written as generic vector IR.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from .ir_loop import counted_loop
from .gemv_reg import FOUR_ROW_COLS
from .numba_util import AVX2, AVX512, AVX512BW, REG_GEMV, njit_kernel
from .tiles import prefetch_ir

__all__ = ["MADD_DECODE", "quantize_x16", "gemv_int8_madd", "BLOCK"]

BLOCK = 2048  # columns summed in int32 before a flush: 2048 * 128 * 32767 < 2^31
_STEP = 64  # columns per loop step of _madd_rows: one 64-byte line of int8 weights per row
# Prefetch distance of the int4 row stream (int4_madd.py): 2-8 KiB measured alike on
# Zen 3; on the Zen 4 VM 8 KiB measured 1.04x over 4 KiB (one and two threads, cold
# DeepSeek-V2-Lite int4 experts), and no prefetch there 0.44-0.55x.
PF_BYTES = 8192 if AVX512 else 4096
# Prefetch distance of the one-row int8 loop (see gemv_int8_madd): 768-1024 measured
# best, 512 and 1536 in between, 2048 no better than none; none on AVX-512 hosts.
PF_ROW_BYTES = 0 if AVX512 else 1024
# Rows this wide or wider stream four side by side (see gemv_int8_madd): on AVX-512 hosts,
# without the prefetch, one row at a time wins up to Mixtral's 4096 columns.
_FOUR_ROW_COLS = 8192 if AVX512 else FOUR_ROW_COLS

# The decode path's choice (decode.py): measured faster on AVX2-only Zen 3 and on
# AVX-512 Zen 4 cores (numba_util.REG_GEMV); other AVX-512 cores keep their fp32 path.
MADD_DECODE = REG_GEMV


def pair_sums(builder: ir.IRBuilder, t: ir.Value, x: ir.Value) -> ir.Value:
    """IR for int32 [n/2] lanes i = t[2i] * x[2i] + t[2i+1] * x[2i+1] of two int16 [n]
    vectors (n = 16 or 32): one vpmaddwd on AVX2 (n = 16) and AVX-512BW (n = 32), the
    same sums as generic vector IR elsewhere."""
    n = t.type.count
    i16, i32 = ir.IntType(16), ir.IntType(32)
    vin, vout, vwide = ir.VectorType(i16, n), ir.VectorType(i32, n // 2), ir.VectorType(i32, n)
    name = {16: "llvm.x86.avx2.pmadd.wd", 32: "llvm.x86.avx512.pmaddw.d.512"}.get(n)
    if (n == 16 and AVX2) or (n == 32 and AVX512BW):
        fnty = ir.FunctionType(vout, [vin, vin])
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), [t, x])
    prod = builder.mul(builder.sext(t, vwide), builder.sext(x, vwide))
    undef = ir.Constant(vwide, ir.Undefined)
    even = builder.shuffle_vector(prod, undef, ir.Constant(vout, list(range(0, n, 2))))
    odd = builder.shuffle_vector(prod, undef, ir.Constant(vout, list(range(1, n, 2))))
    return builder.add(even, odd)


@intrinsic
def _madd_rows(typingctx, w_flat, wi, S, x16_N, xi, steps, out_4):
    """Row j (j < 1, or < 4 when out_4 is an int64 array) gets the exact sum over
    k < 64 * steps of w[wi + j * S + k] * x16[xi + k] (int32 lanes: callers keep
    steps * 64 <= BLOCK): one row returns it as int64, four rows store it in out_4. The
    loop and its accumulators live in the IR (ir_loop.counted_loop), so they stay in
    registers. vpmaddwd on AVX2, the same sums in generic vector IR elsewhere. The
    one-row loop prefetches its stream PF_ROW_BYTES ahead (a hint: addresses past the
    array never fault). Callers keep every index in bounds."""
    if not (isinstance(w_flat, types.Array) and w_flat.dtype == types.int8
            and isinstance(x16_N, types.Array) and x16_N.dtype == types.int16):
        return None
    rows = 4 if isinstance(out_4, types.Array) else 1
    if rows == 4 and out_4.dtype != types.int64:
        return None
    sig = (types.none if rows == 4 else types.int64)(w_flat, wi, S, x16_N, xi, steps, out_4)

    def codegen(context, builder, signature, args):
        i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
        v16i16, v8i32 = ir.VectorType(i16, 16), ir.VectorType(i32, 8)
        intp = context.get_value_type(types.intp)

        def arg(k):
            return context.cast(builder, args[k], signature.args[k], types.intp)

        wdata = context.make_array(signature.args[0])(context, builder, args[0]).data
        xdata = context.make_array(signature.args[3])(context, builder, args[3]).data
        wbase, stride, xbase, count = arg(1), arg(2), arg(4), arg(5)
        row_base = [builder.add(wbase, builder.mul(stride, ir.Constant(intp, j))) for j in range(rows)]
        # Independent accumulator chains: on AVX-512 VNNI cores LLVM fuses each multiply-add
        # and its add into one vpdpwssd, whose accumulator latency (~4 cycles on Zen 4)
        # then bounds the loop. One row with two chains ran ~8 weights per cycle with
        # the rows in cache (34 GB/s, one thread, DeepSeek-V2-Lite int8); four chains
        # 63 GB/s (1.8x), from DRAM 1.03x (two threads, probe ~62 GB/s) and alike at
        # ~35. Four rows keep one chain each: two per row measured alike from DRAM.
        n_acc = 4 if rows == 1 else 1

        def step(b, i, accs):
            off = b.mul(i, ir.Constant(intp, 64))
            x0 = b.add(xbase, off)
            accs = list(accs)
            if rows == 1 and PF_ROW_BYTES:
                ahead = b.add(b.add(row_base[0], off), ir.Constant(intp, PF_ROW_BYTES))
                prefetch_ir(b, b.gep(wdata, [ahead]), 0)
            for h in range(4):
                c = ir.Constant(intp, 16 * h)
                x = b.load(b.bitcast(b.gep(xdata, [b.add(x0, c)]), v16i16.as_pointer()), align=2)
                for j in range(rows):
                    wp = b.bitcast(b.gep(wdata, [b.add(b.add(row_base[j], off), c)]), ir.VectorType(i8, 16).as_pointer())
                    k = j if rows > 1 else h % n_acc
                    accs[k] = b.add(accs[k], pair_sums(b, b.sext(b.load(wp, align=1), v16i16), x))
            return accs

        def total(lanes):
            t = ir.Constant(i64, 0)
            for k in range(8):
                t = builder.add(t, builder.sext(builder.extract_element(lanes, ir.Constant(i32, k)), i64))
            return t

        accs = counted_loop(builder, count, [ir.Constant(v8i32, [0] * 8)] * (rows * n_acc), step)
        if rows == 1:
            lanes = accs[0]
            for a in accs[1:]:
                lanes = builder.add(lanes, a)
            return total(lanes)
        odata = context.make_array(signature.args[6])(context, builder, args[6]).data
        for j in range(rows):
            builder.store(total(accs[j]), builder.gep(odata, [ir.Constant(intp, j)]))
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
def _tail_dot(flat, base, x16_N, k0, k1):
    """q[base+k0:base+k1] . x16_N[k0:k1] exactly, as int64."""
    blk = np.int64(0)
    w_n = flat[base + k0:base + k1]
    for j in range(w_n.shape[0]):
        blk += np.int64(w_n[j]) * np.int64(x16_N[k0 + j])
    return blk


@njit_kernel(parallel=False)
def gemv_int8_madd(x16_N, xs, q_RS, scale_R, out_R, r_lo, r_hi):
    """out_R[r] = scale_R[r] * xs * (q_RS[r, :] . x16_N) for r in r_lo:r_hi (whole rows).

    Each row's dot product: exact int32 sums over blocks of BLOCK columns, the blocks
    added in float64. How many rows stream side by side depends on the row length, as
    for bf16 (gemv_reg.py), measured on the 2-core Zen 3 VM, cold int8 matrices, two
    threads, same-process A/B:
    - short rows (DeepSeek-V2-Lite: 1408 and 2048 columns) one after another, a
      thread's rows being one sequential stream the hardware prefetcher follows:
      0.78-0.86 of the read probe, against 0.50-0.67 four rows side by side;
    - long rows (Mixtral: 4096 and 14336 columns) four side by side: 0.77 and 0.82 of
      the probe, against 0.71 and 0.61 one row at a time.
    Rows of at least FOUR_ROW_COLS columns take the four-row loop; on AVX-512 hosts
    (no prefetch, below) at least 8192: Mixtral int8 with its 4096-column w13 one row at
    a time measured 1.31x (one thread) and 1.08x (two) over four rows, both matrices
    one row at a time 0.96x (two threads).

    Software prefetch, one-row loop: one prefetchnta per 64-byte step, PF_ROW_BYTES
    ahead. The loop decodes each line with ~18 instructions, so the out-of-order window
    holds only ~14 lines of demand loads: one core then streamed ~14 GB/s from DRAM
    where a plain fp32 sum streams ~25. Same-process A/B on cold DeepSeek-V2-Lite int8
    experts with the weights in huge pages (whole decode, two threads): 1.05-1.07x for
    1024 bytes ahead, 1.06x for 768, 1.03-1.04x for 512 and 1536, 0.97x for 2048;
    with the empty tail call per row skipped as well, 1.07x and 1.11x over the kernel
    without either. Earlier, on 4 KiB pages, 1 KiB ahead had measured alike and 4 KiB
    ahead 4-14% slower. The four-row loop has none. On AVX-512 hosts (Zen 4 VM) the
    prefetch held the loop back: without it, 1.17x with one thread (0.91 of a one-thread
    read probe) and 1.02x with two, so there it is left out (as in gemv_reg.py).
    """
    S = q_RS.shape[1]
    flat = q_RS.ravel()
    r = r_lo
    if S >= _FOUR_ROW_COLS:
        o_4 = np.empty(4, np.int64)
        tot_4 = np.empty(4, np.float64)
        while r + 4 <= r_hi:
            base = r * S
            tot_4[:] = 0.0
            for b0 in range(0, S, BLOCK):
                b1 = min(S, b0 + BLOCK)
                steps = (b1 - b0) // _STEP
                _madd_rows(flat, base + b0, S, x16_N, b0, steps, o_4)
                k0 = b0 + steps * _STEP
                for j in range(4):
                    tot_4[j] += float(o_4[j] + (_tail_dot(flat, base + j * S, x16_N, k0, b1) if k0 < b1 else 0))
            for j in range(4):
                out_R[r + j] = np.float32(tot_4[j] * xs * scale_R[r + j])
            r += 4
    for r in range(r, r_hi):
        base = r * S
        tot = 0.0
        for b0 in range(0, S, BLOCK):
            b1 = min(S, b0 + BLOCK)
            steps = (b1 - b0) // _STEP
            k0 = b0 + steps * _STEP
            # The tail only when there is one: an empty call per row cost ~3% of a
            # DeepSeek-V2-Lite expert (rows of 22 and 32 whole steps).
            tot += float(_madd_rows(flat, base + b0, S, x16_N, b0, steps, None)
                         + (_tail_dot(flat, base, x16_N, k0, b1) if k0 < b1 else 0))
        out_R[r] = np.float32(tot * xs * scale_R[r])
