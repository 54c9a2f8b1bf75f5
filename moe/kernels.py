"""The runtime's choice of expert kernels.

CPU experts: the Numba SwiGLU kernel (moe.cpu_kernels.expert_ffn, GIL released, so
several experts run at once on the runtime's thread pool). Device experts: the Triton
fused-MoE kernel on CUDA; on any other device its plain-torch reference, which is what
the CPU-only path (and CI) runs.
"""
from __future__ import annotations

import torch

from moe.cpu_kernels.expert_ffn import expert_ffn
from moe.gpu_kernels import fused_moe_reference

__all__ = ["cpu_expert_ffn", "device_fused_moe"]


def cpu_expert_ffn(x_TD: torch.Tensor, w13_2FD, w2_DF, *, out: torch.Tensor | None = None,
                   num_threads: int | None = None) -> torch.Tensor:
    """y_TD = SwiGLU expert of x_TD on the CPU (into `out` when given); x's dtype out."""
    return expert_ffn(x_TD, w13_2FD, w2_DF, out, num_threads=num_threads)


def device_fused_moe(x_TD, w13_N2FD, w2_NDF, ids_TK, weights_TK, expert_map_E) -> torch.Tensor:
    """Routed experts mapped to a slot by expert_map_E (others contribute 0), on x's device."""
    if x_TD.device.type == "cuda":
        from moe.gpu_kernels import fused_moe

        return fused_moe(x_TD, w13_N2FD, w2_NDF, ids_TK, weights_TK, expert_map_E)
    return fused_moe_reference(x_TD, w13_N2FD, w2_NDF, ids_TK, weights_TK, expert_map_E)
