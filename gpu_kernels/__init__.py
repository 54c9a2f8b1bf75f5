"""Triton kernels for MoE layers, each beside a plain-torch reference.

Pipeline of one MoE layer on the device::

    [Router] -> [moe_align: sort pairs by slot, pad to block] -> [gate/up GEMM + SiLU*up]
             -> [down GEMM * routing weight] -> [combine: sum over k]

Public ops:
    fused_moe(x_TD, w13_E2FD, w2_EDF, topk_ids_TK, topk_weights_TK, expert_map_E=None) -> y_TD
    fused_moe_reference(...)   same signature, plain torch, any device (used on CPU)
    moe_align(topk_ids_TK, block_size, num_slots, expert_map_E=None)
    moe_align_reference(...)   same signature, plain torch

The Triton ops import triton on first use, so CPU-only callers of the references never pay
for it. They run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before
triton was first imported in the process (Triton's interpreter; tests use it).
"""
from __future__ import annotations

import importlib

from .launch_config import FusedMoELaunchConfig, GemmLaunchConfig, get_launch_config
from .reference import fused_moe_reference, max_padded_rows, moe_align_reference

__all__ = [
    "fused_moe",
    "fused_moe_reference",
    "invoke_fused_moe",
    "moe_align",
    "moe_align_reference",
    "max_padded_rows",
    "FusedMoELaunchConfig",
    "GemmLaunchConfig",
    "get_launch_config",
]

_LAZY = {"fused_moe": ".fused", "invoke_fused_moe": ".fused", "moe_align": ".align"}


def __getattr__(name: str):
    # Deferred so that importing the package (e.g. for the CPU reference) does not import triton.
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
