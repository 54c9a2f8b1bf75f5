"""T == 1 (decode) GEMV for int4 weights over a window of whole groups:
out_R[r] = dequant(W)[r, c0:c0+n] . x_N for rows r_lo:r_hi.

Shape key: N window columns, R rows, P packed bytes per row, W = P / 4 packed 32-bit
words per row, G groups per row (group size 128; 32 and 64 use int4_kernels).

Layout (quant.py): within a group of 128 columns, byte i holds column i (low nibble)
and column i + 64 (high nibble). Read as 32-bit words, word i of a group holds bytes
4i..4i+3, i.e. eight nibbles; nibble m (bits 4m..4m+3) is column ``4i + m // 2``
(+ 64 when m is odd). `permute_x` reorders x once per call to match,
xp[16 m + i] = x[col(m, i)], so that lane i of a 16-lane vector takes word i of a
group and each nibble plane m costs one shift, one decode and one FMA across 16 lanes,
with no byte-to-word widening. The lanes keep their partial sums across groups (one FMA
with the group scale), and a row is reduced once at its end.

Decode of a nibble n to the value n - 8: with AVX-512, one vpermps from a 16-entry
table (it reads only the low 4 bits of each lane, so no mask); elsewhere mask, convert
and subtract. The old byte-wise loop (int4_kernels) widened bytes to words and reduced
every group to a scalar, and ran at ~11 G values/s per core here, compute-bound
below the DRAM rate; this one runs at ~26 G values/s (L2-resident, one core).

Tried and not used: decoding in 16-bit lanes (vpermw from a bf16 table) and dotting
with vdpbf16ps (32 products per instruction, AVX512-BF16, through inline assembly)
ran at ~23 G values/s against this loop's ~26 on the same L2-resident rows (and ~30
with the table decode left out): on this core vdpbf16ps and vpermw cost more than the
shift + vpermps + FMA they replace.

The window starts on a group boundary; it may end with the row's shorter last group,
which is dotted byte by byte (int4_kernels._int4_tail_dot, with xsum_G). Rows need
P % 4 == 0 so that every group starts on a word (expert_ffn falls back otherwise).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from .gemv import PF_BYTES, prefetch_rows4
from .int4_kernels import _int4_tail_dot
from .numba_util import njit_kernel
from .tiles import wide_vectors as _wide_vectors

__all__ = ["permute_x", "gemv_int4", "GROUP"]

GROUP = 128  # the group size this kernel handles (others: int4_kernels)
_L = GROUP // 8  # 32-bit words per group, one per lane
_VL = 16  # lanes per vector (two 8-lane halves measured slower here)


def _has_avx512() -> bool:
    """True when numba compiles for this host and the host has AVX-512F."""
    try:
        import llvmlite.binding as llvm
        from numba.core import config
        return config.CPU_NAME is None and bool(llvm.get_host_cpu_features().get("avx512f"))
    except Exception:  # noqa: BLE001 - the generic path is always correct
        return False


# Nibble -> float through a 16-entry table in one register (vpermps reads only the low
# 4 bits of each lane, so no mask): one shuffle-port op instead of a mask and a convert,
# both of which compete with the shifts for the same port on 512-bit vectors.
_PERMUTE_LUT = _has_avx512()


@njit_kernel(parallel=False)
def permute_x(x_N, group, xp_N, xsum_G):
    """xp_N = x_N reordered for the word-lane layout (full groups only; the shorter last
    group, if any, is copied unchanged) and xsum_G[g] = sum of x over group g."""
    N = x_N.shape[0]
    hg = group // 2
    L = group // 8
    full = N // group
    for g in range(full):
        x_g = x_N[g * group:(g + 1) * group]
        xp_g = xp_N[g * group:(g + 1) * group]
        for i in range(L):
            for j in range(4):
                xp_g[2 * j * L + i] = x_g[4 * i + j]
                xp_g[(2 * j + 1) * L + i] = x_g[hg + 4 * i + j]
    for k in range(full * group, N):
        xp_N[k] = x_N[k]
    for g in range(xsum_G.shape[0]):
        x_m = x_N[g * group:min(N, (g + 1) * group)]
        acc = np.float32(0.0)
        for i in range(x_m.shape[0]):
            acc += x_m[i]
        xsum_G[g] = acc


@intrinsic
def _group_lanes(typingctx, w_W, wi, xp_N, xi, acc_L, ai, scale):
    """acc_L[ai:ai+16] += scale * c, c[i] = sum over nibbles m of word w_W[wi+i] of
    (nibble_m - 8) * xp_N[xi + 16m + i]: one group of 128 columns of one row, in 16 lanes.

    Written as explicit 16-lane vector IR because LLVM's loop vectoriser, given the
    same arithmetic as scalar loops over four rows, chose gathers across groups. The
    IR is generic (no target intrinsics): machines without 512-bit vectors split it.
    Callers guarantee the indices are in bounds.
    """
    sig = types.none(w_W, wi, xp_N, xi, acc_L, ai, scale)

    def codegen(context, builder, signature, args):
        w_arr, wi_v, x_arr, xi_v, a_arr, ai_v, sc = args
        w_ty, wi_ty, x_ty, xi_ty, a_ty, ai_ty, sc_ty = signature.args
        i32, f32 = ir.IntType(32), ir.FloatType()
        vi, vf = ir.VectorType(i32, _VL), ir.VectorType(f32, _VL)
        fast = ("contract",)

        def vec_ptr(arr_ty, arr, idx, idx_ty, offset, vty):
            ary = context.make_array(arr_ty)(context, builder, arr)
            index = context.cast(builder, idx, idx_ty, types.intp)
            index = builder.add(index, ir.Constant(index.type, offset))
            return builder.bitcast(builder.gep(ary.data, [index]), vty.as_pointer())

        mask = ir.Constant(vi, [15] * _VL)
        permute = table = None
        if _PERMUTE_LUT:
            fnty = ir.FunctionType(vf, [vf, vi])
            permute = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.permvar.sf.512")
            table = ir.Constant(vf, [float(n - 8) for n in range(16)])
        minus8 = ir.Constant(vf, [-8.0] * _VL)
        scv = context.cast(builder, sc, sc_ty, types.float32)
        splat = builder.insert_element(ir.Constant(vf, ir.Undefined), scv, ir.Constant(i32, 0))
        splat = builder.shuffle_vector(splat, ir.Constant(vf, ir.Undefined), ir.Constant(vi, [0] * _VL))
        for h in range(0, _L, _VL):
            w = builder.load(vec_ptr(w_ty, w_arr, wi_v, wi_ty, h, vi), align=4)
            chains = [None, None]
            for m in range(8):
                t = w if m == 0 else builder.lshr(w, ir.Constant(vi, [4 * m] * _VL))
                if permute is not None:
                    f = builder.call(permute, [table, t])  # the LUT reads bits 0-3 only
                else:
                    f = builder.sitofp(t if m == 7 else builder.and_(t, mask), vf)
                    f = builder.fadd(f, minus8)
                xv = builder.load(vec_ptr(x_ty, x_arr, xi_v, xi_ty, _L * m + h, vf), align=4)
                prod = builder.fmul(f, xv, flags=fast)
                # Two interleaved chains (even and odd nibbles) halve the FMA latency chain.
                if m < 2:
                    chains[m] = prod
                else:
                    chains[m % 2] = builder.fadd(chains[m % 2], prod, flags=fast)
            c = builder.fadd(chains[0], chains[1], flags=fast)
            aptr = vec_ptr(a_ty, a_arr, ai_v, ai_ty, h, vf)
            acc = builder.load(aptr, align=4)
            builder.store(builder.fadd(acc, builder.fmul(c, splat, flags=fast), flags=fast), aptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit_kernel(parallel=False)
def _lane_sum(acc_4L, j):
    """Sum of the 16 lane partials of row j of a 4-row pass."""
    tot = np.float32(0.0)
    for i in range(_L):
        tot += acc_4L[j * _L + i]
    return tot


@njit_kernel(parallel=False)
def gemv_int4(xp_N, x_N, xsum_G, p_RP, w_RW, scale_RG, out_R, r_lo, r_hi, c0):
    """out_R[r] = dequant(p_RP, scale_RG)[r, c0:c0+N] . x_N for r in r_lo:r_hi (group 128).

    xp_N, xsum_G: permute_x(x_N, 128, ...); w_RW: p_RP viewed as int32 words
    (P % 4 == 0); c0: a multiple of 128.
    """
    _wide_vectors()
    N = x_N.shape[0]
    full = N // GROUP
    S = w_RW.shape[1]
    flat = w_RW.ravel()
    g0 = c0 // GROUP
    w0 = g0 * _L  # first word of the window in each row
    b0 = g0 * (GROUP // 2)  # and its first byte
    dist = PF_BYTES // 4
    acc_4L = np.zeros(4 * _L, np.float32)
    tail = N > full * GROUP  # the window ends with the row's shorter last group
    r = r_lo
    while r + 4 <= r_hi:
        acc_4L[:] = 0.0
        sc0 = scale_RG[r, g0:]
        sc1 = scale_RG[r + 1, g0:]
        sc2 = scale_RG[r + 2, g0:]
        sc3 = scale_RG[r + 3, g0:]
        base = r * S + w0
        for g in range(full):
            # One 64-byte line per row and group: prefetch it PF_BYTES ahead.
            prefetch_rows4(flat, S, r, g * _L, full * _L, w0, dist)
            wi = base + g * _L
            xi = g * GROUP
            _group_lanes(flat, wi, xp_N, xi, acc_4L, 0, sc0[g])
            _group_lanes(flat, wi + S, xp_N, xi, acc_4L, _L, sc1[g])
            _group_lanes(flat, wi + 2 * S, xp_N, xi, acc_4L, 2 * _L, sc2[g])
            _group_lanes(flat, wi + 3 * S, xp_N, xi, acc_4L, 3 * _L, sc3[g])
        for j in range(4):
            out_R[r + j] = _lane_sum(acc_4L, j)
        if tail:
            for j in range(4):
                out_R[r + j] += _int4_tail_dot(x_N, p_RP[r + j, b0:], scale_RG[r + j, g0:], xsum_G, GROUP)
        r += 4
    for r in range(r, r_hi):
        acc_4L[:] = 0.0
        sc0 = scale_RG[r, g0:]
        for g in range(full):
            _group_lanes(flat, r * S + w0 + g * _L, xp_N, g * GROUP, acc_4L, 0, sc0[g])
        out_R[r] = _lane_sum(acc_4L, 0)
        if tail:
            out_R[r] += _int4_tail_dot(x_N, p_RP[r, b0:], sc0, xsum_G, GROUP)
