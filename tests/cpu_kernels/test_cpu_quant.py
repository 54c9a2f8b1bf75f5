"""quantize / dequantize: error bounds, packed layout, validation."""
import pytest
import torch

from moe.cpu_kernels import Int4Weight, Int8Weight, quantize

# (rows, cols): odd sizes, a single column, exact and partial int4 groups.
SHAPES = [(1, 1), (3, 33), (47, 33), (5, 128), (7, 160), (2, 257), (0, 64)]
GROUPS = [32, 64, 128]


def _w(R, C, dtype=torch.float32):
    return (torch.randn(R, C) * torch.linspace(0.01, 3.0, max(R, 1))[:R, None]).to(dtype)


@pytest.mark.parametrize("R,C", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_error_within_half_step(R, C, dtype):
    """Every int8 element is within half a row step (scale / 2) of the original."""
    w_RC = _w(R, C, dtype)
    q = quantize(w_RC, "int8")
    assert isinstance(q, Int8Weight) and tuple(q.shape) == (R, C)
    err_RC = (q.dequantize() - w_RC.float()).abs()
    assert bool((err_RC <= q.scale_R[:, None] * (0.5 + 1e-5)).all())
    assert q.nbytes == R * C + 4 * R


@pytest.mark.parametrize("R,C", SHAPES)
@pytest.mark.parametrize("group", GROUPS)
def test_int4_error_within_half_step(R, C, group):
    """Every int4 element is within half a group step (scale / 2) of the original."""
    w_RC = _w(R, C)
    q = quantize(w_RC, "int4", group_size=group)
    assert isinstance(q, Int4Weight) and tuple(q.shape) == (R, C)
    scale_RC = q.scale_RG.repeat_interleave(group, dim=1)[:, :C]
    err_RC = (q.dequantize() - w_RC).abs()
    assert bool((err_RC <= scale_RC * (0.5 + 1e-5)).all())
    assert q.packed_RB.shape[1] == (C // group) * (group // 2) + (C % group + 1) // 2


def test_int4_relative_error_is_bounded():
    """On a Gaussian weight int4's relative error is near the uniform-quantiser value and falls with group size."""
    w_RC = torch.randn(64, 512)
    errs = [float((quantize(w_RC, "int4", group_size=g).dequantize() - w_RC).norm() / w_RC.norm())
            for g in GROUPS]
    # A step of amax / 7 with amax ~ 2.5-3 sigma gives RMSE = step / sqrt(12) ~ 0.10-0.12 sigma.
    assert all(e < 0.125 for e in errs) and errs[0] < errs[1] < errs[2]
    int8_err = float((quantize(w_RC, "int8").dequantize() - w_RC).norm() / w_RC.norm())
    assert int8_err < 0.01


def test_int4_packed_layout_is_split_halves():
    """Byte i of a group holds column i (low nibble) and column i + ceil(m/2) (high nibble)."""
    # One row, 35 columns, group 32: a full group (16 bytes) then a 3-column group (2 bytes).
    q_C = torch.tensor([(c % 15) - 7 for c in range(35)], dtype=torch.float32)
    q_C[33] = 7  # each group reaches |q| = 7, so both scales are exactly 0.5
    w_RC = (q_C * 0.5)[None]  # scale of each group becomes exactly 7 * 0.5 / 7 = 0.5
    q = quantize(w_RC, "int4", group_size=32)
    nib_C = (q_C + 8).to(torch.uint8)
    want = torch.empty(18, dtype=torch.uint8)
    want[:16] = nib_C[:16] | (nib_C[16:32] << 4)
    want[16] = nib_C[32] | (nib_C[34] << 4)
    want[17] = nib_C[33] | (8 << 4)  # odd last group: unused high nibble holds 8 (= 0)
    assert torch.equal(q.packed_RB[0], want)
    assert torch.equal(q.scale_RG, torch.tensor([[0.5, 0.5]]))
    assert torch.equal(q.dequantize(), w_RC)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_zero_rows_dequantize_exactly(scheme):
    """All-zero rows (and groups) round-trip to exact zeros without dividing by zero."""
    w_RC = torch.zeros(3, 70)
    w_RC[1] = torch.randn(70)
    deq = quantize(w_RC, scheme, group_size=32).dequantize()
    assert torch.equal(deq[0], torch.zeros(70)) and torch.equal(deq[2], torch.zeros(70))


def test_dequantize_dtype():
    """dequantize(dtype) returns the requested dtype."""
    q = quantize(torch.randn(4, 64), "int4", group_size=64)
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16


BAD = [
    ("scheme", lambda: quantize(torch.randn(2, 8), "int2"), ValueError, "unknown quantisation scheme"),
    ("group 16", lambda: quantize(torch.randn(2, 8), "int4", group_size=16), ValueError, "group_size must be one of"),
    ("group bool", lambda: quantize(torch.randn(2, 8), "int4", group_size=True), ValueError, "group_size"),
    ("group float", lambda: quantize(torch.randn(2, 8), "int4", group_size=32.0), ValueError, "group_size"),
    ("1-D", lambda: quantize(torch.randn(8), "int8"), ValueError, "must be 2-D"),
    ("int dtype", lambda: quantize(torch.ones(2, 8, dtype=torch.int32), "int8"), ValueError, "float32, bfloat16"),
    ("nan", lambda: quantize(torch.tensor([[1.0, float("nan")]]), "int8"), ValueError, "inf or NaN"),
    ("not tensor", lambda: quantize([[1.0]], "int8"), TypeError, "torch.Tensor"),
    ("int8 scale shape", lambda: Int8Weight(q_RC=torch.zeros(2, 3, dtype=torch.int8), scale_R=torch.ones(3)),
     ValueError, "scale_R must be float32"),
    ("int4 packed shape", lambda: Int4Weight(packed_RB=torch.zeros(2, 3, dtype=torch.uint8),
                                             scale_RG=torch.ones(2, 1), cols=8, group_size=32),
     ValueError, "packed_RB must be"),
    ("int4 group", lambda: Int4Weight(packed_RB=torch.zeros(2, 4, dtype=torch.uint8),
                                      scale_RG=torch.ones(2, 1), cols=8, group_size=8),
     ValueError, "group_size must be one of"),
]


@pytest.mark.parametrize("name,call,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_clear_errors(name, call, exc, msg):
    """Bad weights, schemes, group sizes and packed tensors raise errors naming the problem."""
    with pytest.raises(exc, match=msg):
        call()
