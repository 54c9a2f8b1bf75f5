"""Numba kernels for int4 weights: out_TR = x_TK @ dequant(p_RP, scale_RG).T.

(T == 1 with group size 128 and rows of whole 32-bit words goes through the faster
word-lane GEMV of int4_gemv.py inside the fused decode path, and 2 <= T <= 16 with
them through small_t_int4.py; this module serves larger T, groups 32 / 64 and other
row lengths.)

Shape key: T tokens, K input columns, R output rows, P packed bytes per row, G groups
per row (layout: quant.py: per group, byte i holds column i low and i + ceil(m/2) high).

T == 1: nibbles are dotted as stored (0..15) and the +8 offset is removed once per group
as 8 * sum(x over the group), computed once per call for all rows; four rows stream side
by side sharing each load of x. T > 1: chunks of four rows are dequantised into an L1
scratch and go through the shared register tile (tiles.tile_chunk). Group sizes are dispatched to copies
compiled for a constant size, so the unpack loops have a known trip count.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .numba_util import njit_kernel
from .tiles import KC as _KC
from .tiles import ROW_BLOCK as _RB
from .tiles import prefetch as _prefetch
from .tiles import wide_vectors as _wide_vectors
from .tiles import store_block as _store_block
from .tiles import tile_chunk as _tile_chunk

# Chunks must hold whole groups (see _int4_decode_cols).
assert _KC % 128 == 0

__all__ = ["matmul_int4", "matmul_int4_serial"]

# int4 unpack: numba widens integer arithmetic to int64; converting an int64 to float
# vectorises as 64-bit lanes (vcvtqq2ps, half the throughput), so every unpacked value
# is narrowed back to int32 before the conversion.
_LO = np.int32(15)
_HI = np.int32(4)
_OFF = np.int32(8)
# T == 1: bytes ahead of the current group at which each row stream is prefetched
# (measured best of 256 / 512 / 1024 on one core streaming from DRAM: 512, ~1.15x).
_PF_BYTES = 512

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
    side by side (see the module note on T == 1). The loop is compute-bound (convert +
    FMA per value), so it is compiled for 512-bit vectors, and each row stream is
    prefetched _PF_BYTES ahead once per 64-byte line.
    """
    _wide_vectors()
    K = x_K.shape[0]
    hg = group // 2
    full = K // group
    p0 = p_4P[0]
    p1 = p_4P[1]
    p2 = p_4P[2]
    p3 = p_4P[3]
    P = p_4P.shape[1]
    flat = p_4P.ravel()  # the 4 rows are one contiguous block
    last = 4 * P - 1
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for g in range(full):
        b0 = g * hg
        if b0 % 64 == 0:
            pf = b0 + _PF_BYTES
            _prefetch(flat, min(pf, last))
            _prefetch(flat, min(P + pf, last))
            _prefetch(flat, min(2 * P + pf, last))
            _prefetch(flat, min(3 * P + pf, last))
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
def _int4_decode_cols(p_P, scale_G, group, K, k0, k1, s_C):
    """s_C[:k1-k0] = dequantised columns k0:k1 of one packed int4 row of K columns.

    k0 is a multiple of ``group`` (chunks are KC wide, a multiple of every group size),
    so a chunk holds whole groups, plus the shorter last group when k1 == K.
    """
    hg = group // 2
    full_end = min(k1, (K // group) * group)
    for g in range(k0 // group, full_end // group):
        c = g * group - k0
        p_h = p_P[g * hg: (g + 1) * hg]
        s_lo = s_C[c: c + hg]
        s_hi = s_C[c + hg: c + group]
        s = scale_G[g]
        for i in range(hg):
            b = np.int32(p_h[i])
            s_lo[i] = np.float32(np.int32((b & _LO) - _OFF)) * s
            s_hi[i] = np.float32(np.int32((b >> _HI) - _OFF)) * s
    m = k1 - max(full_end, k0)
    if m > 0:  # the shorter last group of the row
        g = K // group
        h = (m + 1) // 2
        c = g * group - k0
        p_h = p_P[g * hg: g * hg + h]
        s_lo = s_C[c: c + h]
        s_hi = s_C[c + h: c + m]
        s = scale_G[g]
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
        s_BC = np.zeros((_RB, _KC), np.float32)
        acc_T4 = np.empty((T, _RB), np.float32)
        for b0 in range(r_lo, r_hi, _RB):
            nb = min(_RB, r_hi - b0)
            for k0 in range(0, K, _KC):
                k1 = min(K, k0 + _KC)
                for i in range(nb):
                    _int4_decode_cols(p_RP[b0 + i], scale_RG[b0 + i], group, K, k0, k1, s_BC[i])
                _tile_chunk(x_TK, k0, k1, s_BC, 0, acc_T4, k0 == 0)
            _store_block(acc_T4, nb, out_TR, b0)


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


@njit_kernel(parallel=False)
def _group_sums_for(x_TK, group, G):
    """xsum_TG for _rows_int4: the group sums of x at T == 1, else an unused zero row."""
    xsum_TG = np.zeros((1, G), np.float32)
    if x_TK.shape[0] == 1:
        _int4_group_sums(x_TK, group, xsum_TG)
    return xsum_TG


@njit_kernel(parallel=False)
def matmul_int4_serial(x_TK, p_RP, scale_RG, group, out_TR):
    """matmul_int4 on the calling thread only (no thread-pool launch; for small weights)."""
    R = p_RP.shape[0]
    if x_TK.shape[0] == 0 or R == 0:
        return
    xsum_TG = _group_sums_for(x_TK, group, scale_RG.shape[1])
    _rows_int4(x_TK, p_RP, scale_RG, xsum_TG, group, out_TR, 0, R)


@njit_kernel()
def matmul_int4(x_TK, p_RP, scale_RG, group, out_TR, nch):
    """out_TR = x_TK @ dequant(p_RP, scale_RG).T; p_RP uint8 [R, P], scale_RG float32 [R, G]."""
    T = x_TK.shape[0]
    R = p_RP.shape[0]
    if T == 0 or R == 0:
        return
    # Only the T == 1 path uses the group sums; T > 1 dequantises rows instead.
    xsum_TG = _group_sums_for(x_TK, group, scale_RG.shape[1])
    for c in prange(nch):
        _rows_int4(x_TK, p_RP, scale_RG, xsum_TG, group, out_TR, c * R // nch, (c + 1) * R // nch)
