"""T == 1 (decode) GEMV kernels for bf16 and int8 weights over a window of columns:
out_R[r] = W[r, c0:c0+n] . x_N for rows r_lo:r_hi (int8: times scale_R[r]).

Shape key: N window columns (x_N), R weight rows, S row stride (W is C-contiguous [R, S]).

A column window lets the fused decode path (decode.py) split w2 [D, F] by columns
between threads, so no thread waits for another's hidden units. Whole rows are c0 = 0,
n = S.

Decode is memory-bound, so the loops are shaped for the memory system, measured on a
2-core Xeon VM (AVX-512):

* four rows stream side by side, sharing each load of x (four concurrent streams keep
  more DRAM requests in flight than one);
* every row stream is software-prefetched PF_BYTES ahead; near the end of a row the
  prefetch moves on to the same offset of the next block of four rows. The hardware
  prefetcher restarts at every row (and every 4 KiB page), which cost up to ~30% on the
  short rows of small experts (DeepSeek-V2-Lite: 1408 columns);
* rows are walked in steps of STEP_BYTES: LLVM reduces its vector accumulators to a
  scalar once per step, so long steps keep that cost small, and the step is compiled
  for 512-bit vectors (tiles.wide_vectors).

int8 is widened int8 -> int32 -> fp32 in the vector lanes (vpmovsxbd + vcvtdq2ps +
vfmadd) and the row scale is applied once per row after the fp32 dot product.
"""
from __future__ import annotations

import numpy as np

from .numba_util import njit_kernel
from .tiles import bf16_to_f32 as _bf16_to_f32
from .tiles import prefetch as _prefetch
from .tiles import wide_vectors as _wide_vectors

__all__ = ["gemv_bf16", "gemv_int8", "prefetch_rows4", "PF_BYTES", "STEP_BYTES"]

STEP_BYTES = 256
PF_BYTES = 1024
_LINE = 64


@njit_kernel(parallel=False)
def prefetch_rows4(flat, S, r, k, n, c0, dist, span, line):
    """Prefetch elements k + dist .. k + dist + span of the window of rows r..r+3 (flat:
    W raveled, row stride S), one hint per ``line`` elements; past the window's end, the
    same offsets of rows r+4..r+7. The start is clamped so that no hint points outside
    the array (needs 4 rows and span <= S, as in every 4-row pass)."""
    kp = k + dist
    rp = r
    if kp >= n:
        kp -= n
        rp += 4
    b = max(0, min(rp * S + c0 + kp, flat.shape[0] - 3 * S - span))
    for j in range(0, span, line):
        _prefetch(flat, b + j)
        _prefetch(flat, b + S + j)
        _prefetch(flat, b + 2 * S + j)
        _prefetch(flat, b + 3 * S + j)


@njit_kernel(parallel=False)
def gemv_bf16(x_N, w_RS, out_R, r_lo, r_hi, c0, n):
    """out_R[r] = widen(w_RS[r, c0:c0+n]) . x_N for r in r_lo:r_hi (w_RS: bf16 bits, uint16)."""
    _wide_vectors()
    S = w_RS.shape[1]
    flat = w_RS.ravel()
    step = STEP_BYTES // 2
    line = _LINE // 2
    dist = PF_BYTES // 2
    nb = n // step
    r = r_lo
    while r + 4 <= r_hi:
        w0 = w_RS[r, c0:c0 + n]
        w1 = w_RS[r + 1, c0:c0 + n]
        w2 = w_RS[r + 2, c0:c0 + n]
        w3 = w_RS[r + 3, c0:c0 + n]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for b in range(nb):
            k0 = b * step
            prefetch_rows4(flat, S, r, k0, n, c0, dist, step, line)
            x_B = x_N[k0:k0 + step]
            v0 = w0[k0:k0 + step]
            v1 = w1[k0:k0 + step]
            v2 = w2[k0:k0 + step]
            v3 = w3[k0:k0 + step]
            for k in range(step):
                v = x_B[k]
                a0 += _bf16_to_f32(v0[k]) * v
                a1 += _bf16_to_f32(v1[k]) * v
                a2 += _bf16_to_f32(v2[k]) * v
                a3 += _bf16_to_f32(v3[k]) * v
        for k in range(nb * step, n):
            v = x_N[k]
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
        w0 = w_RS[r, c0:c0 + n]
        a0 = np.float32(0.0)
        for k in range(n):
            a0 += _bf16_to_f32(w0[k]) * x_N[k]
        out_R[r] = a0


@njit_kernel(parallel=False)
def gemv_int8(x_N, q_RS, scale_R, out_R, r_lo, r_hi, c0, n):
    """out_R[r] = scale_R[r] * (q_RS[r, c0:c0+n] . x_N) for r in r_lo:r_hi."""
    _wide_vectors()
    S = q_RS.shape[1]
    flat = q_RS.ravel()
    step = STEP_BYTES
    nb = n // step
    r = r_lo
    while r + 4 <= r_hi:
        q0 = q_RS[r, c0:c0 + n]
        q1 = q_RS[r + 1, c0:c0 + n]
        q2 = q_RS[r + 2, c0:c0 + n]
        q3 = q_RS[r + 3, c0:c0 + n]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for b in range(nb):
            k0 = b * step
            prefetch_rows4(flat, S, r, k0, n, c0, PF_BYTES, step, _LINE)
            x_B = x_N[k0:k0 + step]
            v0 = q0[k0:k0 + step]
            v1 = q1[k0:k0 + step]
            v2 = q2[k0:k0 + step]
            v3 = q3[k0:k0 + step]
            for k in range(step):
                v = x_B[k]
                a0 += np.float32(v0[k]) * v
                a1 += np.float32(v1[k]) * v
                a2 += np.float32(v2[k]) * v
                a3 += np.float32(v3[k]) * v
        for k in range(nb * step, n):
            v = x_N[k]
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
        q0 = q_RS[r, c0:c0 + n]
        a0 = np.float32(0.0)
        for k in range(n):
            a0 += np.float32(q0[k]) * x_N[k]
        out_R[r] = a0 * scale_R[r]
