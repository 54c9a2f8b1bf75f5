"""Routing helpers against each family's transformers router, and the counting sort."""
from __future__ import annotations

import pytest
import torch

from moe.cpu_kernels.routing import group_by_expert, select_experts
from moe.families import family_for_config
from moe.block import HybridMoeBlock
from tiny_models import FAMILY_CONFIGS, make_config

import transformers as T

# (T tokens, E experts, K top-k) including odd sizes and a single token.
SHAPES = [(1, 4, 1), (7, 6, 2), (33, 8, 3), (64, 16, 4)]


def _hf_router(family: str):
    model = T.AutoModelForCausalLM.from_config(make_config(family))
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            with torch.no_grad():
                gate.weight.normal_(0, 1.0)
                if hasattr(gate, "e_score_correction_bias"):
                    gate.e_score_correction_bias.normal_(0, 0.1)
            return model.config, gate
    raise AssertionError(f"no router in {family}")


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_gating_matches_transformers_router(family):
    """Our gating gives the same experts and weights as the family's own router."""
    config, gate = _hf_router(family)
    block = HybridMoeBlock(gate=gate, gating=family_for_config(config).gating(config),
                           num_experts=gate.weight.shape[0], layer=0, routed=None)
    x_TD = torch.randn(37, config.hidden_size)
    _, want_w, want_ids = gate(x_TD)
    got_w, got_ids = block.route(x_TD)
    # Same set of experts per token; weights compared in the reference's slot order.
    order_got = got_ids.argsort(dim=-1)
    order_want = want_ids.argsort(dim=-1)
    assert torch.equal(got_ids.gather(1, order_got), want_ids.gather(1, order_want))
    torch.testing.assert_close(got_w.gather(1, order_got).float(), want_w.gather(1, order_want).float(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T_,E,K", SHAPES)
def test_softmax_topk_renormalised(T_, E, K):
    """Softmax top-k with renormalisation sums to one and picks the largest logits."""
    logits = torch.randn(T_, E)
    w, ids = select_experts(logits, K, renormalize=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(T_))
    assert torch.equal(ids, logits.topk(K, dim=-1).indices)


def test_group_limited_keeps_only_best_groups():
    """Group-limited top-k never picks an expert outside the best topk_group groups."""
    logits = torch.randn(50, 16)
    _, ids = select_experts(logits, 2, n_group=4, topk_group=1, group_score="max")
    best_group = logits.view(50, 4, 4).max(-1).values.argmax(-1)
    assert torch.equal(ids // 4, best_group[:, None].expand(-1, 2))


def test_select_experts_bad_input():
    """Bad shapes and arguments are named."""
    with pytest.raises(ValueError, match="top_k"):
        select_experts(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="n_group"):
        select_experts(torch.randn(3, 6), 2, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="score"):
        select_experts(torch.randn(3, 4), 1, score="relu")


@pytest.mark.parametrize("T_,E,K", SHAPES + [(0, 5, 2)])
def test_group_by_expert_is_a_stable_counting_sort(T_, E, K):
    """The permutation groups pairs by expert, stably, with exact offsets."""
    ids = torch.randint(0, E, (T_, K))
    order, offsets = group_by_expert(ids, E)
    flat = ids.reshape(-1)
    assert torch.equal(order, torch.sort(flat, stable=True).indices)
    assert torch.equal(offsets[1:] - offsets[:-1], torch.bincount(flat, minlength=E))
    for e in range(E):
        assert bool((flat[order[offsets[e]:offsets[e + 1]]] == e).all())
    with pytest.raises(ValueError, match="expert ids"):
        group_by_expert(torch.full((2, 1), E), E)
