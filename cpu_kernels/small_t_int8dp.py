"""Small-batch (2 <= T <= SMALL_T) matmul for int8 weights by 16-bit integer dot
products (vpdpwssd, AVX-512 VNNI): out_TR = x_TK @ (q_RK * scale_R[:, None]).T with
each token rounded to 16-bit fixed point as at T == 1 (gemv_madd.quantize_x16).

Shape key: T tokens, K input columns, R weight rows, G tokens per group (4, 2 or 1),
L = 16 int32 lanes.

Why: small_t.py widens each weight to fp32 and spends one FMA per weight and token,
keeping each token's partial sums in L1; on Zen 4 that loop runs at the core's FMA rate
and at T = 16 int8 measured 0.85-0.92x torch. Here 32 weights are sign-extended to
16 bits once per token group, and one vpdpwssd multiplies them by 32 token values and
adds pairs into 16 int32 lanes; the lanes of 4 tokens x 4 rows stay in registers over
a block of columns (`_block`), as in small_t_bf16dp.py.

Numerics: those of the T == 1 path on the same hosts (gemv_madd.py): the token is
x16 * xs with xs a power of two (|x16| <= 32767), products are summed exactly in int32
over blocks of BLOCK columns and the blocks in float64, so a token's output does not
depend on the batch it came in. A token holding inf or NaN has no fixed-point form: the
whole call then takes small_t.py's fp32 loop, so bad values propagate.

Without AVX-512 VNNI/BW the same sums are written as generic vector IR (correct,
slower); expert_ffn selects this path only where INT8DP_SMALL_T holds.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from .gemv import STEP
from .gemv_madd import BLOCK, quantize_x16
from .ir_loop import counted_loop
from .numba_util import AVX512VNNI, REG_GEMV, njit_kernel
from .small_t import rows_small_int8
from .tiles import prefetch_ir

__all__ = ["INT8DP_SMALL_T", "MIN_T", "matmul_small_int8dp", "rows_small_int8dp"]

_LANES = 16
_ROWS = 4
_PF_BYTES = 4096  # the first token group's prefetch distance, as small_t_bf16dp.py
# Where expert_ffn takes this path: Zen 4 (numba_util.REG_GEMV on an AVX-512 core)
# with AVX-512 VNNI, where it was measured, from MIN_T tokens; small_t.py's fp32 loop
# elsewhere. Cold DeepSeek-V2-Lite int8 experts through expert_ffn, against the fp32
# loop: T=2 0.87x, T=4 0.95x (bound by the weight stream, which the fp32 loop's
# prefetch serves better), T=8 1.02x, T=16 1.29x; Mixtral T=16 1.66x.
INT8DP_SMALL_T = REG_GEMV and AVX512VNNI
MIN_T = 8


def _dot_pairs16(b: ir.IRBuilder, acc: ir.Value, w: ir.Value, x: ir.Value) -> ir.Value:
    """acc (16 x i32) + lane sums w[2i] * x[2i] + w[2i+1] * x[2i+1] of two vectors of 32
    int16: one vpdpwssd with AVX-512 VNNI, the same sums as generic vector IR elsewhere."""
    v16i, v32s = ir.VectorType(ir.IntType(32), _LANES), ir.VectorType(ir.IntType(16), 2 * _LANES)
    if AVX512VNNI:
        fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(v16i, [v16i, v16i, v16i]),
                                            "llvm.x86.avx512.vpdpwssd.512")
        return b.call(fn, [acc, b.bitcast(w, v16i), b.bitcast(x, v16i)])
    v32i = ir.VectorType(ir.IntType(32), 2 * _LANES)
    prod = b.mul(b.sext(w, v32i), b.sext(x, v32i))
    undef = ir.Constant(v32i, ir.Undefined)
    even = b.shuffle_vector(prod, undef, ir.Constant(v16i, list(range(0, 2 * _LANES, 2))))
    odd = b.shuffle_vector(prod, undef, ir.Constant(v16i, list(range(1, 2 * _LANES, 2))))
    return b.add(acc, b.add(even, odd))


def _make_block(G: int):
    """The register-blocked kernel for groups of G tokens (a compile-time constant)."""

    @intrinsic
    def block(typingctx, q_flat, wi, S, x16_flat, xi, steps, pf, out):
        """out[4g + j] = sum over k < 64 steps of q_flat[wi + jS + k] * x16_flat[xi + gS + k]
        for g < G tokens, j < 4 rows (both with row stride S), exactly, as int64 (callers
        keep 64 steps <= BLOCK). The 4 x G lane sets stay in registers. Each step
        prefetches its rows' line pf bytes ahead (0: the line it reads)."""
        if not (isinstance(q_flat, types.Array) and q_flat.dtype == types.int8
                and isinstance(x16_flat, types.Array) and x16_flat.dtype == types.int16
                and isinstance(out, types.Array) and out.dtype == types.int64):
            return None
        sig = types.none(q_flat, wi, S, x16_flat, xi, steps, pf, out)

        def codegen(context, builder, signature, args):
            i16, i32, i64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
            v16i, v32s, v32b = ir.VectorType(i32, _LANES), ir.VectorType(i16, 2 * _LANES), \
                ir.VectorType(ir.IntType(8), 2 * _LANES)
            intp = context.get_value_type(types.intp)

            def data(k):
                return context.make_array(signature.args[k])(context, builder, args[k]).data

            def idx(k):
                return context.cast(builder, args[k], signature.args[k], types.intp)

            qdata, xdata, odata = data(0), data(3), data(7)
            wbase, stride, xbase, count, ahead = idx(1), idx(2), idx(4), idx(5), idx(6)

            def load(b, ptr, index, ty, align):
                return b.load(b.bitcast(b.gep(ptr, [index]), ty.as_pointer()), align=align)

            def step(b, s, accs):
                off = b.mul(s, ir.Constant(intp, STEP))
                accs = list(accs)
                rows = [b.add(b.add(wbase, b.mul(stride, ir.Constant(intp, j))), off) for j in range(_ROWS)]
                for j in range(_ROWS):  # one 64-byte line per row and step
                    prefetch_ir(b, b.gep(qdata, [b.add(rows[j], ahead)]), 3)
                ws = [[b.sext(load(b, qdata, b.add(rows[j], ir.Constant(intp, 2 * _LANES * v)), v32b, 1), v32s)
                       for v in range(2)] for j in range(_ROWS)]
                for g in range(G):
                    xrow = b.add(b.add(xbase, b.mul(stride, ir.Constant(intp, g))), off)
                    xs = [load(b, xdata, b.add(xrow, ir.Constant(intp, 2 * _LANES * v)), v32s, 2) for v in range(2)]
                    for j in range(_ROWS):
                        for v in range(2):
                            accs[_ROWS * g + j] = _dot_pairs16(b, accs[_ROWS * g + j], ws[j][v], xs[v])
                return accs

            zero = ir.Constant(v16i, [0] * _LANES)
            accs = counted_loop(builder, count, [zero] * (_ROWS * G), step)
            for k, acc in enumerate(accs):
                tot = ir.Constant(i64, 0)
                for lane in range(_LANES):
                    tot = builder.add(tot, builder.sext(builder.extract_element(acc, ir.Constant(i32, lane)), i64))
                builder.store(tot, builder.gep(odata, [ir.Constant(intp, k)]))
            return context.get_dummy_value()

        return sig, codegen

    return block


_block4, _block2, _block1 = _make_block(4), _make_block(2), _make_block(1)


@njit_kernel(parallel=False)
def _dot_exact(q_K, x16_K, k0, k1):
    """q_K[k0:k1] . x16_K[k0:k1] exactly, as int64 (column tails and the last rows)."""
    a = np.int64(0)
    for k in range(k0, k1):
        a += np.int64(q_K[k]) * np.int64(x16_K[k])
    return a


@njit_kernel(parallel=False)
def rows_small_int8dp(x16_TK, xs_T, q_RK, scale_R, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR = (x16_TK * xs_T[:, None]) @ (q_RK * scale_R[:, None]).T
    (x16_TK int16 and q_RK int8, C-contiguous, the same row length K)."""
    T, K = x16_TK.shape
    flat = q_RK.ravel()
    x_flat = x16_TK.ravel()
    o = np.empty(4 * _ROWS, np.int64)
    tot = np.empty(4 * _ROWS, np.float64)
    r = r_lo
    while r + _ROWS <= r_hi:
        t0 = 0
        while t0 < T:
            g = 4 if T - t0 >= 4 else (2 if T - t0 >= 2 else 1)
            tot[:] = 0.0
            for b0 in range(0, K, BLOCK):
                b1 = min(K, b0 + BLOCK)
                steps = (b1 - b0) // STEP
                # The first group streams the rows from memory (prefetched ahead);
                # later groups find them in L1/L2.
                ahead = _PF_BYTES if t0 == 0 else 0
                if g == 4:
                    _block4(flat, r * K + b0, K, x_flat, t0 * K + b0, steps, ahead, o)
                elif g == 2:
                    _block2(flat, r * K + b0, K, x_flat, t0 * K + b0, steps, ahead, o)
                else:
                    _block1(flat, r * K + b0, K, x_flat, t0 * K + b0, steps, ahead, o)
                k0 = b0 + steps * STEP
                for t in range(g):
                    for j in range(_ROWS):
                        d = o[_ROWS * t + j]
                        if k0 < b1:
                            d += _dot_exact(q_RK[r + j], x16_TK[t0 + t], k0, b1)
                        tot[_ROWS * t + j] += float(d)
            for t in range(g):
                for j in range(_ROWS):
                    out_TR[t0 + t, r + j] = np.float32(tot[_ROWS * t + j] * xs_T[t0 + t] * scale_R[r + j])
            t0 += g
        r += _ROWS
    for r in range(r, r_hi):
        for t in range(T):
            acc = 0.0
            for b0 in range(0, K, BLOCK):
                acc += float(_dot_exact(q_RK[r], x16_TK[t], b0, min(K, b0 + BLOCK)))
            out_TR[t, r] = np.float32(acc * xs_T[t] * scale_R[r])


@njit_kernel(parallel=False)
def _tokens16(x_TK):
    """Each token row rounded to 16-bit fixed point (quantize_x16): (x16, scales, all usable)."""
    T, K = x_TK.shape
    x16_TK = np.empty((T, K), np.int16)
    xs_T = np.empty(T, np.float64)
    ok = True
    for t in range(T):
        xs_T[t] = quantize_x16(x_TK[t], x16_TK[t])
        if xs_T[t] < 0:
            ok = False
    return x16_TK, xs_T, ok


@njit_kernel()
def matmul_small_int8dp(x_TK, q_RK, scale_R, out_TR, nch):
    """out_TR = x_TK @ (q_RK * scale_R[:, None]).T for fp32 tokens x_TK (2 <= T <=
    SMALL_T), in nch chunks of whole 4-row blocks on the thread pool (nch = 1: on the
    calling thread, no launch). A token holding inf or NaN sends the whole call to
    small_t.py's fp32 loop."""
    R = q_RK.shape[0]
    if x_TK.shape[0] == 0 or R == 0:
        return
    x16_TK, xs_T, ok = _tokens16(x_TK)
    if nch == 1:
        if ok:
            rows_small_int8dp(x16_TK, xs_T, q_RK, scale_R, out_TR, 0, R)
        else:
            rows_small_int8(x_TK, q_RK, scale_R, out_TR, 0, R)
        return
    units = (R + _ROWS - 1) // _ROWS
    for c in prange(nch):
        lo = min(R, c * units // nch * _ROWS)
        hi = min(R, (c + 1) * units // nch * _ROWS)
        if ok:
            rows_small_int8dp(x16_TK, xs_T, q_RK, scale_R, out_TR, lo, hi)
        else:
            rows_small_int8(x_TK, q_RK, scale_R, out_TR, lo, hi)
