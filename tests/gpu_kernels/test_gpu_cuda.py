"""Triton fused-MoE and alignment kernels on a real GPU at model shapes (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

from moe.gpu_kernels import fused_moe_reference, moe_align_reference

pytestmark = pytest.mark.gpu

# Tolerance keyed by the narrower dtype, relative to the output's largest magnitude.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}

# (T, E, K, D, F, dtype, map kind): Mixtral-8x7B, a DeepSeek-V2-Lite-like 64-expert layer,
# and odd sizes, from decode to prefill token counts.
FUSED_SHAPES = [
    (1, 8, 2, 4096, 14336, torch.bfloat16, "none"),
    (33, 8, 2, 4096, 14336, torch.bfloat16, "partial"),
    (511, 8, 2, 4096, 14336, torch.float16, "none"),
    (4096, 8, 2, 4096, 14336, torch.bfloat16, "partial"),
    (1, 64, 6, 2048, 1408, torch.bfloat16, "partial"),
    (64, 64, 6, 2048, 1408, torch.float16, "none"),
    (4096, 64, 6, 2048, 1408, torch.bfloat16, "none"),
    (5, 4, 1, 1000, 333, torch.float32, "partial"),
    (33, 8, 2, 1000, 333, torch.float32, "none"),
    (1, 8, 2, 1000, 333, torch.float16, "empty"),
]
ALIGN_SHAPES = [(1, 2, 8, 16, "none"), (33, 2, 8, 16, "partial"), (4096, 6, 64, 64, "none"),
                (4096, 2, 8, 128, "partial"), (511, 8, 256, 16, "none"), (0, 2, 4, 16, "none")]


def _kernels():
    from moe.gpu_kernels import fused

    if fused._INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: the compiled kernels are not in use")
    return fused


def _route(T, E, K, kind, g):
    G = E if kind == "none" else E + 5
    emap = None
    if kind != "none":
        emap = torch.full((G,), -1, dtype=torch.int64)
        if kind == "partial":
            here = torch.randperm(G, generator=g)[: E - 1]
            emap[here] = torch.randperm(E, generator=g)[: E - 1]
    ids = torch.rand(T, G, generator=g).topk(K, dim=1).indices
    return ids, emap


@pytest.mark.parametrize("T,E,K,D,F,dtype,kind", FUSED_SHAPES)
def test_fused_moe_cuda_matches_reference(T, E, K, D, F, dtype, kind):
    """On CUDA the fused kernel matches the per-expert torch loop at model shapes."""
    fused = _kernels()
    g = torch.Generator().manual_seed(T * 31 + E)
    ids, emap = _route(T, E, K, kind, g)
    x = torch.randn(T, D, generator=g).to(dtype).cuda()
    w13 = (torch.randn(E, 2 * F, D, generator=g) / D**0.5).to(dtype).cuda()
    w2 = (torch.randn(E, D, F, generator=g) / F**0.5).to(dtype).cuda()
    weights = torch.rand(T, K, generator=g).softmax(-1).cuda()
    ids = ids.cuda()
    emap = emap.cuda() if emap is not None else None
    got = fused.fused_moe(x, w13, w2, ids, weights, emap)
    want = fused_moe_reference(x, w13, w2, ids, weights, emap)
    tol = TOLERANCE[dtype]
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, atol=tol * scale, rtol=tol)
    if kind == "empty":
        assert torch.count_nonzero(got) == 0


@pytest.mark.parametrize("T,K,E,block,kind", ALIGN_SHAPES)
def test_align_cuda_equals_reference(T, K, E, block, kind):
    """On CUDA the alignment kernel's outputs equal the reference's exactly."""
    _kernels()
    from moe.gpu_kernels import moe_align

    g = torch.Generator().manual_seed(T + E)
    ids, emap = _route(T, E, K, kind, g)
    ids = ids.cuda()
    emap = emap.cuda() if emap is not None else None
    got = moe_align(ids, block, E, emap)
    want = moe_align_reference(ids, block, E, emap)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_fused_moe_cuda_graph_replay():
    """fused_moe never synchronises with the host, so it captures into a CUDA graph and replays exactly."""
    fused = _kernels()
    T, E, K, D, F = 4, 8, 2, 512, 384
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(E, 2 * F, D, device="cuda", dtype=torch.bfloat16) / D**0.5
    w2 = torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16) / F**0.5
    ids = torch.randint(0, E, (T, K), device="cuda")
    weights = torch.rand(T, K, device="cuda")
    eager = fused.fused_moe(x, w13, w2, ids, weights)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused.fused_moe(x, w13, w2, ids, weights)
    ids.copy_(torch.randint(0, E, (T, K), device="cuda"))
    graph.replay()
    assert torch.equal(out, fused.fused_moe(x, w13, w2, ids, weights))
    assert eager.shape == out.shape
