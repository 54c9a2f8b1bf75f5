"""What the kernels need to know about one expert weight, checked and made once per weight.

The runtime applies the same expert weight objects over and over, and a small expert
streams in tens of microseconds, so the Python-side checks and torch -> numpy
conversions are done on first sight of a weight and cached (`weight_info`):

    shape   (rows, cols), after the checks of `check_weight`
    nbytes  bytes one application reads
    fmt     the fused decode kernel for it: "bf16", "int8", "int4" (group 128, rows of
            whole 32-bit words) or None (fp32 and other int4 layouts use the matmul path)
    views   the numpy arrays that kernel takes (no copies)

An entry is keyed by the weight's id, holds only a weak reference to it (it leaves with
the weight), and is rebuilt when the weight's storage pointer or shape changed (e.g. a
``set_`` or ``resize_``); in-place writes into the same storage need nothing.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from .int4_gemv import GROUP as INT4_DECODE_GROUP
from .quant import Int4Weight, Int8Weight

__all__ = ["Weight", "WeightInfo", "weight_info", "check_weight"]

Weight = torch.Tensor | Int8Weight | Int4Weight


@dataclass(frozen=True)
class WeightInfo:
    shape: tuple[int, int]
    nbytes: int
    fmt: str | None
    views: tuple


def check_weight(w: Weight, name: str) -> tuple[int, int]:
    """(rows, cols) of a weight the kernels accept; a clear error naming ``name`` otherwise."""
    if isinstance(w, (Int8Weight, Int4Weight)):
        return tuple(w.shape)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, Int8Weight or Int4Weight, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(w.shape)}")
    if w.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{name} must be float32 or bfloat16 (or quantised with quantize()), got {w.dtype}")
    if w.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got device {w.device}")
    if not w.is_contiguous():
        # A contiguous copy of an expert would double its memory traffic; make the caller decide.
        raise ValueError(f"{name} must be contiguous (row-major [rows, cols]); got strides {w.stride()}")
    return tuple(w.shape)


def _stamp(w: Weight) -> tuple:
    """What must not change for cached views to stay valid: storage pointers and shape."""
    if isinstance(w, Int8Weight):
        return w.q_RC.data_ptr(), w.scale_R.data_ptr()
    if isinstance(w, Int4Weight):
        return w.packed_RB.data_ptr(), w.scale_RG.data_ptr()
    return w.data_ptr(), w.shape


def _make_info(w: Weight, name: str) -> WeightInfo:
    shape = check_weight(w, name)
    if isinstance(w, Int8Weight):
        return WeightInfo(shape, w.nbytes, "int8", (w.q_RC.numpy(), w.scale_R.numpy()))
    if isinstance(w, Int4Weight):
        p_RP = w.packed_RB.numpy()
        if w.group_size != INT4_DECODE_GROUP or p_RP.shape[1] % 4:
            return WeightInfo(shape, w.nbytes, None, ())
        return WeightInfo(shape, w.nbytes, "int4", (p_RP, p_RP.view(np.int32), w.scale_RG.numpy()))
    nbytes = w.numel() * w.element_size()
    if w.dtype == torch.bfloat16:
        return WeightInfo(shape, nbytes, "bf16", (w.detach().view(torch.int16).numpy().view(np.uint16),))
    return WeightInfo(shape, nbytes, None, ())


# id(weight) -> (weak reference to it, its stamp, its info)
_CACHE: dict[int, tuple[weakref.ref, tuple, WeightInfo]] = {}


def weight_info(w: Weight, name: str) -> WeightInfo:
    """The checked WeightInfo of ``w``, cached per weight object (see the module note)."""
    key = id(w)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is w and hit[1] == _stamp(w):
        return hit[2]
    info = _make_info(w, name)

    def forget(ref, key=key):
        # No lock: weakref callbacks may run inside any allocation, even one made while a
        # lock is held; single dict operations are atomic under the GIL, and a race here
        # costs at most one rebuilt entry.
        entry = _CACHE.get(key)
        if entry is not None and entry[0] is ref:
            _CACHE.pop(key, None)

    try:
        ref = weakref.ref(w, forget)
    except TypeError:  # not weak-referenceable: use the info without caching it
        return info
    _CACHE[key] = (ref, _stamp(w), info)
    return info
