"""Measured memory-read bandwidth: the physical bound for memory-bound CPU experts.

A parallel fp32 sum over an array much larger than the last-level cache reads every byte
once from DRAM and does almost no arithmetic, so its rate is what a streaming GEMV can at
best reach on this machine with the same threads. The array sits in huge pages where the
host offers them (hostmem.py), as the expert store's weights do: the bound then holds
both to the same page size.
"""
from __future__ import annotations

import time

import numba
import numpy as np
from numba import prange

from .hostmem import empty_huge_np
from .numba_util import launch_guard, njit_kernel, thread_cap

__all__ = ["read_bandwidth_gbps", "BandwidthProbe"]


@njit_kernel(parallel=False)
def _sum_range(a_N, lo, hi):
    # Index a slice from 0: with i in range(lo, hi) numba cannot rule out negative
    # (wrap-around) indices and the loads become gathers.
    b_N = a_N[lo:hi]
    acc = np.float32(0.0)
    for i in range(b_N.shape[0]):
        acc += b_N[i]
    return acc


@njit_kernel()
def _chunked_sum(a_N, nch):
    """Sum of a float32 array as nch parallel contiguous chunks.

    The loop lives in a serial helper: a prange body does not reliably keep the
    fastmath flags, and an unvectorised sum would be compute-bound and understate DRAM.
    """
    n = a_N.shape[0]
    part = np.zeros(nch, np.float32)
    for c in prange(nch):
        part[c] = _sum_range(a_N, c * n // nch, (c + 1) * n // nch)
    return part.sum()


def _ones(nbytes: int, huge_pages: bool) -> np.ndarray:
    """float32 ones over nbytes (in huge pages where offered, if asked); written once so
    that every page is really mapped before a timed pass."""
    if not huge_pages:
        return np.ones(nbytes // 4, np.float32)
    a_N = empty_huge_np(nbytes // 4 * 4).view(np.float32)
    a_N[:] = 1.0
    return a_N


def _check_probe_size(nbytes: int) -> None:
    if nbytes < 4 << 20:
        raise ValueError(f"nbytes must be >= 4 MiB to measure DRAM rather than cache, got {nbytes}")


class BandwidthProbe:
    """One read-bandwidth sample per call, over an array kept between calls.

    For interleaving with the work being measured: on a shared machine the bandwidth
    left to us drifts by tens of percent within minutes, so a rate is best compared with
    samples taken in the same time windows. ``nbytes`` should be well above the
    last-level cache (each sample then streams it from DRAM). huge_pages: the array in
    huge pages where the host offers them (hostmem.py), else the allocator's pages.
    """

    def __init__(self, nbytes: int = 256 << 20, num_threads: int | None = None, huge_pages: bool = True) -> None:
        _check_probe_size(nbytes)
        self.num_threads = num_threads
        self._a_N = _ones(nbytes, huge_pages)
        with thread_cap(num_threads), launch_guard():
            _chunked_sum(self._a_N[: 1 << 16], numba.get_num_threads() * 4)  # compile / load

    def sample(self) -> float:
        """GB/s (1e9 bytes/s) of one pass over the array."""
        with thread_cap(self.num_threads), launch_guard():
            nch = numba.get_num_threads() * 4
            t0 = time.perf_counter()
            _chunked_sum(self._a_N, nch)
            return self._a_N.nbytes / (time.perf_counter() - t0) / 1e9


def read_bandwidth_gbps(nbytes: int = 1 << 30, repeats: int = 5, num_threads: int | None = None,
                        huge_pages: bool = True) -> float:
    """Best-of-``repeats`` read bandwidth in GB/s (1e9 bytes/s) over an ``nbytes`` array.

    Best rather than median: the bound is what the hardware can do, not a typical run.
    ``nbytes`` should be well above the last-level cache (default 1 GiB). huge_pages as
    for BandwidthProbe.
    """
    _check_probe_size(nbytes)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    a_N = _ones(nbytes, huge_pages)
    best = float("inf")
    with thread_cap(num_threads), launch_guard():
        nch = numba.get_num_threads() * 4
        _chunked_sum(a_N[: 1 << 16], nch)  # compile / load outside the timed runs
        for _ in range(repeats):
            t0 = time.perf_counter()
            _chunked_sum(a_N, nch)
            best = min(best, time.perf_counter() - t0)
    return a_N.nbytes / best / 1e9
