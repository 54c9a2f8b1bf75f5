"""int4 decode against an 8-bit token (int4_dot8.py): the rounding, the GEMV against a
numpy model of the same integer arithmetic, the fused decode against the torch expert,
bad values, and the generic (no VNNI) form."""
import importlib

import numpy as np
import pytest
import torch

from moe.cpu_kernels import expert_ffn_reference, quantize
from moe.cpu_kernels import decode as Dk
from moe.cpu_kernels.int4_dot8 import DOT8_DECODE, GROUP, LANES, TINY, gemv_int4_dot8, quantize_x8
from moe.cpu_kernels.int4_gemv import permute_x
from moe.cpu_kernels.quant import Int4Weight
from moe.cpu_kernels.weight_views import weight_info
from generic_target import run_on_generic_target
from kernel_tol import DOT8

expert_ffn_module = importlib.import_module("moe.cpu_kernels.expert_ffn")


def _x8_model(x):
    """numpy model of quantize_x8: (x8 of the full groups, ts, corr)."""
    G = x.shape[0] // GROUP
    xg = x[:G * GROUP].reshape(G, GROUP).astype(np.float32)
    amax = np.abs(xg).max(axis=1) if G else np.zeros(0, np.float32)
    amax = np.where(amax < TINY, np.float32(0), amax).astype(np.float32)
    ts = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    x8 = np.rint(xg * inv[:, None]).astype(np.int8)
    q = x8.astype(np.int32)
    corr = -8 * (q[:, :64].reshape(G, LANES, 4).sum(2) + q[:, 64:].reshape(G, LANES, 4).sum(2))
    return x8.reshape(-1), ts, corr


def _x8(x):
    G = x.shape[0] // GROUP
    x8 = np.zeros(x.shape[0], np.int8)
    ts = np.full(G, np.nan, np.float32)
    corr = np.full((G, LANES), 12345, np.int32)
    ok = quantize_x8(x, x8, ts, corr)
    return ok, x8, ts, corr


@pytest.mark.parametrize("N", [128, 384, 300, 100, 2048])
def test_quantize_x8_matches_model(N):
    """x8, the group scales and the +8 corrections equal the numpy model exactly; the
    columns past the last full group are left alone."""
    x = (np.random.default_rng(N).standard_normal(N) * 3).astype(np.float32)
    x[:GROUP:7] *= -50  # an outlier-heavy first group, largest magnitude negative
    ok, x8, ts, corr = _x8(x)
    assert ok
    want_x8, want_ts, want_corr = _x8_model(x)
    full = N // GROUP * GROUP
    np.testing.assert_array_equal(x8[:full], want_x8)
    assert not x8[full:].any()
    np.testing.assert_array_equal(ts, want_ts)
    np.testing.assert_array_equal(corr, want_corr)
    if full:
        assert np.abs(x8).max() == 127
        err = np.abs(x8[:full].reshape(-1, GROUP) * ts[:, None] - x[:full].reshape(-1, GROUP))
        assert (err <= ts[:, None] / 2 * (1 + 1e-5)).all()  # at most half a step per element


def test_quantize_x8_zero_tiny_and_bad_groups():
    """An all-zero or tiny group rounds to zero with scale 0; inf or NaN in a full group
    makes the token unusable; inf in the columns past the full groups does not."""
    x = np.zeros(300, np.float32)
    x[130] = 1e-35
    x[200] = -2.5
    ok, x8, ts, corr = _x8(x)
    assert ok and ts[0] == 0 and not x8[:128].any() and not corr[0].any()
    assert x8[130] == 0 and x8[200] == -127 and ts[1] == np.float32(2.5) / np.float32(127)
    for bad in (np.inf, -np.inf, np.nan):
        y = x.copy()
        y[255] = bad
        assert not _x8(y)[0]
    y = x.copy()
    y[299] = np.inf  # the tail is dotted in fp32 with the unrounded token
    assert _x8(y)[0]


def _gemv(q, x, rows):
    S = x.shape[0]
    p = q.packed_RB.numpy()
    ok, x8, ts, corr = _x8(x)
    assert ok
    xp, xsum = np.empty_like(x), np.empty(-(-S // GROUP), np.float32)
    permute_x(x, GROUP, xp, xsum)
    out = np.full(q.packed_RB.shape[0], np.nan, np.float32)
    gemv_int4_dot8(x8, ts, corr, x, xsum, p, p.view(np.int32), q.scale_RG.numpy(), out, *rows)
    return out, x8, ts


# Full-group counts odd and even (the group loop runs pairs, then one more), rows with
# only a shorter group, with a shorter last group, and real row lengths.
@pytest.mark.parametrize("R,S", [(9, 256), (13, 520), (3, 136), (6, 1408), (5, 4096), (4, 384), (7, 104), (3, 2048)])
def test_gemv_int4_dot8_matches_integer_model(R, S):
    """Each row equals the dequantised row times the token as the kernel rounds it (full
    groups: x8 * ts; the shorter last group: x itself), up to fp32 summation order."""
    q = quantize(torch.randn(R, S, generator=torch.Generator().manual_seed(S)), "int4", group_size=GROUP)
    x = np.random.default_rng(R).standard_normal(S).astype(np.float32)
    out, x8, ts = _gemv(q, x, (0, R))
    full = S // GROUP * GROUP
    xr = np.concatenate([(x8[:full].reshape(-1, GROUP) * ts[:, None].astype(np.float64)).ravel(), x[full:]])
    want = q.dequantize().double().numpy() @ xr
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_gemv_int4_dot8_row_window_and_extreme_codes():
    """Rows r_lo:r_hi only are written; the codes -8 and 7 (stored nibbles 0 and 15)
    against tokens of +-127 stay exact."""
    R, S = 6, 512
    packed = torch.full((R, S // 2), 0xF0, dtype=torch.uint8)  # low nibble v = -8, high v = 7
    packed[1] = 0x0F  # low 7, high -8
    packed[2, ::2] = 0x00  # -8, -8
    q = Int4Weight(packed_RB=packed, scale_RG=torch.full((R, S // GROUP), 0.5), cols=S, group_size=GROUP)
    x = np.where(np.arange(S) % 3 == 0, -1.0, 1.0).astype(np.float32)
    out, x8, _ = _gemv(q, x, (1, 4))
    assert np.abs(x8).min() == 127
    assert np.isnan(out[0]) and np.isnan(out[4:]).all()
    want = q.dequantize().double().numpy() @ x.astype(np.float64)
    np.testing.assert_allclose(out[1:4], want[1:4], rtol=1e-6)


DECODE_SHAPES = [(160, 96), (264, 136), (136, 392), (256, 520), (1024, 384)]


def _weights(D, F, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(2 * F, D, generator=g) / D ** 0.5
    w2 = torch.randn(D, F, generator=g) / F ** 0.5
    return quantize(w13, "int4", group_size=GROUP), quantize(w2, "int4", group_size=GROUP)


def _decode(w13, w2, x_TD, nch):
    y_TD = torch.full(x_TD.shape, float("nan"), dtype=x_TD.dtype)
    args = (x_TD.data_ptr(), y_TD.data_ptr(), x_TD.dtype == torch.bfloat16) + weight_info(w13, "w13").views \
        + weight_info(w2, "w2").views
    Dk.decode_int4_dot8(*args) if nch is None else Dk.decode_int4_dot8_pool(*args, nch)
    return y_TD


@pytest.mark.parametrize("D,F", DECODE_SHAPES)
@pytest.mark.parametrize("nch", [None, 2, 3])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_decode_int4_dot8_matches_reference(D, F, nch, x_dtype):
    """The fused decode equals the torch expert within the 8-bit token rounding, and the
    serial and pooled forms agree to fp32 summation order."""
    w13, w2 = _weights(D, F)
    x_TD = torch.randn(1, D, generator=torch.Generator().manual_seed(D + F)).to(x_dtype)
    y_TD = _decode(w13, w2, x_TD, nch)
    torch.testing.assert_close(y_TD, expert_ffn_reference(x_TD, w13, w2), **DOT8)
    if nch is not None and x_dtype == torch.float32:
        torch.testing.assert_close(y_TD, _decode(w13, w2, x_TD, None), rtol=1e-5, atol=1e-5)


def test_decode_int4_dot8_error_is_far_below_the_int4_rounding():
    """On a DeepSeek-V2-Lite-sized expert the 8-bit token moves the output by a few
    percent of its largest value at most, a small fraction of what int4 weights do."""
    g = torch.Generator().manual_seed(7)
    D, F = 2048, 1408
    w13f, w2f = torch.randn(2 * F, D, generator=g) / D ** 0.5, torch.randn(D, F, generator=g) / F ** 0.5
    w13, w2 = quantize(w13f, "int4", group_size=GROUP), quantize(w2f, "int4", group_size=GROUP)
    x_TD = torch.randn(1, D, generator=g)
    ref = expert_ffn_reference(x_TD, w13, w2)
    token_err = (_decode(w13, w2, x_TD, 2) - ref).abs().max() / ref.abs().max()
    weight_err = (ref - expert_ffn_reference(x_TD, w13f, w2f)).abs().max() / ref.abs().max()
    assert token_err < 0.03 and token_err < weight_err / 4


@pytest.mark.parametrize("where", ["token", "tail", "hidden"])
def test_decode_int4_dot8_propagates_bad_values(where):
    """inf or NaN in the token (a full group or the shorter last one), or an overflowing
    hidden vector, stay visible in the output where the reference's are."""
    w13, w2 = _weights(264, 136)
    x_TD = torch.randn(1, 264)
    if where == "token":
        x_TD[0, 100] = float("inf")
    elif where == "tail":
        x_TD[0, 260] = float("nan")
    else:
        x_TD *= 3e19
    y_TD = _decode(w13, w2, x_TD, 2)
    want = expert_ffn_reference(x_TD, w13, w2)
    assert not torch.isfinite(want).all()
    assert torch.equal(torch.isfinite(y_TD), torch.isfinite(want))


def test_expert_ffn_int4_decode_choice():
    """expert_ffn's int4 decode is the 8-bit token form exactly where DOT8_DECODE holds."""
    serial, pool = expert_ffn_module._DECODE["int4"]
    assert (serial is Dk.decode_int4_dot8) == DOT8_DECODE
    assert (pool is Dk.decode_int4_dot8_pool) == DOT8_DECODE


def test_gemv_int4_dot8_on_a_generic_target():
    """Compiled for a generic x86-64 target (no VNNI: the byte dot products as generic
    vector IR) the GEMV still equals the integer model."""
    code = (
        "import numpy as np, torch\n"
        "from moe.cpu_kernels import quantize\n"
        "from moe.cpu_kernels.int4_dot8 import gemv_int4_dot8, quantize_x8\n"
        "from moe.cpu_kernels.numba_util import AVX512VNNI\n"
        "assert not AVX512VNNI\n"
        "S, R = 520, 5\n"
        "q = quantize(torch.randn(R, S), 'int4', group_size=128)\n"
        "x = np.random.default_rng(0).standard_normal(S).astype(np.float32)\n"
        "x8 = np.zeros(S, np.int8); ts = np.zeros(4, np.float32); corr = np.zeros((4, 16), np.int32)\n"
        "assert quantize_x8(x, x8, ts, corr)\n"
        "xsum = np.array([0, 0, 0, 0, x[512:].sum()], np.float32)\n"
        "p = q.packed_RB.numpy(); out = np.empty(R, np.float32)\n"
        "gemv_int4_dot8(x8, ts, corr, x, xsum, p, p.view(np.int32), q.scale_RG.numpy(), out, 0, R)\n"
        "xr = np.concatenate([(x8[:512].reshape(4, 128) * ts[:, None].astype(np.float64)).ravel(), x[512:]])\n"
        "want = q.dequantize().double().numpy() @ xr\n"
        "np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())\n"
    )
    run_on_generic_target(code)
