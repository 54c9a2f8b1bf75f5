"""Shared pieces of the CPU expert kernels: bf16 bit casts, the T > 1 register tiles,
and the small elementwise kernels (SwiGLU, bf16 widen / narrow).

Shape key: T tokens, K input columns, R output rows; B = ROW_BLOCK weight rows.

T > 16 path (2..16: small_t.py): for each block of B = 4 weight rows, a caller walks K
in chunks of KC, decodes the chunk of the 4 rows into an fp32 scratch s_BC (16 KiB,
stays in L1) and
calls `tile_chunk`, which runs a 4-row x 3-token register tile over all T tokens: each
step loads 4 weight and 3 token values for 12 FMAs, against 5 loads per 4 FMAs for one
token at a time. Partial sums collect in acc_T4 [T, 4]; `store_block` writes them out.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from .numba_util import njit_kernel

__all__ = [
    "ROW_BLOCK", "KC", "bf16_to_f32", "tile_chunk", "store_block", "dot_block",
    "swiglu_rows", "widen_bf16", "narrow_to_bf16", "f32_to_bf16", "prefetch", "wide_vectors",
]

ROW_BLOCK = 4  # weight rows per block in the T > 1 path (the 4 of the 4x3 tile)
KC = 1024  # K chunk of the T > 1 path: 4 weight rows + 3 token rows = 28 KiB, in L1


@intrinsic
def bf16_to_f32(typingctx, bits):
    """Reinterpret a bf16 bit pattern (uint16) as the float32 it denotes (exact)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(types.uint16), codegen


def prefetch_ir(builder: ir.IRBuilder, ptr: ir.Value, locality: int) -> None:
    """IR hinting the cache to fetch the line at ``ptr`` (read, data cache, LLVM temporal
    locality 3 = prefetcht0, 2 = t1, ...): no fault, no effect on results."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, locality),
                      ir.Constant(i32, 1)])


# The T == 1 loops decode each byte with several instructions, so the out-of-order
# window runs only a few cache lines ahead of the loads; a software prefetch a few
# hundred bytes ahead in every row stream keeps more DRAM requests in flight.
@intrinsic
def prefetch(typingctx, arr, idx):
    """Hint the cache to fetch the line holding arr[idx] into L1 (prefetcht0; no fault,
    no effect on results)."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        index = context.cast(builder, args[1], signature.args[1], types.intp)
        prefetch_ir(builder, builder.gep(ary.data, [index]), 3)
        return context.get_dummy_value()

    return types.none(arr, idx), codegen


@intrinsic
def wide_vectors(typingctx):
    """Let LLVM vectorise the calling function with 512-bit registers where the CPU has them.

    LLVM's default for AVX-512 server cores is 256-bit vectors. The int4 decode is bound
    by the vector ALU ports (convert + FMA per value), where 512-bit vectors do twice the
    work per instruction: measured ~1.2x on the T == 1 int4 loop here. Without AVX-512
    the attributes change nothing. llvmlite only accepts a fixed list of attribute names,
    so the string attributes are added to its set directly; if that ever fails, the
    function compiles with the default width.
    """
    def codegen(context, builder, signature, args):
        try:
            attrs = builder.function.attributes
            set.add(attrs, '"prefer-vector-width"="512"')
            set.add(attrs, '"min-legal-vector-width"="512"')
        except Exception:  # noqa: BLE001 - an optimisation hint only
            pass
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _f32_bits(typingctx, value):
    """Bit pattern of a float32 as uint32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen

@njit_kernel(parallel=False)
def _tile_4x3(s0, s1, s2, s3, x0, x1, x2, acc_T4, t, first):
    """acc_T4[t:t+3, :] (+)= x{0,1,2} . s{0..3}: a 4-row x 3-token register tile.

    Each step loads 4 weight and 3 token values for 12 FMAs (vs 5 loads per 4 FMAs
    for one token at a time), which is what limits the T > 1 path.
    """
    a00 = a01 = a02 = a03 = np.float32(0.0)
    a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = np.float32(0.0)
    for k in range(s0.shape[0]):
        w0 = s0[k]
        w1 = s1[k]
        w2 = s2[k]
        w3 = s3[k]
        v = x0[k]
        a00 += w0 * v
        a01 += w1 * v
        a02 += w2 * v
        a03 += w3 * v
        v = x1[k]
        a10 += w0 * v
        a11 += w1 * v
        a12 += w2 * v
        a13 += w3 * v
        v = x2[k]
        a20 += w0 * v
        a21 += w1 * v
        a22 += w2 * v
        a23 += w3 * v
    if first:
        acc_T4[t, 0] = a00
        acc_T4[t, 1] = a01
        acc_T4[t, 2] = a02
        acc_T4[t, 3] = a03
        acc_T4[t + 1, 0] = a10
        acc_T4[t + 1, 1] = a11
        acc_T4[t + 1, 2] = a12
        acc_T4[t + 1, 3] = a13
        acc_T4[t + 2, 0] = a20
        acc_T4[t + 2, 1] = a21
        acc_T4[t + 2, 2] = a22
        acc_T4[t + 2, 3] = a23
    else:
        acc_T4[t, 0] += a00
        acc_T4[t, 1] += a01
        acc_T4[t, 2] += a02
        acc_T4[t, 3] += a03
        acc_T4[t + 1, 0] += a10
        acc_T4[t + 1, 1] += a11
        acc_T4[t + 1, 2] += a12
        acc_T4[t + 1, 3] += a13
        acc_T4[t + 2, 0] += a20
        acc_T4[t + 2, 1] += a21
        acc_T4[t + 2, 2] += a22
        acc_T4[t + 2, 3] += a23


@njit_kernel(parallel=False)
def _tile_4x2(s0, s1, s2, s3, x0, x1, acc_T4, t, first):
    """acc_T4[t:t+2, :] (+)= x{0,1} . s{0..3} (token remainder of the 4x3 tiling)."""
    a00 = a01 = a02 = a03 = np.float32(0.0)
    a10 = a11 = a12 = a13 = np.float32(0.0)
    for k in range(s0.shape[0]):
        w0 = s0[k]
        w1 = s1[k]
        w2 = s2[k]
        w3 = s3[k]
        v = x0[k]
        a00 += w0 * v
        a01 += w1 * v
        a02 += w2 * v
        a03 += w3 * v
        v = x1[k]
        a10 += w0 * v
        a11 += w1 * v
        a12 += w2 * v
        a13 += w3 * v
    if first:
        acc_T4[t, 0] = a00
        acc_T4[t, 1] = a01
        acc_T4[t, 2] = a02
        acc_T4[t, 3] = a03
        acc_T4[t + 1, 0] = a10
        acc_T4[t + 1, 1] = a11
        acc_T4[t + 1, 2] = a12
        acc_T4[t + 1, 3] = a13
    else:
        acc_T4[t, 0] += a00
        acc_T4[t, 1] += a01
        acc_T4[t, 2] += a02
        acc_T4[t, 3] += a03
        acc_T4[t + 1, 0] += a10
        acc_T4[t + 1, 1] += a11
        acc_T4[t + 1, 2] += a12
        acc_T4[t + 1, 3] += a13


@njit_kernel(parallel=False)
def _tile_4x1(s0, s1, s2, s3, x0, acc_T4, t, first):
    """acc_T4[t, :] (+)= x0 . s{0..3} (a lone remaining token)."""
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for k in range(s0.shape[0]):
        v = x0[k]
        a0 += s0[k] * v
        a1 += s1[k] * v
        a2 += s2[k] * v
        a3 += s3[k] * v
    if first:
        acc_T4[t, 0] = a0
        acc_T4[t, 1] = a1
        acc_T4[t, 2] = a2
        acc_T4[t, 3] = a3
    else:
        acc_T4[t, 0] += a0
        acc_T4[t, 1] += a1
        acc_T4[t, 2] += a2
        acc_T4[t, 3] += a3


@njit_kernel(parallel=False)
def tile_chunk(x_TK, k0, k1, s_BC, c0, acc_T4, first):
    """acc_T4 (=, or += unless first) x_TK[:, k0:k1] @ s_BC[:, c0:c0+k1-k0].T.

    s_BC: fp32 [4, C], C-contiguous (a decoded chunk with c0 = 0, or whole fp32 rows
    with c0 = k0: a column offset rather than a 2-D slice keeps the row views
    contiguous, which the vectoriser needs). The 4 rows of the chunk stay in L1 while
    all T tokens pass over them.
    """
    T = x_TK.shape[0]
    n = k1 - k0
    s0 = s_BC[0, c0:c0 + n]
    s1 = s_BC[1, c0:c0 + n]
    s2 = s_BC[2, c0:c0 + n]
    s3 = s_BC[3, c0:c0 + n]
    # Tokens in tiles of 3; a remainder of 1 borrows one tile's tokens to make 2 + 2,
    # because the 4x1 tile needs 5 loads per 4 FMAs.
    n3 = T // 3 if T % 3 != 1 or T < 4 else T // 3 - 1
    for j in range(n3):
        t = 3 * j
        _tile_4x3(s0, s1, s2, s3, x_TK[t, k0:k1], x_TK[t + 1, k0:k1], x_TK[t + 2, k0:k1],
                  acc_T4, t, first)
    t = 3 * n3
    while t + 2 <= T:
        _tile_4x2(s0, s1, s2, s3, x_TK[t, k0:k1], x_TK[t + 1, k0:k1], acc_T4, t, first)
        t += 2
    if t < T:
        _tile_4x1(s0, s1, s2, s3, x_TK[t, k0:k1], acc_T4, t, first)


@njit_kernel(parallel=False)
def store_block(acc_T4, nb, out_TR, r0):
    """out_TR[:, r0:r0+nb] = acc_T4[:, :nb]."""
    for t in range(acc_T4.shape[0]):
        for i in range(nb):
            out_TR[t, r0 + i] = acc_T4[t, i]


@njit_kernel(parallel=False)
def dot_block(x_TK, s_BK, nb, out_TR, r0, acc_T4):
    """out_TR[:, r0:r0+nb] = x_TK @ s_BK[:nb].T for 4 rows already in fp32 (s_BK [4, K])."""
    K = x_TK.shape[1]
    for k0 in range(0, K, KC):
        k1 = min(K, k0 + KC)
        tile_chunk(x_TK, k0, k1, s_BK, k0, acc_T4, k0 == 0)
    store_block(acc_T4, nb, out_TR, r0)


@njit_kernel(parallel=False)
def swiglu_rows(gu_T2F, h_TF):
    """h_TF = silu(gu_T2F[:, :F]) * gu_T2F[:, F:] (gate half first, then up half)."""
    T, F = h_TF.shape
    for t in range(T):
        for f in range(F):
            g = gu_T2F[t, f]
            h_TF[t, f] = g / (np.float32(1.0) + np.exp(-g)) * gu_T2F[t, F + f]


@njit_kernel(parallel=False)
def widen_bf16(bits_TD, out_TD):
    """out_TD (float32) = bf16 bit patterns bits_TD (uint16), exactly."""
    T, D = bits_TD.shape
    for t in range(T):
        for d in range(D):
            out_TD[t, d] = bf16_to_f32(bits_TD[t, d])


@njit_kernel(parallel=False)
def f32_to_bf16(v):
    """The bf16 bit pattern (uint16) of float32 v rounded to nearest even, NaN kept NaN."""
    if v != v:
        return np.uint16(0x7FC0)
    u = _f32_bits(v)
    u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return np.uint16(u >> np.uint32(16))


@njit_kernel(parallel=False)
def narrow_to_bf16(x_TD, bits_TD):
    """bits_TD (uint16 bf16 patterns) = x_TD rounded to nearest even, NaN kept NaN."""
    T, D = x_TD.shape
    for t in range(T):
        for d in range(D):
            bits_TD[t, d] = f32_to_bf16(x_TD[t, d])
