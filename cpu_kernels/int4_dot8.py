"""T == 1 (decode) GEMV for int4 weights (group 128) against a token rounded to 8 bits
per group, by byte dot products (vpdpbusd, AVX-512 VNNI):
out_R[r] = sum over groups g of scale[r, g] * ts[g] * (v[r, g] . x8[g]) (+ the fp32 tail).

Shape key: N columns, R rows, P packed bytes per row, W = P / 4 words per row, G full
groups of 128, L = 16 int32 lanes per group.

Why: the 16-bit multiply-add form (int4_madd.py) sign-extends every nibble plane with a
shift pair before its vpmaddwd, ~15 512-bit ops per group of 128 weights: on the Zen 4
VM it ran ~11 cycles per group with the weights in cache, ~36 GB/s on two cores, below
the ~60 GB/s the cores can read when they do not share one. Here the nibbles are
dotted as stored: one mask gives the 64 low nibbles of a group as bytes, one shift and
a mask the 64 high ones, and one vpdpbusd each multiplies them (unsigned) by 64 token
bytes (signed) and adds groups of four products into the 16 int32 lanes: ~8 ops per
group.

Layout (quant.py): byte i of a group holds column i (low nibble) and i + 64 (high), as
v + 8 (v in -8..7). Lane l of the low product therefore sums columns 4l..4l+3 and of the
high product columns 64+4l..64+4l+3: the token bytes stay in column order. The +8 is
removed through the lanes' starting values, corr[g, l] = -8 * (sum of x8 over the
lane's eight columns), computed once per token (`quantize_x8`), so the lanes end at
exactly v . x8 (|lane| <= 8 * 8 * 127, exact in int32 and in fp32).

Numerics: x8[g] = rint(x[g] / ts[g]) with ts[g] = max|x over group g| / 127, so each
element is off by at most ts[g] / 2 = max|x_g| / 254. Both the token and the hidden
vector are rounded so. Over a whole expert (Gaussian tokens and weights, D x F from
160 x 96 to 4096 x 1024) the output moves by 0.6-2.1% of its largest value against the
fp32 product with the dequantised weights (median element ~1.5%); rounding the weights
themselves to int4 moves the same outputs by ~16% (median element ~20%), to int8 by
~1%. That is why, as llama.cpp's 8-bit activation blocks do, this is the int4 decode
where it runs fast (DOT8_DECODE, expert_ffn._DECODE); the 16-bit form (int4_madd.py)
stays for the hosts without VNNI. T >= 2 keeps fp32 tokens (small_t_int4.py), so one
token's output can differ at that level between a batch of one and a larger batch. A token holding
inf or NaN has no 8-bit form: `quantize_x8` returns False and callers take the fp32
path, so bad values still propagate. A row's shorter last group, if any, is dotted in
fp32 with the unrounded token (int4_kernels._int4_tail_dot).

Without AVX-512 VNNI the same sums are written as generic vector IR (correct, slower);
expert_ffn only selects this path on hosts with it.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from .gemv_madd import PF_BYTES
from .int4_kernels import _int4_tail_dot
from .ir_loop import counted_loop, hsum_f32, load_vec, splat
from .numba_util import AVX512VNNI, REG_GEMV, njit_kernel
from .tiles import prefetch_ir

__all__ = ["GROUP", "LANES", "DOT8_DECODE", "TINY", "quantize_x8", "gemv_int4_dot8"]

GROUP = 128
LANES = 16  # int32 lanes per group: 512 bits
_W = GROUP // 8  # 32-bit words per group
# Groups whose largest magnitude is below this count as zero: 127 / max|x| must stay a
# finite float32 (it overflows below ~3.7e-37).
TINY = np.float32(1e-30)
# The int4 decode path of expert_ffn on the hosts where it was measured: Zen 4
# (numba_util.REG_GEMV with AVX-512 VNNI). Two threads, cold DeepSeek-V2-Lite int4
# experts, same-process A/B against the 16-bit multiply-add form: 1.16-1.23x when the
# read probe showed ~60 GB/s (the loop then bounds it), 1.00-1.05x at ~35 GB/s (memory
# bound either way). One thread, in cache: 137 against 215 us per expert.
DOT8_DECODE = REG_GEMV and AVX512VNNI


@njit_kernel(parallel=False)
def quantize_x8(x_N, x8_N, ts_G, corr_GL):
    """For each full group g of 128 columns: ts_G[g] = max|x_g| / 127 (0 for an all-zero
    group), x8_N = rint(x / ts) in -127..127, corr_GL[g, l] = -8 * (sum of x8 over
    columns 4l..4l+3 and 64+4l..64+4l+3). Columns past the last full group are left
    alone (the caller dots them in fp32). A group whose largest magnitude is below TINY
    is rounded to zero. Returns False (nothing usable) when a full group holds inf or
    NaN, else True.

    Written to vectorise (it runs on one thread between the parallel phases): the
    largest magnitude is found on the float bits as integers (for |x| their order is
    the float order, and inf and NaN are the patterns from 0x7F800000 up), and the
    rounding needs no clamp since |x| * 127 / max|x| <= 127 up to one rounding step.
    """
    bits_N = x_N.view(np.int32)
    for g in range(x_N.shape[0] // GROUP):
        b_g = bits_N[g * GROUP:(g + 1) * GROUP]
        top = np.int32(0)
        for i in range(GROUP):
            top = max(top, b_g[i] & np.int32(0x7FFFFFFF))
        if top >= np.int32(0x7F800000):
            return False
        ts_G.view(np.int32)[g] = top  # the largest magnitude's bits, read back as float32
        amax = ts_G[g]
        if amax < TINY:
            amax = np.float32(0.0)
        ts_G[g] = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        x_g = x_N[g * GROUP:(g + 1) * GROUP]
        q_g = x8_N[g * GROUP:(g + 1) * GROUP]
        for i in range(GROUP):
            q_g[i] = np.int8(np.rint(x_g[i] * inv))
        for lane in range(LANES):
            s = np.int32(0)
            for i in range(4):
                s += np.int32(q_g[4 * lane + i]) + np.int32(q_g[64 + 4 * lane + i])
            corr_GL[g, lane] = -8 * s
    return True


def _byte_dots(b: ir.IRBuilder, acc: ir.Value, u: ir.Value, s: ir.Value) -> ir.Value:
    """acc + lane sums of four products of unsigned bytes u and signed bytes s (all three
    <16 x i32>, bytes packed four per lane): one vpdpbusd with AVX-512 VNNI, the same
    sums as generic vector IR elsewhere."""
    i32, v16 = ir.IntType(32), ir.VectorType(ir.IntType(32), LANES)
    if AVX512VNNI:
        fnty = ir.FunctionType(v16, [v16, v16, v16])
        fn = cgutils.get_or_insert_function(b.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
        return b.call(fn, [acc, u, s])
    v64i8, v64i32 = ir.VectorType(ir.IntType(8), 4 * LANES), ir.VectorType(i32, 4 * LANES)
    prod = b.mul(b.zext(b.bitcast(u, v64i8), v64i32), b.sext(b.bitcast(s, v64i8), v64i32))
    undef = ir.Constant(v64i32, ir.Undefined)
    for k in range(4):
        part = b.shuffle_vector(prod, undef, ir.Constant(v16, [4 * j + k for j in range(LANES)]))
        acc = b.add(acc, part)
    return acc


@intrinsic
def _groups_dot8(typingctx, w_W, wi, x8_N, ts_G, corr_GL, scale_S, si, groups):
    """sum over g < groups of scale_S[si + g] * ts_G[g] * (v . x8) over group g (128
    values in the 16 int32 words from word wi + 16 g), as float32. Per group the lanes start at
    corr_GL[g] and take two byte dot products; they convert exactly to fp32 and join
    two fp32 accumulators (even and odd groups: one chain would leave a multiply-add
    latency per group) that stay in registers (ir_loop.counted_loop). Each group's line
    is prefetched PF_BYTES ahead into L2 (gemv_madd.PF_BYTES: 8 KiB measured best here
    too, against 2, 4 and 16 KiB and none). Callers keep every index in bounds."""
    arrays = (w_W, x8_N, ts_G, corr_GL, scale_S)
    if not all(isinstance(a, types.Array) and a.layout == "C" for a in arrays):
        return None
    if (w_W.dtype, x8_N.dtype, ts_G.dtype, corr_GL.dtype, scale_S.dtype) != (
            types.int32, types.int8, types.float32, types.int32, types.float32):
        return None
    sig = types.float32(w_W, wi, x8_N, ts_G, corr_GL, scale_S, si, groups)

    def codegen(context, builder, signature, args):
        i32, f32 = ir.IntType(32), ir.FloatType()
        v16i, v16f = ir.VectorType(i32, LANES), ir.VectorType(f32, LANES)
        intp = context.get_value_type(types.intp)

        def arg(k):
            return context.cast(builder, args[k], signature.args[k], types.intp)

        def data(k):
            return context.make_array(signature.args[k])(context, builder, args[k]).data

        wdata, xdata, tsdata, cdata, sdata = data(0), data(2), data(3), data(4), data(5)
        wbase, sbase, count = arg(1), arg(6), arg(7)
        low = ir.Constant(v16i, [0x0F0F0F0F] * LANES)
        four = ir.Constant(v16i, [4] * LANES)

        def group(b, g, acc):
            w0 = b.add(wbase, b.mul(g, ir.Constant(intp, _W)))
            # A prefetch past the array's end is harmless (a hint never faults), so
            # the address is not clamped: three scalar ops fewer per group.
            prefetch_ir(b, b.gep(wdata, [b.add(w0, ir.Constant(intp, PF_BYTES // 4))]), 2)
            w = load_vec(b, wdata, w0, v16i, 4)
            x0 = b.mul(g, ir.Constant(intp, GROUP))
            x_lo = load_vec(b, xdata, x0, v16i, 1)
            x_hi = load_vec(b, xdata, b.add(x0, ir.Constant(intp, 64)), v16i, 1)
            lanes = load_vec(b, cdata, b.mul(g, ir.Constant(intp, LANES)), v16i, 4)
            lanes = _byte_dots(b, lanes, b.and_(w, low), x_lo)
            lanes = _byte_dots(b, lanes, b.and_(b.lshr(w, four), low), x_hi)
            # Two broadcast loads and two vector ops (multiply, multiply-add) for the two
            # scales; a scalar product then a broadcast measured slower.
            part = b.fmul(b.sitofp(lanes, v16f), splat(b, b.load(b.gep(tsdata, [g])), LANES))
            sc = splat(b, b.load(b.gep(sdata, [b.add(sbase, g)])), LANES)
            return b.fadd(acc, b.fmul(part, sc, flags=("contract",)), flags=("contract",))

        def pair(b, k, accs):
            g = b.mul(k, ir.Constant(intp, 2))
            return [group(b, g, accs[0]), group(b, b.add(g, ir.Constant(intp, 1)), accs[1])]

        zero = ir.Constant(v16f, [0.0] * LANES)
        pairs = builder.sdiv(count, ir.Constant(intp, 2))
        acc0, acc1 = counted_loop(builder, pairs, [zero, zero], pair)
        # An odd count leaves one group: a loop of 0 or 1 steps from group 2 * pairs.
        rest = builder.sub(count, builder.mul(pairs, ir.Constant(intp, 2)))
        first = builder.mul(pairs, ir.Constant(intp, 2))
        (acc0,) = counted_loop(builder, rest, [acc0], lambda b, i, a: [group(b, b.add(first, i), a[0])])
        return hsum_f32(builder, builder.fadd(acc0, acc1))

    return sig, codegen


@njit_kernel(parallel=False)
def gemv_int4_dot8(x8_N, ts_G, corr_GL, x_N, xsum_G, p_RP, w_RW, scale_RG, out_R, r_lo, r_hi):
    """out_R[r] = dequant(p_RP, scale_RG)[r] . x for r in r_lo:r_hi (group 128, whole
    rows), the full groups against the token's 8-bit form (x8_N, ts_G, corr_GL from
    quantize_x8), the shorter last group against x_N in fp32 (xsum_G: its group sums,
    int4_gemv.permute_x). w_RW: p_RP viewed as int32 words (P % 4 == 0)."""
    N = x_N.shape[0]
    full = N // GROUP
    S = w_RW.shape[1]
    G = scale_RG.shape[1]
    flat = w_RW.ravel()
    s_flat = scale_RG.ravel()
    tail = N > full * GROUP
    # Flat arrays and offsets, not row views: a view per row costs reference-count
    # updates, a visible share of a row of ~11 groups.
    for r in range(r_lo, r_hi):
        out_R[r] = _groups_dot8(flat, r * S, x8_N, ts_G, corr_GL, s_flat, r * G, full)
        if tail:
            out_R[r] += _int4_tail_dot(x_N, p_RP[r], scale_RG[r], xsum_G, GROUP)
