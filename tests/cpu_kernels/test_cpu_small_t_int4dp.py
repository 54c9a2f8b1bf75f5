"""int4 small-batch matmul by byte dot products against 8-bit tokens (small_t_int4dp.py):
against an exact model of its arithmetic, the T == 1 GEMV, extreme codes, bad values,
expert_ffn's choice and the generic target."""
import importlib

import numpy as np
import pytest
import torch

from moe.cpu_kernels import expert_ffn, expert_ffn_reference, quantize
from moe.cpu_kernels.int4_dot8 import GROUP, LANES, gemv_int4_dot8, quantize_x8
from moe.cpu_kernels.int4_gemv import permute_x
from moe.cpu_kernels.small_t_int4 import matmul_small_int4
from moe.cpu_kernels.small_t_int4dp import INT4DP_SMALL_T, MIN_T, matmul_small_int4dp
from generic_target import run_on_generic_target
from kernel_tol import kernel_tol

expert_ffn_module = importlib.import_module("moe.cpu_kernels.expert_ffn")


def _views(q):
    p = q.packed_RB.numpy()
    return p, p.view(np.int32), q.scale_RG.numpy()


def _model(x_TK, q):
    """The product as the kernel defines it, in float64: per token and full group of 128
    the exact integer dot of the weight codes (-8..7) with the token's 8-bit form
    (quantize_x8) times both scales; the shorter last group against the fp32 token.
    Also returns, per output, the sum of the products' magnitudes (the scale of the
    fp32 summation error: the kernel scales and sums partial sums of lanes)."""
    T, K = x_TK.shape
    Gf = K // GROUP
    w = q.dequantize(torch.float64).numpy()
    s = q.scale_RG.double().numpy()
    codes = np.rint(w[:, :Gf * GROUP] / np.repeat(s[:, :Gf], GROUP, axis=1)).astype(np.int64)
    out = np.zeros((T, w.shape[0]))
    mag = np.zeros((T, w.shape[0]))
    for t in range(T):
        x8 = np.zeros(K, np.int8)
        ts = np.empty(Gf, np.float32)
        corr = np.empty((Gf, LANES), np.int32)
        assert quantize_x8(x_TK[t], x8, ts, corr)
        for g in range(Gf):
            cols = slice(g * GROUP, (g + 1) * GROUP)
            scale = s[:, g] * float(ts[g])
            out[t] += (codes[:, cols] @ x8[cols].astype(np.int64)) * scale
            mag[t] += (np.abs(codes[:, cols]) @ np.abs(x8[cols].astype(np.int64))) * scale
        term = w[:, Gf * GROUP:] @ x_TK[t, Gf * GROUP:].astype(np.float64)
        out[t] += term
        mag[t] += np.abs(w[:, Gf * GROUP:]) @ np.abs(x_TK[t, Gf * GROUP:].astype(np.float64))
    return out, mag


# Every 4/2/1 token split, rows not a multiple of four (the T == 1 GEMV per token),
# shorter last groups (K % 128), a row of only a short group, long rows, and rows long
# enough that the tokens come in several panels (reg_block.token_panel: 4 here).
@pytest.mark.parametrize("T,R,K", [(2, 9, 200), (3, 8, 128), (5, 7, 256), (7, 30, 4104), (16, 64, 1408),
                                   (11, 5, 2048), (16, 6, 4096), (4, 8, 8), (9, 6, 65600), (40, 5, 392)])
@pytest.mark.parametrize("nch", [1, 3])
def test_matches_the_exact_model(T, R, K, nch):
    q = quantize(torch.randn(R, K, generator=torch.Generator().manual_seed(K)), "int4", group_size=GROUP)
    x = np.random.default_rng(T).standard_normal((T, K)).astype(np.float32)
    out = np.full((T, R), np.nan, np.float32)
    matmul_small_int4dp(x, *_views(q), out, nch)
    want, mag = _model(x, q)
    assert (np.abs(out - want) <= 1e-5 * mag + 1e-30).all(), np.abs(out - want).max()


def test_a_token_gets_the_t1_result():
    """Each token's row of the batch equals the T == 1 GEMV (int4_dot8.py) up to the
    order of the fp32 sum over groups: one rounding of the token, whatever the batch."""
    R, K = 12, 4160
    q = quantize(torch.randn(R, K), "int4", group_size=GROUP)
    x = np.random.default_rng(3).standard_normal((6, K)).astype(np.float32)
    out = np.empty((6, R), np.float32)
    matmul_small_int4dp(x, *_views(q), out, 2)
    p, w, s = _views(q)
    for t in range(6):
        x8 = np.zeros(K, np.int8)
        ts = np.empty(K // GROUP, np.float32)
        corr = np.empty((K // GROUP, LANES), np.int32)
        assert quantize_x8(x[t], x8, ts, corr)
        xp, xsum = np.empty(K, np.float32), np.empty(s.shape[1], np.float32)
        permute_x(x[t], GROUP, xp, xsum)
        one = np.empty(R, np.float32)
        gemv_int4_dot8(x8, ts, corr, x[t], xsum, p, w, s, one, 0, R)
        np.testing.assert_allclose(out[t], one, rtol=2e-6, atol=2e-6 * np.abs(one).max())


def test_extreme_codes_and_tokens_are_exact():
    """Codes -8 and 7 against tokens of +-127 (every lane at its largest magnitude) over
    many groups: the sums are exact integers."""
    R, K = 8, 2048
    w = torch.ones(R, K) * 7
    w[1::2] = -8
    q = quantize(w, "int4", group_size=GROUP)
    x = np.ones((4, K), np.float32)
    x[1] = -1.0
    out = np.empty((4, R), np.float32)
    matmul_small_int4dp(x, *_views(q), out, 1)
    want, _ = _model(x, q)
    np.testing.assert_array_equal(out, want.astype(np.float32))
    assert abs(out[0, 1]) == 8 * K


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_bad_token_takes_the_fp32_loop(bad):
    """inf or NaN in a full group of one token: the call takes small_t_int4.py's loop,
    so the bad token's outputs are not finite and every output equals that loop's."""
    R, K = 9, 392
    q = quantize(torch.randn(R, K), "int4", group_size=GROUP)
    x = np.random.default_rng(0).standard_normal((3, K)).astype(np.float32)
    x[1, 17] = bad
    for nch in (1, 2):
        out = np.empty((3, R), np.float32)
        matmul_small_int4dp(x, *_views(q), out, nch)
        assert not np.isfinite(out[1]).any()
        want = np.empty((3, R), np.float32)
        matmul_small_int4(x, *_views(q), want, 1)
        np.testing.assert_array_equal(out[[0, 2]], want[[0, 2]])


def test_inf_in_the_short_group_keeps_the_byte_path():
    """inf past the last full group is dotted in fp32 (no 8-bit form needed): that token's
    outputs are not finite, the others keep the byte dot products (the exact model)."""
    R, K = 8, 200
    q = quantize(torch.randn(R, K), "int4", group_size=GROUP)
    x = np.random.default_rng(1).standard_normal((2, K)).astype(np.float32)
    x[1, 150] = np.inf
    out = np.empty((2, R), np.float32)
    matmul_small_int4dp(x, *_views(q), out, 1)
    assert not np.isfinite(out[1]).any()
    want, mag = _model(x[:1], q)
    assert (np.abs(out[0] - want[0]) <= 1e-5 * mag[0]).all()


def test_generic_target():
    """Compiled for a generic x86-64 target (no VNNI: the byte sums as generic vector IR)
    the kernel still equals the T == 1 GEMV compiled alike."""
    code = (
        "import numpy as np, torch\n"
        "from moe.cpu_kernels import quantize\n"
        "from moe.cpu_kernels.int4_dot8 import gemv_int4_dot8, quantize_x8\n"
        "from moe.cpu_kernels.int4_gemv import permute_x\n"
        "from moe.cpu_kernels.small_t_int4dp import matmul_small_int4dp\n"
        "from moe.cpu_kernels.numba_util import AVX512VNNI\n"
        "assert not AVX512VNNI\n"
        "R, K = 9, 2200\n"
        "q = quantize(torch.randn(R, K), 'int4', group_size=128)\n"
        "p = q.packed_RB.numpy(); w = p.view(np.int32); s = q.scale_RG.numpy()\n"
        "x = np.random.default_rng(0).standard_normal((7, K)).astype(np.float32)\n"
        "out = np.zeros((7, R), np.float32)\n"
        "matmul_small_int4dp(x, p, w, s, out, 1)\n"
        "for t in range(7):\n"
        "    x8 = np.zeros(K, np.int8); ts = np.empty(K // 128, np.float32)\n"
        "    corr = np.empty((K // 128, 16), np.int32)\n"
        "    assert quantize_x8(x[t], x8, ts, corr)\n"
        "    xp = np.empty(K, np.float32); xsum = np.empty(s.shape[1], np.float32)\n"
        "    permute_x(x[t], 128, xp, xsum)\n"
        "    one = np.empty(R, np.float32)\n"
        "    gemv_int4_dot8(x8, ts, corr, x[t], xsum, p, w, s, one, 0, R)\n"
        "    np.testing.assert_allclose(out[t], one, rtol=2e-6, atol=2e-6 * np.abs(one).max())\n"
    )
    run_on_generic_target(code)


@pytest.mark.parametrize("T", [2, 5, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_ffn_takes_it(T, dtype, monkeypatch):
    """expert_ffn sends int4 (group 128) weights to this path at T >= MIN_T (no upper
    bound) where INT4DP_SMALL_T holds (both matmuls: token and hidden vector), and matches the
    reference within the 8-bit token rounding's tolerance."""
    calls = []
    real = expert_ffn_module.matmul_small_int4dp
    monkeypatch.setattr(expert_ffn_module, "matmul_small_int4dp", lambda *a: (calls.append(1), real(*a)))
    g = torch.Generator().manual_seed(T)
    D, F = 264, 136
    w13 = quantize(torch.randn(2 * F, D, generator=g) / D ** 0.5, "int4", group_size=GROUP)
    w2 = quantize(torch.randn(D, F, generator=g) / F ** 0.5, "int4", group_size=GROUP)
    x = torch.randn(T, D, generator=g).to(dtype)
    torch.testing.assert_close(expert_ffn(x, w13, w2), expert_ffn_reference(x, w13, w2),
                               **kernel_tol(dtype, "int4", T))
    assert len(calls) == (2 if INT4DP_SMALL_T and MIN_T <= T else 0)
