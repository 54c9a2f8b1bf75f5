"""Host store layers and packed CPU copies in huge-page memory: same values, same kernel outputs."""
import pytest
import torch

from moe.cpu_kernels import expert_ffn, quantize
from moe.cpu_kernels.hostmem import huge_pages_enabled, mapping_of
from moe.expert_cache.store import HostExpertStore

L, E, D, F = 2, 3, 512, 1024  # a layer of packed int4 copies is 2.3 MiB: past one huge page


def _advised(t: torch.Tensor) -> bool:
    m = mapping_of(t.data_ptr())
    return m is None or m["advised"]


def _filled_store(ws):
    s = HostExpertStore(num_layers=L, num_experts=E, hidden=D, inter=F, dtype=torch.float32)
    for l, (w13, w2) in enumerate(ws):
        for e in range(E):
            s.set_part(l, e, "w13", w13[e])
            s.set_part(l, e, "w2", w2[e])
    return s


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_huge_page_store_matches_plain_tensors_and_kernels(scheme):
    """Streamed-in layers equal the inputs; packed copies equal quantize()'s, bit for bit,
    in the kernel's output too; all of it in advised memory where huge pages exist."""
    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(E, 2 * F, D, generator=g) * 0.05, torch.randn(E, D, F, generator=g) * 0.05) for _ in range(L)]
    s = _filled_store(ws)
    s.quantize_for_cpu(scheme)
    x = torch.randn(1, D, generator=g)
    for l in range(L):
        for e in range(E):
            assert torch.equal(s.expert(l, e)[0], ws[l][0][e]) and torch.equal(s.expert(l, e)[1], ws[l][1][e])
            mine = s.cpu_weights(l, e)
            ref = (quantize(ws[l][0][e], scheme), quantize(ws[l][1][e], scheme))
            for a, b in zip(mine, ref):
                assert torch.equal(a.dequantize(), b.dequantize())
            assert torch.equal(expert_ffn(x, *mine), expert_ffn(x, *ref))
    if huge_pages_enabled():
        packed = s.cpu_weights(1, 2)[0]
        assert _advised(s.layer(0)[0]) and _advised(packed.q_RC if scheme == "int8" else packed.packed_RB)


def test_keep_only_repacks_the_kept_experts():
    """After keep_only the kept experts' dense and packed weights are unchanged and new objects."""
    g = torch.Generator().manual_seed(1)
    ws = [(torch.randn(E, 2 * F, D, generator=g), torch.randn(E, D, F, generator=g)) for _ in range(L)]
    s = _filled_store(ws)
    s.quantize_for_cpu("int8")
    held = torch.tensor([[True, False, True], [False, True, False]])
    old = {(l, e): s.cpu_weights(l, e) for l, e in held.nonzero().tolist()}
    s.keep_only(held)
    for (l, e), (w13, w2) in old.items():
        new = s.cpu_weights(l, e)
        assert new[0] is not w13 and torch.equal(new[0].q_RC, w13.q_RC) and torch.equal(new[1].scale_R, w2.scale_R)
        assert torch.equal(s.expert(l, e)[0], ws[l][0][e])
    assert s.layer(0)[0].shape[0] == 2 and s.layer(1)[1].shape[0] == 1
