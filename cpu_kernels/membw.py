"""Measured memory-read bandwidth: the physical bound for memory-bound CPU experts.

A parallel fp32 sum over an array much larger than the last-level cache reads every byte
once from DRAM and does almost no arithmetic, so its rate is what a streaming GEMV can at
best reach on this machine with the same threads.
"""
from __future__ import annotations

import time

import numba
import numpy as np
from numba import prange

from .numba_util import launch_guard, njit_kernel, thread_cap

__all__ = ["read_bandwidth_gbps"]


@njit_kernel()
def _chunked_sum(a_N, nch):
    """Sum of a float32 array as nch parallel contiguous chunks."""
    n = a_N.shape[0]
    part = np.zeros(nch, np.float32)
    for c in prange(nch):
        lo = c * n // nch
        hi = (c + 1) * n // nch
        acc = np.float32(0.0)
        for i in range(lo, hi):
            acc += a_N[i]
        part[c] = acc
    return part.sum()


def read_bandwidth_gbps(nbytes: int = 1 << 30, repeats: int = 5, num_threads: int | None = None) -> float:
    """Best-of-``repeats`` read bandwidth in GB/s (1e9 bytes/s) over an ``nbytes`` array.

    Best rather than median: the bound is what the hardware can do, not a typical run.
    ``nbytes`` should be well above the last-level cache (default 1 GiB).
    """
    if nbytes < 4 << 20:
        raise ValueError(f"nbytes must be >= 4 MiB to measure DRAM rather than cache, got {nbytes}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    a_N = np.ones(nbytes // 4, np.float32)  # written once so every page is really mapped
    best = float("inf")
    with thread_cap(num_threads), launch_guard():
        nch = numba.get_num_threads() * 4
        _chunked_sum(a_N[: 1 << 16], nch)  # compile / load outside the timed runs
        for _ in range(repeats):
            t0 = time.perf_counter()
            _chunked_sum(a_N, nch)
            best = min(best, time.perf_counter() - t0)
    return a_N.nbytes / best / 1e9
