"""The small-batch (2 <= T <= 16) kernels (small_t.py, small_t_int4.py) against torch references."""
import importlib

import numpy as np
import pytest
import torch

from moe.cpu_kernels import expert_ffn, expert_ffn_reference, quantize
from moe.cpu_kernels.small_t import SMALL_T, rows_small_bf16, rows_small_f32, rows_small_int8
from moe.cpu_kernels.small_t_int4 import matmul_small_int4, matmul_small_int4_serial
from moe.cpu_kernels.weight_views import weight_info
from kernel_tol import kernel_tol

expert_ffn_module = importlib.import_module("moe.cpu_kernels.expert_ffn")

# (T, R rows, K columns, r_lo, r_hi): row ranges that start and end off a 4-row block,
# K with and without a column tail (int4: a shorter last group), one-column rows.
CASES = [
    (2, 9, 256, 0, 9),
    (3, 13, 520, 1, 12),
    (5, 8, 136, 4, 8),
    (8, 7, 96, 0, 7),
    (16, 21, 1100, 3, 21),
    (4, 5, 1, 0, 5),
]
# Same weights, fp32 accumulation; only the summation order differs.
TOL = dict(rtol=1e-4, atol=1e-4)


def _expect(x_TK, w_RK, out_TR, r_lo, r_hi):
    want = out_TR.copy()
    want[:, r_lo:r_hi] = (torch.from_numpy(x_TK) @ w_RK[r_lo:r_hi].T).numpy()
    return want


@pytest.mark.parametrize("T,R,K,r_lo,r_hi", CASES)
def test_rows_small_dense_and_int8(T, R, K, r_lo, r_hi):
    """fp32, bf16 and int8 small-T rows equal x @ W.T on their row range and leave other rows alone."""
    g = torch.Generator().manual_seed(T)
    x_TK = torch.randn(T, K, generator=g).numpy()
    w_RK = torch.randn(R, K, generator=g)
    out_TR = np.full((T, R), 7.0, np.float32)
    rows_small_f32(x_TK, w_RK.numpy(), out_TR, r_lo, r_hi)
    np.testing.assert_allclose(out_TR, _expect(x_TK, w_RK, np.full((T, R), 7.0, np.float32), r_lo, r_hi), **TOL)
    wb = w_RK.bfloat16()
    out_TR = np.full((T, R), 7.0, np.float32)
    rows_small_bf16(x_TK, wb.view(torch.int16).numpy().view(np.uint16), out_TR, r_lo, r_hi)
    np.testing.assert_allclose(out_TR, _expect(x_TK, wb.float(), np.full((T, R), 7.0, np.float32), r_lo, r_hi),
                               **TOL)
    q = quantize(w_RK, "int8")
    out_TR = np.full((T, R), 7.0, np.float32)
    rows_small_int8(x_TK, q.q_RC.numpy(), q.scale_R.numpy(), out_TR, r_lo, r_hi)
    np.testing.assert_allclose(out_TR, _expect(x_TK, q.dequantize(torch.float32), np.full((T, R), 7.0, np.float32),
                                               r_lo, r_hi), **TOL)


@pytest.mark.parametrize("T,R,K", [(2, 9, 256), (3, 13, 520), (5, 8, 136), (8, 7, 96), (16, 21, 160)])
@pytest.mark.parametrize("nch", [0, 1, 2, 3])
def test_small_int4_matches_dequantised(T, R, K, nch):
    """int4 group-128 small-T matmul (nch 0: calling thread) equals x @ dequant(W).T."""
    g = torch.Generator().manual_seed(K)
    x_TK = torch.randn(T, K, generator=g).numpy()
    w = quantize(torch.randn(R, K, generator=g), "int4", group_size=128)
    info = weight_info(w, "w")
    assert info.fmt == "int4"
    out_TR = np.full((T, R), np.nan, np.float32)
    if nch == 0:
        matmul_small_int4_serial(x_TK, *info.views, out_TR)
    else:
        matmul_small_int4(x_TK, *info.views, out_TR, nch)
    want = (torch.from_numpy(x_TK) @ w.dequantize(torch.float32).T).numpy()
    np.testing.assert_allclose(out_TR, want, **TOL)


@pytest.mark.parametrize("T", [2, 4, 8, SMALL_T, SMALL_T + 1])
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("serial_bytes", [0, 1 << 40])
def test_expert_ffn_small_batches(T, fmt, serial_bytes, monkeypatch):
    """expert_ffn at small T, on the thread pool (0) or the calling thread (huge), gives the reference."""
    monkeypatch.setattr(expert_ffn_module, "SERIAL_BYTES", serial_bytes)
    D, F = 256, 200  # int4: whole groups in w13 rows, a shorter last group in w2 rows
    g = torch.Generator().manual_seed(1)
    w13 = torch.randn(2 * F, D, generator=g) / D ** 0.5
    w2 = torch.randn(D, F, generator=g) / F ** 0.5
    if fmt == "bf16":
        w13, w2 = w13.bfloat16(), w2.bfloat16()
    elif fmt != "fp32":
        w13, w2 = quantize(w13, fmt), quantize(w2, fmt)
    # kernel_tol: int8 and int4 round the token where small_t_int8dp.py / small_t_int4dp.py run.
    for x_dtype in (torch.float32, torch.bfloat16):
        x_TD = torch.randn(T, D, generator=g).to(x_dtype)
        ref = expert_ffn_reference(x_TD, w13, w2)
        torch.testing.assert_close(expert_ffn(x_TD, w13, w2), ref, **kernel_tol(x_dtype, fmt, T, ref))
