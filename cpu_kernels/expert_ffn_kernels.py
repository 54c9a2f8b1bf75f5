"""Raw Numba kernels behind `expert_ffn`: out_TR = x_TK @ W_RK.T for each weight format.

Shape key: T tokens, K input columns, R output rows (weight rows), B = _RB rows per block,
G int4 groups per row, P packed int4 bytes per row.

Every kernel takes x_TK float32 C-contiguous and writes out_TR float32, accumulating in
fp32. Weights are read in their stored form, each row front to back exactly once:

* fp32 rows as they are; bf16 rows as raw uint16, widened in registers (bits << 16);
* int8 rows times one scale per row; int4 rows unpacked per group (layout: quant.py).

Work split: ``prange`` over ``nch`` contiguous chunks of rows (the caller picks several
per thread; numba.get_num_threads() inside a kernel would make it uncacheable).

T == 1 (decode) is a GEMV, memory-bound: rows are decoded and dotted in one pass, four
rows at a time. Four concurrent streams keep more loads in flight than one and were
measured at about 1.4x the DRAM rate of a row-at-a-time loop here (2-core Xeon VM);
x_K is loaded once for the four.

T > 1 decodes a block of B rows into a small fp32 scratch, then dots it against all T
tokens with a 4-row x 3-token register tile over K chunks that stay in L1, so each
weight byte still leaves DRAM once and the inner loops run on plain fp32.

Hot loops index 1-D row views from 0: with offsets numba cannot rule out negative
(wrap-around) indices and LLVM turns the loads into gathers.

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

_RB = 4  # weight rows per block in the T > 1 path (the 4 of the 4x3 register tile)
_KC = 1024  # K chunk of the T > 1 path: 4 weight rows + 3 token rows = 28 KiB, fits L1
# int4 unpack: numba widens integer arithmetic to int64; converting an int64 to float
# vectorises as 64-bit lanes (vcvtqq2ps, half the throughput), so every unpacked value
# is narrowed back to int32 before the conversion.
_LO = np.int32(15)
_HI = np.int32(4)
_OFF = np.int32(8)


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
def _tile_4x3(s0, s1, s2, s3, x0, x1, x2, acc_T4, t, first):
    """acc_T4[t:t+3, :] (+)= x{0,1,2} . s{0..3}: a 4-row x 3-token register tile.

    Each step loads 4 weight and 3 token values for 12 FMAs (vs 5 loads per 4 FMAs
    for one token at a time), which is what limits the T > 1 path.
    """
    a00 = a01 = a02 = a03 = np.float32(0.0)
    a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = np.float32(0.0)
    for k in range(s0.shape[0]):
        w0 = s0[k]
        w1 = s1[k]
        w2 = s2[k]
        w3 = s3[k]
        v = x0[k]
        a00 += w0 * v
        a01 += w1 * v
        a02 += w2 * v
        a03 += w3 * v
        v = x1[k]
        a10 += w0 * v
        a11 += w1 * v
        a12 += w2 * v
        a13 += w3 * v
        v = x2[k]
        a20 += w0 * v
        a21 += w1 * v
        a22 += w2 * v
        a23 += w3 * v
    if first:
        acc_T4[t, 0] = a00
        acc_T4[t, 1] = a01
        acc_T4[t, 2] = a02
        acc_T4[t, 3] = a03
        acc_T4[t + 1, 0] = a10
        acc_T4[t + 1, 1] = a11
        acc_T4[t + 1, 2] = a12
        acc_T4[t + 1, 3] = a13
        acc_T4[t + 2, 0] = a20
        acc_T4[t + 2, 1] = a21
        acc_T4[t + 2, 2] = a22
        acc_T4[t + 2, 3] = a23
    else:
        acc_T4[t, 0] += a00
        acc_T4[t, 1] += a01
        acc_T4[t, 2] += a02
        acc_T4[t, 3] += a03
        acc_T4[t + 1, 0] += a10
        acc_T4[t + 1, 1] += a11
        acc_T4[t + 1, 2] += a12
        acc_T4[t + 1, 3] += a13
        acc_T4[t + 2, 0] += a20
        acc_T4[t + 2, 1] += a21
        acc_T4[t + 2, 2] += a22
        acc_T4[t + 2, 3] += a23


@njit_kernel(parallel=False)
def _tile_4x2(s0, s1, s2, s3, x0, x1, acc_T4, t, first):
    """acc_T4[t:t+2, :] (+)= x{0,1} . s{0..3} (token remainder of the 4x3 tiling)."""
    a00 = a01 = a02 = a03 = np.float32(0.0)
    a10 = a11 = a12 = a13 = np.float32(0.0)
    for k in range(s0.shape[0]):
        w0 = s0[k]
        w1 = s1[k]
        w2 = s2[k]
        w3 = s3[k]
        v = x0[k]
        a00 += w0 * v
        a01 += w1 * v
        a02 += w2 * v
        a03 += w3 * v
        v = x1[k]
        a10 += w0 * v
        a11 += w1 * v
        a12 += w2 * v
        a13 += w3 * v
    if first:
        acc_T4[t, 0] = a00
        acc_T4[t, 1] = a01
        acc_T4[t, 2] = a02
        acc_T4[t, 3] = a03
        acc_T4[t + 1, 0] = a10
        acc_T4[t + 1, 1] = a11
        acc_T4[t + 1, 2] = a12
        acc_T4[t + 1, 3] = a13
    else:
        acc_T4[t, 0] += a00
        acc_T4[t, 1] += a01
        acc_T4[t, 2] += a02
        acc_T4[t, 3] += a03
        acc_T4[t + 1, 0] += a10
        acc_T4[t + 1, 1] += a11
        acc_T4[t + 1, 2] += a12
        acc_T4[t + 1, 3] += a13


@njit_kernel(parallel=False)
def _tile_4x1(s0, s1, s2, s3, x0, acc_T4, t, first):
    """acc_T4[t, :] (+)= x0 . s{0..3} (a lone remaining token)."""
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for k in range(s0.shape[0]):
        v = x0[k]
        a0 += s0[k] * v
        a1 += s1[k] * v
        a2 += s2[k] * v
        a3 += s3[k] * v
    if first:
        acc_T4[t, 0] = a0
        acc_T4[t, 1] = a1
        acc_T4[t, 2] = a2
        acc_T4[t, 3] = a3
    else:
        acc_T4[t, 0] += a0
        acc_T4[t, 1] += a1
        acc_T4[t, 2] += a2
        acc_T4[t, 3] += a3


@njit_kernel(parallel=False)
def _dot_block(x_TK, s_BK, nb, out_TR, r0, acc_T4):
    """out_TR[:, r0:r0+nb] = x_TK @ s_BK[:nb].T; s_BK fp32 [4, K] (rows >= nb are ignored).

    K is walked in chunks of _KC so the 4 weight rows and 3 token rows of a tile stay
    in L1 while all T tokens pass over them; partial sums collect in acc_T4 [T, 4].
    """
    T, K = x_TK.shape
    for k0 in range(0, K, _KC):
        k1 = min(K, k0 + _KC)
        first = k0 == 0
        s0 = s_BK[0, k0:k1]
        s1 = s_BK[1, k0:k1]
        s2 = s_BK[2, k0:k1]
        s3 = s_BK[3, k0:k1]
        # Tokens in tiles of 3; a remainder of 1 borrows one tile's tokens to make 2 + 2,
        # because the 4x1 tile needs 5 loads per 4 FMAs.
        n3 = T // 3 if T % 3 != 1 or T < 4 else T // 3 - 1
        for j in range(n3):
            t = 3 * j
            _tile_4x3(s0, s1, s2, s3, x_TK[t, k0:k1], x_TK[t + 1, k0:k1], x_TK[t + 2, k0:k1], acc_T4, t, first)
        t = 3 * n3
        while t + 2 <= T:
            _tile_4x2(s0, s1, s2, s3, x_TK[t, k0:k1], x_TK[t + 1, k0:k1], acc_T4, t, first)
            t += 2
        if t < T:
            _tile_4x1(s0, s1, s2, s3, x_TK[t, k0:k1], acc_T4, t, first)
    for t in range(T):
        for i in range(nb):
            out_TR[t, r0 + i] = acc_T4[t, i]


@njit_kernel(parallel=False)
def _gemv_f32(x_K, w_RK, out_R, r_lo, r_hi):
    """out_R[r] = w_RK[r] . x_K for r in r_lo:r_hi; four rows per pass."""
    K = x_K.shape[0]
    r = r_lo
    while r + 4 <= r_hi:
        w0 = w_RK[r]
        w1 = w_RK[r + 1]
        w2 = w_RK[r + 2]
        w3 = w_RK[r + 3]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for k in range(K):
            v = x_K[k]
            a0 += w0[k] * v
            a1 += w1[k] * v
            a2 += w2[k] * v
            a3 += w3[k] * v
        out_R[r] = a0
        out_R[r + 1] = a1
        out_R[r + 2] = a2
        out_R[r + 3] = a3
        r += 4
    for r in range(r, r_hi):
        w0 = w_RK[r]
        a0 = np.float32(0.0)
        for k in range(K):
            a0 += w0[k] * x_K[k]
        out_R[r] = a0


@njit_kernel(parallel=False)
def _gemv_bf16(x_K, w_RK, out_R, r_lo, r_hi):
    """out_R[r] = widen(w_RK[r]) . x_K for r in r_lo:r_hi; four rows per pass."""
    K = x_K.shape[0]
    r = r_lo
    while r + 4 <= r_hi:
        w0 = w_RK[r]
        w1 = w_RK[r + 1]
        w2 = w_RK[r + 2]
        w3 = w_RK[r + 3]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for k in range(K):
            v = x_K[k]
            a0 += _bf16_to_f32(w0[k]) * v
            a1 += _bf16_to_f32(w1[k]) * v
            a2 += _bf16_to_f32(w2[k]) * v
            a3 += _bf16_to_f32(w3[k]) * v
        out_R[r] = a0
        out_R[r + 1] = a1
        out_R[r + 2] = a2
        out_R[r + 3] = a3
        r += 4
    for r in range(r, r_hi):
        w0 = w_RK[r]
        a0 = np.float32(0.0)
        for k in range(K):
            a0 += _bf16_to_f32(w0[k]) * x_K[k]
        out_R[r] = a0


@njit_kernel(parallel=False)
def _gemv_int8(x_K, q_RK, scale_R, out_R, r_lo, r_hi):
    """out_R[r] = scale_R[r] * (q_RK[r] . x_K) for r in r_lo:r_hi; four rows per pass."""
    K = x_K.shape[0]
    r = r_lo
    while r + 4 <= r_hi:
        q0 = q_RK[r]
        q1 = q_RK[r + 1]
        q2 = q_RK[r + 2]
        q3 = q_RK[r + 3]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for k in range(K):
            v = x_K[k]
            a0 += np.float32(q0[k]) * v
            a1 += np.float32(q1[k]) * v
            a2 += np.float32(q2[k]) * v
            a3 += np.float32(q3[k]) * v
        # The row scale factors out of the dot product: one multiply per row.
        out_R[r] = a0 * scale_R[r]
        out_R[r + 1] = a1 * scale_R[r + 1]
        out_R[r + 2] = a2 * scale_R[r + 2]
        out_R[r + 3] = a3 * scale_R[r + 3]
        r += 4
    for r in range(r, r_hi):
        q0 = q_RK[r]
        a0 = np.float32(0.0)
        for k in range(K):
            a0 += np.float32(q0[k]) * x_K[k]
        out_R[r] = a0 * scale_R[r]


@njit_kernel(parallel=False)
def _rows_f32(x_TK, w_RK, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR = x_TK @ w_RK.T (float32 weights)."""
    T, K = x_TK.shape
    if T == 1:
        _gemv_f32(x_TK[0], w_RK, out_TR[0], r_lo, r_hi)
    else:
        acc_T4 = np.empty((T, _RB), np.float32)
        tail_BK = np.zeros((_RB, K), np.float32)
        for b0 in range(r_lo, r_hi, _RB):
            nb = min(_RB, r_hi - b0)
            if nb == _RB:
                _dot_block(x_TK, w_RK[b0:b0 + _RB], nb, out_TR, b0, acc_T4)
            else:  # a short last block: pad to 4 rows so the tile code stays one shape
                tail_BK[:nb] = w_RK[b0:b0 + nb]
                _dot_block(x_TK, tail_BK, nb, out_TR, b0, acc_T4)


@njit_kernel(parallel=False)
def _rows_bf16(x_TK, w_RK, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR = x_TK @ w_RK.T (bf16 weights as uint16)."""
    T, K = x_TK.shape
    if T == 1:
        _gemv_bf16(x_TK[0], w_RK, out_TR[0], r_lo, r_hi)
    else:
        # Zeros: rows past a short last block must hold finite values (they are not stored).
        s_BK = np.zeros((_RB, K), np.float32)
        acc_T4 = np.empty((T, _RB), np.float32)
        for b0 in range(r_lo, r_hi, _RB):
            nb = min(_RB, r_hi - b0)
            for i in range(nb):
                w_K = w_RK[b0 + i]
                s_K = s_BK[i]
                for k in range(K):
                    s_K[k] = _bf16_to_f32(w_K[k])
            _dot_block(x_TK, s_BK, nb, out_TR, b0, acc_T4)


@njit_kernel(parallel=False)
def _rows_int8(x_TK, q_RK, scale_R, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR = x_TK @ (q_RK * scale_R[:, None]).T."""
    T, K = x_TK.shape
    if T == 1:
        _gemv_int8(x_TK[0], q_RK, scale_R, out_TR[0], r_lo, r_hi)
    else:
        # Zeros: rows past a short last block must hold finite values (they are not stored).
        s_BK = np.zeros((_RB, K), np.float32)
        acc_T4 = np.empty((T, _RB), np.float32)
        for b0 in range(r_lo, r_hi, _RB):
            nb = min(_RB, r_hi - b0)
            for i in range(nb):
                s = scale_R[b0 + i]
                q_K = q_RK[b0 + i]
                s_K = s_BK[i]
                for k in range(K):
                    s_K[k] = np.float32(q_K[k]) * s
            _dot_block(x_TK, s_BK, nb, out_TR, b0, acc_T4)


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
            x_m = x_TK[t, g * group: min(K, (g + 1) * group)]
            acc = np.float32(0.0)
            for i in range(x_m.shape[0]):
                acc += x_m[i]
            xsum_TG[t, g] = acc


@njit_kernel(parallel=False)
def _int4_tail_dot(x_K, p_P, scale_G, xsum_G, group):
    """Contribution of the last, shorter group of a packed int4 row (0 if none)."""
    K = x_K.shape[0]
    hg = group // 2
    full = K // group
    m = K - full * group
    if m == 0:
        return np.float32(0.0)
    h = (m + 1) // 2  # halves of ceil(m / 2) and floor(m / 2) columns
    p_h = p_P[full * hg: full * hg + h]
    x_lo = x_K[full * group: full * group + h]
    x_hi = x_K[full * group + h: K]
    part = np.float32(0.0)
    for i in range(h):
        part += np.float32(np.int32(np.int32(p_h[i]) & _LO)) * x_lo[i]
    for i in range(m - h):
        part += np.float32(np.int32(np.int32(p_h[i]) >> _HI)) * x_hi[i]
    return (part - np.float32(8.0) * xsum_G[full]) * scale_G[full]


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
        p_h = p_P[g * hg: (g + 1) * hg]
        x_lo = x_K[g * group: g * group + hg]
        x_hi = x_K[g * group + hg: (g + 1) * group]
        part = np.float32(0.0)
        for i in range(hg):
            b = np.int32(p_h[i])
            part += np.float32(np.int32(b & _LO)) * x_lo[i] + np.float32(np.int32(b >> _HI)) * x_hi[i]
        acc += (part - np.float32(8.0) * xsum_G[g]) * scale_G[g]
    return acc + _int4_tail_dot(x_K, p_P, scale_G, xsum_G, group)


@njit_kernel(parallel=False)
def _int4_rows4_dot(x_K, p_4P, scale_4G, xsum_G, group, out_R, r):
    """out_R[r:r+4] = four packed int4 rows (p_4P, scale_4G) dotted with x_K.

    Same arithmetic as _int4_row_dot; four rows share each load of x and stream
    side by side (see the module note on T == 1).
    """
    K = x_K.shape[0]
    hg = group // 2
    full = K // group
    p0 = p_4P[0]
    p1 = p_4P[1]
    p2 = p_4P[2]
    p3 = p_4P[3]
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for g in range(full):
        b0 = g * hg
        x_lo = x_K[g * group: g * group + hg]
        x_hi = x_K[g * group + hg: (g + 1) * group]
        q0 = p0[b0: b0 + hg]
        q1 = p1[b0: b0 + hg]
        q2 = p2[b0: b0 + hg]
        q3 = p3[b0: b0 + hg]
        c0 = c1 = c2 = c3 = np.float32(0.0)
        for i in range(hg):
            vl = x_lo[i]
            vh = x_hi[i]
            b = np.int32(q0[i])
            c0 += np.float32(np.int32(b & _LO)) * vl + np.float32(np.int32(b >> _HI)) * vh
            b = np.int32(q1[i])
            c1 += np.float32(np.int32(b & _LO)) * vl + np.float32(np.int32(b >> _HI)) * vh
            b = np.int32(q2[i])
            c2 += np.float32(np.int32(b & _LO)) * vl + np.float32(np.int32(b >> _HI)) * vh
            b = np.int32(q3[i])
            c3 += np.float32(np.int32(b & _LO)) * vl + np.float32(np.int32(b >> _HI)) * vh
        off = np.float32(8.0) * xsum_G[g]
        a0 += (c0 - off) * scale_4G[0, g]
        a1 += (c1 - off) * scale_4G[1, g]
        a2 += (c2 - off) * scale_4G[2, g]
        a3 += (c3 - off) * scale_4G[3, g]
    out_R[r] = a0
    out_R[r + 1] = a1
    out_R[r + 2] = a2
    out_R[r + 3] = a3
    if K > full * group:  # the shorter last group, one row at a time
        for i in range(4):
            out_R[r + i] += _int4_tail_dot(x_K, p_4P[i], scale_4G[i], xsum_G, group)


@njit_kernel(parallel=False)
def _int4_row_decode(p_P, scale_G, group, s_K):
    """Dequantise one packed int4 row into fp32 s_K."""
    K = s_K.shape[0]
    hg = group // 2
    full = K // group
    for g in range(full):
        p_h = p_P[g * hg: (g + 1) * hg]
        s_lo = s_K[g * group: g * group + hg]
        s_hi = s_K[g * group + hg: (g + 1) * group]
        s = scale_G[g]
        for i in range(hg):
            b = np.int32(p_h[i])
            s_lo[i] = np.float32(np.int32((b & _LO) - _OFF)) * s
            s_hi[i] = np.float32(np.int32((b >> _HI) - _OFF)) * s
    m = K - full * group
    if m > 0:
        h = (m + 1) // 2
        p_h = p_P[full * hg: full * hg + h]
        s_lo = s_K[full * group: full * group + h]
        s_hi = s_K[full * group + h: K]
        s = scale_G[full]
        for i in range(h):
            s_lo[i] = np.float32(np.int32((np.int32(p_h[i]) & _LO) - _OFF)) * s
        for i in range(m - h):
            s_hi[i] = np.float32(np.int32((np.int32(p_h[i]) >> _HI) - _OFF)) * s


@njit_kernel(parallel=False)
def _rows_int4_g(x_TK, p_RP, scale_RG, xsum_TG, group, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR = x_TK @ dequant(p_RP, scale_RG).T for one group size."""
    T, K = x_TK.shape
    if T == 1:
        r = r_lo
        while r + 4 <= r_hi:
            _int4_rows4_dot(x_TK[0], p_RP[r:r + 4], scale_RG[r:r + 4], xsum_TG[0], group, out_TR[0], r)
            r += 4
        for r in range(r, r_hi):
            out_TR[0, r] = _int4_row_dot(x_TK[0], p_RP[r], scale_RG[r], xsum_TG[0], group)
    else:
        # Zeros: rows past a short last block must hold finite values (they are not stored).
        s_BK = np.zeros((_RB, K), np.float32)
        acc_T4 = np.empty((T, _RB), np.float32)
        for b0 in range(r_lo, r_hi, _RB):
            nb = min(_RB, r_hi - b0)
            for i in range(nb):
                _int4_row_decode(p_RP[b0 + i], scale_RG[b0 + i], group, s_BK[i])
            _dot_block(x_TK, s_BK, nb, out_TR, b0, acc_T4)


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
