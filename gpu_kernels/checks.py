"""Input checks shared by the fused-MoE kernels and their plain-torch references.

Shape key: T tokens, D hidden size, F expert intermediate size, E weight slots (dim 0 of
w13/w2), G global experts (length of expert_map), K experts per token (top-k).
"""
from __future__ import annotations

import torch

__all__ = ["FLOAT_DTYPES", "INDEX_DTYPES", "check_moe_inputs", "check_align_inputs", "check_index_values"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _need_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _need_dims(name: str, t: torch.Tensor, dims: str) -> None:
    if t.dim() != len(dims):
        raise ValueError(f"{name} must have shape [{', '.join(dims)}], got {tuple(t.shape)}")


def _need_dtype(name: str, t: torch.Tensor, allowed: tuple) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")


def check_align_inputs(topk_ids_TK, block_size: int, num_slots: int, expert_map_G=None) -> None:
    """Shapes, dtypes and devices of `moe_align` arguments (values are checked elsewhere)."""
    _need_tensor("topk_ids_TK", topk_ids_TK)
    _need_dims("topk_ids_TK", topk_ids_TK, "TK")
    _need_dtype("topk_ids_TK", topk_ids_TK, INDEX_DTYPES)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 1:
        raise ValueError(f"num_slots must be an int >= 1, got {num_slots!r}")
    if expert_map_G is not None:
        _need_tensor("expert_map_E", expert_map_G)
        _need_dims("expert_map_E", expert_map_G, "G")
        _need_dtype("expert_map_E", expert_map_G, INDEX_DTYPES)
        if expert_map_G.device != topk_ids_TK.device:
            raise ValueError(
                f"expert_map_E is on {expert_map_G.device} but topk_ids_TK is on {topk_ids_TK.device}; "
                "expected one device"
            )


def check_index_values(topk_ids_TK: torch.Tensor, num_slots: int, expert_map_G=None) -> None:
    """Value ranges of expert ids and of the expert->slot map.

    Reads the tensors on the host, so on CUDA this synchronises; the fast path skips it
    and its kernels drop out-of-range ids instead of reading out of bounds.
    """
    num_global = num_slots if expert_map_G is None else expert_map_G.shape[0]
    if topk_ids_TK.numel():
        lo, hi = int(topk_ids_TK.min()), int(topk_ids_TK.max())
        if lo < 0 or hi >= num_global:
            what = "expert_map_E length" if expert_map_G is not None else "the number of weight slots"
            raise ValueError(
                f"topk_ids_TK holds expert ids in [{lo}, {hi}], expected [0, {num_global - 1}] "
                f"({what} is {num_global})"
            )
    if expert_map_G is not None and expert_map_G.numel():
        lo, hi = int(expert_map_G.min()), int(expert_map_G.max())
        if lo < -1 or hi >= num_slots:
            raise ValueError(
                f"expert_map_E holds values in [{lo}, {hi}], expected -1 (not on this device) "
                f"or a slot in [0, {num_slots - 1}]"
            )


def check_moe_inputs(x_TD, w13_E2FD, w2_EDF, topk_ids_TK, topk_weights_TK, expert_map_G=None) -> None:
    """Shapes, dtypes and devices of a fused-MoE call; raises naming the bad argument."""
    for name, t in (("x_TD", x_TD), ("w13_E2FD", w13_E2FD), ("w2_EDF", w2_EDF),
                    ("topk_ids_TK", topk_ids_TK), ("topk_weights_TK", topk_weights_TK)):
        _need_tensor(name, t)
    _need_dims("x_TD", x_TD, "TD")
    _need_dims("w13_E2FD", w13_E2FD, ("E", "2F", "D"))
    _need_dims("w2_EDF", w2_EDF, "EDF")
    _need_dims("topk_ids_TK", topk_ids_TK, "TK")
    _need_dims("topk_weights_TK", topk_weights_TK, "TK")
    _need_dtype("x_TD", x_TD, FLOAT_DTYPES)
    _need_dtype("w13_E2FD", w13_E2FD, FLOAT_DTYPES)
    _need_dtype("w2_EDF", w2_EDF, FLOAT_DTYPES)
    _need_dtype("topk_weights_TK", topk_weights_TK, FLOAT_DTYPES)
    _need_dtype("topk_ids_TK", topk_ids_TK, INDEX_DTYPES)
    if w13_E2FD.dtype != w2_EDF.dtype:
        raise TypeError(f"w13_E2FD and w2_EDF must share a dtype, got {w13_E2FD.dtype} and {w2_EDF.dtype}")
    T, D = x_TD.shape
    E, F2, D13 = w13_E2FD.shape
    if E < 1:
        raise ValueError("w13_E2FD must hold at least one expert slot (dim 0 >= 1)")
    if F2 % 2 or F2 == 0:
        raise ValueError(f"w13_E2FD dim 1 must be 2F (gate rows then up rows) with F >= 1, got {F2}")
    F = F2 // 2
    if D13 != D:
        raise ValueError(f"w13_E2FD has D={D13} but x_TD has D={D}; expected [E, 2F, {D}]")
    if tuple(w2_EDF.shape) != (E, D, F):
        raise ValueError(f"w2_EDF must have shape [E, D, F] = {(E, D, F)} to match w13_E2FD, got {tuple(w2_EDF.shape)}")
    if topk_ids_TK.shape[0] != T:
        raise ValueError(f"topk_ids_TK has {topk_ids_TK.shape[0]} rows but x_TD has T={T}")
    if topk_weights_TK.shape != topk_ids_TK.shape:
        raise ValueError(
            f"topk_weights_TK shape {tuple(topk_weights_TK.shape)} must equal topk_ids_TK shape "
            f"{tuple(topk_ids_TK.shape)}"
        )
    devices = {t.device for t in (x_TD, w13_E2FD, w2_EDF, topk_ids_TK, topk_weights_TK)}
    if expert_map_G is not None:
        _need_tensor("expert_map_E", expert_map_G)
        _need_dims("expert_map_E", expert_map_G, "G")
        _need_dtype("expert_map_E", expert_map_G, INDEX_DTYPES)
        devices.add(expert_map_G.device)
    if len(devices) != 1:
        raise ValueError(f"all fused-MoE tensors must be on one device, got {sorted(str(d) for d in devices)}")
