"""bf16 x bf16 small-batch matmul by bf16 dot products (small_t_bf16dp.py) against float64
products, the fp32 small-batch loop, and expert_ffn's use of it."""
import importlib

import numpy as np
import pytest
import torch

from moe.cpu_kernels import expert_ffn, expert_ffn_reference
from moe.cpu_kernels.small_t import rows_small_bf16
from moe.cpu_kernels.small_t_bf16dp import BF16DP_SMALL_T, matmul_small_bf16dp, rows_small_bf16dp
from generic_target import run_on_generic_target
from kernel_tol import BF16

expert_ffn_module = importlib.import_module("moe.cpu_kernels.expert_ffn")


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


# Token counts through every group split (4, 2, 1), row counts that are not a multiple of
# four, rows shorter than one 64-column step, with a column tail, real lengths, and rows
# long enough that the tokens come in several panels (reg_block.token_panel: 4 here).
@pytest.mark.parametrize("T,R,K", [(2, 9, 200), (3, 8, 63), (5, 7, 64), (7, 13, 520), (16, 12, 2048),
                                   (11, 6, 1408), (1, 5, 130), (16, 3, 100), (9, 6, 65600), (40, 5, 96)])
@pytest.mark.parametrize("nch", [None, 1, 3])
def test_matches_float64_products(T, R, K, nch):
    """Equal to the float64 product of the same bf16 values up to fp32 summation."""
    g = torch.Generator().manual_seed(T * 1000 + K)
    w = torch.randn(R, K, generator=g).bfloat16()
    x = torch.randn(T, K, generator=g).bfloat16()
    out = np.full((T, R), np.nan, np.float32)
    if nch is None:
        rows_small_bf16dp(_bits(x), _bits(w), out, 0, R)
    else:
        matmul_small_bf16dp(_bits(x), _bits(w), out, nch)
    want = (x.double() @ w.double().T).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6 * np.abs(want).max() * K ** 0.5)


def test_row_window_and_the_fp32_loop():
    """Rows r_lo:r_hi only are written, and they equal small_t.py's fp32 loop on the
    widened token (same exact products, other summation order)."""
    w = torch.randn(21, 300).bfloat16()
    x = torch.randn(6, 300).bfloat16()
    out = np.full((6, 21), np.nan, np.float32)
    rows_small_bf16dp(_bits(x), _bits(w), out, 4, 17)
    assert np.isnan(out[:, :4]).all() and np.isnan(out[:, 17:]).all()
    ref = np.zeros((6, 21), np.float32)
    rows_small_bf16(x.float().numpy(), _bits(w), ref, 4, 17)
    np.testing.assert_allclose(out[:, 4:17], ref[:, 4:17], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [2, 5, 16, 40])
def test_expert_ffn_uses_it_for_bf16_tokens_only(T, monkeypatch):
    """expert_ffn takes the dot-product path for a bf16 token against bf16 w13 where
    BF16DP_SMALL_T holds, never for an fp32 token, and matches the reference."""
    calls = []
    real = expert_ffn_module._matmul_bf16dp
    monkeypatch.setattr(expert_ffn_module, "_matmul_bf16dp", lambda *a: (calls.append(1), real(*a)))
    g = torch.Generator().manual_seed(T)
    D, F = 264, 136
    w13 = (torch.randn(2 * F, D, generator=g) / D ** 0.5).bfloat16()
    w2 = (torch.randn(D, F, generator=g) / F ** 0.5).bfloat16()
    x = torch.randn(T, D, generator=g)
    torch.testing.assert_close(expert_ffn(x.bfloat16(), w13, w2), expert_ffn_reference(x.bfloat16(), w13, w2),
                               **BF16)
    assert len(calls) == (1 if BF16DP_SMALL_T else 0)
    expert_ffn(x, w13, w2)
    assert len(calls) == (1 if BF16DP_SMALL_T else 0)


def test_generic_target():
    """Compiled for a generic x86-64 target (no AVX-512 BF16: the pair sums as generic
    vector IR) the kernel still equals the float64 products."""
    code = (
        "import numpy as np, torch\n"
        "from moe.cpu_kernels.small_t_bf16dp import rows_small_bf16dp\n"
        "from moe.cpu_kernels.numba_util import AVX512BF16\n"
        "assert not AVX512BF16\n"
        "w = torch.randn(9, 200).bfloat16(); x = torch.randn(7, 200).bfloat16()\n"
        "b = lambda t: t.contiguous().view(torch.int16).numpy().view(np.uint16)\n"
        "out = np.zeros((7, 9), np.float32)\n"
        "rows_small_bf16dp(b(x), b(w), out, 0, 9)\n"
        "want = (x.double() @ w.double().T).numpy()\n"
        "np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())\n"
    )
    run_on_generic_target(code)
