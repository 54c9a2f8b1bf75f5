"""Numba plumbing shared by the CPU kernels: cached JIT that tolerates read-only trees,
a per-call thread cap, and a guard that keeps concurrent launches safe.

Threading model
---------------
Every kernel here is compiled with ``nogil=True, parallel=True``. Several Python threads
may call them at once (the runtime runs several CPU experts on a thread pool). Whether
that is safe depends on numba's threading layer, chosen once per process at the first
parallel launch:

* ``omp`` and ``tbb`` accept concurrent launches from many threads; each launch gets its
  own team, so calls really run in parallel.
* ``workqueue`` (the fallback when neither OpenMP nor TBB can be loaded) aborts the
  process on concurrent launches. Under it, :func:`launch_guard` serialises launches with
  a process-wide lock: correct, but experts then run one at a time.

``numba.set_num_threads`` is thread-local: a cap set in one Python thread does not affect
launches from another. :func:`thread_cap` sets it for the duration of one call and
restores the caller's previous value, so a pool of workers can each use, e.g., 1 thread
while the main thread keeps all cores. P Python threads calling with N numba threads
each run P * N OS threads; on C cores, num_threads = C // P avoids oversubscription.

Caching
-------
Compiled kernels are cached next to the sources (``__pycache__/*.nbi, *.nbc``), or in
numba's user cache dir when that is read-only, or not at all (a warning) when neither is
writable. Numba checks only the timestamp of a function's own file: after editing a
helper in one module (e.g. tiles.py), delete the cached ``*.nbi``/``*.nbc`` files of
cpu_kernels so callers in other modules are recompiled.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator

import numba

__all__ = ["njit_kernel", "thread_cap", "thread_cap_check", "launch_guard", "launches_concurrent", "max_threads",
           "host_cpu_features", "host_cpu_name", "AVX2", "AVX2_ONLY", "AVX512", "AVX512BW", "AVX512VNNI",
           "AVX512BF16", "REG_GEMV"]


def _host_query(query, default):
    """query(llvmlite.binding) for this host; default when numba compiles for another CPU
    (no host assumptions) or the query fails: callers then take their generic paths."""
    try:
        import llvmlite.binding as llvm
        from numba.core import config
        return default if config.CPU_NAME is not None else query(llvm)
    except Exception:  # noqa: BLE001 - the generic paths are always correct
        return default


def host_cpu_features() -> dict:
    """LLVM's feature flags of this host ({} when compiling for another CPU or unreadable)."""
    return _host_query(lambda llvm: dict(llvm.get_host_cpu_features()), {})


def host_cpu_name() -> str:
    """LLVM's name of this host CPU ("znver4", "icelake-server", ...; "" when compiling for
    another CPU or unreadable)."""
    return _host_query(lambda llvm: str(llvm.get_host_cpu_name()), "")


_FEATURES = host_cpu_features()
AVX2 = bool(_FEATURES.get("avx2"))
AVX512 = bool(_FEATURES.get("avx512f"))
AVX512BW = AVX512 and bool(_FEATURES.get("avx512bw"))  # 512-bit 16-bit integer ops (vpmaddwd zmm)
AVX512VNNI = AVX512BW and bool(_FEATURES.get("avx512vnni"))  # 512-bit byte dot products (vpdpbusd zmm)
AVX512BF16 = AVX512BW and bool(_FEATURES.get("avx512bf16"))  # bf16 pair dot products (vdpbf16ps zmm)
AVX2_ONLY = AVX2 and not AVX512
# Where the T == 1 GEMVs take the register-accumulator kernels, one or four row streams
# per thread by row length (gemv_reg.py, gemv_madd.py, int4_madd.py), instead of the fp32
# four-row kernels (gemv.py). Measured, cold DeepSeek-V2-Lite / Mixtral experts, two
# threads, same-process A/B of the whole decode:
#   Zen 3, AVX2 only:     faster in every format (the modules' docstrings);
#   Zen 4, AVX-512:       int8 1.70x / 0.97-1.00x, int4 1.59x / 1.37x, bf16 1.06x / 1.13-1.16x;
#   Xeon, AVX-512:        the fp32 kernels were tuned there; the register kernels were
#                         never measured on one, so other AVX-512 hosts keep them.
# The choice is a compile-time constant of the kernels; numba's cache is keyed by the
# host CPU, so a cache never carries one host's choice to another.
REG_GEMV = AVX2 and (AVX2_ONLY or host_cpu_name().startswith("znver"))

_launch_lock = threading.Lock()
# None until the first launch has picked a layer; then True when launches must be serialised.
_serialise: bool | None = None


# Reassociation lets LLVM vectorise fp32 dot-product reductions (several partial sums);
# contraction allows FMA. NaN/inf semantics stay IEEE (no nnan/ninf), so bad values
# propagate instead of being optimised away.
FASTMATH = frozenset({"reassoc", "contract"})


def njit_kernel(*, parallel: bool = True, fastmath: bool | frozenset = FASTMATH) -> Callable:
    """``numba.njit(nogil=True, cache=True, ...)`` that falls back to ``cache=False``.

    Numba raises at decoration time when no cache location is writable (read-only
    install, no writable home); the kernels must still import and run there, only
    compiling on every start.
    """

    def deco(fn: Callable) -> Callable:
        flags = set(fastmath) if isinstance(fastmath, frozenset) else fastmath
        opts = dict(nogil=True, parallel=parallel, fastmath=flags, error_model="numpy")
        try:
            return numba.njit(cache=True, **opts)(fn)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            warnings.warn(f"numba cache unavailable for {fn.__name__} ({exc}); compiling without cache",
                          RuntimeWarning, stacklevel=2)
            return numba.njit(cache=False, **opts)(fn)

    return deco


def max_threads() -> int:
    """Upper bound for a thread cap: numba's pool size (NUMBA_NUM_THREADS, default all cores)."""
    return int(numba.config.NUMBA_NUM_THREADS)


def thread_cap_check(num_threads: int) -> None:
    """Raise unless ``num_threads`` is a valid cap (an int in 1..max_threads())."""
    if isinstance(num_threads, bool) or not isinstance(num_threads, int):
        raise TypeError(f"num_threads must be an int or None, got {num_threads!r}")
    limit = max_threads()
    if not 1 <= num_threads <= limit:
        raise ValueError(f"num_threads must be in 1..{limit} (NUMBA_NUM_THREADS), got {num_threads}")


@contextlib.contextmanager
def thread_cap(num_threads: int | None) -> Iterator[None]:
    """Run the body with at most ``num_threads`` numba threads in the *calling* thread.

    None leaves the caller's current setting untouched. Other Python threads are not
    affected (numba's setting is thread-local).
    """
    if num_threads is None:
        yield
        return
    thread_cap_check(num_threads)
    previous = numba.get_num_threads()
    numba.set_num_threads(num_threads)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def launches_concurrent() -> bool:
    """True once a launch has shown that the threading layer takes concurrent launches,
    so a caller may skip launch_guard (and its context-manager cost)."""
    return _serialise is False


@contextlib.contextmanager
def launch_guard() -> Iterator[None]:
    """Serialise kernel launches only when numba's threading layer cannot take concurrent ones."""
    global _serialise
    if _serialise is False:
        yield
        return
    with _launch_lock:
        yield
        if _serialise is None:
            try:
                layer = numba.threading_layer()
            except ValueError:  # no parallel launch happened yet inside the body
                return
            _serialise = layer == "workqueue"
