"""Small-batch (T >= 2) matmul for int4 weights (group 128) by byte dot
products (vpdpbusd, AVX-512 VNNI) against each token rounded to 8 bits per group as at
T == 1 (int4_dot8.py): out_TR[t, r] = sum over groups g of scale[r, g] * ts[t, g] *
(v[r, g] . x8[t, g]) (+ the fp32 tail).

Shape key: T tokens, K input columns, R weight rows, P packed bytes per row, W = P / 4
words per row, Gf full groups of 128 per row, G tokens per group of tokens (4, 2 or 1),
L = 16 int32 lanes.

Why: small_t_int4.py decodes each nibble to fp32 once per 4-row block and then spends
eight fp32 FMAs per token, row and group; on Zen 4 that loop runs at the core's FMA rate
and at T = 16 measured 0.71-0.82x torch's bf16 matmul on dequantised copies. Here the
nibbles of a group stay bytes (one mask for the low ones, a shift and a mask for the
high ones, once per row and group) and each token takes two vpdpbusd (64 products
each), one conversion and one multiply-add with the group's scale product per row:
four vector operations per token, row and group of 128 weights against eight. The
sums of 4 tokens x 4 rows stay in registers over the whole row (`_block`), as in
small_t_bf16dp.py.

Any T >= 2 takes it where expert_ffn selects it, not only small batches, with the
tokens in L2-sized panels (reg_block.py says why).

Per 4-row block and token group the scale products s[r + j, g] * ts[t, g] are formed in
a first pass over the groups, one 16-lane vector per group (8 scalar loads, two
broadcast patterns, one multiply), and read in the main loop as broadcast operands. A
numba loop of 16 scalar products per group, which it replaced, cost ~30% of the block on
rows of 1408 columns (in cache; cold through expert_ffn 1.10x at T=4..64). The lanes
of each token and group start at its corr (-8 times the sums of its bytes,
quantize_x8), so they end at exactly v . x8 (the +8 of the stored nibbles removed) as
at T == 1.

Numerics: those of int4_dot8.py (~1.5% of the output from rounding the token to 8 bits
per group; the int4 weights themselves move it ~16%); per-group products are exact, only
the fp32 sum over groups is ordered differently from T == 1, so a token's output
differs between batch sizes by fp32 rounding only. A token holding inf or NaN in a full
group has no 8-bit form: the whole call then takes small_t_int4.py's fp32 loop, so bad
values propagate. A row's shorter last group, if any, is dotted in fp32 with the
unrounded token (int4_kernels._int4_tail_dot).

Without AVX-512 VNNI the same sums are written as generic vector IR (correct, slower);
expert_ffn selects this path only where INT4DP_SMALL_T holds.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core.extending import intrinsic

from .int4_dot8 import DOT8_DECODE, GROUP, LANES, _byte_dots, gemv_int4_dot8, quantize_x8
from .int4_gemv import permute_x
from .int4_kernels import _int4_tail_dot
from .ir_loop import counted_loop, hsum_f32, load_vec, splat
from .numba_util import njit_kernel
from .reg_block import token_group, token_panel
from .small_t_int4 import _permute, _rows
from .tiles import prefetch_ir

__all__ = ["INT4DP_SMALL_T", "MIN_T", "matmul_small_int4dp", "rows_small_int4dp"]

_ROWS = 4
_W = GROUP // 8  # 32-bit words per group
_PF_BYTES = 8192  # the first token group's prefetch distance, into L2 (reg_block.py)
# Where expert_ffn takes this path: the hosts of int4_dot8.DOT8_DECODE (Zen 4 with
# AVX-512 VNNI), where it was measured, from MIN_T tokens. Cold experts through
# expert_ffn against small_t_int4.py's fp32 loop, two threads: DeepSeek-V2-Lite T=2
# 1.13x, T=4 1.45x, T=8 1.75x, T=16 1.84x; Mixtral T=4 1.60x, T=16 2.03x (with the
# prefetch 4 KiB ahead into L1; 8 KiB into L2 then gave a further 1.2x at Mixtral T=4
# and 1.7x at DeepSeek-V2-Lite T=2). In L2, the two loops at T=16: 2.5x.
INT4DP_SMALL_T = DOT8_DECODE
MIN_T = 2


def _make_block(G: int):
    """An intrinsic block(w_flat, wi, S, x8_flat, xi, K, c_flat, ci, Gf, groups, pf,
    s_flat, si, G, ts_flat, ti, sp_flat, out): for t < G tokens and j < 4 rows,
    out[4t + j] = sum over g < groups of s_flat[si + j G + g] * ts_flat[ti + t Gf + g] *
    (v . x8) over group g, with v the nibbles of the 16 words from w_flat[wi + j S + 16 g]
    less 8, x8 the bytes x8_flat[xi + t K + 128 g ...] and the lanes starting at
    c_flat[ci + (t Gf + g) 16 ...]. Each step prefetches its rows' lines pf bytes ahead
    (0: the lines it reads). sp_flat (16 x groups floats) is scratch for the scale
    products. Callers keep every index in bounds."""

    @intrinsic
    def block(typingctx, w_flat, wi, S, x8_flat, xi, K, c_flat, ci, Gf, groups, pf, s_flat, si, G_, ts_flat, ti,
              sp_flat, out):
        want = ((w_flat, types.int32), (x8_flat, types.int8), (c_flat, types.int32), (s_flat, types.float32),
                (ts_flat, types.float32), (sp_flat, types.float32), (out, types.float32))
        if not all(isinstance(a, types.Array) and a.layout == "C" and a.dtype == d for a, d in want):
            return None
        sig = types.none(w_flat, wi, S, x8_flat, xi, K, c_flat, ci, Gf, groups, pf, s_flat, si, G_, ts_flat, ti,
                         sp_flat, out)

        def codegen(context, builder, signature, args):
            i32, f32 = ir.IntType(32), ir.FloatType()
            v16i, v16f = ir.VectorType(i32, LANES), ir.VectorType(f32, LANES)
            intp = context.get_value_type(types.intp)

            def data(k):
                return context.make_array(signature.args[k])(context, builder, args[k]).data

            def idx(k):
                return context.cast(builder, args[k], signature.args[k], types.intp)

            def const(v):
                return ir.Constant(intp, v)

            wdata, xdata, cdata, odata = data(0), data(3), data(6), data(17)
            scdata, tsdata, sdata = data(11), data(14), data(16)
            wbase, stride, xbase, xstride = idx(1), idx(2), idx(4), idx(5)
            cbase, gstride, count, ahead = idx(7), idx(8), idx(9), idx(10)
            sbase, sstride, tbase = idx(12), idx(13), idx(15)
            ahead_words = builder.sdiv(ahead, const(4))
            low = ir.Constant(v16i, [0x0F0F0F0F] * LANES)
            four = ir.Constant(v16i, [4] * LANES)

            def scale_products(b, g, carried):
                # sp[16 g + 4 t + j] = s[j, g] * ts[t, g]: 8 scalar loads, two
                # broadcast patterns and one multiply per group (tokens past G repeat
                # token 0; their products are never read).
                v4 = ir.VectorType(f32, 4)
                s4 = t4 = ir.Constant(v4, ir.Undefined)
                for j in range(_ROWS):
                    sj = b.load(b.gep(scdata, [b.add(b.add(sbase, b.mul(sstride, const(j))), g)]))
                    s4 = b.insert_element(s4, sj, ir.Constant(i32, j))
                for t in range(4):
                    tt = b.load(b.gep(tsdata, [b.add(b.add(tbase, b.mul(gstride, const(t if t < G else 0))), g)]))
                    t4 = b.insert_element(t4, tt, ir.Constant(i32, t))
                sv = b.shuffle_vector(s4, s4, ir.Constant(v16i, [k % 4 for k in range(16)]))
                tv = b.shuffle_vector(t4, t4, ir.Constant(v16i, [k // 4 for k in range(16)]))
                dst = b.bitcast(b.gep(sdata, [b.mul(g, const(16))]), v16f.as_pointer())
                b.store(b.fmul(sv, tv), dst, align=4)
                return carried

            counted_loop(builder, count, [], scale_products)

            def step(b, g, accs):
                accs = list(accs)
                nibbles = []
                for j in range(_ROWS):
                    w0 = b.add(b.add(wbase, b.mul(stride, const(j))), b.mul(g, const(_W)))
                    prefetch_ir(b, b.gep(wdata, [b.add(w0, ahead_words)]), 2)
                    w = load_vec(b, wdata, w0, v16i, 4)
                    nibbles.append((b.and_(w, low), b.and_(b.lshr(w, four), low)))
                for t in range(G):
                    x0 = b.add(b.add(xbase, b.mul(xstride, const(t))), b.mul(g, const(GROUP)))
                    x_lo = load_vec(b, xdata, x0, v16i, 1)
                    x_hi = load_vec(b, xdata, b.add(x0, const(GROUP // 2)), v16i, 1)
                    c0 = b.add(cbase, b.mul(b.add(b.mul(gstride, const(t)), g), const(LANES)))
                    corr = load_vec(b, cdata, c0, v16i, 4)
                    for j in range(_ROWS):
                        lanes = _byte_dots(b, corr, nibbles[j][0], x_lo)
                        lanes = _byte_dots(b, lanes, nibbles[j][1], x_hi)
                        sp = b.load(b.gep(sdata, [b.add(b.mul(g, const(16)), const(_ROWS * t + j))]))
                        k = _ROWS * t + j
                        part = b.fmul(b.sitofp(lanes, v16f), splat(b, sp, LANES), flags=("contract",))
                        accs[k] = b.fadd(accs[k], part, flags=("contract",))
                return accs

            zero = ir.Constant(v16f, [0.0] * LANES)
            accs = counted_loop(builder, count, [zero] * (_ROWS * G), step)
            for k, acc in enumerate(accs):
                builder.store(hsum_f32(builder, acc), builder.gep(odata, [const(k)]))
            return context.get_dummy_value()

        return sig, codegen

    return block


_block4, _block2, _block1 = _make_block(4), _make_block(2), _make_block(1)


@njit_kernel(parallel=False)
def _panel_rows(x_TK, x8_TK, ts_TG, corr_TGL, xsum_TG, p_RP, w_RW, scale_RG, out_TR, r_lo, r_hi, c0, c1,
                flat, x8_flat, c_flat, sp, o, Gf, S, K, tail):
    """The whole 4-row blocks of rows r_lo:r_hi for tokens c0:c1 (rows_small_int4dp)."""
    G = scale_RG.shape[1]
    s_flat = scale_RG.ravel()
    ts_flat = ts_TG.ravel()
    r = r_lo
    while r + _ROWS <= r_hi:
        t0 = c0
        while t0 < c1:
            n = token_group(c1 - t0)
            # The first token group streams the rows from memory (prefetched ahead);
            # later groups find them in L1/L2.
            ahead = _PF_BYTES if t0 == c0 else 0
            if n == 4:
                _block4(flat, r * S, S, x8_flat, t0 * K, K, c_flat, t0 * Gf * LANES, Gf, Gf, ahead,
                        s_flat, r * G, G, ts_flat, t0 * Gf, sp, o)
            elif n == 2:
                _block2(flat, r * S, S, x8_flat, t0 * K, K, c_flat, t0 * Gf * LANES, Gf, Gf, ahead,
                        s_flat, r * G, G, ts_flat, t0 * Gf, sp, o)
            else:
                _block1(flat, r * S, S, x8_flat, t0 * K, K, c_flat, t0 * Gf * LANES, Gf, Gf, ahead,
                        s_flat, r * G, G, ts_flat, t0 * Gf, sp, o)
            for t in range(n):
                for j in range(_ROWS):
                    a = o[_ROWS * t + j]
                    if tail:
                        a += _int4_tail_dot(x_TK[t0 + t], p_RP[r + j], scale_RG[r + j], xsum_TG[t0 + t], GROUP)
                    out_TR[t0 + t, r + j] = a
            t0 += n
        r += _ROWS


@njit_kernel(parallel=False)
def rows_small_int4dp(x_TK, x8_TK, ts_TG, corr_TGL, xsum_TG, p_RP, w_RW, scale_RG, out_TR, r_lo, r_hi):
    """Rows r_lo:r_hi of out_TR = x_TK @ dequant(p_RP, scale_RG).T, the full groups against
    the tokens' 8-bit forms (x8_TK, ts_TG, corr_TGL from quantize_x8 per token), the
    shorter last group against x_TK in fp32 (xsum_TG: its group sums, permute_x).
    w_RW: p_RP viewed as int32 words (P % 4 == 0)."""
    T, K = x_TK.shape
    Gf = K // GROUP
    S = w_RW.shape[1]
    tail = K > Gf * GROUP
    flat = w_RW.ravel()
    x8_flat = x8_TK.ravel()
    c_flat = corr_TGL.ravel()
    sp = np.empty(_ROWS * 4 * max(Gf, 1), np.float32)
    o = np.empty(_ROWS * 4, np.float32)
    # Tokens in panels whose 8-bit forms (K + K / 2 bytes each with corr) stay in L2
    # while every row block of the range passes over them (reg_block.token_panel).
    panel = token_panel(T, K + K // 2)
    for c0 in range(0, T, panel):
        c1 = min(T, c0 + panel)
        _panel_rows(x_TK, x8_TK, ts_TG, corr_TGL, xsum_TG, p_RP, w_RW, scale_RG, out_TR, r_lo, r_hi,
                    c0, c1, flat, x8_flat, c_flat, sp, o, Gf, S, K, tail)
    r = r_lo + (r_hi - r_lo) // _ROWS * _ROWS
    if r < r_hi:  # fewer than four rows left: the T == 1 GEMV per token
        for t in range(T):
            gemv_int4_dot8(x8_TK[t], ts_TG[t], corr_TGL[t], x_TK[t], xsum_TG[t], p_RP, w_RW, scale_RG,
                           out_TR[t], r, r_hi)


@njit_kernel(parallel=False)
def _tokens8(x_TK, G):
    """Each token's 8-bit form per full group (quantize_x8) and its fp32 group sums (the
    tail group): (x8, ts, corr, xsum, all usable)."""
    T, K = x_TK.shape
    Gf = K // GROUP
    x8_TK = np.zeros((T, K), np.int8)
    ts_TG = np.empty((T, Gf), np.float32)
    corr_TGL = np.empty((T, Gf, LANES), np.int32)
    xsum_TG = np.zeros((T, G), np.float32)
    ok = True
    if K > Gf * GROUP:
        xp_K = np.empty(K, np.float32)
        for t in range(T):
            permute_x(x_TK[t], GROUP, xp_K, xsum_TG[t])
    for t in range(T):
        if not quantize_x8(x_TK[t], x8_TK[t], ts_TG[t], corr_TGL[t]):
            ok = False
    return x8_TK, ts_TG, corr_TGL, xsum_TG, ok


@njit_kernel(parallel=False)
def _rows_either(ok, x_TK, xp_TK, x8_TK, ts_TG, corr_TGL, xsum_TG, p_RP, w_RW, scale_RG, out_TR, lo, hi):
    """Rows lo:hi by the byte dot products, or by small_t_int4.py's fp32 loop when a token
    had no 8-bit form (xp_TK, xsum_TG then from its _permute)."""
    if ok:
        rows_small_int4dp(x_TK, x8_TK, ts_TG, corr_TGL, xsum_TG, p_RP, w_RW, scale_RG, out_TR, lo, hi)
    else:
        _rows(x_TK, xp_TK, xsum_TG, p_RP, w_RW, scale_RG, out_TR, lo, hi)


@njit_kernel()
def matmul_small_int4dp(x_TK, p_RP, w_RW, scale_RG, out_TR, nch):
    """out_TR = x_TK @ dequant(p_RP, scale_RG).T (group 128) for fp32 tokens x_TK (any
    T), in nch chunks of whole 4-row blocks on the thread pool (nch = 1: on the
    calling thread, no launch). A token holding inf or NaN in a full group sends the
    whole call to small_t_int4.py's fp32 loop."""
    R = p_RP.shape[0]
    if x_TK.shape[0] == 0 or R == 0:
        return
    x8_TK, ts_TG, corr_TGL, xsum_TG, ok = _tokens8(x_TK, scale_RG.shape[1])
    xp_TK = x_TK
    if not ok:
        xp_TK, xsum_TG = _permute(x_TK, scale_RG.shape[1])
    if nch == 1:
        _rows_either(ok, x_TK, xp_TK, x8_TK, ts_TG, corr_TGL, xsum_TG, p_RP, w_RW, scale_RG, out_TR, 0, R)
        return
    units = (R + _ROWS - 1) // _ROWS
    for c in prange(nch):
        lo = min(R, c * units // nch * _ROWS)
        hi = min(R, (c + 1) * units // nch * _ROWS)
        _rows_either(ok, x_TK, xp_TK, x8_TK, ts_TG, corr_TGL, xsum_TG, p_RP, w_RW, scale_RG, out_TR, lo, hi)
