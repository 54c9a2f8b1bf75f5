"""One SwiGLU expert for one token (T == 1, decode) in a single kernel call.

Shape key: D model dim, F expert hidden dim, C chunks (threads).

    x_D  float32, or bf16 bits (uint16)        y_D  same kind as x_D
    w13  [2F, D] (gate rows, then up rows)     w2   [D, F]
    bf16: uint16 bits; int8: q + per-row scale; int4 (group 128): packed bytes, the same
    bytes viewed as int32 words, group scales (int4_gemv.py)

A small expert streams in tens of microseconds, so the per-call cost of separate
matmul launches, Python glue and intermediate copies is a large share of it. Here one
call does everything, with at most one thread-pool launch:

    chunk c of C owns hidden units [f_lo, f_hi) (a multiple of ALIGN wide):
        gate, up = w13[f_lo:f_hi] @ x, w13[F+f_lo:F+f_hi] @ x      (rows)
        h[f_lo:f_hi] = silu(gate) * up
        yp[c] = w2[:, f_lo:f_hi] @ h[f_lo:f_hi]                      (a column window)
    y = sum over c of yp[c]                                          (D adds per chunk)

Splitting w2 by columns lets every chunk finish on its own hidden units, so the chunks
need no barrier between the two matmuls. Each weight byte is still read exactly once.
``parallel`` False runs the chunks on the calling thread (no pool launch), with C = 1.
"""
from __future__ import annotations

import numpy as np
from numba import prange, types
from numba.extending import overload

from .gemv import gemv_bf16, gemv_int8
from .int4_gemv import GROUP as INT4_GROUP
from .int4_gemv import gemv_int4, permute_x
from .numba_util import njit_kernel
from .tiles import bf16_to_f32, f32_to_bf16

__all__ = ["ALIGN", "decode_bf16", "decode_int8", "decode_int4"]

# Hidden units per split unit: a multiple of the int4 group (w2 windows start on a
# group) and of a 64-byte line of int8.
ALIGN = 128


def _widen(src_D, dst_D):
    """dst_D (float32) = src_D (float32, or bf16 bits as uint16)."""


@overload(_widen)
def _widen_impl(src_D, dst_D):
    if src_D.dtype == types.uint16:
        def impl(src_D, dst_D):
            for d in range(src_D.shape[0]):
                dst_D[d] = bf16_to_f32(src_D[d])
        return impl

    def impl(src_D, dst_D):
        dst_D[:] = src_D
    return impl


def _store(acc_D, dst_D):
    """dst_D (float32, or bf16 bits rounded to nearest even) = acc_D (float32)."""


@overload(_store)
def _store_impl(acc_D, dst_D):
    if dst_D.dtype == types.uint16:
        def impl(acc_D, dst_D):
            for d in range(acc_D.shape[0]):
                dst_D[d] = f32_to_bf16(acc_D[d])
        return impl

    def impl(acc_D, dst_D):
        dst_D[:] = acc_D
    return impl


@njit_kernel(parallel=False)
def _split(F, nch, c):
    """Hidden units [lo, hi) of chunk c of nch: whole ALIGN units, spread evenly."""
    units = (F + ALIGN - 1) // ALIGN
    return min(F, (c * units // nch) * ALIGN), min(F, ((c + 1) * units // nch) * ALIGN)


@njit_kernel(parallel=False)
def _swiglu(gu_2F, h_F, F, lo, hi):
    """h_F[lo:hi] = silu(gate) * up for hidden units lo:hi."""
    for f in range(lo, hi):
        g = gu_2F[f]
        h_F[f] = g / (np.float32(1.0) + np.exp(-g)) * gu_2F[F + f]


@njit_kernel(parallel=False)
def _sum_chunks(yp_CD, dst_D):
    """dst_D = sum over chunks of yp_CD (stored as float32 or bf16)."""
    C, D = yp_CD.shape
    acc_D = yp_CD[0].copy()
    for c in range(1, C):
        acc_D += yp_CD[c]
    _store(acc_D, dst_D)


# ---------------------------------------------------------------- bf16

@njit_kernel(parallel=False)
def _chunk_bf16(c, nch, x_D, w13, w2, gu_2F, h_F, yp_CD):
    D, F = w2.shape
    lo, hi = _split(F, nch, c)
    if hi <= lo:
        yp_CD[c, :] = 0.0
        return
    gemv_bf16(x_D, w13, gu_2F, lo, hi, 0, D)
    gemv_bf16(x_D, w13, gu_2F, F + lo, F + hi, 0, D)
    _swiglu(gu_2F, h_F, F, lo, hi)
    gemv_bf16(h_F[lo:hi], w2, yp_CD[c], 0, D, lo, hi - lo)


@njit_kernel()
def _pool_bf16(nch, x_D, w13, w2, gu_2F, h_F, yp_CD):
    for c in prange(nch):
        _chunk_bf16(c, nch, x_D, w13, w2, gu_2F, h_F, yp_CD)


@njit_kernel(parallel=False)
def decode_bf16(x_D, w13, w2, y_D, nch, parallel):
    """y_D = expert(x_D) with bf16 weights (uint16 bits): w13 [2F, D], w2 [D, F]."""
    D, F = w2.shape
    xf_D = np.empty(D, np.float32)
    _widen(x_D, xf_D)
    gu_2F = np.empty(2 * F, np.float32)
    h_F = np.empty(F, np.float32)
    if parallel:
        yp_CD = np.empty((nch, D), np.float32)
        _pool_bf16(nch, xf_D, w13, w2, gu_2F, h_F, yp_CD)
    else:
        yp_CD = np.empty((1, D), np.float32)
        _chunk_bf16(0, 1, xf_D, w13, w2, gu_2F, h_F, yp_CD)
    _sum_chunks(yp_CD, y_D)


# ---------------------------------------------------------------- int8

@njit_kernel(parallel=False)
def _chunk_int8(c, nch, x_D, q13, s13, q2, s2, gu_2F, h_F, yp_CD):
    D, F = q2.shape
    lo, hi = _split(F, nch, c)
    if hi <= lo:
        yp_CD[c, :] = 0.0
        return
    gemv_int8(x_D, q13, s13, gu_2F, lo, hi, 0, D)
    gemv_int8(x_D, q13, s13, gu_2F, F + lo, F + hi, 0, D)
    _swiglu(gu_2F, h_F, F, lo, hi)
    gemv_int8(h_F[lo:hi], q2, s2, yp_CD[c], 0, D, lo, hi - lo)


@njit_kernel()
def _pool_int8(nch, x_D, q13, s13, q2, s2, gu_2F, h_F, yp_CD):
    for c in prange(nch):
        _chunk_int8(c, nch, x_D, q13, s13, q2, s2, gu_2F, h_F, yp_CD)


@njit_kernel(parallel=False)
def decode_int8(x_D, q13, s13, q2, s2, y_D, nch, parallel):
    """y_D = expert(x_D) with int8 weights: q13 [2F, D], s13 [2F], q2 [D, F], s2 [D]."""
    D, F = q2.shape
    xf_D = np.empty(D, np.float32)
    _widen(x_D, xf_D)
    gu_2F = np.empty(2 * F, np.float32)
    h_F = np.empty(F, np.float32)
    if parallel:
        yp_CD = np.empty((nch, D), np.float32)
        _pool_int8(nch, xf_D, q13, s13, q2, s2, gu_2F, h_F, yp_CD)
    else:
        yp_CD = np.empty((1, D), np.float32)
        _chunk_int8(0, 1, xf_D, q13, s13, q2, s2, gu_2F, h_F, yp_CD)
    _sum_chunks(yp_CD, y_D)


# ---------------------------------------------------------------- int4

@njit_kernel(parallel=False)
def _chunk_int4(c, nch, x_D, xp_D, xsum_G, p13, w13, s13, p2, w2, s2, gu_2F, h_F, hp_F, hsum_G, yp_CD):
    D = p2.shape[0]
    F = gu_2F.shape[0] // 2
    lo, hi = _split(F, nch, c)
    if hi <= lo:
        yp_CD[c, :] = 0.0
        return
    gemv_int4(xp_D, x_D, xsum_G, p13, w13, s13, gu_2F, lo, hi, 0)
    gemv_int4(xp_D, x_D, xsum_G, p13, w13, s13, gu_2F, F + lo, F + hi, 0)
    _swiglu(gu_2F, h_F, F, lo, hi)
    g_lo = lo // INT4_GROUP
    g_hi = (hi + INT4_GROUP - 1) // INT4_GROUP
    permute_x(h_F[lo:hi], INT4_GROUP, hp_F[lo:hi], hsum_G[g_lo:g_hi])
    gemv_int4(hp_F[lo:hi], h_F[lo:hi], hsum_G[g_lo:g_hi], p2, w2, s2, yp_CD[c], 0, D, lo)


@njit_kernel()
def _pool_int4(nch, x_D, xp_D, xsum_G, p13, w13, s13, p2, w2, s2, gu_2F, h_F, hp_F, hsum_G, yp_CD):
    for c in prange(nch):
        _chunk_int4(c, nch, x_D, xp_D, xsum_G, p13, w13, s13, p2, w2, s2, gu_2F, h_F, hp_F, hsum_G, yp_CD)


@njit_kernel(parallel=False)
def decode_int4(x_D, p13, w13, s13, p2, w2, s2, y_D, nch, parallel):
    """y_D = expert(x_D) with int4 weights, group 128: packed p13 [2F, P13] and its int32
    view w13, scales s13 [2F, G13]; p2 [D, P2], w2, s2 [D, G2] (layout: int4_gemv.py)."""
    D = p2.shape[0]
    F = p13.shape[0] // 2
    xf_D = np.empty(D, np.float32)
    _widen(x_D, xf_D)
    xp_D = np.empty(D, np.float32)
    xsum_G = np.empty(s13.shape[1], np.float32)
    permute_x(xf_D, INT4_GROUP, xp_D, xsum_G)
    gu_2F = np.empty(2 * F, np.float32)
    h_F = np.empty(F, np.float32)
    hp_F = np.empty(F, np.float32)
    hsum_G = np.empty(s2.shape[1], np.float32)
    if parallel:
        yp_CD = np.empty((nch, D), np.float32)
        _pool_int4(nch, xf_D, xp_D, xsum_G, p13, w13, s13, p2, w2, s2, gu_2F, h_F, hp_F, hsum_G, yp_CD)
    else:
        yp_CD = np.empty((1, D), np.float32)
        _chunk_int4(0, 1, xf_D, xp_D, xsum_G, p13, w13, s13, p2, w2, s2, gu_2F, h_F, hp_F, hsum_G, yp_CD)
    _sum_chunks(yp_CD, y_D)
