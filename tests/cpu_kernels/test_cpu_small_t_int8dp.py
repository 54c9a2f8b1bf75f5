"""int8 small-batch matmul by 16-bit integer dot products (small_t_int8dp.py) against an
exact model of its arithmetic, the T == 1 GEMV, bad values and the generic target."""
import importlib

import numpy as np
import pytest
import torch

from moe.cpu_kernels import expert_ffn, expert_ffn_reference, quantize
from moe.cpu_kernels.gemv_madd import gemv_int8_madd, quantize_x16
from moe.cpu_kernels.small_t_int8dp import INT8DP_SMALL_T, MIN_T, matmul_small_int8dp
from generic_target import run_on_generic_target
from kernel_tol import kernel_tol

expert_ffn_module = importlib.import_module("moe.cpu_kernels.expert_ffn")


def _model(x_TK, q):
    """The product as the kernel defines it: each token rounded by quantize_x16, exact
    integer dot products, scaled in float64."""
    T, K = x_TK.shape
    x16 = np.empty((T, K), np.int16)
    xs = np.array([quantize_x16(x_TK[t], x16[t]) for t in range(T)])
    dots = x16.astype(np.int64) @ q.q_RC.numpy().astype(np.int64).T  # exact
    return dots * xs[:, None] * q.scale_R.double().numpy()[None, :]


# Every 4/2/1 token split, rows not a multiple of four, column tails, rows shorter than
# one 64-column step, and rows longer than one 2048-column block (int32 flushes).
@pytest.mark.parametrize("T,R,K", [(2, 9, 200), (3, 8, 63), (5, 7, 64), (7, 30, 4160), (16, 64, 1408),
                                   (11, 5, 2048), (16, 6, 4096), (9, 6, 65600), (40, 5, 96)])
@pytest.mark.parametrize("nch", [1, 3])
def test_matches_the_exact_model(T, R, K, nch):
    q = quantize(torch.randn(R, K, generator=torch.Generator().manual_seed(K)), "int8")
    x = np.random.default_rng(T).standard_normal((T, K)).astype(np.float32)
    out = np.full((T, R), np.nan, np.float32)
    matmul_small_int8dp(x, q.q_RC.numpy(), q.scale_R.numpy(), out, nch)
    np.testing.assert_allclose(out, _model(x, q), rtol=1e-6, atol=1e-30)


def test_a_token_gets_the_t1_result_bit_for_bit():
    """Each token's row of the batch equals the T == 1 multiply-add GEMV exactly: the
    output of a token does not depend on the batch it came in."""
    R, K = 12, 4160
    q = quantize(torch.randn(R, K), "int8")
    x = np.random.default_rng(3).standard_normal((6, K)).astype(np.float32)
    out = np.empty((6, R), np.float32)
    matmul_small_int8dp(x, q.q_RC.numpy(), q.scale_R.numpy(), out, 2)
    for t in range(6):
        x16 = np.empty(K, np.int16)
        xs = quantize_x16(x[t], x16)
        one = np.empty(R, np.float32)
        gemv_int8_madd(x16, xs, q.q_RC.numpy(), q.scale_R.numpy(), one, 0, R)
        np.testing.assert_array_equal(out[t], one)


def test_extreme_codes_and_tokens_do_not_overflow():
    """All codes +-127 against tokens at +-32767 over two 2048-column blocks stay exact."""
    R, K = 8, 4096
    q = quantize(torch.ones(R, K), "int8")
    q.q_RC[1::2] = -127
    x = np.ones((4, K), np.float32)
    x[1] = -1.0
    out = np.empty((4, R), np.float32)
    matmul_small_int8dp(x, q.q_RC.numpy(), q.scale_R.numpy(), out, 1)
    np.testing.assert_allclose(out, _model(x, q), rtol=1e-7)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_bad_token_takes_the_fp32_loop(bad):
    """inf or NaN in one token: the call takes small_t.py's loop, the bad token's outputs
    are not finite and the other tokens' are the fp32 products."""
    R, K = 9, 300
    q = quantize(torch.randn(R, K), "int8")
    x = np.random.default_rng(0).standard_normal((3, K)).astype(np.float32)
    x[1, 17] = bad
    out = np.empty((3, R), np.float32)
    matmul_small_int8dp(x, q.q_RC.numpy(), q.scale_R.numpy(), out, 2)
    assert not np.isfinite(out[1]).any()
    want = x[[0, 2]].astype(np.float64) @ q.dequantize().double().numpy().T
    np.testing.assert_allclose(out[[0, 2]], want, rtol=1e-4, atol=1e-4)


def test_generic_target():
    """Compiled for a generic x86-64 target (no VNNI: the pair sums as generic vector IR)
    the kernel still equals the exact model."""
    code = (
        "import numpy as np, torch\n"
        "from moe.cpu_kernels import quantize\n"
        "from moe.cpu_kernels.gemv_madd import quantize_x16\n"
        "from moe.cpu_kernels.small_t_int8dp import matmul_small_int8dp\n"
        "from moe.cpu_kernels.numba_util import AVX512VNNI\n"
        "assert not AVX512VNNI\n"
        "q = quantize(torch.randn(9, 2200), 'int8')\n"
        "x = np.random.default_rng(0).standard_normal((7, 2200)).astype(np.float32)\n"
        "out = np.zeros((7, 9), np.float32)\n"
        "matmul_small_int8dp(x, q.q_RC.numpy(), q.scale_R.numpy(), out, 1)\n"
        "x16 = np.empty((7, 2200), np.int16)\n"
        "xs = np.array([quantize_x16(x[t], x16[t]) for t in range(7)])\n"
        "want = (x16.astype(np.int64) @ q.q_RC.numpy().astype(np.int64).T) * xs[:, None] * q.scale_R.double().numpy()\n"
        "np.testing.assert_allclose(out, want, rtol=1e-6)\n"
    )
    run_on_generic_target(code)


@pytest.mark.parametrize("T", [2, 8, 16, 40])
def test_expert_ffn_takes_it_from_min_t(T, monkeypatch):
    """expert_ffn sends int8 weights to this path at T >= MIN_T (no upper bound) where
    INT8DP_SMALL_T holds (both matmuls: token and hidden vector), and matches the reference."""
    calls = []
    real = expert_ffn_module.matmul_small_int8dp
    monkeypatch.setattr(expert_ffn_module, "matmul_small_int8dp", lambda *a: (calls.append(1), real(*a)))
    g = torch.Generator().manual_seed(T)
    D, F = 264, 136
    w13 = quantize(torch.randn(2 * F, D, generator=g) / D ** 0.5, "int8")
    w2 = quantize(torch.randn(D, F, generator=g) / F ** 0.5, "int8")
    x = torch.randn(T, D, generator=g)
    torch.testing.assert_close(expert_ffn(x, w13, w2), expert_ffn_reference(x, w13, w2), **kernel_tol(x.dtype, "int8", T))
    assert len(calls) == (2 if INT8DP_SMALL_T and MIN_T <= T else 0)
