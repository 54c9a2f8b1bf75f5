"""expert_ffn (Numba) against expert_ffn_reference (plain torch) over shapes, formats, dtypes."""
import importlib
import threading

import numpy as np
import pytest
import torch

from moe.cpu_kernels import expert_ffn, expert_ffn_reference, quantize
from moe.cpu_kernels import tiles
from kernel_tol import kernel_tol

expert_ffn_module = importlib.import_module("moe.cpu_kernels.expert_ffn")

# (T, D, F): decode sizes, odd sizes, a size with full and partial int4 groups, empty T.
SHAPES = [
    (1, 33, 47),
    (3, 33, 47),
    (17, 47, 33),
    (64, 33, 47),
    (0, 33, 47),
    (1, 160, 96),
    (1, 130, 67),  # T = 1 rows with full 64-column steps, a column tail and a row tail
    (5, 160, 96),
    (2, 1, 1),
    (4, 1100, 1030),  # K beyond one 1024-column chunk, with a partial int4 group at the end
    (1, 1100, 530),  # T = 1 rows of several GEMV steps plus a tail; prefetch past the last block
    (8, 256, 200),  # small-T paths; int4 group 128: whole groups (w13), a shorter last group (w2)
    (16, 520, 136),  # the largest small T; int4 rows of whole words with group tails on both weights
]
# Weight formats: dense dtypes and packed schemes (int4 with each group size).
FORMATS = ["fp32", "bf16", "int8", "int4-32", "int4-64", "int4-128"]
X_DTYPES = [torch.float32, torch.bfloat16]
# Kernel and reference read identical weights and both accumulate in fp32; they differ
# only in summation order (fp32) plus, for bf16 output, one final rounding step.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3)}


def make_weights(D, F, fmt, seed=0):
    """w13 [2F, D] and w2 [D, F] in format fmt, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(2 * F, D, generator=g) / max(D, 1) ** 0.5
    w2 = torch.randn(D, F, generator=g) / max(F, 1) ** 0.5
    if fmt == "fp32":
        return w13, w2
    if fmt == "bf16":
        return w13.bfloat16(), w2.bfloat16()
    if fmt == "int8":
        return quantize(w13, "int8"), quantize(w2, "int8")
    group = int(fmt.split("-")[1])
    return quantize(w13, "int4", group_size=group), quantize(w2, "int4", group_size=group)


@pytest.mark.parametrize("T,D,F", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("x_dtype", X_DTYPES)
def test_matches_reference(T, D, F, fmt, x_dtype):
    """The kernel output equals the torch reference within the dtype's tolerance."""
    w13, w2 = make_weights(D, F, fmt)
    x_TD = torch.randn(T, D).to(x_dtype)
    y_TD = expert_ffn(x_TD, w13, w2)
    assert y_TD.dtype == x_dtype and tuple(y_TD.shape) == (T, D)
    ref = expert_ffn_reference(x_TD, w13, w2)
    torch.testing.assert_close(y_TD, ref, **kernel_tol(x_dtype, fmt, T, ref))


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("serial_bytes", [0, 1 << 40])
def test_parallel_and_serial_paths_match_reference(T, fmt, serial_bytes, monkeypatch):
    """Forcing every matmul onto the thread pool (0) or the calling thread (huge) gives the reference."""
    monkeypatch.setattr(expert_ffn_module, "SERIAL_BYTES", serial_bytes)
    w13, w2 = make_weights(130, 67, fmt)
    x_TD = torch.randn(T, 130)
    torch.testing.assert_close(expert_ffn(x_TD, w13, w2), expert_ffn_reference(x_TD, w13, w2),
                               **kernel_tol(torch.float32, fmt, T))


@pytest.mark.parametrize("fmt", FORMATS)
def test_out_argument_is_filled_and_returned(fmt):
    """With out= the result is written into the given tensor, which is returned."""
    w13, w2 = make_weights(33, 47, fmt)
    x_TD = torch.randn(3, 33)
    out = torch.full((3, 33), float("nan"))
    y_TD = expert_ffn(x_TD, w13, w2, out=out)
    assert y_TD is out
    torch.testing.assert_close(out, expert_ffn_reference(x_TD, w13, w2), **kernel_tol(torch.float32, fmt, 3))


def test_non_contiguous_activations_are_accepted():
    """A strided x_TD gives the same result as its contiguous copy."""
    w13, w2 = make_weights(33, 47, "bf16")
    x_big = torch.randn(4, 66)
    x_TD = x_big[:, ::2]
    torch.testing.assert_close(expert_ffn(x_TD, w13, w2), expert_ffn(x_TD.contiguous(), w13, w2),
                               rtol=0, atol=0)


def test_zero_hidden_units_gives_zeros():
    """An expert with F = 0 maps every token to zero."""
    y_TD = expert_ffn(torch.randn(2, 5), torch.empty(0, 5), torch.empty(5, 0))
    assert torch.equal(y_TD, torch.zeros(2, 5))


def test_nan_in_activations_propagates():
    """A NaN token gives NaN outputs, as in the reference (no fast-math NaN folding)."""
    w13, w2 = make_weights(33, 47, "int8")
    x_TD = torch.randn(2, 33)
    x_TD[1, 3] = float("nan")
    y_TD = expert_ffn(x_TD, w13, w2)
    assert torch.isnan(y_TD[1]).all() and not torch.isnan(y_TD[0]).any()


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4-128", "int4-64"])
def test_concurrent_calls_from_threads(fmt):
    """Several Python threads calling at once (with and without a thread cap) get correct results."""
    w13, w2 = make_weights(160, 96, fmt)
    xs = [torch.randn(t, 160) for t in (1, 2, 7, 1, 16, 3)]
    expected = [expert_ffn_reference(x, w13, w2) for x in xs]
    results = [None] * len(xs)
    errors = []

    def work(i):
        try:
            for _ in range(5):
                results[i] = expert_ffn(xs[i], w13, w2, num_threads=1 if i % 2 else None)
        except Exception as exc:  # re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for x, got, want in zip(xs, results, expected):
        torch.testing.assert_close(got, want, **kernel_tol(torch.float32, fmt, x.shape[0]))


def test_num_threads_cap_matches_default():
    """A per-call cap of one thread gives the same result as the default thread count."""
    w13, w2 = make_weights(47, 33, "fp32")
    x_TD = torch.randn(17, 47)
    torch.testing.assert_close(expert_ffn(x_TD, w13, w2, num_threads=1), expert_ffn(x_TD, w13, w2),
                               **TOL[torch.float32])


def test_bf16_round_trip_helpers_match_torch_exactly():
    """widen_bf16 / narrow_to_bf16 equal torch's bf16 conversions bit for bit (ties, inf, subnormals)."""
    x_TD = torch.randn(8, 257) * torch.logspace(-30, 30, 257)
    # Exact ties (low 16 bits 0x8000) for round-half-to-even on both parities, and specials.
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x00008000], dtype=torch.int32).view(torch.float32)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45])
    x_TD = torch.cat([x_TD.flatten(), ties, specials]).reshape(1, -1).contiguous()
    bits = np.empty(x_TD.shape, np.uint16)
    tiles.narrow_to_bf16(x_TD.numpy(), bits)
    want = x_TD.to(torch.bfloat16)
    nan = torch.isnan(x_TD)
    got = torch.from_numpy(bits.view(np.int16))
    # NaN payloads are not specified; any NaN pattern must stay a NaN.
    assert torch.equal(got[~nan], want.view(torch.int16)[~nan])
    back = np.empty(x_TD.shape, np.float32)
    tiles.widen_bf16(bits, back)
    assert np.array_equal(back, want.float().numpy(), equal_nan=True)
    assert np.isnan(back[nan.numpy()]).all()


BAD_INPUTS = [
    # (description, callable building args, expected exception, message fragment)
    ("x 1-D", lambda w13, w2: (torch.randn(8), w13, w2), ValueError, "x_TD must be 2-D"),
    ("x fp16", lambda w13, w2: (torch.randn(2, 8).half(), w13, w2), ValueError, "x_TD must be float32 or bfloat16"),
    ("x not a tensor", lambda w13, w2: (np.zeros((2, 8)), w13, w2), TypeError, "x_TD must be a torch.Tensor"),
    ("D mismatch", lambda w13, w2: (torch.randn(2, 9), w13, w2), ValueError, "model dim 9"),
    ("odd w13 rows", lambda w13, w2: (torch.randn(2, 8), w13[:5], w2), ValueError, "even row count"),
    ("w2 shape", lambda w13, w2: (torch.randn(2, 8), w13, w2[:5]), ValueError, r"w2 must be \[D, F\]"),
    ("w13 fp16", lambda w13, w2: (torch.randn(2, 8), w13.half(), w2), ValueError, "w13 must be float32 or bfloat16"),
    ("w13 strided", lambda w13, w2: (torch.randn(2, 8), torch.randn(8, 12).T, w2), ValueError, "contiguous"),
    ("w2 3-D", lambda w13, w2: (torch.randn(2, 8), w13, w2[None]), ValueError, "w2 must be 2-D"),
    ("w13 list", lambda w13, w2: (torch.randn(2, 8), [[0.0]], w2), TypeError, "w13 must be a torch.Tensor"),
]


@pytest.mark.parametrize("name,build,exc,msg", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(name, build, exc, msg):
    """Malformed inputs raise an error naming the argument and what was expected."""
    w13, w2 = make_weights(8, 6, "fp32")
    with pytest.raises(exc, match=msg):
        expert_ffn(*build(w13, w2))


def test_bad_out_and_thread_cap_raise():
    """A wrong out= tensor or an impossible thread cap is rejected before any work."""
    w13, w2 = make_weights(8, 6, "fp32")
    x_TD = torch.randn(2, 8)
    with pytest.raises(ValueError, match="out must be"):
        expert_ffn(x_TD, w13, w2, out=torch.empty(2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="num_threads must be in"):
        expert_ffn(x_TD, w13, w2, num_threads=0)
    with pytest.raises(TypeError, match="num_threads must be an int"):
        expert_ffn(x_TD, w13, w2, num_threads=True)
