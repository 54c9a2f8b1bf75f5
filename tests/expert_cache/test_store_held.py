"""A host store holding a subset of the experts (one expert-parallel rank's) and cache release."""
import pytest
import torch

from moe.expert_cache.device_cache import DeviceExpertCache
from moe.expert_cache.store import HostExpertStore

L, E, D, F = 2, 5, 6, 4


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(E, 2 * F, D, generator=g), torch.randn(E, D, F, generator=g)) for _ in range(L)]


def _held():
    held = torch.zeros(L, E, dtype=torch.bool)
    held[0, [1, 4]] = True
    held[1, [0, 2, 3]] = True
    return held


@pytest.mark.parametrize("fill", ["layer", "part"])
def test_subset_store_keeps_exactly_the_held_experts(fill):
    """Layer- or part-wise filling keeps the held experts bit-exact and drops the rest."""
    ws, held = _weights(), _held()
    s = HostExpertStore(num_layers=L, num_experts=E, hidden=D, inter=F, dtype=torch.float32, held_LE=held)
    for l, (w13, w2) in enumerate(ws):
        if fill == "layer":
            s.set_layer(l, w13, w2)
        else:
            for e in range(E):
                s.set_part(l, e, "w1", w13[e, :F])
                s.set_part(l, e, "w3", w13[e, F:])
                s.set_part(l, e, "w2", w2[e])
    assert s.missing() == []
    assert s.total_bytes == 5 * s.expert_bytes
    for l, e in held.nonzero().tolist():
        assert torch.equal(s.expert(l, e)[0], ws[l][0][e]) and torch.equal(s.expert(l, e)[1], ws[l][1][e])
    with pytest.raises(KeyError, match="expert 0 of MoE layer 0 is not held"):
        s.expert(0, 0)


def test_subset_store_reports_only_held_missing():
    """missing() lists only tensors of held experts that were never filled."""
    s = HostExpertStore(num_layers=L, num_experts=E, hidden=D, inter=F, dtype=torch.float32, held_LE=_held())
    assert len(s.missing()) == 5 * 3 and all(s.holds(l, e) for l, e, _ in s.missing())


def test_keep_only_shrinks_a_full_store_and_its_quantized_copies():
    """keep_only drops experts (also their packed CPU copies) and refuses to keep what is not held."""
    ws, held = _weights(1), _held()
    s = HostExpertStore(num_layers=L, num_experts=E, hidden=D + 26, inter=F + 28, dtype=torch.float32)
    big = [(torch.randn(E, 2 * (F + 28), D + 26), torch.randn(E, D + 26, F + 28)) for _ in range(L)]
    for l, (w13, w2) in enumerate(big):
        s.set_layer(l, w13, w2)
    s.quantize_for_cpu("int8")
    before = {(l, e): s.cpu_weights(l, e)[0].dequantize() for l, e in held.nonzero().tolist()}
    s.keep_only(held)
    assert s.total_bytes == 5 * s.expert_bytes and s.layer(1)[0].shape[0] == 3
    for (l, e), w in before.items():
        assert torch.equal(s.cpu_weights(l, e)[0].dequantize(), w)
        assert torch.equal(s.expert(l, e)[0], big[l][0][e])
    with pytest.raises(KeyError, match="cannot keep expert 0 of MoE layer 0"):
        s.keep_only(torch.ones(L, E, dtype=torch.bool))
    with pytest.raises(ValueError, match="held_LE must be a bool tensor"):
        HostExpertStore(num_layers=L, num_experts=E, hidden=D, inter=F, dtype=torch.float32,
                        held_LE=torch.ones(L, E + 1, dtype=torch.bool))
    del ws


def test_cache_release_frees_every_slot():
    """release() evicts everything and leaves a zero-slot cache that loads nothing."""
    s = HostExpertStore(num_layers=L, num_experts=E, hidden=D, inter=F, dtype=torch.float32)
    for l, (w13, w2) in enumerate(_weights()):
        s.set_layer(l, w13, w2)
    c = DeviceExpertCache(s, num_slots=3, device="cpu")
    c.pin([(0, 1)])
    c.load(1, 2)
    c.release()
    assert c.num_slots == 0 and c.w13_N2FD.shape[0] == 0 and c.resident_experts(0) == []
    assert c.load(0, 3) == -1


def test_expert_views_are_stable_objects_until_the_layer_changes():
    """expert() hands out the same view objects on every call (kernels cache per object) and new ones after set_layer."""
    s = HostExpertStore(num_layers=L, num_experts=E, hidden=D, inter=F, dtype=torch.float32)
    ws = _weights()
    for l, (w13, w2) in enumerate(ws):
        s.set_layer(l, w13, w2)
    a = s.expert(1, 2)
    assert s.expert(1, 2)[0] is a[0] and s.cpu_weights(1, 2)[1] is a[1]
    s.set_layer(1, ws[0][0].clone(), ws[0][1].clone())
    b = s.expert(1, 2)
    assert b[0] is not a[0] and torch.equal(b[0], ws[0][0][2])
