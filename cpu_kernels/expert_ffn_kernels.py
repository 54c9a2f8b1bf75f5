"""Raw Numba kernels behind `expert_ffn`: out_TR = x_TK @ W_RK.T for each weight format.

Shape key: T tokens, K input columns, R output rows (weight rows), B = _RB rows per block,
G int4 groups per row, P packed int4 bytes per row.

Every kernel takes x_TK float32 C-contiguous and writes out_TR float32, accumulating in
fp32. Weights are read in their stored form, one contiguous row at a time:

* fp32 rows as they are; bf16 rows as raw uint16, widened in registers (bits << 16);
* int8 rows times one scale per row; int4 rows unpacked per group (layout: quant.py).

Work split: ``prange`` over ``nch`` contiguous chunks of rows (the caller picks several
per thread so uneven chunks balance; numba.get_num_threads() inside a kernel would make
it uncacheable). T == 1 (decode) is a GEMV: each row is streamed once, decoded and dotted
in one pass (memory-bound). T > 1 decodes a block of B rows into a small fp32 scratch,
then dots it against all T tokens, so each weight byte still leaves DRAM once and the
inner loops run on plain fp32 with B independent accumulators.

Callers (expert_ffn.py) check shapes, dtypes and contiguity; these functions do not.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core.extending import intrinsic

from .numba_util import njit_kernel

__all__ = [
    "matmul_f32", "matmul_bf16", "matmul_int8", "matmul_int4",
    "swiglu_rows", "widen_bf16", "narrow_to_bf16",
]

_RB = 4  # rows per block in the T > 1 path: 4 accumulators + 1 shared load of x per step


@intrinsic
def _bf16_to_f32(typingctx, bits):
    """Reinterpret a bf16 bit pattern (uint16) as the float32 it denotes (exact)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_bits(typingctx, value):
    """Bit pattern of a float32 as uint32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@njit_kernel(parallel=False)
def _dot_block(x_TK, s_BK, nb, out_TR, r0):
    """out_TR[:, r0:r0+nb] = x_TK @ s_BK[:nb].T with s_BK fp32 scratch."""
    T, K = x_TK.shape
    if nb == 4:
        for t in range(T):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for k in range(K):
                xv = x_TK[t, k]
                a0 += s_BK[0, k] * xv
                a1 += s_BK[1, k] * xv
                a2 += s_BK[2, k] * xv
                a3 += s_BK[3, k] * xv
            out_TR[t, r0] = a0
            out_TR[t, r0 + 1] = a1
            out_TR[t, r0 + 2] = a2
            out_TR[t, r0 + 3] = a3
    else:
        for i in range(nb):
            for t in range(T):
                acc = np.float32(0.0)
                for k in range(K):
                    acc += s_BK[i, k] * x_TK[t, k]
                out_TR[t, r0 + i] = acc


@njit_kernel(parallel=False)
def _rows_f32(x_TK, w_RK, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR = x_TK @ w_RK.T (float32 weights)."""
    T, K = x_TK.shape
    if T == 1:
        for r in range(r_lo, r_hi):
            acc = np.float32(0.0)
            for k in range(K):
                acc += w_RK[r, k] * x_TK[0, k]
            out_TR[0, r] = acc
    else:
        for b0 in range(r_lo, r_hi, _RB):
            nb = min(_RB, r_hi - b0)
            _dot_block(x_TK, w_RK[b0:b0 + nb], nb, out_TR, b0)


@njit_kernel(parallel=False)
def _rows_bf16(x_TK, w_RK, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR = x_TK @ w_RK.T (bf16 weights as uint16)."""
    T, K = x_TK.shape
    if T == 1:
        for r in range(r_lo, r_hi):
            acc = np.float32(0.0)
            for k in range(K):
                acc += _bf16_to_f32(w_RK[r, k]) * x_TK[0, k]
            out_TR[0, r] = acc
    else:
        s_BK = np.empty((_RB, K), np.float32)
        for b0 in range(r_lo, r_hi, _RB):
            nb = min(_RB, r_hi - b0)
            for i in range(nb):
                for k in range(K):
                    s_BK[i, k] = _bf16_to_f32(w_RK[b0 + i, k])
            _dot_block(x_TK, s_BK, nb, out_TR, b0)


@njit_kernel(parallel=False)
def _rows_int8(x_TK, q_RK, scale_R, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR = x_TK @ (q_RK * scale_R[:, None]).T."""
    T, K = x_TK.shape
    if T == 1:
        for r in range(r_lo, r_hi):
            acc = np.float32(0.0)
            for k in range(K):
                acc += np.float32(q_RK[r, k]) * x_TK[0, k]
            # The row scale factors out of the dot product: one multiply per row.
            out_TR[0, r] = acc * scale_R[r]
    else:
        s_BK = np.empty((_RB, K), np.float32)
        for b0 in range(r_lo, r_hi, _RB):
            nb = min(_RB, r_hi - b0)
            for i in range(nb):
                s = scale_R[b0 + i]
                for k in range(K):
                    s_BK[i, k] = np.float32(q_RK[b0 + i, k]) * s
            _dot_block(x_TK, s_BK, nb, out_TR, b0)


# The parallel entry points only split rows into chunks: numba compiles prange bodies
# into separate functions that do not reliably keep the fastmath flags, so the hot loops
# live in the serial _rows_* functions above, where reductions vectorise.

@njit_kernel()
def matmul_f32(x_TK, w_RK, out_TR, nch):
    """out_TR = x_TK @ w_RK.T; w_RK float32 [R, K]."""
    R = w_RK.shape[0]
    if x_TK.shape[0] == 0 or R == 0:
        return
    for c in prange(nch):
        _rows_f32(x_TK, w_RK, out_TR, c * R // nch, (c + 1) * R // nch)


@njit_kernel()
def matmul_bf16(x_TK, w_RK, out_TR, nch):
    """out_TR = x_TK @ w_RK.T; w_RK is bf16 viewed as uint16 [R, K] (no widened copy)."""
    R = w_RK.shape[0]
    if x_TK.shape[0] == 0 or R == 0:
        return
    for c in prange(nch):
        _rows_bf16(x_TK, w_RK, out_TR, c * R // nch, (c + 1) * R // nch)


@njit_kernel()
def matmul_int8(x_TK, q_RK, scale_R, out_TR, nch):
    """out_TR = x_TK @ (q_RK * scale_R[:, None]).T; q_RK int8 [R, K], scale_R float32 [R]."""
    R = q_RK.shape[0]
    if x_TK.shape[0] == 0 or R == 0:
        return
    for c in prange(nch):
        _rows_int8(x_TK, q_RK, scale_R, out_TR, c * R // nch, (c + 1) * R // nch)


@njit_kernel(parallel=False)
def _int4_group_sums(x_TK, group, xsum_TG):
    """xsum_TG[t, g] = sum of x_TK[t] over the columns of group g."""
    T, K = x_TK.shape
    for t in range(T):
        for g in range(xsum_TG.shape[1]):
            acc = np.float32(0.0)
            for k in range(g * group, min(K, (g + 1) * group)):
                acc += x_TK[t, k]
            xsum_TG[t, g] = acc


@njit_kernel(parallel=False)
def _int4_row_dot(x_K, p_P, scale_G, xsum_G, group):
    """Dot of one packed int4 row with x_K (fp32); layout: quant.py.

    Nibbles are dotted as stored (0..15) and the +8 offset is removed once per group as
    8 * sum(x over the group), which the caller computes once for all rows.
    """
    K = x_K.shape[0]
    hg = group // 2
    full = K // group
    acc = np.float32(0.0)
    for g in range(full):
        c0 = g * group
        b0 = g * hg
        part = np.float32(0.0)
        for i in range(hg):
            b = np.int32(p_P[b0 + i])
            part += np.float32(b & 15) * x_K[c0 + i] + np.float32(b >> 4) * x_K[c0 + hg + i]
        acc += (part - np.float32(8.0) * xsum_G[g]) * scale_G[g]
    m = K - full * group
    if m > 0:  # last, shorter group: halves of ceil(m / 2) and floor(m / 2) columns
        c0 = full * group
        b0 = full * hg
        h = (m + 1) // 2
        part = np.float32(0.0)
        for i in range(h):
            part += np.float32(np.int32(p_P[b0 + i]) & 15) * x_K[c0 + i]
        for i in range(m - h):
            part += np.float32(np.int32(p_P[b0 + i]) >> 4) * x_K[c0 + h + i]
        acc += (part - np.float32(8.0) * xsum_G[full]) * scale_G[full]
    return acc


@njit_kernel(parallel=False)
def _int4_row_decode(p_P, scale_G, group, s_K):
    """Dequantise one packed int4 row into fp32 s_K."""
    K = s_K.shape[0]
    hg = group // 2
    full = K // group
    for g in range(full):
        c0 = g * group
        b0 = g * hg
        s = scale_G[g]
        for i in range(hg):
            b = np.int32(p_P[b0 + i])
            s_K[c0 + i] = np.float32((b & 15) - 8) * s
            s_K[c0 + hg + i] = np.float32((b >> 4) - 8) * s
    m = K - full * group
    if m > 0:
        c0 = full * group
        b0 = full * hg
        h = (m + 1) // 2
        s = scale_G[full]
        for i in range(h):
            s_K[c0 + i] = np.float32((np.int32(p_P[b0 + i]) & 15) - 8) * s
        for i in range(m - h):
            s_K[c0 + h + i] = np.float32((np.int32(p_P[b0 + i]) >> 4) - 8) * s


@njit_kernel(parallel=False)
def _rows_int4_g(x_TK, p_RP, scale_RG, xsum_TG, group, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR = x_TK @ dequant(p_RP, scale_RG).T for one group size."""
    T, K = x_TK.shape
    if T == 1:
        for r in range(r_lo, r_hi):
            out_TR[0, r] = _int4_row_dot(x_TK[0], p_RP[r], scale_RG[r], xsum_TG[0], group)
    else:
        s_BK = np.empty((_RB, K), np.float32)
        for b0 in range(r_lo, r_hi, _RB):
            nb = min(_RB, r_hi - b0)
            for i in range(nb):
                _int4_row_decode(p_RP[b0 + i], scale_RG[b0 + i], group, s_BK[i])
            _dot_block(x_TK, s_BK, nb, out_TR, b0)


@njit_kernel(parallel=False)
def _rows_int4(x_TK, p_RP, scale_RG, xsum_TG, group, out_TR, r_lo, r_hi):
    """Dispatch to a copy compiled for a constant group size: with the half-group trip
    count known, the unpack loop compiles to straight vector code (about 3x faster)."""
    if group == 32:
        _rows_int4_g(x_TK, p_RP, scale_RG, xsum_TG, 32, out_TR, r_lo, r_hi)
    elif group == 64:
        _rows_int4_g(x_TK, p_RP, scale_RG, xsum_TG, 64, out_TR, r_lo, r_hi)
    else:
        _rows_int4_g(x_TK, p_RP, scale_RG, xsum_TG, 128, out_TR, r_lo, r_hi)


@njit_kernel()
def matmul_int4(x_TK, p_RP, scale_RG, group, out_TR, nch):
    """out_TR = x_TK @ dequant(p_RP, scale_RG).T; p_RP uint8 [R, P], scale_RG float32 [R, G]."""
    T = x_TK.shape[0]
    R = p_RP.shape[0]
    if T == 0 or R == 0:
        return
    # Only the T == 1 path uses the group sums; T > 1 dequantises rows instead.
    xsum_TG = np.zeros((1, scale_RG.shape[1]), np.float32)
    if T == 1:
        _int4_group_sums(x_TK, group, xsum_TG)
    for c in prange(nch):
        _rows_int4(x_TK, p_RP, scale_RG, xsum_TG, group, out_TR, c * R // nch, (c + 1) * R // nch)


@njit_kernel(parallel=False)
def swiglu_rows(gu_T2F, h_TF):
    """h_TF = silu(gu_T2F[:, :F]) * gu_T2F[:, F:] (gate half first, then up half)."""
    T, F = h_TF.shape
    for t in range(T):
        for f in range(F):
            g = gu_T2F[t, f]
            h_TF[t, f] = g / (np.float32(1.0) + np.exp(-g)) * gu_T2F[t, F + f]


@njit_kernel(parallel=False)
def widen_bf16(bits_TD, out_TD):
    """out_TD (float32) = bf16 bit patterns bits_TD (uint16), exactly."""
    T, D = bits_TD.shape
    for t in range(T):
        for d in range(D):
            out_TD[t, d] = _bf16_to_f32(bits_TD[t, d])


@njit_kernel(parallel=False)
def narrow_to_bf16(x_TD, bits_TD):
    """bits_TD (uint16 bf16 patterns) = x_TD rounded to nearest even, NaN kept NaN."""
    T, D = x_TD.shape
    for t in range(T):
        for d in range(D):
            v = x_TD[t, d]
            u = _f32_bits(v)
            if v != v:
                bits_TD[t, d] = np.uint16(0x7FC0)
            else:
                u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
                bits_TD[t, d] = np.uint16(u >> np.uint32(16))
