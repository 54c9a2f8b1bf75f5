"""One SwiGLU expert for one token (T == 1, decode) in a single kernel call.

Shape key: D model dim, F expert hidden dim, C chunks (threads).

    xa, ya   addresses of the token x [D] and the output y [D] (contiguous, both
             float32, or both bf16 bit patterns when bf16 is True)
    w13  [2F, D] (gate rows, then up rows)     w2   [D, F]
    bf16: uint16 bits; int8: q + per-row scale; int4 (group 128): packed bytes, the same
    bytes viewed as int32 words, group scales (int4_gemv.py)

A small expert streams in tens of microseconds, so the per-call cost of separate
matmul launches, Python glue and intermediate copies is a large share of it. Here one
call does everything in two parallel regions of one compiled function:

    phase 1, chunk c of C owns hidden units [f_lo, f_hi):
        gate, up = w13[f_lo:f_hi] @ x, w13[F+f_lo:F+f_hi] @ x      (whole rows)
        h[f_lo:f_hi] = silu(gate) * up
    phase 2, chunk c of C owns output rows [d_lo, d_hi):
        y[d_lo:d_hi] = w2[d_lo:d_hi] @ h                             (whole rows)

Both phases read whole rows, so every thread streams long contiguous runs of memory.
An earlier one-phase form split w2 by columns instead (each chunk finished on its own
hidden units, no barrier): it saved one pool launch (~2 us with the OpenMP layer) but
left each thread reading half of every w2 row, a strided stream the hardware prefetcher
follows badly. On DeepSeek-V2-Lite int8 (w2 rows of 1408 bytes) the two-phase form
streams ~18% faster on the 2-core test VM; on Mixtral-sized experts the two are alike.

Each format has two entry points: ``decode_<fmt>`` runs on the calling thread (C = 1,
no pool launch) and ``decode_<fmt>_pool`` runs nch chunks per phase (nch = 0: one per
thread of the caller's numba setting; -n: a cap of n threads for this call, see
_threads_enter). int8 and int4 have
a second pair, ``decode_<fmt>_madd[_pool]``, which rounds the token and the hidden vector
to 16-bit fixed point and multiplies by integer multiply-add (gemv_madd.py,
int4_madd.py); expert_ffn uses them where numba_util.REG_GEMV holds (AVX2-only and
Zen 4 cores), where the fp32 kernels are compute-bound below the DRAM rate. int4 has
a third pair, ``decode_int4_dot8[_pool]``, against the token and the hidden vector
rounded to 8 bits per group (int4_dot8.py), which expert_ffn takes on Zen 4 (AVX-512
VNNI). Every GEMV of a format goes through one call site per phase, because every
distinct compiled copy of the GEMV loops costs seconds of compile time on first use
(numba re-optimises callees per caller).

Why addresses, and the thread cap inside: a decode step streams far more weight bytes
than the last-level cache holds, so the Python and torch code between two expert calls
runs from cold caches, where one torch attribute read or view costs 5-25 us instead of
0.3 us. Handing the kernel two integers rather than numpy views made per call (two
torch calls and a numpy array each) saves ~15 us per call of a DeepSeek-V2-Lite-sized
int8 expert (~350 us) on the 2-core test VM. The caller (expert_ffn._decode) checks dtype,
device, shape and contiguity before it passes an address.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic
from numba.np.ufunc.parallel import _launch_threads

from .gemv import gemv_bf16, gemv_int8
from .gemv_madd import gemv_int8_madd, quantize_x16
from .int4_gemv import GROUP as INT4_GROUP
from .int4_gemv import gemv_int4, permute_x
from .int4_dot8 import GROUP as DOT8_GROUP
from .int4_dot8 import LANES as DOT8_LANES
from .int4_dot8 import gemv_int4_dot8, quantize_x8
from .int4_madd import gemv_int4_madd, permute_x16
from .numba_util import njit_kernel
from .tiles import bf16_to_f32, f32_to_bf16

__all__ = ["decode_bf16", "decode_int8", "decode_int4", "decode_bf16_pool", "decode_int8_pool",
           "decode_int4_pool", "decode_int8_madd", "decode_int8_madd_pool", "decode_int4_madd", "decode_int4_madd_pool",
           "decode_int4_dot8", "decode_int4_dot8_pool"]

# Rows per split unit: the GEMVs stream four rows side by side (gemv._step4), so
# chunks of whole 4-row blocks keep every thread on its fast path.
ROWS = 4


def _raw_pointer(elem):
    """An intrinsic turning an integer address into a numba pointer to ``elem``."""
    def impl(typingctx, addr):
        if not isinstance(addr, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(elem).as_pointer())

        return types.CPointer(elem)(addr), codegen
    return intrinsic(impl)


_f32_at = _raw_pointer(types.float32)
_u16_at = _raw_pointer(types.uint16)


@njit_kernel(parallel=False)
def _load_x(xa, bf16, D):
    """The token at address xa (D float32 values, or D bf16 bit patterns) as float32 [D]."""
    if not bf16:
        return numba.carray(_f32_at(xa), (D,)).copy()
    b_D = numba.carray(_u16_at(xa), (D,))
    xf_D = np.empty(D, np.float32)
    for d in range(D):
        xf_D[d] = bf16_to_f32(b_D[d])
    return xf_D


@njit_kernel(parallel=False)
def _store_y(y_D, ya, bf16):
    """y_D to address ya, as float32 or (bf16) as bf16 bit patterns."""
    D = y_D.shape[0]
    if not bf16:
        numba.carray(_f32_at(ya), (D,))[:] = y_D
        return
    b_D = numba.carray(_u16_at(ya), (D,))
    for d in range(D):
        b_D[d] = f32_to_bf16(y_D[d])


@njit_kernel(parallel=False)
def _split(n, nch, c):
    """Rows [lo, hi) of chunk c of nch over n rows: whole ROWS blocks, spread evenly."""
    units = (n + ROWS - 1) // ROWS
    return min(n, (c * units // nch) * ROWS), min(n, ((c + 1) * units // nch) * ROWS)


@njit_kernel(parallel=False)
def _swiglu(gu_2F, h_F, F, lo, hi):
    """h_F[lo:hi] = silu(gate) * up for hidden units lo:hi."""
    for f in range(lo, hi):
        g = gu_2F[f]
        h_F[f] = g / (np.float32(1.0) + np.exp(-g)) * gu_2F[F + f]


# Two parallel regions with the same trip count and nothing between them are candidates
# for numba's parfor fusion, which would drop the barrier phase 2 needs (it reads all of
# h). Phase 2 therefore counts its chunks in a variable of its own (_chunks2).
@njit_kernel(parallel=False)
def _chunks2(nch, D):
    return max(1, min(nch, D // ROWS))


# The thread count of a pool kernel, settled inside the compiled code: from Python,
# numba.get_num_threads() and a set/restore around the call cost ~1-3 us per call
# with warm caches and several times that from the cold caches a decode step leaves
# (see "Why addresses" above). numba.get/set_num_threads inside compiled code call the
# threading layer through ctypes pointers, which numba cannot cache, so these call the
# layer's C functions by the symbol names numba's own parallel loops use. Those symbols
# exist once numba has loaded its threading layer: numba loads it before lowering a
# parallel function or loading one from its cache, and the typing below loads it too (as
# numba's own intrinsic for the thread count does). The two helpers are inlined into the
# pool kernels, so their code is only ever linked inside a parallel function. (Loading
# the layer at import instead started the pool in every process that imports this
# module, and a spawned process holding a started pool sometimes aborted at exit.)
@intrinsic
def _get_threads(typingctx):
    """The calling thread's numba thread count (C: int get_num_threads(void))."""
    _launch_threads()

    def codegen(context, builder, signature, args):
        # Declared as numba's parallel loops declare it (returning intp): one module may
        # hold both. The C function returns an int, so only the low 32 bits are read.
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []), "get_num_threads")
        return builder.sext(builder.trunc(builder.call(fn, []), ir.IntType(32)), ir.IntType(64))
    return types.int64(), codegen


@intrinsic
def _set_threads(typingctx, n):
    """Set the calling thread's numba thread count (C: void set_num_threads(int))."""
    if not isinstance(n, types.Integer):
        return None
    _launch_threads()

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(32)]),
                                            "set_num_threads")
        builder.call(fn, [builder.trunc(context.cast(builder, args[0], signature.args[0], types.int64),
                                        ir.IntType(32))])
        return context.get_dummy_value()
    return types.none(n), codegen


@numba.njit(inline="always", nogil=True)
def _threads_enter(nch):
    """(chunks, thread count to restore after the call or 0) for a pool kernel's nch:
    > 0 that many chunks on the current threads; 0 one chunk per current thread; < 0 a
    cap of -nch threads for this call (one chunk each), set here and restored by
    _threads_leave. Callers check a cap against NUMBA_NUM_THREADS first."""
    if nch > 0:
        return nch, 0
    cur = _get_threads()
    if nch == 0 or -nch == cur:
        return cur, 0
    _set_threads(-nch)
    return -nch, cur


@numba.njit(inline="always", nogil=True)
def _threads_leave(prev):
    if prev > 0:
        _set_threads(prev)


# ---------------------------------------------------------------- bf16

@njit_kernel(parallel=False)
def _up_bf16(c, nch, x_D, w13, gu_2F, h_F):
    F = h_F.shape[0]
    lo, hi = _split(F, nch, c)
    for part in range(2):  # gate rows, then up rows
        gemv_bf16(x_D, w13, gu_2F, part * F + lo, part * F + hi, 0, x_D.shape[0])
    _swiglu(gu_2F, h_F, F, lo, hi)


@njit_kernel(parallel=False)
def _down_bf16(c, nch, h_F, w2, y_D):
    lo, hi = _split(y_D.shape[0], nch, c)
    gemv_bf16(h_F, w2, y_D, lo, hi, 0, h_F.shape[0])


@njit_kernel(parallel=False)
def decode_bf16(xa, ya, bf16, w13, w2):
    """y = expert(x) with bf16 weights (uint16 bits) w13 [2F, D], w2 [D, F]; calling thread."""
    D, F = w2.shape
    h_F = np.empty(F, np.float32)
    y_D = np.empty(D, np.float32)
    _up_bf16(0, 1, _load_x(xa, bf16, D), w13, np.empty(2 * F, np.float32), h_F)
    _down_bf16(0, 1, h_F, w2, y_D)
    _store_y(y_D, ya, bf16)


@njit_kernel()
def decode_bf16_pool(xa, ya, bf16, w13, w2, nch):
    """decode_bf16 in two phases of nch chunks on the thread pool."""
    nch, prev = _threads_enter(nch)
    D, F = w2.shape
    x_D = _load_x(xa, bf16, D)
    gu_2F = np.empty(2 * F, np.float32)
    h_F = np.empty(F, np.float32)
    y_D = np.empty(D, np.float32)
    for c in prange(nch):
        _up_bf16(c, nch, x_D, w13, gu_2F, h_F)
    n2 = _chunks2(nch, D)
    for c in prange(n2):
        _down_bf16(c, n2, h_F, w2, y_D)
    _threads_leave(prev)
    _store_y(y_D, ya, bf16)


# ---------------------------------------------------------------- int8

@njit_kernel(parallel=False)
def _up_int8(c, nch, x_D, q13, s13, gu_2F, h_F):
    F = h_F.shape[0]
    lo, hi = _split(F, nch, c)
    for part in range(2):  # gate rows, then up rows
        gemv_int8(x_D, q13, s13, gu_2F, part * F + lo, part * F + hi, 0, x_D.shape[0])
    _swiglu(gu_2F, h_F, F, lo, hi)


@njit_kernel(parallel=False)
def _down_int8(c, nch, h_F, q2, s2, y_D):
    lo, hi = _split(y_D.shape[0], nch, c)
    gemv_int8(h_F, q2, s2, y_D, lo, hi, 0, h_F.shape[0])


@njit_kernel(parallel=False)
def decode_int8(xa, ya, bf16, q13, s13, q2, s2):
    """y = expert(x) with int8 weights q13 [2F, D], s13 [2F], q2 [D, F], s2 [D]; calling thread."""
    D, F = q2.shape
    h_F = np.empty(F, np.float32)
    y_D = np.empty(D, np.float32)
    _up_int8(0, 1, _load_x(xa, bf16, D), q13, s13, np.empty(2 * F, np.float32), h_F)
    _down_int8(0, 1, h_F, q2, s2, y_D)
    _store_y(y_D, ya, bf16)


@njit_kernel()
def decode_int8_pool(xa, ya, bf16, q13, s13, q2, s2, nch):
    """decode_int8 in two phases of nch chunks on the thread pool."""
    nch, prev = _threads_enter(nch)
    D, F = q2.shape
    x_D = _load_x(xa, bf16, D)
    gu_2F = np.empty(2 * F, np.float32)
    h_F = np.empty(F, np.float32)
    y_D = np.empty(D, np.float32)
    for c in prange(nch):
        _up_int8(c, nch, x_D, q13, s13, gu_2F, h_F)
    n2 = _chunks2(nch, D)
    for c in prange(n2):
        _down_int8(c, n2, h_F, q2, s2, y_D)
    _threads_leave(prev)
    _store_y(y_D, ya, bf16)


# ------------------------------------------------- int8 by 16-bit multiply-add
# gemv_madd.py: the token (phase 1) and the hidden vector (phase 2) rounded to 16-bit
# fixed point, int8 x int16 products summed exactly. xs < 0 marks a vector holding inf
# or NaN, which takes the fp32 path above so that bad values propagate.

@njit_kernel(parallel=False)
def _x16(v_N):
    """v_N rounded to 16-bit fixed point (gemv_madd.quantize_x16): (values, scale < 0: none)."""
    v16_N = np.empty(v_N.shape[0], np.int16)
    return v16_N, quantize_x16(v_N, v16_N)


@njit_kernel(parallel=False)
def _up_int8_madd(c, nch, x_D, x16_D, xs, q13, s13, gu_2F, h_F):
    if xs < 0:
        _up_int8(c, nch, x_D, q13, s13, gu_2F, h_F)
        return
    F = h_F.shape[0]
    lo, hi = _split(F, nch, c)
    for part in range(2):  # gate rows, then up rows
        gemv_int8_madd(x16_D, xs, q13, s13, gu_2F, part * F + lo, part * F + hi)
    _swiglu(gu_2F, h_F, F, lo, hi)


@njit_kernel(parallel=False)
def _down_int8_madd(c, nch, h_F, h16_F, hs, q2, s2, y_D):
    if hs < 0:
        _down_int8(c, nch, h_F, q2, s2, y_D)
        return
    lo, hi = _split(y_D.shape[0], nch, c)
    gemv_int8_madd(h16_F, hs, q2, s2, y_D, lo, hi)


@njit_kernel(parallel=False)
def decode_int8_madd(xa, ya, bf16, q13, s13, q2, s2):
    """decode_int8 by 16-bit multiply-add (gemv_madd.py); calling thread."""
    D, F = q2.shape
    x_D = _load_x(xa, bf16, D)
    x16_D, xs = _x16(x_D)
    h_F = np.empty(F, np.float32)
    y_D = np.empty(D, np.float32)
    _up_int8_madd(0, 1, x_D, x16_D, xs, q13, s13, np.empty(2 * F, np.float32), h_F)
    h16_F, hs = _x16(h_F)
    _down_int8_madd(0, 1, h_F, h16_F, hs, q2, s2, y_D)
    _store_y(y_D, ya, bf16)


@njit_kernel()
def decode_int8_madd_pool(xa, ya, bf16, q13, s13, q2, s2, nch):
    """decode_int8_madd in two phases of nch chunks on the thread pool (h is rounded to
    16 bits between them, on the calling thread: F values, ~1 us)."""
    nch, prev = _threads_enter(nch)
    D, F = q2.shape
    x_D = _load_x(xa, bf16, D)
    x16_D, xs = _x16(x_D)
    gu_2F = np.empty(2 * F, np.float32)
    h_F = np.empty(F, np.float32)
    y_D = np.empty(D, np.float32)
    for c in prange(nch):
        _up_int8_madd(c, nch, x_D, x16_D, xs, q13, s13, gu_2F, h_F)
    h16_F, hs = _x16(h_F)
    n2 = _chunks2(nch, D)
    for c in prange(n2):
        _down_int8_madd(c, n2, h_F, h16_F, hs, q2, s2, y_D)
    _threads_leave(prev)
    _store_y(y_D, ya, bf16)


# ---------------------------------------------------------------- int4

@njit_kernel(parallel=False)
def _up_int4(c, nch, x_D, xp_D, xsum_G, p13, w13, s13, gu_2F, h_F):
    F = h_F.shape[0]
    lo, hi = _split(F, nch, c)
    for part in range(2):  # gate rows, then up rows
        gemv_int4(xp_D, x_D, xsum_G, p13, w13, s13, gu_2F, part * F + lo, part * F + hi, 0)
    _swiglu(gu_2F, h_F, F, lo, hi)


@njit_kernel(parallel=False)
def _down_int4(c, nch, h_F, hp_F, hsum_G, p2, w2, s2, y_D):
    lo, hi = _split(y_D.shape[0], nch, c)
    gemv_int4(hp_F, h_F, hsum_G, p2, w2, s2, y_D, lo, hi, 0)


@njit_kernel(parallel=False)
def _int4_scratch(x_D, s13, s2, F):
    """Permuted token and its group sums (int4_gemv.permute_x), and the hidden buffers."""
    xp_D = np.empty_like(x_D)
    xsum_G = np.empty(s13.shape[1], np.float32)
    permute_x(x_D, INT4_GROUP, xp_D, xsum_G)
    return (xp_D, xsum_G, np.empty(2 * F, np.float32), np.empty(F, np.float32),
            np.empty(F, np.float32), np.empty(s2.shape[1], np.float32))


@njit_kernel(parallel=False)
def decode_int4(xa, ya, bf16, p13, w13, s13, p2, w2, s2):
    """y = expert(x) with int4 weights, group 128: packed p13 [2F, P13] and its int32 view
    w13, scales s13 [2F, G13]; p2 [D, P2], w2, s2 [D, G2] (int4_gemv.py); calling thread."""
    D = p2.shape[0]
    F = p13.shape[0] // 2
    x_D = _load_x(xa, bf16, D)
    xp_D, xsum_G, gu_2F, h_F, hp_F, hsum_G = _int4_scratch(x_D, s13, s2, F)
    y_D = np.empty(D, np.float32)
    _up_int4(0, 1, x_D, xp_D, xsum_G, p13, w13, s13, gu_2F, h_F)
    permute_x(h_F, INT4_GROUP, hp_F, hsum_G)
    _down_int4(0, 1, h_F, hp_F, hsum_G, p2, w2, s2, y_D)
    _store_y(y_D, ya, bf16)


@njit_kernel()
def decode_int4_pool(xa, ya, bf16, p13, w13, s13, p2, w2, s2, nch):
    """decode_int4 in two phases of nch chunks on the thread pool (h is permuted for
    the w2 GEMV between them, on the calling thread: F values, ~1 us)."""
    nch, prev = _threads_enter(nch)
    D = p2.shape[0]
    F = p13.shape[0] // 2
    x_D = _load_x(xa, bf16, D)
    xp_D, xsum_G, gu_2F, h_F, hp_F, hsum_G = _int4_scratch(x_D, s13, s2, F)
    y_D = np.empty(D, np.float32)
    for c in prange(nch):
        _up_int4(c, nch, x_D, xp_D, xsum_G, p13, w13, s13, gu_2F, h_F)
    permute_x(h_F, INT4_GROUP, hp_F, hsum_G)
    n2 = _chunks2(nch, D)
    for c in prange(n2):
        _down_int4(c, n2, h_F, hp_F, hsum_G, p2, w2, s2, y_D)
    _threads_leave(prev)
    _store_y(y_D, ya, bf16)


# ------------------------------------------------- int4 by 16-bit multiply-add
# int4_madd.py; as for int8, xs < 0 (inf or NaN) takes the fp32 path above.

@njit_kernel(parallel=False)
def _xq_for_int4(v_N):
    """The 16-bit form of v_N permuted for int4_madd (permute_x16), and its scale (< 0: none)."""
    v16_N, vs = _x16(v_N)
    if vs < 0:
        return v16_N, vs
    vq_N = np.empty_like(v16_N)
    permute_x16(v16_N, vq_N)
    return vq_N, vs


@njit_kernel(parallel=False)
def _hidden_int4_madd(h_F, hp_F, hsum_G):
    """Between the phases: h's fp32 permuted form and group sums (the fp32 path and the
    tail group) and its 16-bit permuted form with scale."""
    permute_x(h_F, INT4_GROUP, hp_F, hsum_G)
    return _xq_for_int4(h_F)


@njit_kernel(parallel=False)
def _up_int4_madd(c, nch, x_D, xp_D, xq_D, xs, xsum_G, p13, w13, s13, gu_2F, h_F):
    if xs < 0:
        _up_int4(c, nch, x_D, xp_D, xsum_G, p13, w13, s13, gu_2F, h_F)
        return
    F = h_F.shape[0]
    lo, hi = _split(F, nch, c)
    for part in range(2):  # gate rows, then up rows
        gemv_int4_madd(xq_D, xs, x_D, xsum_G, p13, w13, s13, gu_2F, part * F + lo, part * F + hi)
    _swiglu(gu_2F, h_F, F, lo, hi)


@njit_kernel(parallel=False)
def _down_int4_madd(c, nch, h_F, hp_F, hq_F, hs, hsum_G, p2, w2, s2, y_D):
    if hs < 0:
        _down_int4(c, nch, h_F, hp_F, hsum_G, p2, w2, s2, y_D)
        return
    lo, hi = _split(y_D.shape[0], nch, c)
    gemv_int4_madd(hq_F, hs, h_F, hsum_G, p2, w2, s2, y_D, lo, hi)


@njit_kernel(parallel=False)
def decode_int4_madd(xa, ya, bf16, p13, w13, s13, p2, w2, s2):
    """decode_int4 by 16-bit multiply-add (int4_madd.py); calling thread."""
    D = p2.shape[0]
    F = p13.shape[0] // 2
    x_D = _load_x(xa, bf16, D)
    xp_D, xsum_G, gu_2F, h_F, hp_F, hsum_G = _int4_scratch(x_D, s13, s2, F)
    xq_D, xs = _xq_for_int4(x_D)
    y_D = np.empty(D, np.float32)
    _up_int4_madd(0, 1, x_D, xp_D, xq_D, xs, xsum_G, p13, w13, s13, gu_2F, h_F)
    hq_F, hs = _hidden_int4_madd(h_F, hp_F, hsum_G)
    _down_int4_madd(0, 1, h_F, hp_F, hq_F, hs, hsum_G, p2, w2, s2, y_D)
    _store_y(y_D, ya, bf16)


@njit_kernel()
def decode_int4_madd_pool(xa, ya, bf16, p13, w13, s13, p2, w2, s2, nch):
    """decode_int4_madd in two phases of nch chunks on the thread pool."""
    nch, prev = _threads_enter(nch)
    D = p2.shape[0]
    F = p13.shape[0] // 2
    x_D = _load_x(xa, bf16, D)
    xp_D, xsum_G, gu_2F, h_F, hp_F, hsum_G = _int4_scratch(x_D, s13, s2, F)
    xq_D, xs = _xq_for_int4(x_D)
    y_D = np.empty(D, np.float32)
    for c in prange(nch):
        _up_int4_madd(c, nch, x_D, xp_D, xq_D, xs, xsum_G, p13, w13, s13, gu_2F, h_F)
    hq_F, hs = _hidden_int4_madd(h_F, hp_F, hsum_G)
    n2 = _chunks2(nch, D)
    for c in prange(n2):
        _down_int4_madd(c, n2, h_F, hp_F, hq_F, hs, hsum_G, p2, w2, s2, y_D)
    _threads_leave(prev)
    _store_y(y_D, ya, bf16)


# ------------------------------------------ int4 against an 8-bit token (VNNI)
# int4_dot8.py: the token (phase 1) and the hidden vector (phase 2) rounded to 8 bits
# per group of 128; a vector holding inf or NaN takes the fp32 path above.

@njit_kernel(parallel=False)
def _x8_for_int4(v_N):
    """v_N's 8-bit form per group (int4_dot8.quantize_x8): (x8, ts, corr, usable)."""
    G = v_N.shape[0] // DOT8_GROUP
    x8_N = np.zeros(v_N.shape[0], np.int8)
    ts_G = np.empty(G, np.float32)
    corr_GL = np.empty((G, DOT8_LANES), np.int32)
    return x8_N, ts_G, corr_GL, quantize_x8(v_N, x8_N, ts_G, corr_GL)


@njit_kernel(parallel=False)
def _up_int4_dot8(c, nch, x_D, xp_D, x8_D, ts_D, corr_D, ok, xsum_G, p13, w13, s13, gu_2F, h_F):
    if not ok:
        _up_int4(c, nch, x_D, xp_D, xsum_G, p13, w13, s13, gu_2F, h_F)
        return
    F = h_F.shape[0]
    lo, hi = _split(F, nch, c)
    for part in range(2):  # gate rows, then up rows
        gemv_int4_dot8(x8_D, ts_D, corr_D, x_D, xsum_G, p13, w13, s13, gu_2F, part * F + lo, part * F + hi)
    _swiglu(gu_2F, h_F, F, lo, hi)


@njit_kernel(parallel=False)
def _down_int4_dot8(c, nch, h_F, hp_F, h8_F, ts_F, corr_F, ok, hsum_G, p2, w2, s2, y_D):
    if not ok:
        _down_int4(c, nch, h_F, hp_F, hsum_G, p2, w2, s2, y_D)
        return
    lo, hi = _split(y_D.shape[0], nch, c)
    gemv_int4_dot8(h8_F, ts_F, corr_F, h_F, hsum_G, p2, w2, s2, y_D, lo, hi)


@njit_kernel(parallel=False)
def _hidden_int4_dot8(h_F, hp_F, hsum_G):
    """Between the phases: h's fp32 permuted form and group sums (the fp32 path and the
    tail group) and its 8-bit form."""
    permute_x(h_F, INT4_GROUP, hp_F, hsum_G)
    return _x8_for_int4(h_F)


@njit_kernel(parallel=False)
def decode_int4_dot8(xa, ya, bf16, p13, w13, s13, p2, w2, s2):
    """decode_int4 against the 8-bit token (int4_dot8.py); calling thread."""
    D = p2.shape[0]
    F = p13.shape[0] // 2
    x_D = _load_x(xa, bf16, D)
    xp_D, xsum_G, gu_2F, h_F, hp_F, hsum_G = _int4_scratch(x_D, s13, s2, F)
    x8_D, ts_D, corr_D, ok = _x8_for_int4(x_D)
    y_D = np.empty(D, np.float32)
    _up_int4_dot8(0, 1, x_D, xp_D, x8_D, ts_D, corr_D, ok, xsum_G, p13, w13, s13, gu_2F, h_F)
    h8_F, ts_F, corr_F, hok = _hidden_int4_dot8(h_F, hp_F, hsum_G)
    _down_int4_dot8(0, 1, h_F, hp_F, h8_F, ts_F, corr_F, hok, hsum_G, p2, w2, s2, y_D)
    _store_y(y_D, ya, bf16)


@njit_kernel()
def decode_int4_dot8_pool(xa, ya, bf16, p13, w13, s13, p2, w2, s2, nch):
    """decode_int4_dot8 in two phases of nch chunks on the thread pool."""
    nch, prev = _threads_enter(nch)
    D = p2.shape[0]
    F = p13.shape[0] // 2
    x_D = _load_x(xa, bf16, D)
    xp_D, xsum_G, gu_2F, h_F, hp_F, hsum_G = _int4_scratch(x_D, s13, s2, F)
    x8_D, ts_D, corr_D, ok = _x8_for_int4(x_D)
    y_D = np.empty(D, np.float32)
    for c in prange(nch):
        _up_int4_dot8(c, nch, x_D, xp_D, x8_D, ts_D, corr_D, ok, xsum_G, p13, w13, s13, gu_2F, h_F)
    h8_F, ts_F, corr_F, hok = _hidden_int4_dot8(h_F, hp_F, hsum_G)
    n2 = _chunks2(nch, D)
    for c in prange(n2):
        _down_int4_dot8(c, n2, h_F, hp_F, h8_F, ts_F, corr_F, hok, hsum_G, p2, w2, s2, y_D)
    _threads_leave(prev)
    _store_y(y_D, ya, bf16)
