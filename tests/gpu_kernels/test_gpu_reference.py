"""Plain-torch references of the fused-MoE kernels: semantics, invariants and input checks."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as Fn

from moe.gpu_kernels import fused_moe_reference, max_padded_rows, moe_align_reference

# (T, K, E, block_size, with expert map)
ALIGN_SHAPES = [(1, 1, 4, 16, False), (5, 2, 8, 16, True), (33, 2, 8, 16, False), (33, 2, 4, 64, True),
                (511, 2, 8, 32, True), (64, 6, 64, 16, False), (7, 1, 1, 16, False)]
# (T, K, E, D, F, with expert map)
FUSED_SHAPES = [(1, 1, 4, 8, 6, False), (5, 2, 8, 17, 9, True), (33, 2, 8, 16, 12, False),
                (33, 2, 4, 9, 33, True), (64, 6, 16, 8, 4, True)]


def _expert_map(G: int, E: int, g: torch.Generator) -> torch.Tensor:
    emap = torch.full((G,), -1, dtype=torch.int64)
    here = torch.randperm(G, generator=g)[: E - 1]
    emap[here] = torch.randperm(E, generator=g)[: E - 1]
    return emap


@pytest.mark.parametrize("T,K,E,block,with_map", ALIGN_SHAPES)
def test_align_reference_invariants(T, K, E, block, with_map):
    """Every kept pair appears once, grouped by ascending slot, padded per slot, with matching block slots."""
    g = torch.Generator().manual_seed(T * 100 + E)
    G = E + 5 if with_map else E
    ids = torch.randint(0, G, (T, K), generator=g)
    emap = _expert_map(G, E, g) if with_map else None
    sorted_ids, expert_ids, num_post = moe_align_reference(ids, block, E, emap)
    slots = (emap[ids] if with_map else ids).flatten()
    P = int(num_post)
    assert sorted_ids.dtype == expert_ids.dtype == num_post.dtype == torch.int32
    assert sorted_ids.shape == (max_padded_rows(T * K, block, E),)
    assert P % block == 0 and P <= sorted_ids.numel()
    assert torch.all(sorted_ids[P:] == T * K) and torch.all(expert_ids[P // block:] == -1)
    used = sorted_ids[:P]
    real = used[used < T * K].long()
    assert torch.equal(real.sort().values, torch.nonzero(slots >= 0).flatten())
    block_slots = expert_ids[:P // block].long().repeat_interleave(block)
    assert torch.equal(slots[real], block_slots[used < T * K])
    assert torch.all(block_slots[1:] >= block_slots[:-1])
    for e in range(E):
        n = int((slots == e).sum())
        assert int((block_slots == e).sum()) == -(-n // block) * block


def test_align_reference_rejects_bad_input():
    """Out-of-range ids and map values, wrong dtypes and bad block sizes raise naming the argument."""
    ids = torch.tensor([[0, 3]])
    with pytest.raises(ValueError, match="topk_ids_TK"):
        moe_align_reference(ids, 16, 3)
    with pytest.raises(ValueError, match="expert_map_E"):
        moe_align_reference(ids, 16, 2, torch.tensor([0, -1, 1, 2]))
    with pytest.raises(TypeError, match="topk_ids_TK"):
        moe_align_reference(ids.float(), 16, 4)
    with pytest.raises(ValueError, match="block_size"):
        moe_align_reference(ids, 0, 4)
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        moe_align_reference(ids.flatten(), 16, 4)


def _dense_moe(x, w13, w2, ids, weights, emap):
    """Every token through every slot, in float64, then routed by a one-hot mask (gpt-fast style)."""
    F = w2.shape[2]
    h = torch.einsum("td,efd->tef", x.double(), w13.double())
    act = Fn.silu(h[..., :F]) * h[..., F:]
    out = torch.einsum("tef,edf->ted", act, w2.double())
    slots = emap[ids] if emap is not None else ids
    mask = torch.zeros(x.shape[0], w13.shape[0], dtype=torch.float64)
    for k in range(ids.shape[1]):
        keep = slots[:, k] >= 0
        mask[keep, slots[keep, k]] += weights[keep, k].double()
    return torch.einsum("te,ted->td", mask, out)


@pytest.mark.parametrize("T,K,E,D,F,with_map", FUSED_SHAPES)
def test_fused_reference_matches_dense_formula(T, K, E, D, F, with_map):
    """The per-expert loop equals the dense every-expert formula, dropping unmapped experts."""
    g = torch.Generator().manual_seed(T + 7 * E)
    G = E + 4 if with_map else E
    emap = _expert_map(G, E, g) if with_map else None
    ids = torch.stack([torch.randperm(G, generator=g)[:K] for _ in range(T)])
    x = torch.randn(T, D, generator=g)
    w13 = torch.randn(E, 2 * F, D, generator=g) / D**0.5
    w2 = torch.randn(E, D, F, generator=g) / F**0.5
    weights = torch.rand(T, K, generator=g)
    got = fused_moe_reference(x, w13, w2, ids, weights, emap)
    want = _dense_moe(x, w13, w2, ids, weights, emap)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("xdt,wdt", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                     (torch.float32, torch.bfloat16)])
def test_fused_reference_output_dtype_follows_x(xdt, wdt):
    """The output has x's dtype and is the float32 computation rounded once."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 16, generator=g).to(xdt)
    w13 = (torch.randn(4, 24, 16, generator=g) / 4).to(wdt)
    w2 = (torch.randn(4, 16, 12, generator=g) / 4).to(wdt)
    ids, weights = torch.randint(0, 4, (5, 2), generator=g), torch.rand(5, 2, generator=g)
    got = fused_moe_reference(x, w13, w2, ids, weights)
    want = fused_moe_reference(x.float(), w13.float(), w2.float(), ids, weights)
    assert got.dtype == xdt
    assert torch.equal(got, want.to(xdt))


def test_fused_reference_all_experts_elsewhere_gives_zeros():
    """With every expert mapped to -1 the layer contributes exactly zero."""
    x = torch.randn(3, 8)
    y = fused_moe_reference(x, torch.randn(2, 8, 8), torch.randn(2, 8, 4), torch.tensor([[0, 1]] * 3),
                            torch.ones(3, 2), torch.full((4,), -1))
    assert torch.equal(y, torch.zeros_like(x))


BAD_INPUTS = [
    ("w13 odd rows", dict(w13=torch.randn(2, 7, 8)), ValueError, "2F"),
    ("w2 shape", dict(w2=torch.randn(2, 8, 5)), ValueError, "w2_EDF"),
    ("x hidden", dict(x=torch.randn(3, 9)), ValueError, "x_TD"),
    ("weights shape", dict(weights=torch.ones(3, 1)), ValueError, "topk_weights_TK"),
    ("ids rows", dict(ids=torch.zeros(2, 2, dtype=torch.long)), ValueError, "topk_ids_TK"),
    ("ids dtype", dict(ids=torch.zeros(3, 2)), TypeError, "topk_ids_TK"),
    ("x dtype", dict(x=torch.zeros(3, 8, dtype=torch.int32)), TypeError, "x_TD"),
    ("weight dtypes differ", dict(w2=torch.randn(2, 8, 4).half()), TypeError, "share a dtype"),
    ("id out of range", dict(ids=torch.tensor([[0, 2]] * 3)), ValueError, r"\[0, 1\]"),
    ("map value", dict(emap=torch.tensor([0, 5])), ValueError, "expert_map_E"),
    ("map dtype", dict(emap=torch.tensor([0.0, 1.0])), TypeError, "expert_map_E"),
    ("not a tensor", dict(x=[[0.0] * 8] * 3), TypeError, "x_TD"),
]


@pytest.mark.parametrize("label,override,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_fused_reference_rejects_bad_input(label, override, exc, match):
    """Each malformed argument raises an error that names it and what was expected."""
    args = dict(x=torch.randn(3, 8), w13=torch.randn(2, 8, 8), w2=torch.randn(2, 8, 4),
                ids=torch.zeros(3, 2, dtype=torch.long), weights=torch.ones(3, 2), emap=None)
    args.update(override)
    with pytest.raises(exc, match=match):
        fused_moe_reference(args["x"], args["w13"], args["w2"], args["ids"], args["weights"], args["emap"])


def test_package_import_does_not_import_triton():
    """Importing moe.gpu_kernels for the CPU reference leaves triton unimported."""
    code = "import sys, moe.gpu_kernels as g; g.fused_moe_reference; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


_CPU_CALL = """
import torch
from moe.gpu_kernels import fused_moe, moe_align
calls = {
    "fused_moe": lambda: fused_moe(torch.randn(2, 8), torch.randn(2, 8, 8), torch.randn(2, 8, 4),
                                   torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)),
    "moe_align": lambda: moe_align(torch.zeros(2, 1, dtype=torch.long), 16, 2),
}
for name, call in calls.items():
    try:
        call()
    except ValueError as exc:
        print(exc)
    else:
        raise SystemExit(name + " accepted CPU tensors outside the interpreter")
"""


def test_fused_moe_on_cpu_without_interpreter_points_to_reference():
    """Outside the interpreter, the Triton ops on CPU tensors raise and name their references."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _CPU_CALL], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fused_moe_reference" in proc.stdout and "moe_align_reference" in proc.stdout
    assert "TRITON_INTERPRET=1" in proc.stdout
