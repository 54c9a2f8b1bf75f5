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
the group's scale; groups accumulate in fp32, in registers: a row's group loop runs
inside one intrinsic (`_groups_madd`, ir_loop.py), as in gemv_madd. Same-process A/B
on cold experts against the memory-accumulator form, 2-core Zen 3 VM: 1.02-1.06x
(DeepSeek-V2-Lite), 0.93x and 1.12x in two runs (Mixtral). The row's shorter last
group, if any, is dotted in fp32 with the unrounded token (int4_kernels._int4_tail_dot).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic

from .gemv_madd import PF_BYTES, pair_sums
from .int4_kernels import _int4_tail_dot
from .ir_loop import counted_loop
from .numba_util import AVX512BW, njit_kernel
from .tiles import prefetch_ir

__all__ = ["permute_x16", "gemv_int4_madd", "GROUP"]

GROUP = 128
_W = GROUP // 8  # 32-bit words per group
# 16-bit lanes per load: a whole group (512 bits) where the CPU multiply-adds 512-bit
# vectors, else half a group. The token layout serves both: plane p of a group's two
# halves is the contiguous run xq[32p : 32p + 32]. On the Zen 4 VM the 512-bit form
# measured 1.085x (one thread) and 1.06x (two) on cold DeepSeek-V2-Lite int4 experts;
# the loop stays bound by its vector ops (~11 cycles per group of 128: shifts to
# sign-extend the nibbles, multiply-adds, conversion), not by DRAM.
_LANES16 = 32 if AVX512BW else 16


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
def _groups_madd(typingctx, w_W, wi, xq_N, scale_G, groups, pf_last):
    """sum over g < groups of scale_G[g] * (v . xq) over group g (128 values in the 16
    int32 words from word wi + 16 g; v: the signed nibble values), as float32. Per
    group the int32 lanes (vpmaddwd on AVX2, the same sums in generic vector IR
    elsewhere) are converted exactly and added with one fp32 multiply-add per lane into
    accumulators that stay in registers: the group loop is emitted as IR
    (ir_loop.counted_loop). Each group's line is prefetched PF_BYTES ahead into L2,
    clamped to word pf_last. Callers keep every index in bounds."""
    if not (isinstance(w_W, types.Array) and w_W.dtype == types.int32
            and isinstance(xq_N, types.Array) and xq_N.dtype == types.int16
            and isinstance(scale_G, types.Array) and scale_G.dtype == types.float32
            and w_W.layout == xq_N.layout == scale_G.layout == "C"):
        return None
    sig = types.float32(w_W, wi, xq_N, scale_G, groups, pf_last)

    def codegen(context, builder, signature, args):
        i16, i32, f32 = ir.IntType(16), ir.IntType(32), ir.FloatType()
        L = _LANES16
        vli16, vhf32, vhi32 = ir.VectorType(i16, L), ir.VectorType(f32, L // 2), ir.VectorType(i32, L // 2)
        intp = context.get_value_type(types.intp)

        def arg(k):
            return context.cast(builder, args[k], signature.args[k], types.intp)

        wdata = context.make_array(signature.args[0])(context, builder, args[0]).data
        xdata = context.make_array(signature.args[2])(context, builder, args[2]).data
        sdata = context.make_array(signature.args[3])(context, builder, args[3]).data
        wbase, count, last = arg(1), arg(4), arg(5)
        flip = ir.Constant(vli16, [0x8888 - 0x10000] * L)  # v + 8 -> v's 4-bit two's complement
        twelve = ir.Constant(vli16, [12] * L)

        def group(b, g, accs):
            w0 = b.add(wbase, b.mul(g, ir.Constant(intp, _W)))
            target = b.add(w0, ir.Constant(intp, PF_BYTES // 4))
            target = b.select(b.icmp_signed("<", target, last), target, last)
            # Into L2 (prefetcht1): on Zen 3 a T0 hint a few KiB ahead streamed up to
            # ~10% slower than T1/T2, which leave L1 to the demand loads.
            prefetch_ir(b, b.gep(wdata, [target]), 2)
            x0 = b.mul(g, ir.Constant(intp, GROUP))
            acc_i = None
            for h in range(32 // L):  # loads per group: 2 of 256 bits or 1 of 512
                wp = b.bitcast(b.gep(wdata, [b.add(w0, ir.Constant(intp, 8 * h))]), vli16.as_pointer())
                w = b.xor(b.load(wp, align=4), flip)
                for p in range(4):
                    t = w if p == 3 else b.shl(w, ir.Constant(vli16, [12 - 4 * p] * L))
                    t = b.ashr(t, twelve)
                    xp = b.bitcast(b.gep(xdata, [b.add(x0, ir.Constant(intp, 32 * p + 16 * h))]), vli16.as_pointer())
                    s = pair_sums(b, t, b.load(xp, align=2))
                    acc_i = s if acc_i is None else b.add(acc_i, s)
            sc = b.load(b.gep(sdata, [g]))
            splat = b.insert_element(ir.Constant(vhf32, ir.Undefined), sc, ir.Constant(i32, 0))
            splat = b.shuffle_vector(splat, ir.Constant(vhf32, ir.Undefined), ir.Constant(vhi32, [0] * (L // 2)))
            return [b.fadd(accs[0], b.fmul(b.sitofp(acc_i, vhf32), splat, flags=("contract",)), flags=("contract",))]

        (acc,) = counted_loop(builder, count, [ir.Constant(vhf32, [0.0] * (L // 2))], group)
        tot = ir.Constant(f32, 0.0)
        for k in range(L // 2):
            tot = builder.fadd(tot, builder.extract_element(acc, ir.Constant(i32, k)))
        return tot

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
    tail = N > full * GROUP
    for r in range(r_lo, r_hi):
        sc = scale_RG[r]
        out_R[r] = _groups_madd(flat, r * S, xq_N, sc, full, last) * np.float32(xs)
        if tail:
            out_R[r] += _int4_tail_dot(x_N, p_RP[r], sc, xsum_G, GROUP)
