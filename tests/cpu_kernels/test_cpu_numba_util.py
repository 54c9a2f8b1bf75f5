"""Numba plumbing: cache fallback, per-thread caps, bandwidth probe."""
import os
import subprocess
import sys
import threading

import numba
import pytest

from moe.cpu_kernels import BandwidthProbe, numba_util, read_bandwidth_gbps, thread_cap


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


def test_bandwidth_probe_samples_and_validates():
    """The interleavable probe gives one positive sample per call and rejects cache-sized arrays."""
    probe = BandwidthProbe(8 << 20, num_threads=1)
    assert all(probe.sample() > 0 for _ in range(3))
    with pytest.raises(ValueError, match="nbytes must be"):
        BandwidthProbe(1 << 20)


_WORKQUEUE_SCRIPT = """
import threading, torch
from moe.cpu_kernels import expert_ffn, expert_ffn_reference
w13 = torch.randn(96, 40) / 7
w2 = torch.randn(40, 48) / 7
xs = [torch.randn(t, 40) for t in (1, 3, 5, 2)]
errors = []
def work(x):
    try:
        for _ in range(20):
            torch.testing.assert_close(expert_ffn(x, w13, w2), expert_ffn_reference(x, w13, w2),
                                       rtol=1e-4, atol=1e-5)
    except Exception as exc:
        errors.append(exc)
threads = [threading.Thread(target=work, args=(x,)) for x in xs]
[t.start() for t in threads]
[t.join() for t in threads]
import numba
assert numba.threading_layer() == "workqueue", numba.threading_layer()
assert not errors, errors
print("ok")
"""


def test_concurrent_calls_survive_the_workqueue_layer():
    """Under numba's workqueue layer (no OpenMP/TBB), concurrent calls are serialised, not fatal."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    proc = subprocess.run([sys.executable, "-c", _WORKQUEUE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_host_features_are_empty_when_compiling_for_another_cpu():
    """Under NUMBA_CPU_NAME (code compiled for another CPU) no host feature is assumed, so
    the kernels take their generic paths (no AVX2-only choices)."""
    code = ("from moe.cpu_kernels import numba_util as U\n"
            "assert U.host_cpu_features() == {} and U.host_cpu_name() == ''\n"
            "assert not U.AVX2 and not U.AVX2_ONLY and not U.REG_GEMV\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300,
                   env=dict(os.environ, NUMBA_CPU_NAME="generic"))
