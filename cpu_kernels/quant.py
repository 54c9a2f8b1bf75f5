"""Weight-only quantisation for CPU experts: packed formats read directly by `expert_ffn`.

Shape key: R output rows, C input columns (a weight is [R, C], y = x @ w.T),
G = ceil(C / group_size) groups per row, B = bytes per packed int4 row.

int8  (``Int8Weight``): symmetric, one fp32 scale per output row.
      q_RC int8 in [-127, 127], w ~= q * scale_R[:, None].
int4  (``Int4Weight``): symmetric, one fp32 scale per group of ``group_size`` consecutive
      input columns of a row; q in [-8, 7] stored as the nibble q + 8, two per byte.
      Within each group of m columns (m = group_size, or less for the last group of a
      row when C is not a multiple), byte i holds column i in its low nibble and column
      i + ceil(m / 2) in its high nibble. Splitting the group in halves (rather than
      pairing neighbours) lets the kernel unpack with one AND / one shift per byte into
      two contiguous runs, which vectorises; odd m leaves the last high nibble 8 (= 0).

Both formats store a row's bytes contiguously, so a GEMV streams each row once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Int8Weight", "Int4Weight", "quantize", "QUANT_SCHEMES", "INT4_GROUP_SIZES"]

QUANT_SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)


def _check_weight(w: torch.Tensor, what: str = "weight") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{what} must be 2-D [rows, cols], got shape {tuple(w.shape)}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{what} must be float32, bfloat16 or float16 to quantise, got {w.dtype}")
    if w.device.type != "cpu":
        raise ValueError(f"{what} must be on the CPU, got device {w.device}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{what} contains inf or NaN; cannot choose quantisation scales")


@dataclass(frozen=True, kw_only=True)
class Int8Weight:
    """int8 weight with per-output-row scales.

    q_RC: int8 [R, C], contiguous.  scale_R: float32 [R].
    """

    q_RC: torch.Tensor
    scale_R: torch.Tensor

    def __post_init__(self) -> None:
        q, s = self.q_RC, self.scale_R
        if not (isinstance(q, torch.Tensor) and q.dtype == torch.int8 and q.dim() == 2):
            raise ValueError(f"Int8Weight.q_RC must be a 2-D int8 tensor, got {_desc(q)}")
        if not (isinstance(s, torch.Tensor) and s.dtype == torch.float32 and tuple(s.shape) == (q.shape[0],)):
            raise ValueError(f"Int8Weight.scale_R must be float32 [{q.shape[0]}], got {_desc(s)}")
        if not (q.is_contiguous() and s.is_contiguous()):
            raise ValueError("Int8Weight tensors must be contiguous")

    @property
    def shape(self) -> torch.Size:
        return self.q_RC.shape

    @property
    def nbytes(self) -> int:
        """Bytes a kernel reads to apply this weight once."""
        return self.q_RC.numel() + 4 * self.scale_R.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense [R, C] weight in ``dtype``."""
        return (self.q_RC.to(torch.float32) * self.scale_R[:, None]).to(dtype)


@dataclass(frozen=True, kw_only=True)
class Int4Weight:
    """int4 weight with group-wise scales along the input dimension (layout: module doc).

    packed_RB: uint8 [R, B] with B = sum over groups of ceil(m / 2), contiguous.
    scale_RG: float32 [R, G].  cols: C.  group_size: 32, 64 or 128.
    """

    packed_RB: torch.Tensor
    scale_RG: torch.Tensor
    cols: int
    group_size: int

    def __post_init__(self) -> None:
        p, s, C, g = self.packed_RB, self.scale_RG, self.cols, self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g not in INT4_GROUP_SIZES:
            raise ValueError(f"Int4Weight.group_size must be one of {INT4_GROUP_SIZES}, got {g!r}")
        if isinstance(C, bool) or not isinstance(C, int) or C < 0:
            raise ValueError(f"Int4Weight.cols must be an int >= 0, got {C!r}")
        if not (isinstance(p, torch.Tensor) and p.dtype == torch.uint8 and p.dim() == 2):
            raise ValueError(f"Int4Weight.packed_RB must be a 2-D uint8 tensor, got {_desc(p)}")
        R = p.shape[0]
        if tuple(p.shape) != (R, _int4_row_bytes(C, g)):
            raise ValueError(f"Int4Weight.packed_RB must be [{R}, {_int4_row_bytes(C, g)}] for cols={C}, "
                             f"group_size={g}, got {tuple(p.shape)}")
        G = -(-C // g)
        if not (isinstance(s, torch.Tensor) and s.dtype == torch.float32 and tuple(s.shape) == (R, G)):
            raise ValueError(f"Int4Weight.scale_RG must be float32 [{R}, {G}], got {_desc(s)}")
        if not (p.is_contiguous() and s.is_contiguous()):
            raise ValueError("Int4Weight tensors must be contiguous")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.packed_RB.shape[0], self.cols))

    @property
    def nbytes(self) -> int:
        """Bytes a kernel reads to apply this weight once."""
        return self.packed_RB.numel() + 4 * self.scale_RG.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense [R, C] weight in ``dtype``."""
        R, C, g = self.packed_RB.shape[0], self.cols, self.group_size
        out_RC = torch.empty((R, C), dtype=torch.float32)
        for c0, b0, m in _int4_groups(C, g):
            h = (m + 1) // 2
            byte_Rh = self.packed_RB[:, b0:b0 + h].to(torch.int16)
            scale_R1 = self.scale_RG[:, c0 // g, None]
            out_RC[:, c0:c0 + h] = ((byte_Rh & 15) - 8).to(torch.float32) * scale_R1
            out_RC[:, c0 + h:c0 + m] = ((byte_Rh[:, : m - h] >> 4) - 8).to(torch.float32) * scale_R1
        return out_RC.to(dtype)


def _desc(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _int4_groups(C: int, g: int):
    """Yield (first column, first byte, columns m) for each group of a row."""
    c0 = b0 = 0
    while c0 < C:
        m = min(g, C - c0)
        yield c0, b0, m
        c0 += m
        b0 += (m + 1) // 2


def _int4_row_bytes(C: int, g: int) -> int:
    full, rest = divmod(C, g)
    return full * (g // 2) + (rest + 1) // 2


def _quantize_int8(w_RC: torch.Tensor) -> Int8Weight:
    w = w_RC.to(torch.float32)
    amax_R = w.abs().amax(dim=1) if w.shape[1] else torch.zeros(w.shape[0])
    # All-zero rows get scale 1 so dequantisation stays exact (0 * 1) and never divides by 0.
    scale_R = torch.where(amax_R > 0, amax_R / 127.0, torch.ones_like(amax_R))
    q = torch.round(w / scale_R[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q_RC=q.contiguous(), scale_R=scale_R.contiguous())


def _quantize_int4(w_RC: torch.Tensor, group_size: int) -> Int4Weight:
    R, C = w_RC.shape
    g = group_size
    w = w_RC.to(torch.float32)
    G = -(-C // g)
    packed_RB = torch.empty((R, _int4_row_bytes(C, g)), dtype=torch.uint8)
    scale_RG = torch.empty((R, G), dtype=torch.float32)
    for c0, b0, m in _int4_groups(C, g):
        wg = w[:, c0:c0 + m]
        amax_R = wg.abs().amax(dim=1)
        scale_R = torch.where(amax_R > 0, amax_R / 7.0, torch.ones_like(amax_R))
        nib = (torch.round(wg / scale_R[:, None]).clamp_(-8, 7) + 8).to(torch.uint8)
        h = (m + 1) // 2
        hi = torch.full((R, h), 8, dtype=torch.uint8)
        hi[:, : m - h] = nib[:, h:]
        packed_RB[:, b0:b0 + h] = nib[:, :h] | (hi << 4)
        scale_RG[:, c0 // g] = scale_R
    return Int4Weight(packed_RB=packed_RB, scale_RG=scale_RG, cols=C, group_size=g)


def quantize(w: torch.Tensor, scheme: str, group_size: int = 128) -> Int8Weight | Int4Weight:
    """Quantise a dense [R, C] weight (fp32/bf16/fp16, CPU) for `expert_ffn`.

    scheme: "int8" (per-row scales; ``group_size`` is ignored) or "int4" (scales per
    ``group_size`` in {32, 64, 128} input columns). Rounds to nearest; the error of each
    element is at most half a quantisation step (scale / 2) of its row or group.
    """
    if scheme not in QUANT_SCHEMES:
        raise ValueError(f"unknown quantisation scheme {scheme!r}; choose one of {', '.join(QUANT_SCHEMES)}")
    _check_weight(w)
    if scheme == "int8":
        return _quantize_int8(w)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    return _quantize_int4(w, group_size)
