"""One SwiGLU expert for one token (T == 1, decode) in a single kernel call.

Shape key: D model dim, F expert hidden dim, C chunks (threads).

    x_1D [1, D] float32 | bits_1D [1, D] int16 (bf16 bit patterns): the token, in one
         of the two (the other is passed empty, shape [1, 0]); y in the same kind
    w13  [2F, D] (gate rows, then up rows)     w2   [D, F]
    bf16: uint16 bits; int8: q + per-row scale; int4 (group 128): packed bytes, the same
    bytes viewed as int32 words, group scales (int4_gemv.py)

A small expert streams in tens of microseconds, so the per-call cost of separate
matmul launches, Python glue and intermediate copies is a large share of it. Here one
call does everything, with one thread-pool launch (int4 with hidden groups that do not
split evenly among the threads: two, see decode_int4_pool):

    chunk c of C owns hidden units [f_lo, f_hi) (whole units of ALIGN / ALIGN_INT4):
        gate, up = w13[f_lo:f_hi] @ x, w13[F+f_lo:F+f_hi] @ x      (rows)
        h[f_lo:f_hi] = silu(gate) * up
        yp[c] = w2[:, f_lo:f_hi] @ h[f_lo:f_hi]                      (a column window)
    y = sum over c of yp[c]                                          (D adds per chunk)

Splitting w2 by columns lets every chunk finish on its own hidden units, so the chunks
need no barrier between the two matmuls. Each weight byte is still read exactly once.

Each format has two entry points: ``decode_<fmt>`` runs on the calling thread (C = 1,
no pool launch) and ``decode_<fmt>_pool`` runs C chunks with one prange. The token
travels as two arrays of fixed types rather than one of either type, and gate and up
rows share one GEMV call site, because every distinct compiled copy of the GEMV loops
costs seconds of compile time on first use (numba re-optimises callees per caller).
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .gemv import gemv_bf16, gemv_int8
from .int4_gemv import GROUP as INT4_GROUP
from .int4_gemv import gemv_int4, permute_x
from .numba_util import njit_kernel
from .tiles import bf16_to_f32, f32_to_bf16

__all__ = ["ALIGN", "decode_bf16", "decode_int8", "decode_int4", "decode_bf16_pool", "decode_int8_pool",
           "decode_int4_pool", "NO_X", "NO_BITS"]

# Hidden units per split unit: one GEMV step (gemv.STEP) for bf16 / int8, one group for
# int4 (w2 windows start on a group). A coarser unit costs balance: DeepSeek-V2-Lite's
# F = 1408 is 22 units of 64 (11 + 11 on two threads) but 11 of 128 (5 + 6, the second
# thread ~9% longer, and the call waits for it).
ALIGN = 64
ALIGN_INT4 = INT4_GROUP

# The unused one of (x_1D, bits_1D) / (y_1D, ybits_1D).
NO_X = np.empty((1, 0), np.float32)
NO_BITS = np.empty((1, 0), np.int16)


@njit_kernel(parallel=False)
def _load_x(x_1D, bits_1D, D):
    """The token as float32 [D], from x_1D or (if not empty) the bf16 bits bits_1D."""
    if bits_1D.shape[1] == 0:
        return x_1D[0].copy()
    xf_D = np.empty(D, np.float32)
    b_D = bits_1D[0]
    for d in range(D):
        xf_D[d] = bf16_to_f32(np.uint16(b_D[d]))
    return xf_D


@njit_kernel(parallel=False)
def _store_y(yp_CD, y_1D, ybits_1D):
    """y = sum over chunks of yp_CD, into y_1D or (if not empty) ybits_1D as bf16 bits."""
    C, D = yp_CD.shape
    acc_D = yp_CD[0].copy()
    for c in range(1, C):
        acc_D += yp_CD[c]
    if ybits_1D.shape[1] == 0:
        y_1D[0, :] = acc_D
    else:
        b_D = ybits_1D[0]
        for d in range(D):
            b_D[d] = np.int16(f32_to_bf16(acc_D[d]))


@njit_kernel(parallel=False)
def _split(F, nch, c, align):
    """Hidden units [lo, hi) of chunk c of nch: whole units of ``align``, spread evenly."""
    units = (F + align - 1) // align
    return min(F, (c * units // nch) * align), min(F, ((c + 1) * units // nch) * align)


@njit_kernel(parallel=False)
def _swiglu(gu_2F, h_F, F, lo, hi):
    """h_F[lo:hi] = silu(gate) * up for hidden units lo:hi."""
    for f in range(lo, hi):
        g = gu_2F[f]
        h_F[f] = g / (np.float32(1.0) + np.exp(-g)) * gu_2F[F + f]


# ---------------------------------------------------------------- bf16

@njit_kernel(parallel=False)
def _chunk_bf16(c, nch, x_D, w13, w2, gu_2F, h_F, yp_CD):
    D, F = w2.shape
    lo, hi = _split(F, nch, c, ALIGN)
    if hi <= lo:
        yp_CD[c, :] = 0.0
        return
    for part in range(2):  # gate rows, then up rows
        gemv_bf16(x_D, w13, gu_2F, part * F + lo, part * F + hi, 0, D)
    _swiglu(gu_2F, h_F, F, lo, hi)
    gemv_bf16(h_F[lo:hi], w2, yp_CD[c], 0, D, lo, hi - lo)


@njit_kernel(parallel=False)
def decode_bf16(x_1D, bits_1D, w13, w2, y_1D, ybits_1D):
    """y = expert(x) with bf16 weights (uint16 bits) w13 [2F, D], w2 [D, F]; calling thread."""
    D, F = w2.shape
    yp_CD = np.empty((1, D), np.float32)
    _chunk_bf16(0, 1, _load_x(x_1D, bits_1D, D), w13, w2, np.empty(2 * F, np.float32),
                np.empty(F, np.float32), yp_CD)
    _store_y(yp_CD, y_1D, ybits_1D)


@njit_kernel()
def decode_bf16_pool(x_1D, bits_1D, w13, w2, y_1D, ybits_1D, nch):
    """decode_bf16 split into nch chunks on the thread pool."""
    D, F = w2.shape
    x_D = _load_x(x_1D, bits_1D, D)
    gu_2F = np.empty(2 * F, np.float32)
    h_F = np.empty(F, np.float32)
    yp_CD = np.empty((nch, D), np.float32)
    for c in prange(nch):
        _chunk_bf16(c, nch, x_D, w13, w2, gu_2F, h_F, yp_CD)
    _store_y(yp_CD, y_1D, ybits_1D)


# ---------------------------------------------------------------- int8

@njit_kernel(parallel=False)
def _chunk_int8(c, nch, x_D, q13, s13, q2, s2, gu_2F, h_F, yp_CD):
    D, F = q2.shape
    lo, hi = _split(F, nch, c, ALIGN)
    if hi <= lo:
        yp_CD[c, :] = 0.0
        return
    for part in range(2):  # gate rows, then up rows
        gemv_int8(x_D, q13, s13, gu_2F, part * F + lo, part * F + hi, 0, D)
    _swiglu(gu_2F, h_F, F, lo, hi)
    gemv_int8(h_F[lo:hi], q2, s2, yp_CD[c], 0, D, lo, hi - lo)


@njit_kernel(parallel=False)
def decode_int8(x_1D, bits_1D, q13, s13, q2, s2, y_1D, ybits_1D):
    """y = expert(x) with int8 weights q13 [2F, D], s13 [2F], q2 [D, F], s2 [D]; calling thread."""
    D, F = q2.shape
    yp_CD = np.empty((1, D), np.float32)
    _chunk_int8(0, 1, _load_x(x_1D, bits_1D, D), q13, s13, q2, s2, np.empty(2 * F, np.float32),
                np.empty(F, np.float32), yp_CD)
    _store_y(yp_CD, y_1D, ybits_1D)


@njit_kernel()
def decode_int8_pool(x_1D, bits_1D, q13, s13, q2, s2, y_1D, ybits_1D, nch):
    """decode_int8 split into nch chunks on the thread pool."""
    D, F = q2.shape
    x_D = _load_x(x_1D, bits_1D, D)
    gu_2F = np.empty(2 * F, np.float32)
    h_F = np.empty(F, np.float32)
    yp_CD = np.empty((nch, D), np.float32)
    for c in prange(nch):
        _chunk_int8(c, nch, x_D, q13, s13, q2, s2, gu_2F, h_F, yp_CD)
    _store_y(yp_CD, y_1D, ybits_1D)


# ---------------------------------------------------------------- int4

@njit_kernel(parallel=False)
def _chunk_int4(c, nch, x_D, xp_D, xsum_G, p13, w13, s13, p2, w2, s2, gu_2F, h_F, hp_F, hsum_G, yp_CD):
    D = p2.shape[0]
    F = gu_2F.shape[0] // 2
    lo, hi = _split(F, nch, c, ALIGN_INT4)
    if hi <= lo:
        yp_CD[c, :] = 0.0
        return
    for part in range(2):  # gate rows, then up rows
        gemv_int4(xp_D, x_D, xsum_G, p13, w13, s13, gu_2F, part * F + lo, part * F + hi, 0)
    _swiglu(gu_2F, h_F, F, lo, hi)
    g_lo = lo // INT4_GROUP
    g_hi = (hi + INT4_GROUP - 1) // INT4_GROUP
    permute_x(h_F[lo:hi], INT4_GROUP, hp_F[lo:hi], hsum_G[g_lo:g_hi])
    gemv_int4(hp_F[lo:hi], h_F[lo:hi], hsum_G[g_lo:g_hi], p2, w2, s2, yp_CD[c], 0, D, lo)


@njit_kernel(parallel=False)
def _int4_scratch(x_D, s13, s2, F):
    """Permuted token and its group sums (int4_gemv.permute_x), and the hidden buffers."""
    xp_D = np.empty_like(x_D)
    xsum_G = np.empty(s13.shape[1], np.float32)
    permute_x(x_D, INT4_GROUP, xp_D, xsum_G)
    return (xp_D, xsum_G, np.empty(2 * F, np.float32), np.empty(F, np.float32),
            np.empty(F, np.float32), np.empty(s2.shape[1], np.float32))


@njit_kernel(parallel=False)
def decode_int4(x_1D, bits_1D, p13, w13, s13, p2, w2, s2, y_1D, ybits_1D):
    """y = expert(x) with int4 weights, group 128: packed p13 [2F, P13] and its int32 view
    w13, scales s13 [2F, G13]; p2 [D, P2], w2, s2 [D, G2] (int4_gemv.py); calling thread."""
    D = p2.shape[0]
    F = p13.shape[0] // 2
    x_D = _load_x(x_1D, bits_1D, D)
    xp_D, xsum_G, gu_2F, h_F, hp_F, hsum_G = _int4_scratch(x_D, s13, s2, F)
    yp_CD = np.empty((1, D), np.float32)
    _chunk_int4(0, 1, x_D, xp_D, xsum_G, p13, w13, s13, p2, w2, s2, gu_2F, h_F, hp_F, hsum_G, yp_CD)
    _store_y(yp_CD, y_1D, ybits_1D)


@njit_kernel()
def decode_int4_pool(x_1D, bits_1D, p13, w13, s13, p2, w2, s2, y_1D, ybits_1D, nch):
    """decode_int4 on nch threads: one phase (chunks as decode_bf16_pool) when the groups
    of F split evenly, else two: hidden units split by 4-row blocks, then w2 by rows.

    Unlike bf16 / int8, int4 w2 windows must start on a 128-column group, so the
    one-phase split leaves uneven halves on small experts (DeepSeek-V2-Lite: 5 and 6 of
    11 groups, the call waiting ~9% on the longer one); two parallel regions cost one
    more pool launch (a few microseconds) but split both matmuls evenly.
    """
    D = p2.shape[0]
    F = p13.shape[0] // 2
    x_D = _load_x(x_1D, bits_1D, D)
    xp_D, xsum_G, gu_2F, h_F, hp_F, hsum_G = _int4_scratch(x_D, s13, s2, F)
    if ((F + INT4_GROUP - 1) // INT4_GROUP) % nch == 0:  # whole groups split evenly: one phase
        yp_CD = np.empty((nch, D), np.float32)
        for c in prange(nch):
            _chunk_int4(c, nch, x_D, xp_D, xsum_G, p13, w13, s13, p2, w2, s2, gu_2F, h_F, hp_F, hsum_G, yp_CD)
        _store_y(yp_CD, y_1D, ybits_1D)
        return
    for c in prange(nch):
        lo, hi = _split(F, nch, c, 4)
        for part in range(2):  # gate rows, then up rows
            gemv_int4(xp_D, x_D, xsum_G, p13, w13, s13, gu_2F, part * F + lo, part * F + hi, 0)
        _swiglu(gu_2F, h_F, F, lo, hi)
    permute_x(h_F, INT4_GROUP, hp_F, hsum_G)
    yp_CD = np.empty((1, D), np.float32)
    y_D = yp_CD[0]
    for c in prange(nch):
        lo, hi = _split(D, nch, c, 4)
        gemv_int4(hp_F, h_F, hsum_G, p2, w2, s2, y_D, lo, hi, 0)
    _store_y(yp_CD, y_1D, ybits_1D)
