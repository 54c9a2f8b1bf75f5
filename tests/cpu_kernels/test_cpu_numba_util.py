"""Numba plumbing: cache fallback, per-thread caps, bandwidth probe."""
import threading

import numba
import pytest

from moe.cpu_kernels import numba_util, read_bandwidth_gbps, thread_cap


def test_njit_kernel_falls_back_when_cache_is_unavailable(monkeypatch):
    """If numba cannot cache (read-only tree), the kernel still compiles and runs uncached."""
    real_njit = numba.njit

    def njit_without_cache_dir(*args, cache=False, **kwargs):
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'f.py'")
        return real_njit(*args, **kwargs)

    monkeypatch.setattr(numba_util.numba, "njit", njit_without_cache_dir)
    with pytest.warns(RuntimeWarning, match="compiling without cache"):
        f = numba_util.njit_kernel(parallel=False)(lambda a: a + 1)
    assert f(41) == 42


def test_thread_cap_is_per_thread_and_restored():
    """A cap applies inside the block in the calling thread only and is undone afterwards."""
    before = numba.get_num_threads()
    seen = {}

    def other():
        seen["other"] = numba.get_num_threads()

    with thread_cap(1):
        assert numba.get_num_threads() == 1
        th = threading.Thread(target=other)
        th.start()
        th.join()
    assert numba.get_num_threads() == before
    assert seen["other"] == numba_util.max_threads()


def test_thread_cap_validates():
    """Caps outside 1..NUMBA_NUM_THREADS or of the wrong type are rejected."""
    with pytest.raises(ValueError, match="num_threads must be in"):
        with thread_cap(numba_util.max_threads() + 1):
            pass
    with pytest.raises(TypeError):
        with thread_cap(1.5):
            pass


def test_read_bandwidth_probe_runs_and_validates():
    """The bandwidth probe returns a positive rate and rejects cache-sized arrays."""
    assert read_bandwidth_gbps(8 << 20, repeats=1) > 0
    with pytest.raises(ValueError, match="nbytes must be"):
        read_bandwidth_gbps(1 << 20)
    with pytest.raises(ValueError, match="repeats"):
        read_bandwidth_gbps(8 << 20, repeats=0)
