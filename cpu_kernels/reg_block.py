"""The register-blocked small-batch loop shared by small_t_bf16dp.py and small_t_int8dp.py:
4 weight rows x G tokens of partial sums held in registers over a run of 64-column steps
(small_t_int4dp.py builds its own block, with per-group scales, on the same plan).

Shape key: G tokens per group, S row stride (elements; weights and tokens share it).

Each step loads 64 columns of four weight rows once (as two vectors of 32 elements per
row, widened by the caller's `load_w`), then every token of the group (`load_x`)
multiplies into its four rows' sums with the caller's dot-product instruction (`dot`).
The sums are loop-carried values (ir_loop.counted_loop), so they stay in registers; at
the end each is reduced (`reduce`) and stored. Each step also prefetches its rows' lines
``pf`` elements ahead into L2 (0: the lines it reads, a no-op), for the group that
streams the rows from memory. Into L2, not L1: 4 KiB ahead into L1 (prefetcht0) left
cold DeepSeek-V2-Lite int8 experts at T=2..4 slower than small_t.py's fp32 loop
(0.87-0.95x); into L2 they ran 1.32-1.54x faster than it (bf16: 1.03-1.12x over 4 KiB
into L1; int4, small_t_int4dp.py: 1.2-1.7x).

The kernels built on such blocks (bf16, int8 and int4 dot products) serve every T >= 2
where expert_ffn selects them, not only small batches: their dot products do twice the
work per instruction of the fp32 FMAs in tiles.py's register tiles, and cold
DeepSeek-V2-Lite experts at T = 32..2048 ran 1.6-1.9x (int8), 2.2-3.7x (int4) and
1.5-1.6x (bf16) that path. Their tokens go in panels that stay in L2 while every row
block of a thread's range passes over them (`token_panel`; T = 2048: 1.07-1.09x over
one panel).
"""
from __future__ import annotations

from typing import Callable

from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic

from .gemv import STEP
from .numba_util import njit_kernel
from .ir_loop import counted_loop
from .tiles import prefetch_ir

__all__ = ["PANEL_BYTES", "ROWS", "VEC", "make_block", "token_group", "token_panel"]

ROWS = 4
VEC = 32  # elements per loaded vector: two per row and step
_LINE = 64
# The bytes of token data a panel may hold: each 4-row block passes over every token
# group of the panel, so the panel should stay in L2 (1 MiB per core on Zen 4; half of
# it leaves room for the weight rows streaming through).
PANEL_BYTES = 512 << 10


@njit_kernel(parallel=False)
def token_panel(T, bytes_per_token):
    """Tokens per panel for the kernels' token loops: a multiple of 4 whose data fits
    PANEL_BYTES (at least 4), or T when all of them fit; at least 1."""
    n = max(4, PANEL_BYTES // max(bytes_per_token, 1) // 4 * 4)
    return max(1, min(T, n))


@njit_kernel(parallel=False)
def token_group(left):
    """Tokens in the next group of a token loop with `left` tokens to go: 4, 2 or 1
    (the kernels' blocks are compiled for those group sizes)."""
    return 4 if left >= 4 else (2 if left >= 2 else 1)


def make_block(G: int, w_dtype, x_dtype, out_dtype, load_w: Callable, load_x: Callable, dot: Callable,
               zero: Callable, reduce: Callable):
    """An intrinsic block(w_flat, wi, S, x_flat, xi, steps, pf, out): for g < G tokens and
    j < 4 rows, out[4g + j] = reduce(sum over k < 64 steps of w[wi + jS + k] * x[xi + gS + k])
    as `dot` accumulates it. load_w / load_x(builder, data pointer, index) -> vector;
    dot(builder, acc, w, x) -> acc; zero() -> the starting sum; reduce(builder, acc) ->
    the scalar stored. Callers keep every index in bounds."""

    @intrinsic
    def block(typingctx, w_flat, wi, S, x_flat, xi, steps, pf, out):
        if not all(isinstance(a, types.Array) and a.dtype == d
                   for a, d in ((w_flat, w_dtype), (x_flat, x_dtype), (out, out_dtype))):
            return None
        sig = types.none(w_flat, wi, S, x_flat, xi, steps, pf, out)
        per_line = _LINE // (w_dtype.bitwidth // 8)

        def codegen(context, builder, signature, args):
            intp = context.get_value_type(types.intp)

            def data(k):
                return context.make_array(signature.args[k])(context, builder, args[k]).data

            def idx(k):
                return context.cast(builder, args[k], signature.args[k], types.intp)

            def const(v):
                return ir.Constant(intp, v)

            wdata, xdata, odata = data(0), data(3), data(7)
            wbase, stride, xbase, count, ahead = idx(1), idx(2), idx(4), idx(5), idx(6)

            def step(b, s, accs):
                off = b.mul(s, const(STEP))
                accs = list(accs)
                rows = [b.add(b.add(wbase, b.mul(stride, const(j))), off) for j in range(ROWS)]
                for j in range(ROWS):
                    for line in range(STEP // per_line):
                        prefetch_ir(b, b.gep(wdata, [b.add(b.add(rows[j], ahead), const(per_line * line))]), 2)
                ws = [[load_w(b, wdata, b.add(rows[j], const(VEC * v))) for v in range(STEP // VEC)]
                      for j in range(ROWS)]
                for g in range(G):
                    xrow = b.add(b.add(xbase, b.mul(stride, const(g))), off)
                    xs = [load_x(b, xdata, b.add(xrow, const(VEC * v))) for v in range(STEP // VEC)]
                    for j in range(ROWS):
                        for v in range(STEP // VEC):
                            accs[ROWS * g + j] = dot(b, accs[ROWS * g + j], ws[j][v], xs[v])
                return accs

            accs = counted_loop(builder, count, [zero()] * (ROWS * G), step)
            for k, acc in enumerate(accs):
                builder.store(reduce(builder, acc), builder.gep(odata, [const(k)]))
            return context.get_dummy_value()

        return sig, codegen

    return block
