"""Weighted sum of a one-token layer's expert rows (decode at batch 1), in one call.

    y[d] = sum over m of w_K[k_m] * rows[k_m, d],   k_m = slots_M[m], in that order

Shape key: K rows (one per expert of the token), D model dim, M rows summed (M <= K).

The runtime's one-token path writes each CPU expert's output into its own row of a
[K, D] buffer and then needs this sum, in fp32, in a fixed expert order (results must
not depend on which expert finished first), rounded once to the token's dtype: the
same arithmetic as the general path's fp32 index_add (a rounded product, then a rounded
sum, per expert; no FMA contraction, hence no fast-math here). As torch ops (index,
widen, product, narrow) it cost ~0.3 ms per layer on a 2-core VM, each op running from
cold caches after the experts' weight streams; here it is one compiled call on two
addresses.
"""
from __future__ import annotations

import numba
import numpy as np

from .decode import _f32_at, _u16_at
from .numba_util import njit_kernel
from .tiles import bf16_to_f32, f32_to_bf16

__all__ = ["combine_rows"]


@njit_kernel(parallel=False, fastmath=frozenset())
def combine_rows(ya, rows_a, bf16, K, D, w_K, slots_M):
    """y (1 x D at address ya) = the weighted sum above of the rows at rows_a ([K, D],
    contiguous); both float32, or both bf16 bit patterns when bf16 is True; w_K float32."""
    acc_D = np.zeros(D, np.float32)
    if bf16:
        rows = numba.carray(_u16_at(rows_a), (K, D))
        for m in range(slots_M.shape[0]):
            k = slots_M[m]
            w = w_K[k]
            for d in range(D):
                acc_D[d] = acc_D[d] + w * bf16_to_f32(rows[k, d])
        y_D = numba.carray(_u16_at(ya), (D,))
        for d in range(D):
            y_D[d] = f32_to_bf16(acc_D[d])
        return
    rows = numba.carray(_f32_at(rows_a), (K, D))
    for m in range(slots_M.shape[0]):
        k = slots_M[m]
        w = w_K[k]
        for d in range(D):
            acc_D[d] = acc_D[d] + w * rows[k, d]
    numba.carray(_f32_at(ya), (D,))[:] = acc_D
