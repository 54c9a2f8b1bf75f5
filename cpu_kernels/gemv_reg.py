"""T == 1 (decode) GEMV for bf16 weights with register accumulators:
out_R[r] = widen(w_RS[r, c0:c0+n]) . x_N for rows r_lo:r_hi.

Shape key: N window columns (x_N), R weight rows, S row stride (C-contiguous [R, S]).

gemv.py's kernel passes its partial sums from one intrinsic call to the next in a numpy
array. LLVM cannot keep such an accumulator in a register (the weight loads might alias
it), so every step waits on store-to-load forwarding. Here each dot product runs inside
one intrinsic whose loop keeps its accumulators in registers (ir_loop.counted_loop).

How many rows stream side by side depends on the row length, measured on the 2-core
Zen 3 VM (AVX2 only), cold bf16 matrices, two threads, same-process A/B:
- short rows (DeepSeek-V2-Lite: 1408 and 2048 columns) stream best one after another,
  a thread's window being one sequential stream the hardware prefetcher follows across
  rows: 0.76-0.89 of the read probe, against 0.60-0.78 with four rows side by side
  and 0.67-0.68 for gemv.py's kernel;
- long rows (Mixtral-8x7B: 4096 and 14336 columns) stream best four side by side
  (four streams per thread, each sharing the loads of x): 0.98 and 1.05 of the probe,
  against 0.82 one row at a time, and 0.99 and 0.82 for gemv.py's kernel.
Windows of at least FOUR_ROW_COLS columns take the four-row loop; the int8 multiply-add
GEMV measured the same split (gemv_madd.py).

Software prefetch: on AVX2 hosts the one-row loop prefetches (prefetchnta) both lines
of each step PF_ROW_BYTES ahead. With the weights in huge pages, same-process A/B on
cold DeepSeek-V2-Lite bf16 experts (Zen 3, whole decode, two threads, together with
skipping the empty tail call per row): 1.07x for 1024 bytes ahead (twice), 1.04x for
512, 0.99x for 2048. On 4 KiB pages a prefetch had measured alike or slower.

AVX-512 hosts (the 2-core Zen 4 VM, where numba_util.REG_GEMV also picks this kernel)
measured otherwise: the prefetch is what held the one-row loop back there. Without it
one thread streams DeepSeek-V2-Lite bf16 experts at 0.97 of a one-thread read probe
(1.79x the four-row loop that was the choice then), and two threads 1.22x it (0.97 of
the two-thread probe); over a 256 MB matrix two threads of the one-row loop read 55.5
GB/s against 37.9 with the prefetch and 36.4 for four rows, the probe reading 56.6.
Four rows side by side still win where the token window outgrows L1 (Mixtral's w2,
14336 fp32 columns = 56 KiB, re-read from L2 once per row by a one-row loop): one row
for windows up to 4096 columns and four above measured 1.05x (two threads) and 1.21x
(one) over four rows for both of Mixtral's matrices, and one row for both 0.92x. So on
AVX-512 hosts there is no prefetch and bf16 windows of at least
BF16_FOUR_ROW_COLS_AVX512 columns take the four-row loop.

Numerics: bf16 bits << 16 are the fp32 weight exactly; products and sums in fp32 (FMA
where the CPU has it), summed in a different order from gemv.py's kernel.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic

from .ir_loop import counted_loop
from .numba_util import AVX512, njit_kernel
from .tiles import bf16_to_f32, prefetch_ir

__all__ = ["gemv_bf16_reg", "FOUR_ROW_COLS"]

_STEP = 64  # columns per loop step: two 64-byte lines of bf16 per row
_ACCS = 4  # accumulators of the one-row loop: one FMA chain each per step
FOUR_ROW_COLS = 4096  # windows this wide or wider stream four rows side by side
BF16_FOUR_ROW_COLS_AVX512 = 8192  # the same for bf16 on AVX-512 hosts (see the module docstring)
_BF16_FOUR_ROW_COLS = BF16_FOUR_ROW_COLS_AVX512 if AVX512 else FOUR_ROW_COLS
# Prefetch distance of the one-row loop, 0 for none (see the module docstring).
PF_ROW_BYTES = 0 if AVX512 else 1024


def _widen16(b, v):
    """fp32 [16] of 16 bf16 bit patterns (exact)."""
    i32 = ir.IntType(32)
    wide = b.zext(v, ir.VectorType(i32, 16))
    return b.bitcast(b.shl(wide, ir.Constant(ir.VectorType(i32, 16), [16] * 16)), ir.VectorType(ir.FloatType(), 16))


def _hsum16(b, v):
    tot = ir.Constant(ir.FloatType(), 0.0)
    for k in range(16):
        tot = b.fadd(tot, b.extract_element(v, ir.Constant(ir.IntType(32), k)))
    return tot


def _ok(w_flat, x_N):
    return (isinstance(w_flat, types.Array) and w_flat.dtype == types.uint16 and w_flat.layout == "C"
            and isinstance(x_N, types.Array) and x_N.dtype == types.float32 and x_N.layout == "C")


@intrinsic
def _bf16_rows(typingctx, w_flat, wi, S, x_N, steps, out_4):
    """out_4[j] = sum over k < 64 * steps of widen(w[wi + j * S + k]) * x_N[k] for the
    rows j < len(out_4) (1 or 4, a compile-time choice by out_4's type: a 1-row loop
    needs no out array and returns the sum) in fp32. w_flat bf16 bits (uint16), x_N
    float32 from its first element. Callers keep every index in bounds."""
    if not _ok(w_flat, x_N):
        return None
    rows = 4 if isinstance(out_4, types.Array) else 1
    if rows == 4 and out_4.dtype != types.float32:
        return None
    sig = (types.none if rows == 4 else types.float32)(w_flat, wi, S, x_N, steps, out_4)

    def codegen(context, builder, signature, args):
        v16i16, v16f32 = ir.VectorType(ir.IntType(16), 16), ir.VectorType(ir.FloatType(), 16)
        intp = context.get_value_type(types.intp)

        def arg(k):
            return context.cast(builder, args[k], signature.args[k], types.intp)

        wdata = context.make_array(signature.args[0])(context, builder, args[0]).data
        xdata = context.make_array(signature.args[3])(context, builder, args[3]).data
        wbase, stride, count = arg(1), arg(2), arg(4)
        row_base = [builder.add(wbase, builder.mul(stride, ir.Constant(intp, j))) for j in range(rows)]
        n_acc = _ACCS if rows == 1 else 1  # four rows: one chain per row is enough
        fast = ("contract",)

        def step(b, i, accs):
            off = b.mul(i, ir.Constant(intp, _STEP))
            accs = list(accs)
            if rows == 1 and PF_ROW_BYTES:  # two 64-byte lines per step: one prefetch each
                for line in range(2):
                    ahead = ir.Constant(intp, PF_ROW_BYTES // 2 + 32 * line)  # in bf16 elements
                    prefetch_ir(b, b.bitcast(b.gep(wdata, [b.add(b.add(row_base[0], off), ahead)]),
                                             ir.IntType(8).as_pointer()), 0)
            for h in range(_STEP // 16):
                c = ir.Constant(intp, 16 * h)
                x = b.load(b.bitcast(b.gep(xdata, [b.add(off, c)]), v16f32.as_pointer()), align=4)
                for j in range(rows):
                    wp = b.bitcast(b.gep(wdata, [b.add(b.add(row_base[j], off), c)]), v16i16.as_pointer())
                    k = j if rows > 1 else h % n_acc
                    accs[k] = b.fadd(accs[k], b.fmul(_widen16(b, b.load(wp, align=2)), x, flags=fast), flags=fast)
            return accs

        zero = ir.Constant(v16f32, [0.0] * 16)
        accs = counted_loop(builder, count, [zero] * (rows * n_acc), step)
        if rows == 1:
            lanes = accs[0]
            for a in accs[1:]:
                lanes = builder.fadd(lanes, a)
            return _hsum16(builder, lanes)
        odata = context.make_array(signature.args[5])(context, builder, args[5]).data
        for j in range(rows):
            builder.store(_hsum16(builder, accs[j]), builder.gep(odata, [ir.Constant(intp, j)]))
        return context.get_dummy_value()

    return sig, codegen


@njit_kernel(parallel=False)
def _tail(flat, base, x_n, k0, n):
    a = np.float32(0.0)
    w_n = flat[base + k0:base + n]
    for k in range(w_n.shape[0]):
        a += bf16_to_f32(w_n[k]) * x_n[k0 + k]
    return a


@njit_kernel(parallel=False)
def gemv_bf16_reg(x_N, w_RS, out_R, r_lo, r_hi, c0, n):
    """out_R[r] = widen(w_RS[r, c0:c0+n]) . x_N for r in r_lo:r_hi (w_RS: bf16 bits, uint16)."""
    S = w_RS.shape[1]
    flat = w_RS.ravel()
    x_n = x_N[:n]
    steps = n // _STEP
    k0 = steps * _STEP
    r = r_lo
    if n >= _BF16_FOUR_ROW_COLS:
        o_4 = np.empty(4, np.float32)
        while r + 4 <= r_hi:
            base = r * S + c0
            _bf16_rows(flat, base, S, x_n, steps, o_4)
            for j in range(4):
                out_R[r + j] = o_4[j] + (_tail(flat, base + j * S, x_n, k0, n) if k0 < n else np.float32(0.0))
            r += 4
    for r in range(r, r_hi):
        base = r * S + c0
        # The tail only when there is one: an empty call per row costs ~3% of a short-row expert.
        tail = _tail(flat, base, x_n, k0, n) if k0 < n else np.float32(0.0)
        out_R[r] = _bf16_rows(flat, base, S, x_n, steps, None) + tail
