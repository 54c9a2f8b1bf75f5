"""Assemble a RoutingTrace from routing-observer calls made while a model runs.

The runtime calls `observe(layer, topk_ids_TK, topk_weights_TK)` for every MoE layer
(ordinal 0..L-1) of every forward, T being that forward's tokens (batch 1: the prompt at
prefill, then one token per decode step). A forward ends when the layer ordinal stops
rising; a sequence is what happens between begin_sequence() and end_sequence().
"""
from __future__ import annotations

import torch

from moe.router_predictor.trace import RoutingTrace

__all__ = ["TraceRecorder"]


class TraceRecorder:
    """Collects per-layer top-k routing into a trace; one sequence per begin/end pair."""

    def __init__(self) -> None:
        self._seqs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids_TLK, weights_TLK) per sequence
        self._forwards: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # the forward being observed
        self.num_layers: int | None = None
        self.top_k: int | None = None

    def begin_sequence(self) -> None:
        if self._forwards is not None:
            raise RuntimeError("begin_sequence() called twice without end_sequence()")
        self._forwards, self._layers = [], []

    def observe(self, layer: int, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> None:
        """The observer callback: one MoE layer of one forward."""
        if self._forwards is None:
            raise RuntimeError("routing observed outside begin_sequence()/end_sequence()")
        if topk_ids_TK.dim() != 2 or topk_weights_TK.shape != topk_ids_TK.shape:
            raise ValueError(f"layer {layer}: expected ids and weights [T, K], got {tuple(topk_ids_TK.shape)} "
                             f"and {tuple(topk_weights_TK.shape)}")
        if self._layers and layer <= len(self._layers) - 1:
            self._close_forward()
        if layer != len(self._layers):
            raise ValueError(f"routing of layer {layer} arrived after {len(self._layers)} layers of this "
                             f"forward; layers must come in order 0..L-1")
        if self._layers and topk_ids_TK.shape != self._layers[0][0].shape:
            raise ValueError(f"layer {layer} routed {tuple(topk_ids_TK.shape)} tokens x k, layer 0 of the same "
                             f"forward {tuple(self._layers[0][0].shape)}")
        self._layers.append((topk_ids_TK.detach().to("cpu", torch.int64), topk_weights_TK.detach().float().cpu()))

    def _close_forward(self) -> None:
        n = len(self._layers)
        if self.num_layers is None:
            self.num_layers, self.top_k = n, int(self._layers[0][0].shape[1])
        elif n != self.num_layers:
            raise ValueError(f"a forward routed {n} MoE layers, earlier forwards {self.num_layers}")
        if self._layers[0][0].shape[1] != self.top_k:
            raise ValueError(f"a forward routed top-{self._layers[0][0].shape[1]}, earlier ones top-{self.top_k}")
        ids_TLK = torch.stack([ids for ids, _ in self._layers], dim=1)
        w_TLK = torch.stack([w for _, w in self._layers], dim=1)
        self._forwards.append((ids_TLK, w_TLK))
        self._layers = []

    def end_sequence(self) -> int:
        """Close the sequence; returns its token count."""
        if self._forwards is None:
            raise RuntimeError("end_sequence() without begin_sequence()")
        if self._layers:
            self._close_forward()
        fw, self._forwards = self._forwards, None
        if not fw:
            return 0
        ids = torch.cat([i for i, _ in fw])
        self._seqs.append((ids, torch.cat([w for _, w in fw])))
        return int(ids.shape[0])

    def trace(self, *, num_experts: int | None = None, model: str = "", source: str = "") -> RoutingTrace:
        """The recorded trace; num_experts defaults to the largest id seen + 1."""
        if self._forwards is not None:
            raise RuntimeError("end_sequence() the current sequence before taking the trace")
        if not self._seqs:
            raise ValueError("no routing was recorded: did the model run any MoE layer?")
        ids = torch.cat([i for i, _ in self._seqs])
        w = torch.cat([w for _, w in self._seqs])
        seen = int(ids.max()) + 1 if ids.numel() else 1
        if num_experts is not None and seen > num_experts:
            raise ValueError(f"recorded expert id {seen - 1} but the model has {num_experts} experts")
        lengths = [0] + [int(i.shape[0]) for i, _ in self._seqs]
        return RoutingTrace(
            expert_ids=ids.to(torch.int16),
            weights=w.to(torch.float16),
            seq_starts=torch.tensor(lengths, dtype=torch.int64).cumsum(0),
            num_experts=num_experts or seen,
            top_k=int(ids.shape[2]),
            model=model,
            source=source,
        )
