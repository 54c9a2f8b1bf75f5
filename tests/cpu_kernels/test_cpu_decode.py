"""The T == 1 kernels (gemv.py, int4_gemv.py, decode.py) against plain torch / numpy references."""
import importlib

import numba
import numpy as np
import pytest
import torch

from moe.cpu_kernels import expert_ffn, expert_ffn_reference, quantize
from moe.cpu_kernels import decode as Dk
from moe.cpu_kernels.combine import combine_rows
from moe.cpu_kernels.gemv import gemv_bf16, gemv_int8
from moe.cpu_kernels.gemv_madd import gemv_int8_madd, quantize_x16
from moe.cpu_kernels.gemv_reg import FOUR_ROW_COLS, gemv_bf16_reg
from moe.cpu_kernels.int4_gemv import gemv_int4, permute_x
from moe.cpu_kernels.int4_madd import gemv_int4_madd, permute_x16
from moe.cpu_kernels.weight_views import weight_info
from generic_target import run_on_generic_target
from kernel_tol import BF16, MADD, kernel_tol

expert_ffn_module = importlib.import_module("moe.cpu_kernels.expert_ffn")
weight_views = importlib.import_module("moe.cpu_kernels.weight_views")

# (R rows, S columns, c0, n): whole rows, windows starting on a 128-column boundary,
# row counts that are not a multiple of 4, windows shorter than a GEMV step or a group,
# and windows ending with a partial int4 group.
WINDOWS = [
    (9, 256, 0, 256),
    (13, 520, 128, 392),
    (8, 136, 0, 136),
    (7, 96, 0, 96),
    (21, 1100, 256, 600),
    (4, 300, 128, 172),
    (3, 2, 0, 2),
]
# Kernel and reference read identical weights and accumulate in fp32; only the order differs.
TOL = dict(rtol=1e-4, atol=1e-4)


def _window_ref(w_RS, c0, n, x_N):
    return (w_RS[:, c0:c0 + n].to(torch.float32) @ torch.from_numpy(x_N)).numpy()


@pytest.mark.parametrize("R,S,c0,n", WINDOWS)
def test_gemv_bf16_window(R, S, c0, n):
    """gemv_bf16 over a column window equals the dense product of the window."""
    w = torch.randn(R, S).bfloat16()
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    out = np.full(R, np.nan, np.float32)
    gemv_bf16(x, w.view(torch.int16).numpy().view(np.uint16), out, 0, R, c0, n)
    np.testing.assert_allclose(out, _window_ref(w, c0, n, x), **TOL)


@pytest.mark.parametrize("R,S,c0,n", WINDOWS)
def test_gemv_int8_window(R, S, c0, n):
    """gemv_int8 over a column window equals the dequantised window times x."""
    q = quantize(torch.randn(R, S), "int8")
    x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    out = np.full(R, np.nan, np.float32)
    gemv_int8(x, q.q_RC.numpy(), q.scale_R.numpy(), out, 0, R, c0, n)
    np.testing.assert_allclose(out, _window_ref(q.dequantize(), c0, n, x), **TOL)


@pytest.mark.parametrize("R,S,c0,n", [w for w in WINDOWS if (w[1] % 128 + 1) // 2 % 4 == 0])
def test_gemv_int4_window(R, S, c0, n):
    """gemv_int4 over a window of whole groups (plus the row's tail group) equals dequant(W) x."""
    q = quantize(torch.randn(R, S), "int4", group_size=128)
    x = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    xp = np.empty_like(x)
    xsum = np.empty(-(-n // 128), np.float32)
    permute_x(x, 128, xp, xsum)
    np.testing.assert_allclose(xsum, [x[g:g + 128].sum() for g in range(0, n, 128)], rtol=1e-5, atol=1e-5)
    p = q.packed_RB.numpy()
    out = np.full(R, np.nan, np.float32)
    gemv_int4(xp, x, xsum, p, p.view(np.int32), q.scale_RG.numpy(), out, 0, R, c0)
    np.testing.assert_allclose(out, _window_ref(q.dequantize(), c0, n, x), **TOL)


# (D, F): F below, at and above one split unit (128), partial int4 groups in both
# weights, D not a multiple of 4.
DECODE_SHAPES = [(160, 96), (264, 136), (136, 392), (256, 520)]
DECODE_FORMATS = ["bf16", "int8", "int4"]


def _weights(D, F, fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(2 * F, D, generator=g) / D ** 0.5
    w2 = torch.randn(D, F, generator=g) / F ** 0.5
    if fmt == "bf16":
        return w13.bfloat16(), w2.bfloat16()
    if fmt == "int8":
        return quantize(w13, "int8"), quantize(w2, "int8")
    return quantize(w13, "int4", group_size=128), quantize(w2, "int4", group_size=128)


@pytest.mark.parametrize("D,F", DECODE_SHAPES)
@pytest.mark.parametrize("fmt", DECODE_FORMATS)
@pytest.mark.parametrize("nch,parallel", [(1, False), (2, True), (3, True)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_matches_reference(D, F, fmt, nch, parallel, x_dtype):
    """The fused decode kernel, serial or split into chunks, equals the torch expert."""
    w13, w2 = _weights(D, F, fmt)
    x_TD = torch.randn(1, D).to(x_dtype)
    y_TD = torch.full((1, D), float("nan"), dtype=x_dtype)
    i13, i2 = weight_info(w13, "w13"), weight_info(w2, "w2")
    assert i13.fmt == i2.fmt == fmt
    args = (x_TD.data_ptr(), y_TD.data_ptr(), x_dtype == torch.bfloat16) + i13.views + i2.views
    if parallel:
        getattr(Dk, f"decode_{fmt}_pool")(*args, nch)
    else:
        getattr(Dk, f"decode_{fmt}")(*args)
    tol = dict(rtol=1e-4, atol=1e-5) if x_dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(y_TD, expert_ffn_reference(x_TD, w13, w2), **tol)


@pytest.mark.parametrize("fmt", DECODE_FORMATS)
@pytest.mark.parametrize("serial_bytes", [0, 1 << 40])
def test_expert_ffn_takes_decode_path(fmt, serial_bytes, monkeypatch):
    """expert_ffn at T == 1 runs the fused kernel (pool or calling thread) and matches the reference."""
    monkeypatch.setattr(expert_ffn_module, "SERIAL_BYTES", serial_bytes)
    calls = []
    serial, pool = expert_ffn_module._DECODE[fmt]
    monkeypatch.setitem(expert_ffn_module._DECODE, fmt, (lambda *a: (calls.append(False), serial(*a)),
                                                         lambda *a: (calls.append(True), pool(*a))))
    w13, w2 = _weights(264, 136, fmt)
    x_TD = torch.randn(1, 264)
    torch.testing.assert_close(expert_ffn(x_TD, w13, w2), expert_ffn_reference(x_TD, w13, w2),
                               **kernel_tol(torch.float32, fmt))
    assert calls == [serial_bytes == 0]


@pytest.mark.parametrize("fmt", DECODE_FORMATS)
@pytest.mark.parametrize("num_threads", [None, 1, 2])
def test_expert_ffn_decode_strided_token_and_thread_cap(fmt, num_threads, monkeypatch):
    """A [1, D] token with a column stride is copied before its address is taken; a
    thread cap applies to the call only; out is written in place."""
    monkeypatch.setattr(expert_ffn_module, "SERIAL_BYTES", 0)
    w13, w2 = _weights(264, 136, fmt)
    x_TD = torch.randn(1, 2 * 264)[:, ::2]
    assert not x_TD.is_contiguous()
    out = torch.full((1, 264), float("nan"))
    before = numba.get_num_threads()
    y_TD = expert_ffn(x_TD, w13, w2, out=out, num_threads=num_threads)
    assert y_TD is out and numba.get_num_threads() == before
    torch.testing.assert_close(out, expert_ffn_reference(x_TD.contiguous(), w13, w2), **kernel_tol(torch.float32, fmt))


def test_expert_ffn_decode_rejects_bad_out():
    """The decode path checks out like every other path: shape, dtype, contiguity."""
    w13, w2 = _weights(264, 136, "int8")
    x_TD = torch.randn(1, 264)
    with pytest.raises(ValueError, match="out must be a CPU torch.float32 tensor of shape"):
        expert_ffn(x_TD, w13, w2, out=torch.empty(1, 264, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be a CPU"):
        expert_ffn(x_TD, w13, w2, out=torch.empty(2, 264))
    with pytest.raises(ValueError, match="out must be contiguous"):
        expert_ffn(x_TD, w13, w2, out=torch.empty(1, 528)[:, ::2])


def test_mixed_or_unsupported_formats_fall_back():
    """Weights without a decode kernel (fp32, int4 group 64, mixed formats) still give the reference."""
    g = torch.Generator().manual_seed(3)
    # Scaled like a model's weights: unscaled ones make O(1) outputs from O(100) partial
    # sums, where the summation order alone (it differs between AVX2 and AVX-512 builds)
    # moves the result by more than the tolerance.
    w13, w2 = torch.randn(272, 160, generator=g) / 160 ** 0.5, torch.randn(160, 136, generator=g) / 136 ** 0.5
    x_TD = torch.randn(1, 160)
    for a, b in [(w13, w2), (quantize(w13, "int4", 64), quantize(w2, "int4", 64)),
                 (quantize(w13, "int8"), w2.bfloat16())]:
        torch.testing.assert_close(expert_ffn(x_TD, a, b), expert_ffn_reference(x_TD, a, b),
                                   rtol=1e-4, atol=1e-4)


def test_weight_info_is_cached_per_weight_rebuilt_and_released():
    """A weight's info is made once, rebuilt when its storage changes, and dropped with the weight."""
    w = torch.randn(8, 256).bfloat16()
    first = weight_info(w, "w")
    assert weight_info(w, "w") is first
    w.set_(torch.randn(8, 256).bfloat16())
    second = weight_info(w, "w")
    assert second is not first and second.views[0].ctypes.data == w.data_ptr()
    key = id(w)
    del w, first, second
    assert key not in weight_views._CACHE


def test_expert_ffn_sees_a_swapped_storage():
    """After set_() on a weight, expert_ffn reads the new values, not stale cached views."""
    w13, w2 = _weights(160, 96, "bf16")
    x_TD = torch.randn(1, 160)
    expert_ffn(x_TD, w13, w2)
    w13.set_(torch.randn(192, 160).bfloat16())
    torch.testing.assert_close(expert_ffn(x_TD, w13, w2), expert_ffn_reference(x_TD, w13, w2),
                               rtol=1e-4, atol=1e-4)


def test_int4_generic_lanes_without_avx512():
    """The int4 GEMV compiled for a generic x86-64 target (no lookup-table shuffle) gives dequant(W) x."""
    code = (
        "import numpy as np, torch\n"
        "from moe.cpu_kernels import quantize\n"
        "from moe.cpu_kernels import int4_gemv as G\n"
        "assert not G._PERMUTE_LUT\n"
        "q = quantize(torch.randn(13, 392), 'int4', group_size=128)\n"
        "x = np.random.default_rng(0).standard_normal(392).astype(np.float32)\n"
        "xp = np.empty_like(x); xs = np.empty(4, np.float32); G.permute_x(x, 128, xp, xs)\n"
        "p = q.packed_RB.numpy(); out = np.empty(13, np.float32)\n"
        "G.gemv_int4(xp, x, xs, p, p.view(np.int32), q.scale_RG.numpy(), out, 0, 13, 0)\n"
        "ref = (q.dequantize() @ torch.from_numpy(x)).numpy()\n"
        "np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)\n"
    )
    run_on_generic_target(code)


def test_register_gemvs_on_a_generic_target():
    """Compiled for a generic x86-64 target (no vpmaddwd: the pair sums as generic vector
    IR), the int8 and int4 multiply-add GEMVs and the bf16 register GEMV still give the
    reference products, on rows for the one-row and the four-row loops."""
    code = (
        "import numpy as np, torch\n"
        "from moe.cpu_kernels import quantize\n"
        "from moe.cpu_kernels.gemv_madd import gemv_int8_madd, quantize_x16\n"
        "from moe.cpu_kernels.gemv_reg import gemv_bf16_reg\n"
        "from moe.cpu_kernels.int4_gemv import permute_x\n"
        "from moe.cpu_kernels.int4_madd import gemv_int4_madd, permute_x16\n"
        "from moe.cpu_kernels.numba_util import AVX2\n"
        "assert not AVX2\n"
        "rng = np.random.default_rng(0)\n"
        "for R, S in ((5, 300), (5, 4160)):\n"
        "    q = quantize(torch.randn(R, S), 'int8')\n"
        "    x16 = rng.integers(-32767, 32768, S).astype(np.int16)\n"
        "    out = np.empty(R, np.float32)\n"
        "    gemv_int8_madd(x16, 2.0 ** -12, q.q_RC.numpy(), q.scale_R.numpy(), out, 0, R)\n"
        "    want = (q.q_RC.double() @ torch.from_numpy(x16).double()) * 2.0 ** -12 * q.scale_R.double()\n"
        "    np.testing.assert_allclose(out, want.numpy(), rtol=1e-6)\n"
        "    w = torch.randn(R, S).bfloat16()\n"
        "    x = rng.standard_normal(S).astype(np.float32)\n"
        "    gemv_bf16_reg(x, w.view(torch.int16).numpy().view(np.uint16), out, 0, R, 0, S)\n"
        "    want = (w.double() @ torch.from_numpy(x).double()).numpy()\n"
        "    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * np.abs(want).max() * S ** 0.5)\n"
        "q = quantize(torch.randn(6, 512), 'int4', group_size=128)\n"
        "x = rng.standard_normal(512).astype(np.float32)\n"
        "xp = np.empty_like(x); xsum = np.empty(4, np.float32); permute_x(x, 128, xp, xsum)\n"
        "x16 = np.empty(512, np.int16); xq = np.empty(512, np.int16)\n"
        "xs = quantize_x16(x, x16); permute_x16(x16, xq)\n"
        "p = q.packed_RB.numpy(); out = np.empty(6, np.float32)\n"
        "gemv_int4_madd(xq, xs, x, xsum, p, p.view(np.int32), q.scale_RG.numpy(), out, 0, 6)\n"
        "want = (q.dequantize().double() @ torch.from_numpy(x16 * xs).double()).numpy()\n"
        "np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())\n"
    )
    run_on_generic_target(code)


def test_quantize_x16_scale_range_and_bad_values():
    """The 16-bit token: power-of-two scale, |x16| <= 32767, exact for bf16 values within
    a factor 128 of the max, error <= xs / 2 elsewhere; zeros give scale 0; inf or NaN give -1 (fp32 path)."""
    x = torch.randn(999).bfloat16().float().numpy()
    x[5] = torch.tensor(-np.abs(x).max() * 1.5).bfloat16().float()  # the largest magnitude is negative
    x16 = np.empty(999, np.int16)
    xs = quantize_x16(x, x16)
    assert xs > 0 and np.log2(xs) == round(np.log2(xs)) and np.abs(x16.astype(np.int32)).max() <= 32767
    err = np.abs(x16 * xs - x)
    assert err.max() <= xs / 2
    near = np.abs(x) >= np.abs(x).max() / 128
    assert (err[near] == 0).all()
    assert quantize_x16(np.zeros(7, np.float32), x16[:7]) == 0.0 and not x16[:7].any()
    big = np.array([np.finfo(np.float32).max, -1.0], np.float32)  # rounds to +-32768: clamped
    assert quantize_x16(big, x16[:2]) > 0 and x16[0] == 32767
    for bad in (np.inf, -np.inf, np.nan):
        assert quantize_x16(np.array([1.0, bad, 2.0], np.float32), x16[:3]) == -1.0


@pytest.mark.parametrize("R,S", [(9, 256), (13, 520), (3, 2), (5, 31), (7, 33), (4, 4100), (9, 8200), (4, 8192), (5, 4096)])
def test_gemv_int8_madd_rows(R, S):
    """gemv_int8_madd equals the dequantised rows times the 16-bit token exactly (up to
    the final fp32 rounding), for rows shorter than one step, with tails, over a flush,
    and for rows long enough for the four-row loop (with a leftover row)."""
    q = quantize(torch.randn(R, S), "int8")
    x16 = np.random.default_rng(4).integers(-32767, 32768, S).astype(np.int16)
    xs = 2.0 ** -12
    out = np.full(R, np.nan, np.float32)
    gemv_int8_madd(x16, xs, q.q_RC.numpy(), q.scale_R.numpy(), out, 0, R)
    want = (q.q_RC.double() @ torch.from_numpy(x16).double()) * xs * q.scale_R.double()
    np.testing.assert_allclose(out, want.numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("R,S,c0,n", [(5, 100, 0, 100), (7, 300, 37, 200), (3, 63, 0, 63), (6, 1408, 704, 704),
                                      (9, 4200, 3, FOUR_ROW_COLS + 5), (4, 8192, 0, 8192),
                                      (5, 8300, 5, 8200)])
def test_gemv_bf16_reg_windows(R, S, c0, n):
    """gemv_bf16_reg (register accumulators; one row or, for long rows, four side by side)
    gives widen(W[:, c0:c0+n]) x for column windows, tails and a leftover row."""
    w = torch.randn(R, S).bfloat16()
    x = np.random.default_rng(5).standard_normal(n).astype(np.float32)
    out = np.full(R, np.nan, np.float32)
    gemv_bf16_reg(x, w.view(torch.int16).numpy().view(np.uint16), out, 0, R, c0, n)
    want = w[:, c0:c0 + n].double() @ torch.from_numpy(x).double()
    np.testing.assert_allclose(out, want.numpy(), rtol=0, atol=2e-6 * float(want.abs().max()) * n ** 0.5)


def test_gemv_int8_madd_extreme_codes_do_not_overflow():
    """All codes -128 against all token values -32767 over 9000 columns (several int32
    flushes) give the exact product."""
    S = 9000  # long enough for the four-row loop; 5 rows: one left for the one-row loop
    q = np.full((5, S), -128, np.int8)
    x16 = np.full(S, -32767, np.int16)
    out = np.empty(5, np.float32)
    gemv_int8_madd(x16, 1.0, q, np.ones(5, np.float32), out, 0, 5)
    assert (out == np.float32(128 * 32767 * S)).all()


@pytest.mark.parametrize("D,F", DECODE_SHAPES)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("nch", [None, 2, 3])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_decode_madd_matches_reference(D, F, fmt, nch, x_dtype):
    """The 16-bit multiply-add decode (used on AVX2 hosts; runs anywhere) equals the
    torch expert within its documented rounding."""
    w13, w2 = _weights(D, F, fmt)
    x_TD = torch.randn(1, D).to(x_dtype)
    y_TD = torch.full((1, D), float("nan"), dtype=x_dtype)
    args = (x_TD.data_ptr(), y_TD.data_ptr(), x_dtype == torch.bfloat16) + weight_info(w13, "w13").views \
        + weight_info(w2, "w2").views
    getattr(Dk, f"decode_{fmt}_madd")(*args) if nch is None else getattr(Dk, f"decode_{fmt}_madd_pool")(*args, nch)
    torch.testing.assert_close(y_TD, expert_ffn_reference(x_TD, w13, w2),
                               **(MADD if x_dtype == torch.float32 else BF16))


@pytest.mark.parametrize("where", ["token", "hidden"])
def test_decode_int8_madd_propagates_bad_values(where):
    """inf or NaN in the token, or an overflowing hidden vector, take the fp32 path: the
    output is not finite where the reference's is not."""
    w13, w2 = _weights(160, 96, "int8")
    x_TD = torch.randn(1, 160)
    if where == "token":
        x_TD[0, 7] = float("nan")
    else:
        x_TD *= 3e19  # gate and up overflow fp32: h holds inf or NaN
    y_TD = torch.zeros(1, 160)
    Dk.decode_int8_madd_pool(x_TD.data_ptr(), y_TD.data_ptr(), False, *weight_info(w13, "w13").views,
                             *weight_info(w2, "w2").views, 2)
    want = expert_ffn_reference(x_TD, w13, w2)
    assert not torch.isfinite(want).all()
    assert torch.equal(torch.isfinite(y_TD), torch.isfinite(want))


def test_permute_x16_matches_the_lane_layout():
    """xq[32p + j] of each full group is column 2j + p // 2 (+ 64 for odd p); the rest is copied."""
    x16 = np.arange(300, dtype=np.int16)
    xq = np.empty_like(x16)
    permute_x16(x16, xq)
    want = [g * 128 + 2 * j + p // 2 + 64 * (p % 2) for g in range(2) for p in range(4) for j in range(32)]
    assert xq[:256].tolist() == want and xq[256:].tolist() == list(range(256, 300))


@pytest.mark.parametrize("R,S", [(9, 256), (13, 520), (3, 136), (6, 1408), (5, 4096)])
def test_gemv_int4_madd_rows(R, S):
    """gemv_int4_madd equals the dequantised rows times the 16-bit token (plus the fp32
    tail group), including rows that end with a shorter group."""
    q = quantize(torch.randn(R, S), "int4", group_size=128)
    p = q.packed_RB.numpy()
    assert p.shape[1] % 4 == 0
    x = np.random.default_rng(5).standard_normal(S).astype(np.float32)
    x16 = np.empty(S, np.int16)
    xs = quantize_x16(x, x16)
    xq = np.empty_like(x16)
    permute_x16(x16, xq)
    xp, xsum = np.empty_like(x), np.empty(-(-S // 128), np.float32)
    permute_x(x, 128, xp, xsum)
    out = np.full(R, np.nan, np.float32)
    gemv_int4_madd(xq, xs, x, xsum, p, p.view(np.int32), q.scale_RG.numpy(), out, 0, R)
    full = S // 128 * 128
    xr = np.concatenate([x16[:full] * xs, x[full:]]).astype(np.float64)  # the token as the kernel reads it
    want = q.dequantize().double().numpy() @ xr
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("where", ["token", "hidden"])
def test_decode_int4_madd_propagates_bad_values(where):
    """As for int8: inf or NaN take the fp32 path and stay visible in the output."""
    w13, w2 = _weights(264, 136, "int4")
    x_TD = torch.randn(1, 264)
    if where == "token":
        x_TD[0, 200] = float("inf")
    else:
        x_TD *= 3e19
    y_TD = torch.zeros(1, 264)
    Dk.decode_int4_madd_pool(x_TD.data_ptr(), y_TD.data_ptr(), False, *weight_info(w13, "w13").views,
                             *weight_info(w2, "w2").views, 2)
    want = expert_ffn_reference(x_TD, w13, w2)
    assert not torch.isfinite(want).all()
    assert torch.equal(torch.isfinite(y_TD), torch.isfinite(want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_rows_is_the_sequential_fp32_sum(dtype):
    """combine_rows sums the chosen rows in the given order as rounded fp32 products and
    sums (the general path's index_add arithmetic) and rounds once to the rows' dtype."""
    K, D = 6, 300
    y_KD = torch.randn(K, D).to(dtype)
    w_K = torch.rand(K).to(dtype).float().numpy()
    slots = np.array([4, 0, 5, 2], np.int64)  # a subset, in expert order
    out = torch.full((1, D), float("nan"), dtype=dtype)
    combine_rows(out.data_ptr(), y_KD.data_ptr(), dtype == torch.bfloat16, K, D, w_K, slots)
    want = torch.zeros(D)
    for k in slots.tolist():
        want.index_add_(0, torch.arange(D), y_KD[k].float() * float(w_K[k]))
    assert torch.equal(out[0], want.to(dtype))


@pytest.mark.parametrize("fmt", DECODE_FORMATS)
def test_decode_thread_cap_is_restored_and_nch_zero_uses_the_setting(fmt, monkeypatch):
    """The pool kernels settle the thread count themselves: nch = 0 takes the calling
    thread's numba setting, nch = -n caps this call at n threads and puts the caller's
    setting back; results equal the reference either way."""
    monkeypatch.setattr(expert_ffn_module, "SERIAL_BYTES", 0)
    w13, w2 = _weights(264, 136, fmt)
    x_TD = torch.randn(1, 264)
    want = expert_ffn_reference(x_TD, w13, w2)
    pool = expert_ffn_module._DECODE[fmt][1]
    before = numba.get_num_threads()
    try:
        for setting in sorted({1, before}):
            numba.set_num_threads(setting)
            for nch in (0, -1, -before):
                y_TD = torch.full((1, 264), float("nan"))
                pool(x_TD.data_ptr(), y_TD.data_ptr(), False, *weight_info(w13, "w13").views,
                     *weight_info(w2, "w2").views, nch)
                torch.testing.assert_close(y_TD, want, **kernel_tol(torch.float32, fmt))
                assert numba.get_num_threads() == setting
            torch.testing.assert_close(expert_ffn(x_TD, w13, w2, num_threads=before), want,
                                       **kernel_tol(torch.float32, fmt))
            assert numba.get_num_threads() == setting
    finally:
        numba.set_num_threads(before)
