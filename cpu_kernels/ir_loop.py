"""A counted loop emitted as LLVM IR, for intrinsics whose inner loop carries vector
accumulators, and the lane sum such loops end with.

Why: an accumulator that numba code hands from one intrinsic call to the next lives in
a numpy array, and LLVM cannot keep it in a register because the weight loads of the
loop might alias it. Every step then stores the accumulator and the next step loads it
back: a loop-carried dependency through store-to-load forwarding (~7 cycles on Zen 3).
On the T == 1 int8 multiply-add GEMV that chain alone held one core to ~14 G weights/s
with the weights in cache, below the DRAM rate of two cores. Inside one intrinsic the
accumulators are phi nodes, i.e. registers.
"""
from __future__ import annotations

from typing import Callable, Sequence

from llvmlite import ir

__all__ = ["counted_loop", "hsum_f32", "load_vec", "splat"]


def counted_loop(builder: ir.IRBuilder, count: ir.Value, inits: Sequence[ir.Value],
                 body: Callable[[ir.IRBuilder, ir.Value, list], Sequence[ir.Value]]) -> list:
    """Emit ``for i in range(count)`` (count: an integer value, <= 0 runs no step) with
    loop-carried values: ``body(builder, i, values) -> next values`` (same types as
    ``inits``). Returns the values after the loop; the builder is left after it."""
    pre = builder.block
    header = builder.append_basic_block("loop.header")
    step = builder.append_basic_block("loop.body")
    done = builder.append_basic_block("loop.exit")
    builder.branch(header)
    builder.position_at_end(header)
    i = builder.phi(count.type)
    i.add_incoming(ir.Constant(count.type, 0), pre)
    carried = []
    for v in inits:
        p = builder.phi(v.type)
        p.add_incoming(v, pre)
        carried.append(p)
    builder.cbranch(builder.icmp_signed("<", i, count), step, done)
    builder.position_at_end(step)
    nxt = list(body(builder, i, list(carried)))
    if len(nxt) != len(carried):
        raise ValueError(f"loop body returned {len(nxt)} values for {len(carried)} carried ones")
    latch = builder.block
    i.add_incoming(builder.add(i, ir.Constant(count.type, 1)), latch)
    for p, v in zip(carried, nxt):
        p.add_incoming(v, latch)
    builder.branch(header)
    builder.position_at_end(done)
    return carried


def hsum_f32(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """The sum of a float vector's lanes by halving (log2(n) dependent adds, not n): a
    GEMV row ends with it, and the sequential form's chain of 16 adds cost ~50 cycles per
    row of the int4 loop (int4_dot8.py)."""
    n = v.type.count
    i32 = ir.IntType(32)
    while n > 1:
        n //= 2
        lo = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, n), list(range(n))))
        hi = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, n), list(range(n, 2 * n))))
        v = b.fadd(lo, hi)
    return b.extract_element(v, ir.Constant(i32, 0))


def load_vec(b: ir.IRBuilder, ptr: ir.Value, index: ir.Value, ty: ir.VectorType, align: int) -> ir.Value:
    """The vector of type ty stored from element ptr[index] (align: bytes it is known to
    be aligned to)."""
    return b.load(b.bitcast(b.gep(ptr, [index]), ty.as_pointer()), align=align)


def splat(b: ir.IRBuilder, v: ir.Value, n: int) -> ir.Value:
    """The scalar v broadcast to n lanes."""
    i32 = ir.IntType(32)
    vt = ir.VectorType(v.type, n)
    one = b.insert_element(ir.Constant(vt, ir.Undefined), v, ir.Constant(i32, 0))
    return b.shuffle_vector(one, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(i32, n), [0] * n))
