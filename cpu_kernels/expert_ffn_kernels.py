"""Raw Numba kernels behind `expert_ffn` for fp32, bf16 and int8 weights:
out_TR = x_TK @ W_RK.T (int4: int4_kernels.py; shared tiles and helpers: tiles.py).

Shape key: T tokens, K input columns, R output rows (weight rows), B = ROW_BLOCK rows.

Every kernel takes x_TK float32 C-contiguous and writes out_TR float32, accumulating in
fp32. Weights are read in their stored form, each row front to back exactly once:

* fp32 rows as they are; bf16 rows as raw uint16, widened in registers (bits << 16);
* int8 rows times one scale per row (applied once per dot product).

Work split: ``prange`` over ``nch`` contiguous row ranges, one per thread, chosen by the
caller (numba.get_num_threads() inside a kernel would make it uncacheable).

T == 1 (decode) is a GEMV, memory-bound: rows are decoded and dotted in one pass, four
rows at a time (fp32 here; bf16 and int8 in gemv.py, with software prefetch). Four
concurrent streams keep more loads in flight than one and were measured at about 1.4x
the DRAM rate of a row-at-a-time loop here (2-core Xeon VM); x_K is loaded once for
the four.

2 <= T <= SMALL_T (16) runs the small-batch loops of small_t.py (fp32 T == 1 too).

T > SMALL_T decodes a block of B rows into a small fp32 scratch, then dots it against all T
tokens with the register tile of tiles.dot_block, so each weight byte still leaves DRAM
once and the inner loops run on plain fp32.

Hot loops index 1-D row views from 0: with offsets numba cannot rule out negative
(wrap-around) indices and LLVM turns the loads into gathers.

Callers (expert_ffn.py) check shapes, dtypes and contiguity; these functions do not.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .gemv import gemv_bf16, gemv_int8
from .numba_util import njit_kernel
from .small_t import SMALL_T as _SMALL_T
from .small_t import rows_small_bf16, rows_small_f32, rows_small_int8
from .tiles import KC as _KC
from .tiles import ROW_BLOCK as _RB
from .tiles import bf16_to_f32 as _bf16_to_f32
from .tiles import dot_block as _dot_block
from .tiles import store_block as _store_block
from .tiles import tile_chunk as _tile_chunk

__all__ = ["matmul_f32", "matmul_bf16", "matmul_int8", "rows_f32", "rows_bf16", "rows_int8"]


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
def _rows_f32(x_TK, w_RK, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR = x_TK @ w_RK.T (float32 weights)."""
    T, K = x_TK.shape
    if T <= _SMALL_T:  # T == 1 too: its row streams are prefetched, unlike _gemv_f32's
        rows_small_f32(x_TK, w_RK, out_TR, r_lo, r_hi)
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
        gemv_bf16(x_TK[0], w_RK, out_TR[0], r_lo, r_hi, 0, K)
    elif T <= _SMALL_T:
        rows_small_bf16(x_TK, w_RK, out_TR, r_lo, r_hi)
    else:
        # Zeros: rows past a short last block must hold finite values (they are not stored).
        s_BC = np.zeros((_RB, _KC), np.float32)
        acc_T4 = np.empty((T, _RB), np.float32)
        for b0 in range(r_lo, r_hi, _RB):
            nb = min(_RB, r_hi - b0)
            for k0 in range(0, K, _KC):
                k1 = min(K, k0 + _KC)
                for i in range(nb):
                    w_C = w_RK[b0 + i, k0:k1]
                    s_C = s_BC[i]
                    for k in range(k1 - k0):
                        s_C[k] = _bf16_to_f32(w_C[k])
                _tile_chunk(x_TK, k0, k1, s_BC, 0, acc_T4, k0 == 0)
            _store_block(acc_T4, nb, out_TR, b0)


@njit_kernel(parallel=False)
def _rows_int8(x_TK, q_RK, scale_R, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR = x_TK @ (q_RK * scale_R[:, None]).T."""
    T, K = x_TK.shape
    if T == 1:
        gemv_int8(x_TK[0], q_RK, scale_R, out_TR[0], r_lo, r_hi, 0, K)
    elif T <= _SMALL_T:
        rows_small_int8(x_TK, q_RK, scale_R, out_TR, r_lo, r_hi)
    else:
        # Zeros: rows past a short last block must hold finite values (they are not stored).
        s_BC = np.zeros((_RB, _KC), np.float32)
        acc_T4 = np.empty((T, _RB), np.float32)
        for b0 in range(r_lo, r_hi, _RB):
            nb = min(_RB, r_hi - b0)
            for k0 in range(0, K, _KC):
                k1 = min(K, k0 + _KC)
                for i in range(nb):
                    s = scale_R[b0 + i]
                    q_C = q_RK[b0 + i, k0:k1]
                    s_C = s_BC[i]
                    for k in range(k1 - k0):
                        s_C[k] = np.float32(q_C[k]) * s
                _tile_chunk(x_TK, k0, k1, s_BC, 0, acc_T4, k0 == 0)
            _store_block(acc_T4, nb, out_TR, b0)


# Serial entry points (one thread, no thread-pool launch): the row functions themselves.
rows_f32 = _rows_f32
rows_bf16 = _rows_bf16
rows_int8 = _rows_int8

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
