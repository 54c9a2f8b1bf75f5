"""HybridMoeBlock: the drop-in replacement for a family's sparse MoE block.

Pipeline (shapes: B batch, S sequence, T = B*S tokens, D model dim, E experts, K top-k):

    x_BSD -> [Router] logits_TE -> select_experts -> topk_weights_TK, topk_ids_TK
          -> [Routed experts] block.routed(x_TD, topk_ids_TK, topk_weights_TK) -> y_TD
             (the hybrid runtime: device cache slots, CPU experts, copies; or expert
              parallelism, which swaps `routed`)
          -> [+ shared experts] (sigmoid-gated for Qwen2-MoE)
          -> y_BSD
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe.cpu_kernels.routing import select_experts
from moe.families import GatingSpec

__all__ = ["HybridMoeBlock", "RoutedFn"]

RoutedFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class HybridMoeBlock(nn.Module):
    """Sparse MoE block whose routed experts live outside the module.

    gate: the family's router module (kept, so its weight keeps its name in state_dict);
        only `gate.weight` and, for DeepSeek-V3, `gate.e_score_correction_bias` are read.
    shared / shared_gate: the shared expert module and its gate, or None.
    layer: MoE-layer ordinal (0..L-1) used by the runtime, store and traces.
    """

    def __init__(self, *, gate: nn.Module, gating: GatingSpec, num_experts: int, layer: int,
                 routed: RoutedFn, shared: nn.Module | None = None,
                 shared_gate: nn.Module | None = None, store=None) -> None:
        super().__init__()
        self.gate = gate
        self.gating = gating
        self.num_experts = num_experts
        self.layer = layer
        self.shared = shared
        self.shared_gate = shared_gate
        self.routed = routed
        self.store = store

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E], in fp32 where the family computes them so."""
        w_ED = self.gate.weight
        return F.linear(x_TD.float(), w_ED.float()) if self.gating.router_fp32 else F.linear(x_TD, w_ED)

    def correction_bias(self) -> torch.Tensor | None:
        return self.gate.e_score_correction_bias if self.gating.has_correction_bias else None

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_weights_TK, topk_ids_TK) with the family's exact gating rule."""
        g = self.gating
        logits_TE = self.logits(x_TD)
        bias_E = self.correction_bias()
        weights_TK, ids_TK = select_experts(logits_TE, g.top_k, correction_bias_E=bias_E,
                                            **g.select_kwargs())
        if g.weights_in_logits_dtype:
            weights_TK = weights_TK.to(logits_TE.dtype)
        return weights_TK, ids_TK

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        shape = hidden_BSD.shape
        x_TD = hidden_BSD.reshape(-1, shape[-1])
        weights_TK, ids_TK = self.route(x_TD)
        y_TD = self.routed(x_TD, ids_TK, weights_TK)
        if self.shared is not None:
            s_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                s_TD = torch.sigmoid(self.shared_gate(x_TD)) * s_TD
            y_TD = y_TD + s_TD
        return y_TD.reshape(shape)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.num_experts}, top_k={self.gating.top_k}"
