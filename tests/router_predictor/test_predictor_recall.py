"""Routing-path predictors: recall on synthetic traces with planted structure, honesty, save/load."""
import pytest
import torch

from moe.router_predictor.evaluate import forecast_table, recall_at_k
from moe.router_predictor.learned import LearnedConfig, LearnedPathPredictor, train_path_predictor
from moe.router_predictor.predictors import (
    FrequencyPredictor,
    GateLookaheadPredictor,
    RoutingContext,
    TransitionConfig,
    TransitionPredictor,
    contexts_for_layer,
)
from moe.router_predictor.trace import RoutingTrace

# (tokens per sequence, layers, experts, top-k)
PLANTED_SHAPES = [([40, 23], 5, 8, 2), ([61], 4, 7, 1), ([30, 30, 17], 6, 16, 3)]


def _planted_trace(lengths, layers, experts, k, seed=0, noise=0.1):
    """Layer l+1's experts are layer l's shifted by +1 (mod E), except a `noise` share drawn at random."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    ids = torch.empty(T, layers, k, dtype=torch.long)
    ids[:, 0] = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(T)])
    for l in range(1, layers):
        ids[:, l] = (ids[:, l - 1] + 1) % experts
        redo = torch.rand(T, generator=g) < noise
        for t in torch.nonzero(redo).flatten().tolist():
            ids[t, l] = torch.randperm(experts, generator=g)[:k]
    return RoutingTrace(expert_ids=ids.to(torch.int16), seq_starts=torch.tensor([0] + lengths).cumsum(0),
                        num_experts=experts, top_k=k)


@pytest.mark.parametrize("lengths,layers,experts,k", PLANTED_SHAPES)
def test_predictor_transition_finds_planted_path(lengths, layers, experts, k):
    """The transition table recovers a planted layer-to-layer mapping far above the frequency prior."""
    train = _planted_trace([4 * n for n in lengths], layers, experts, k, seed=1)
    test = _planted_trace(lengths, layers, experts, k, seed=2)
    trans = recall_at_k(TransitionPredictor.fit(train), test, ks=(k,), depth=2)[f"recall@{k}"]
    freq = recall_at_k(FrequencyPredictor.fit(train), test, ks=(k,), depth=2)[f"recall@{k}"]
    assert trans["l+1"] > 0.8 and trans["l+2"] > 0.65  # the path survives noise 0.9 and 0.81 of the time
    assert trans["l+1"] > freq["l+1"] + 0.3


def test_predictor_learned_finds_planted_path(tmp_path):
    """The learned predictor learns the planted path and survives a safetensors round trip exactly."""
    train = _planted_trace([120], 4, 8, 2, seed=3)
    test = _planted_trace([50], 4, 8, 2, seed=4)
    pred, info = train_path_predictor(train, LearnedConfig(steps=300, hidden=64, depth=2))
    assert info["loss_last"] < info["loss_first"]
    r = recall_at_k(pred, test, ks=(2,), depth=2)["recall@2"]
    assert r["l+1"] > 0.8
    pred.save(tmp_path / "p.safetensors")
    back = LearnedPathPredictor.load(tmp_path / "p.safetensors")
    ctx = contexts_for_layer(test, 1)
    assert torch.equal(back.predict(ctx, 2), pred.predict(ctx, 2))
    (tmp_path / "bad.safetensors").write_bytes(b"xx")
    with pytest.raises(ValueError, match="cannot read"):
        LearnedPathPredictor.load(tmp_path / "bad.safetensors")


def test_predictor_temporal_table_uses_previous_token():
    """With tokens that repeat their predecessor, the temporal table predicts it exactly."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(30):  # runs of 4 identical tokens
        tok = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(3)])
        rows += [tok] * 4
    ids = torch.stack(rows).to(torch.int16)
    tr = RoutingTrace(expert_ids=ids, seq_starts=torch.tensor([0, ids.shape[0]]), num_experts=8, top_k=2)
    cfg = TransitionConfig(history=1, temporal=True)
    r = recall_at_k(TransitionPredictor.fit(tr, cfg), tr, ks=(2,), depth=1)["recall@2"]["l+1"]
    r0 = recall_at_k(TransitionPredictor.fit(tr, TransitionConfig(history=1, temporal=False)), tr, ks=(2,),
                     depth=1)["recall@2"]["l+1"]
    assert r > 0.7 and r > r0 + 0.2


def test_predictor_sees_no_future():
    """Forecasts at layer l do not change when the current token's later layers change."""
    tr = _planted_trace([20, 9], 5, 8, 2, seed=5)
    altered = tr.expert_ids.clone()
    altered[:, 3:] = (altered[:, 3:] + 3) % 8
    tr2 = RoutingTrace(expert_ids=altered, seq_starts=tr.seq_starts, num_experts=8, top_k=2)
    learned, _ = train_path_predictor(tr, LearnedConfig(steps=20, hidden=16))
    for pred in (TransitionPredictor.fit(tr), learned, FrequencyPredictor.fit(tr)):
        a, b = pred.predict(contexts_for_layer(tr, 2), 2), pred.predict(contexts_for_layer(tr2, 2), 2)
        # Only the predecessor's layers (3, 4) differ, and only rows that have a predecessor.
        no_prev = torch.zeros(tr.num_tokens, dtype=torch.bool)
        no_prev[tr.seq_starts[:-1]] = True
        torch.testing.assert_close(a[no_prev], b[no_prev], rtol=0, atol=0)
    table = forecast_table(TransitionPredictor.fit(tr), tr, depth=1)
    assert table.shape == (tr.num_tokens, 5, 1, 8) and (table[:, -1] == 0).all()


def test_predictor_gate_lookahead_applies_next_gates():
    """Gate lookahead ranks experts by the next layer's gate on the current hidden state."""
    torch.manual_seed(0)
    W = [torch.randn(6, 16) for _ in range(3)]
    gates = [lambda h, w=w: torch.softmax(h @ w.T, dim=-1) for w in W]
    pred = GateLookaheadPredictor(gates, top_k=2, num_experts=6)
    h_TD = torch.randn(9, 16)
    ctx = RoutingContext(layer=0, ids_TlK=torch.zeros(9, 1, 2, dtype=torch.long), hidden_TD=h_TD)
    p = pred.predict(ctx, depth=3)
    assert p.shape == (9, 2, 6)
    expect_top = torch.softmax(h_TD @ W[1].T, -1).topk(2).indices.sort().values
    assert torch.equal(p[:, 0].topk(2).indices.sort().values, expect_top)
    with pytest.raises(ValueError, match="hidden state"):
        pred.predict(RoutingContext(layer=0, ids_TlK=torch.zeros(9, 1, 2, dtype=torch.long)))
