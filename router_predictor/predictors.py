"""Routing-path predictors: score the experts of layers l+1..l+d while layer l runs.

Shape key: T tokens, L MoE layers, K top-k, E experts per layer, D model dim, d depth.

One interface, `RoutingPredictor.predict(ctx, depth) -> probs_TdE`: the probability that
each expert of layers l+1..l+d is among the token's top-k there (rows sum to about K).
`RoutingContext` carries only what a running system knows when layer l has routed: the
current tokens' routing at layers 0..l, each token's predecessor's routing (all layers;
it was computed earlier), and optionally the hidden state. Predictors therefore cannot
see the future by construction.

- FrequencyPredictor: per-layer expert frequency on a training trace (the prior).
- TransitionPredictor: inter-layer transition tables P(e' at l+j | e at l-i), i < history,
  and the temporal table P(e' at layer m | predecessor used e at m), combined naive-Bayes
  style over the prior.
- GateLookaheadPredictor: the next layers' gates applied to the current hidden state
  (training-free; needs the model). See learned.py for the learned path predictor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from moe.router_predictor.trace import RoutingTrace

__all__ = [
    "RoutingContext", "RoutingPredictor", "FrequencyPredictor", "TransitionPredictor", "TransitionConfig",
    "GateLookaheadPredictor", "one_hot_experts", "contexts_for_layer",
]


@dataclass(kw_only=True)
class RoutingContext:
    """What is known when layer `layer` has routed the current T tokens.

    ids_TlK: int64 [T, layer+1, K], the current tokens' experts at layers 0..layer.
    prev_ids_TLK: int64 [T, L, K], each token's predecessor in its sequence (all layers);
        rows of tokens without one are -1. None when unknown.
    hidden_TD: the hidden state at layer `layer` (for gate lookahead), or None.
    """

    layer: int
    ids_TlK: torch.Tensor
    prev_ids_TLK: torch.Tensor | None = None
    hidden_TD: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.ids_TlK.dim() != 3 or self.ids_TlK.shape[1] != self.layer + 1:
            raise ValueError(
                f"routing context for layer {self.layer} needs ids [T, {self.layer + 1}, K], "
                f"got {tuple(self.ids_TlK.shape)}"
            )
        if self.prev_ids_TLK is not None and self.prev_ids_TLK.shape[0] != self.ids_TlK.shape[0]:
            raise ValueError("routing context prev_ids_TLK must have one row per token")


def one_hot_experts(ids_NK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """float [N, E]: 1 where the row chose the expert; ids < 0 (unknown) give a zero row."""
    out = torch.zeros(ids_NK.shape[0], num_experts)
    valid = ids_NK >= 0
    out.scatter_add_(1, ids_NK.clamp(min=0).long(), valid.float())
    return out.clamp_(max=1.0)


def contexts_for_layer(trace: RoutingTrace, layer: int, hidden_TD: torch.Tensor | None = None) -> RoutingContext:
    """The context of every token of `trace` at `layer` (what decode knows there)."""
    ids_TLK = trace.expert_ids.long()
    prev_TLK = torch.full_like(ids_TLK, -1)
    has_prev_T = torch.zeros(trace.num_tokens, dtype=torch.bool)
    has_prev_T[1:] = trace.next_in_sequence()[:-1]
    prev_TLK[1:] = ids_TLK[:-1]
    prev_TLK[~has_prev_T] = -1
    return RoutingContext(layer=layer, ids_TlK=ids_TLK[:, : layer + 1], prev_ids_TLK=prev_TLK, hidden_TD=hidden_TD)


class RoutingPredictor:
    """Base class. `predict` returns probs [T, d, E] for layers l+1..l+d (d clipped at L-1)."""

    name = "base"
    num_layers: int
    num_experts: int
    top_k: int

    def predict(self, ctx: RoutingContext, depth: int = 1) -> torch.Tensor:
        raise NotImplementedError

    def _depth(self, ctx: RoutingContext, depth: int) -> int:
        if depth < 1:
            raise ValueError(f"prediction depth must be >= 1, got {depth}")
        if not 0 <= ctx.layer < self.num_layers:
            raise ValueError(f"layer {ctx.layer} outside the predictor's {self.num_layers} layers")
        return min(depth, self.num_layers - 1 - ctx.layer)


def _layer_counts(trace: RoutingTrace) -> torch.Tensor:
    """float [L, E]: how often each expert is chosen per layer."""
    ids = trace.expert_ids.long()
    counts = torch.zeros(trace.num_layers, trace.num_experts)
    counts.scatter_add_(1, ids.permute(1, 0, 2).reshape(trace.num_layers, -1), torch.ones(1).expand(
        trace.num_layers, ids.shape[0] * ids.shape[2]))
    return counts


class FrequencyPredictor(RoutingPredictor):
    """The per-layer expert frequency of a training trace, whatever the context."""

    name = "frequency"

    def __init__(self, counts_LE: torch.Tensor, top_k: int, alpha: float = 1.0) -> None:
        self.num_layers, self.num_experts = counts_LE.shape
        self.top_k = top_k
        c = counts_LE.float() + alpha
        self.probs_LE = top_k * c / c.sum(1, keepdim=True)

    @classmethod
    def fit(cls, trace: RoutingTrace, alpha: float = 1.0) -> "FrequencyPredictor":
        return cls(_layer_counts(trace), trace.top_k, alpha)

    def predict(self, ctx: RoutingContext, depth: int = 1) -> torch.Tensor:
        d = self._depth(ctx, depth)
        T = ctx.ids_TlK.shape[0]
        return self.probs_LE[ctx.layer + 1 : ctx.layer + 1 + d].unsqueeze(0).expand(T, d, -1).clone()


@dataclass(kw_only=True)
class TransitionConfig:
    """history: source layers of the current token (l, l-1, ..; on Mixtral traces each further
    layer kept adding recall up to about 8); max_depth: farthest target
    offset fitted; temporal: also use the predecessor token's routing at the target layer;
    alpha: add-alpha smoothing of every table."""

    history: int = 8
    max_depth: int = 3
    temporal: bool = True
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.history < 1 or self.max_depth < 1:
            raise ValueError(f"transition history and max_depth must be >= 1, got {self.history}, {self.max_depth}")
        if self.alpha <= 0:
            raise ValueError(f"transition alpha must be > 0, got {self.alpha}")


class TransitionPredictor(RoutingPredictor):
    """Inter-layer (and temporal) transition tables fitted on a trace, combined naive-Bayes.

    score(e' at l+j) = log prior(e') + sum over sources s of mean over the source's experts e
    of [log P(e' | e via s) - log prior(e')], where the sources are the current token at
    layers l, l-1, .., l-history+1 and (temporal) its predecessor at layer l+j. The
    probabilities are K * softmax(score), so rows sum to K.
    """

    name = "transition"

    def __init__(self, config: TransitionConfig, log_prior_LE: torch.Tensor, log_trans_JHLEE: torch.Tensor,
                 log_temporal_LEE: torch.Tensor, top_k: int) -> None:
        self.config = config
        self.num_layers, self.num_experts = log_prior_LE.shape
        self.top_k = top_k
        self.log_prior_LE = log_prior_LE
        self.log_trans_JHLEE = log_trans_JHLEE  # [j-1, i, l, e, e']: log P(e' at l+j | e at l-i)
        self.log_temporal_LEE = log_temporal_LEE  # [m, e, e']: log P(e' at m | predecessor's e at m)

    @classmethod
    def fit(cls, trace: RoutingTrace, config: TransitionConfig | None = None) -> "TransitionPredictor":
        cfg = config or TransitionConfig()
        L, E, a = trace.num_layers, trace.num_experts, cfg.alpha
        oh_TLE = one_hot_experts(trace.expert_ids.long().reshape(-1, trace.top_k), E).reshape(-1, L, E)
        prior = oh_TLE.sum(0) + a
        log_prior = (prior / prior.sum(1, keepdim=True)).log()
        J, H = cfg.max_depth, cfg.history
        trans = torch.full((J, H, L, E, E), a)
        for j in range(1, J + 1):
            for i in range(H):
                for l in range(i, L - j):
                    trans[j - 1, i, l] += oh_TLE[:, l - i].T @ oh_TLE[:, l + j]
        log_trans = (trans / trans.sum(-1, keepdim=True)).log()
        nxt = trace.next_in_sequence()
        temporal = torch.full((L, E, E), a)
        src, dst = oh_TLE[:-1][nxt[:-1]], oh_TLE[1:][nxt[:-1]]
        temporal += torch.einsum("tle,tlf->lef", src, dst)
        log_temporal = (temporal / temporal.sum(-1, keepdim=True)).log()
        return cls(cfg, log_prior, log_trans, log_temporal, trace.top_k)

    def _pmi(self, table_EE: torch.Tensor, ids_TK: torch.Tensor, log_prior_E: torch.Tensor) -> torch.Tensor:
        """[T, E]: mean over each row's known source experts of log P(e'|e) - log prior(e')."""
        oh_TE = one_hot_experts(ids_TK, self.num_experts)
        n_T = oh_TE.sum(1, keepdim=True).clamp(min=1.0)
        return (oh_TE @ (table_EE - log_prior_E)) / n_T

    def predict(self, ctx: RoutingContext, depth: int = 1) -> torch.Tensor:
        d = self._depth(ctx, depth)
        l, T = ctx.layer, ctx.ids_TlK.shape[0]
        out = torch.empty(T, d, self.num_experts)
        for j in range(1, d + 1):
            target = l + j
            prior_E = self.log_prior_LE[target]
            score = prior_E.expand(T, -1).clone()
            if j <= self.config.max_depth:  # beyond it: prior and temporal evidence only
                for i in range(min(self.config.history, l + 1)):
                    score += self._pmi(self.log_trans_JHLEE[j - 1, i, l], ctx.ids_TlK[:, l - i], prior_E)
            if self.config.temporal and ctx.prev_ids_TLK is not None:
                score += self._pmi(self.log_temporal_LEE[target], ctx.prev_ids_TLK[:, target], prior_E)
            out[:, j - 1] = self.top_k * torch.softmax(score, dim=-1)
        return out.clamp_(max=1.0)


class GateLookaheadPredictor(RoutingPredictor):
    """Apply the next layers' gates to the current hidden state (training-free).

    gates: one callable per MoE layer, `gate_l(hidden_TD) -> probs_TE` (softmax router
    probabilities). Hidden states change little between adjacent layers (residual stream),
    so layer l+j's gate on layer l's hidden state forecasts its routing.
    """

    name = "gate-lookahead"

    def __init__(self, gates: Sequence[Callable[[torch.Tensor], torch.Tensor]], top_k: int,
                 num_experts: int) -> None:
        if not gates:
            raise ValueError("gate lookahead needs one gate callable per MoE layer, got none")
        self.gates = list(gates)
        self.num_layers, self.num_experts, self.top_k = len(self.gates), num_experts, top_k

    def predict(self, ctx: RoutingContext, depth: int = 1) -> torch.Tensor:
        d = self._depth(ctx, depth)
        if ctx.hidden_TD is None:
            raise ValueError("gate lookahead needs the hidden state (ctx.hidden_TD); it predicts from the model")
        outs = []
        for j in range(1, d + 1):
            probs_TE = self.gates[ctx.layer + j](ctx.hidden_TD).float()
            if probs_TE.shape != (ctx.hidden_TD.shape[0], self.num_experts):
                raise ValueError(f"gate {ctx.layer + j} returned {tuple(probs_TE.shape)}, expected "
                                 f"[{ctx.hidden_TD.shape[0]}, {self.num_experts}]")
            # Probability of being in the top-k: the top-k experts of the gate get 1, the
            # rest their gate probability (monotone in the gate, so ranking is the gate's).
            top = probs_TE.topk(self.top_k, dim=-1).indices
            p = probs_TE.clone()
            p.scatter_(1, top, 1.0)
            outs.append(p)
        return torch.stack(outs, dim=1) if outs else torch.empty(ctx.hidden_TD.shape[0], 0, self.num_experts)
