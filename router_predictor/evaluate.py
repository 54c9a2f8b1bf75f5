"""Recall@k of routing-path predictors on a trace, and the adapter that feeds a cache replay.

recall@k at offset j: over every token t and layer l with l + j < L, the fraction of the
token's K experts at layer l+j that are among the predictor's k best scores made at layer
l (|top-k ∩ actual| / K; at most k/K when k < K).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from moe.router_predictor.predictors import RoutingPredictor, contexts_for_layer, one_hot_experts
from moe.router_predictor.trace import RoutingTrace

__all__ = ["recall_at_k", "forecast_table", "out_of_fold_forecast_table", "make_forecaster"]


def recall_at_k(predictor: RoutingPredictor, trace: RoutingTrace, *, ks: Sequence[int] = (1, 2, 4),
                depth: int = 3, hidden_TLD: torch.Tensor | None = None) -> dict:
    """{"recall@k": {"l+1": r, .., "l+depth": r, "l+1..l+depth": mean over all (t, l, j)}} per k."""
    if trace.num_layers < 2:
        raise ValueError("recall needs a trace with at least 2 layers")
    if any(k < 1 or k > trace.num_experts for k in ks):
        raise ValueError(f"recall k must be in [1, {trace.num_experts}], got {list(ks)}")
    E, K, L = trace.num_experts, trace.top_k, trace.num_layers
    hit = {k: torch.zeros(depth) for k in ks}
    n = torch.zeros(depth)
    ids_TLK = trace.expert_ids.long()
    for l in range(L - 1):
        ctx = contexts_for_layer(trace, l, None if hidden_TLD is None else hidden_TLD[:, l])
        probs_TdE = predictor.predict(ctx, depth)
        for j in range(probs_TdE.shape[1]):
            actual_TE = one_hot_experts(ids_TLK[:, l + 1 + j], E)
            n[j] += trace.num_tokens
            for k in ks:
                top_Tk = probs_TdE[:, j].topk(k, dim=-1).indices
                hit[k][j] += actual_TE.gather(1, top_Tk).sum() / K
    out = {}
    for k in ks:
        row = {f"l+{j + 1}": float(hit[k][j] / n[j]) for j in range(depth) if n[j] > 0}
        row[f"l+1..l+{depth}"] = float(hit[k].sum() / n.sum())
        out[f"recall@{k}"] = row
    return out


def forecast_table(predictor: RoutingPredictor, trace: RoutingTrace, depth: int = 1) -> np.ndarray:
    """float [T, L, depth, E]: the forecast made at (t, l) for layers l+1..l+depth (zeros past L-1).

    Computed a layer at a time over all tokens; each row still uses only its own context
    (the token's layers <= l and its predecessor), so it equals the online forecast.
    """
    T, L, E = trace.num_tokens, trace.num_layers, trace.num_experts
    out = np.zeros((T, L, depth, E))
    for l in range(L - 1):
        p = predictor.predict(contexts_for_layer(trace, l), depth)
        out[:, l, : p.shape[1]] = p.numpy()
    return out


def out_of_fold_forecast_table(fit: Callable[[RoutingTrace], RoutingPredictor], trace: RoutingTrace,
                               depth: int = 1, folds: int = 2) -> np.ndarray:
    """Like forecast_table, but each sequence is forecast by a predictor fitted without it.

    Sequences are dealt round-robin into `folds` groups; a trace with fewer sequences is
    first cut into `folds` contiguous pieces. Used to tune policies on a trace whose own
    predictor would otherwise have memorised it.
    """
    if folds < 2:
        raise ValueError(f"out-of-fold forecasts need folds >= 2, got {folds}")
    if trace.num_sequences < folds:
        cuts = np.linspace(0, trace.num_tokens, folds + 1).round().astype(np.int64)
        trace = RoutingTrace(expert_ids=trace.expert_ids, seq_starts=torch.from_numpy(cuts), weights=trace.weights,
                             num_experts=trace.num_experts, top_k=trace.top_k, model=trace.model, source=trace.source)
    starts = trace.seq_starts.tolist()
    out = np.zeros((trace.num_tokens, trace.num_layers, depth, trace.num_experts))
    for f in range(folds):
        held = [s for s in range(trace.num_sequences) if s % folds == f]
        rest = [s for s in range(trace.num_sequences) if s % folds != f]
        rows = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in held])
        out[rows] = forecast_table(fit(trace.select_sequences(rest)), trace.select_sequences(held), depth)
    return out


def make_forecaster(table_TLdE: np.ndarray) -> Callable:
    """A replay forecaster `(t, l, ids_lK, prev_LK) -> [d, E]` reading a forecast_table."""

    def forecaster(t: int, l: int, ids_lK, prev_LK) -> np.ndarray:
        return table_TLdE[t, l]

    return forecaster
