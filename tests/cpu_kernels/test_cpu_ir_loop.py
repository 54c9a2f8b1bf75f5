"""ir_loop.counted_loop: the loop the multiply-add GEMV keeps its accumulators in."""
import pytest
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

from moe.cpu_kernels.ir_loop import counted_loop


@intrinsic
def _sum_and_count(typingctx, n):
    """(sum of i for i < n, steps taken) with both carried through the loop."""
    sig = types.UniTuple(types.int64, 2)(n)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        count = context.cast(builder, args[0], signature.args[0], types.int64)

        def body(b, i, vals):
            return [b.add(vals[0], i), b.add(vals[1], ir.Constant(i64, 1))]

        total, steps = counted_loop(builder, count, [ir.Constant(i64, 0), ir.Constant(i64, 0)], body)
        return context.make_tuple(builder, signature.return_type, [total, steps])

    return sig, codegen


@njit
def _run(n):
    return _sum_and_count(n)


@pytest.mark.parametrize("n", [-3, 0, 1, 2, 7, 1000])
def test_counted_loop_runs_count_steps(n):
    assert _run(n) == (max(n, 0) * (max(n, 0) - 1) // 2, max(n, 0))


def test_body_must_return_every_carried_value():
    @intrinsic
    def bad(typingctx, n):
        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)
            counted_loop(builder, args[0], [ir.Constant(i64, 0)], lambda b, i, vals: [])
            return ir.Constant(i64, 0)
        return types.int64(n), codegen

    @njit
    def run(n):
        return bad(n)

    with pytest.raises(Exception, match="returned 0 values for 1 carried"):
        run(3)
