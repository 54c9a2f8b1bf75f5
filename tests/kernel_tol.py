"""Tolerances of the CPU expert kernels against expert_ffn_reference (shared by the tests)."""
import torch

from moe.cpu_kernels.gemv_madd import MADD_DECODE
from moe.cpu_kernels.int4_dot8 import DOT8_DECODE
from moe.cpu_kernels.small_t_int8dp import INT8DP_SMALL_T
from moe.cpu_kernels.small_t_int8dp import MIN_T as INT8DP_MIN_T
from moe.cpu_kernels.small_t_int4dp import INT4DP_SMALL_T
from moe.cpu_kernels.small_t_int4dp import MIN_T as INT4DP_MIN_T

# Same weights, fp32 accumulation: only the summation order differs.
FP32 = dict(rtol=1e-4, atol=1e-5)
# bf16 output: one final rounding step on top.
BF16 = dict(rtol=1.6e-2, atol=1e-3)
# int8 and int4 decode by 16-bit multiply-add (gemv_madd.py, int4_madd.py; on
# numba_util.REG_GEMV hosts): the token and the hidden vector are rounded to 16-bit
# fixed point; measured 1e-4 to 4e-4 of the largest output (the tests' outputs are O(1)
# to O(4)).
MADD = dict(rtol=2e-3, atol=2e-3)
# int4 decode against an 8-bit token (int4_dot8.py; Zen 4 hosts): token and hidden vector
# rounded to 8 bits per group of 128; measured up to 0.048 on outputs of largest
# magnitude ~2.7 (0.6-2.1% of the largest output), against ~16% from the int4 weights.
DOT8 = dict(rtol=3e-2, atol=8e-2)
# The same error is a fraction of the largest output (up to 0.021 measured, 0.018 on a
# test output of magnitude 13.8), so the absolute part grows with it.
DOT8_OF_LARGEST = 3e-2


def kernel_tol(x_dtype=torch.float32, fmt: str = "", T: int = 1, ref: torch.Tensor | None = None) -> dict:
    """The tolerance for an expert_ffn result in x_dtype with weights in fmt and T tokens
    (ref: the reference output, whose largest magnitude scales the 8-bit token forms' one)."""
    if fmt in ("int4", "int4-128") and ((DOT8_DECODE and T == 1) or (INT4DP_SMALL_T and T >= INT4DP_MIN_T)):
        # int4_dot8.py at T == 1, small_t_int4dp.py at T >= 2
        largest = float(ref.abs().max()) if ref is not None and ref.numel() else 0.0
        return dict(DOT8, atol=max(DOT8["atol"], DOT8_OF_LARGEST * largest))
    if x_dtype == torch.bfloat16:
        return BF16
    if MADD_DECODE and fmt in ("int8", "int4", "int4-128") and T == 1:
        return MADD
    if INT8DP_SMALL_T and fmt == "int8" and T >= INT8DP_MIN_T:  # small_t_int8dp.py: T == 1 rounding
        return MADD
    return FP32
