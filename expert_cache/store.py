"""Host expert store: every routed expert's weights in (pinned) CPU memory.

Shape key: L MoE layers, E experts per layer, D model dim, F expert hidden dim.
Per layer the store holds w13_E2FD (gate rows [0:F], up rows [F:2F]) and w2_EDF, the
layout both the CPU kernels and the device cache slots use, so a copy to the device is
one contiguous memcpy per tensor.

A store may hold only a subset of the experts (`held_LE`): under expert parallelism each
rank keeps just its own. Then each layer's tensors have one row per held expert, and
asking for an expert that is not held raises.

Layers the store allocates (unpinned) and the packed CPU copies live in transparent huge
pages where the host offers them (cpu_kernels.hostmem): the CPU kernels stream them with
fewer TLB misses, 0-14% faster per expert (figures in hostmem.py). Two kinds keep the
allocator's pages: pinned layers (for device copies; pinning a huge-page range would need
cudaHostRegister) and layers adopted by set_layer without a copy (a copy would double a
layer's memory while the caller still holds it).
"""
from __future__ import annotations

import dataclasses

import torch

from moe.cpu_kernels.hostmem import empty_huge, pack

__all__ = ["HostExpertStore", "pack_experts", "weight_tensors"]


class HostExpertStore:
    """Expert weights of L layers x E experts, filled layer by layer or expert by expert."""

    def __init__(self, *, num_layers: int, num_experts: int, hidden: int, inter: int,
                 dtype: torch.dtype, pin_memory: bool = False, held_LE: torch.Tensor | None = None) -> None:
        if min(num_layers, num_experts, hidden, inter) < 1:
            raise ValueError("store dimensions must be >= 1, got "
                             f"layers={num_layers} experts={num_experts} D={hidden} F={inter}")
        self.num_layers, self.num_experts = num_layers, num_experts
        self._set_held(held_LE)
        self.hidden, self.inter, self.dtype = hidden, inter, dtype
        self.pin_memory = pin_memory
        self._w13: list[torch.Tensor | None] = [None] * num_layers
        self._w2: list[torch.Tensor | None] = [None] * num_layers
        self._filled = torch.zeros(num_layers, num_experts, 3, dtype=torch.bool)  # w1, w3, w2
        self._cpu_q: list | None = None  # packed copies for the CPU path (quantize_for_cpu)
        # (w13_2FD, w2_DF) view objects per (layer, row), made once: the CPU kernels cache
        # their checks and numpy views per weight object, so handing out the same objects
        # on every call keeps a small expert's per-call overhead down.
        self._views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- sizes -------------------------------------------------------------------------
    def _set_held(self, held_LE: torch.Tensor | None) -> None:
        L, E = self.num_layers, self.num_experts
        if held_LE is None:
            held_LE = torch.ones(L, E, dtype=torch.bool)
        held_LE = torch.as_tensor(held_LE)
        if held_LE.dtype != torch.bool or tuple(held_LE.shape) != (L, E):
            raise ValueError(f"held_LE must be a bool tensor [{L} layers, {E} experts], "
                             f"got {held_LE.dtype} {tuple(held_LE.shape)}")
        self.held_LE = held_LE.clone()
        # row_LE[l, e]: the row of expert e in layer l's tensors, -1 if not held
        self._row_LE = torch.where(held_LE, held_LE.long().cumsum(1) - 1, -1)
        # The same as nested lists: looked up once per expert call, where one tensor
        # index from cold caches costs more than the list lookup by ~10 us.
        self._rows = self._row_LE.tolist()

    def holds(self, layer: int, expert: int) -> bool:
        """Whether this store keeps expert `expert` of MoE layer `layer`."""
        return bool(self.held_LE[layer, expert])

    def _row(self, layer: int, expert: int) -> int:
        r = self._rows[layer][expert]
        if r < 0:
            raise KeyError(f"expert {expert} of MoE layer {layer} is not held in this process's store "
                           "(under expert parallelism each rank keeps only its own experts)")
        return r

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (w13 + w2): what one host-to-device copy moves."""
        return 3 * self.hidden * self.inter * self.dtype.itemsize

    @property
    def cpu_expert_bytes(self) -> int:
        """Bytes one CPU run of an expert reads: its packed copy when quantized for the CPU."""
        if self._cpu_q is None:
            return self.expert_bytes
        from moe.cpu_kernels import weight_nbytes

        for layer in self._cpu_q:
            if layer:
                return sum(weight_nbytes(w) for w in layer[0])
        return self.expert_bytes

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes * int(self.held_LE.sum())

    # -- filling -----------------------------------------------------------------------
    def _empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.pin_memory:
            return torch.empty(shape, dtype=self.dtype, pin_memory=True)
        return empty_huge(shape, self.dtype)

    def _rows_copy(self, t_E: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """t_E[rows] in fresh memory of this store's kind."""
        return torch.index_select(t_E, 0, rows, out=self._empty((len(rows), *t_E.shape[1:])))

    def _alloc(self, layer: int) -> None:
        if self._w13[layer] is None:
            E, D, F = int(self.held_LE[layer].sum()), self.hidden, self.inter
            self._w13[layer] = self._empty((E, 2 * F, D))
            self._w2[layer] = self._empty((E, D, F))

    def set_layer(self, layer: int, w13_E2FD: torch.Tensor, w2_EDF: torch.Tensor) -> None:
        """Take a whole layer. Without pinning a CPU tensor of the right dtype is adopted
        as is (no copy); otherwise it is copied into pinned memory."""
        self._check_layer(layer)
        E, D, F = self.num_experts, self.hidden, self.inter
        if tuple(w13_E2FD.shape) != (E, 2 * F, D) or tuple(w2_EDF.shape) != (E, D, F):
            raise ValueError(
                f"layer {layer}: expected w13 {(E, 2 * F, D)} and w2 {(E, D, F)}, "
                f"got {tuple(w13_E2FD.shape)} and {tuple(w2_EDF.shape)}")
        adopt = (not self.pin_memory and w13_E2FD.device.type == "cpu" and w2_EDF.device.type == "cpu")
        if not self.held_LE[layer].all():  # keep only the held experts' rows
            rows_E = self.held_LE[layer].nonzero().flatten()
            w13_E2FD, w2_EDF = w13_E2FD[rows_E], w2_EDF[rows_E]
        if adopt:
            self._w13[layer] = w13_E2FD.detach().to(self.dtype).contiguous()
            self._w2[layer] = w2_EDF.detach().to(self.dtype).contiguous()
            self._drop_views(layer)
        else:
            self._alloc(layer)
            self._w13[layer].copy_(w13_E2FD.detach())
            self._w2[layer].copy_(w2_EDF.detach())
        self._filled[layer] = self.held_LE[layer, :, None].expand(-1, 3)

    def set_part(self, layer: int, expert: int, part: str, w: torch.Tensor) -> None:
        """Stream one checkpoint tensor in: part "w1" (gate) / "w3" (up) [F, D], "w2" (down)
        [D, F], or "w13" [2F, D]. A tensor of an expert this store does not hold is
        dropped (check `holds` first to skip reading it)."""
        self._check_layer(layer)
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range 0..{self.num_experts - 1} in layer {layer}")
        if not self.held_LE[layer, expert]:
            return
        self._alloc(layer)
        D, F = self.hidden, self.inter
        r = self._row(layer, expert)
        targets = {
            "w1": (self._w13[layer][r, :F], (F, D), (0,)),
            "w3": (self._w13[layer][r, F:], (F, D), (1,)),
            "w13": (self._w13[layer][r], (2 * F, D), (0, 1)),
            "w2": (self._w2[layer][r], (D, F), (2,)),
        }
        if part not in targets:
            raise ValueError(f"unknown expert tensor part {part!r}")
        dst, shape, flags = targets[part]
        if tuple(w.shape) != shape:
            raise ValueError(f"layer {layer} expert {expert} {part}: expected shape {shape}, "
                             f"got {tuple(w.shape)} (does the config match the weights?)")
        dst.copy_(w)
        for f in flags:
            self._filled[layer, expert, f] = True

    def missing(self) -> list[tuple[int, int, str]]:
        """(layer, expert, part) of every tensor of a held expert not yet filled."""
        names = ("w1", "w3", "w2")
        idx = (~self._filled & self.held_LE[:, :, None]).nonzero().tolist()
        return [(l, e, names[p]) for l, e, p in idx]

    # -- CPU-side quantized copies -------------------------------------------------------
    def quantize_for_cpu(self, scheme: str, group_size: int = 128) -> None:
        """Keep a packed int8/int4 copy of every expert for the CPU path (the dense
        weights stay for device copies)."""
        from moe.cpu_kernels import quantize

        self._cpu_q = [pack_experts([(quantize(self._w13[l][r], scheme, group_size),
                                     quantize(self._w2[l][r], scheme, group_size))
                                    for r in range(int(self.held_LE[l].sum()))]) for l in range(self.num_layers)]

    def cpu_weights(self, layer: int, expert: int):
        """(w13, w2) the CPU kernel should read: packed when quantized, else the dense views."""
        if self._cpu_q is not None:
            return self._cpu_q[layer][self._row(layer, expert)]
        return self.expert(layer, expert)

    # -- reading -----------------------------------------------------------------------
    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13_2FD, w2_DF) views of one expert."""
        self._check_layer(layer)
        if self._w13[layer] is None:
            raise RuntimeError(f"layer {layer} of the expert store was never filled")
        r = self._row(layer, expert)
        views = self._views.get((layer, r))
        if views is None:
            views = self._views[layer, r] = (self._w13[layer][r], self._w2[layer][r])
        return views

    def _drop_views(self, layer: int) -> None:
        for key in [k for k in self._views if k[0] == layer]:
            del self._views[key]

    def keep_only(self, held_LE: torch.Tensor) -> None:
        """Drop every expert outside `held_LE` (a subset of what is held now), freeing its
        memory: an expert-parallel rank keeps its own experts only."""
        held_LE = torch.as_tensor(held_LE)
        if tuple(held_LE.shape) != tuple(self.held_LE.shape) or held_LE.dtype != torch.bool:
            raise ValueError(f"held_LE must be a bool tensor {tuple(self.held_LE.shape)}")
        if (held_LE & ~self.held_LE).any():
            l, e = (held_LE & ~self.held_LE).nonzero()[0].tolist()
            raise KeyError(f"cannot keep expert {e} of MoE layer {l}: this store does not hold it")
        old_row_LE = self._row_LE
        for l in range(self.num_layers):
            if self._w13[l] is not None and not torch.equal(held_LE[l], self.held_LE[l]):
                rows = old_row_LE[l][held_LE[l]]
                self._w13[l], self._w2[l] = self._rows_copy(self._w13[l], rows), self._rows_copy(self._w2[l], rows)
                self._drop_views(l)
                if self._cpu_q is not None:  # repacked, so the dropped experts' arena is freed
                    self._cpu_q[l] = pack_experts([self._cpu_q[l][int(r)] for r in rows])
        self._filled &= held_LE[:, :, None]
        self._set_held(held_LE)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13_E2FD, w2_EDF) of a whole layer (rows of the held experts only)."""
        self._check_layer(layer)
        if self._w13[layer] is None:
            raise RuntimeError(f"layer {layer} of the expert store was never filled")
        return self._w13[layer], self._w2[layer]

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"MoE layer {layer} out of range 0..{self.num_layers - 1}")


def weight_tensors(w) -> dict:
    """The tensors a weight holds: {None: w} for a tensor, {field: tensor} for a packed
    Int8Weight/Int4Weight."""
    if isinstance(w, torch.Tensor):
        return {None: w}
    return {k: v for k, v in vars(w).items() if isinstance(v, torch.Tensor)}


def pack_experts(pairs: list[tuple]) -> list[tuple]:
    """Copies of (w13, w2) pairs (tensors or Int8Weight/Int4Weight) with every tensor of
    theirs in one huge-page arena (hostmem.pack): a layer's experts share huge pages
    instead of each leaving a tail in small pages. The arena lives while any copy does."""
    fields = [[weight_tensors(w) for w in pair] for pair in pairs]
    copies = iter(pack([t for pair in fields for f in pair for t in f.values()]))

    def rebuilt(w, f: dict):
        if isinstance(w, torch.Tensor):
            return next(copies)
        return dataclasses.replace(w, **{k: next(copies) for k in f})

    return [tuple(rebuilt(w, f) for w, f in zip(pair, fpair)) for pair, fpair in zip(pairs, fields)]
