"""Generic work items and layer plans: what the scheduler sees of a model.

The scheduler knows no model architecture. One MoE layer reaches it as one `WorkItem`
per active expert (the runtime uses `key=(layer, expert)`); a dense linear layer split
between CPU and device, or a batch of embedding lookups, reaches it the same way with a
different `kind`. Each item can run in one of three places (`Placement`), and a
`LayerPlan` says where every item runs and in which order copies go on the link.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Hashable
from dataclasses import dataclass, field

__all__ = ["Placement", "WorkItem", "LayerPlan", "KINDS"]

# Cost-model families. A kind selects per-kind rates in the cost model; unknown kinds are
# rejected early so a typo cannot silently fall back to expert rates.
KINDS = ("expert", "linear", "embedding")


class Placement(enum.Enum):
    """Where one work item runs."""

    DEVICE = "device"  # weights already on device (cached)
    COPY = "copy"  # copy weights host->device (or wait for a copy in flight), then run on device
    CPU = "cpu"  # run on CPU from host memory, no copy


@dataclass(frozen=True, kw_only=True)
class WorkItem:
    """One unit of work with a CPU and a device implementation.

    key: opaque and hashable; unique within one layer (the runtime uses (layer, expert)).
    tokens: rows this item processes (>= 0; 0 is allowed and costs only call overheads).
    weight_bytes: bytes of weights one run reads (= bytes a copy moves).
    flops_per_token: e.g. 2*3*D*F for a SwiGLU expert.
    cached: the device holds the weights now.
    copy_ready_s: a copy is already in flight and lands in this many seconds (not cached).
    kind: cost-model family, one of KINDS.
    read_bytes: bytes one run actually reads when that is less than weight_bytes
        (embedding lookups touch `tokens` rows, not the table); None means weight_bytes.
    cpu_read_bytes: bytes a CPU run reads when the CPU keeps its own, smaller copy of the
        weights (int8/int4 packed experts); None means the same as a device run.
    """

    key: Hashable
    tokens: int
    weight_bytes: int
    flops_per_token: int
    cached: bool = False
    copy_ready_s: float | None = None
    kind: str = "expert"
    read_bytes: int | None = None
    cpu_read_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("tokens", "weight_bytes", "flops_per_token"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"WorkItem {self.key!r}: {name} must be an int >= 0, got {value!r}")
        if self.kind not in KINDS:
            raise ValueError(f"WorkItem {self.key!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.copy_ready_s is not None:
            if not math.isfinite(self.copy_ready_s) or self.copy_ready_s < 0:
                raise ValueError(
                    f"WorkItem {self.key!r}: copy_ready_s must be a finite number of seconds >= 0, "
                    f"got {self.copy_ready_s!r}"
                )
            if self.cached:
                raise ValueError(f"WorkItem {self.key!r}: a cached item cannot also have a copy in flight")
        if self.read_bytes is not None and (
            isinstance(self.read_bytes, bool) or not isinstance(self.read_bytes, int) or self.read_bytes < 0
        ):
            raise ValueError(f"WorkItem {self.key!r}: read_bytes must be None or an int >= 0, got {self.read_bytes!r}")
        if self.cpu_read_bytes is not None and (
            isinstance(self.cpu_read_bytes, bool) or not isinstance(self.cpu_read_bytes, int) or self.cpu_read_bytes < 0
        ):
            raise ValueError(f"WorkItem {self.key!r}: cpu_read_bytes must be None or an int >= 0, "
                             f"got {self.cpu_read_bytes!r}")

    @property
    def bytes_read(self) -> int:
        """Bytes one run reads from wherever the weights live."""
        return self.weight_bytes if self.read_bytes is None else self.read_bytes

    @property
    def cpu_bytes_read(self) -> int:
        """Bytes one CPU run reads (its own packed copy where it has one)."""
        return self.bytes_read if self.cpu_read_bytes is None else self.cpu_read_bytes

    @property
    def in_flight(self) -> bool:
        """A copy of this item's weights is on the link now."""
        return self.copy_ready_s is not None


@dataclass
class LayerPlan:
    """Where each item of one layer runs.

    placement: key -> Placement for every item of the layer.
    copy_order: keys whose copies must be issued now, in issue order on the copy stream.
        Items whose copy is already in flight are placed COPY but are not listed: the
        runtime waits for the copy it issued earlier.
    makespan_s: the layer's finishing time predicted by the cost model.
    """

    placement: dict[Hashable, Placement]
    copy_order: list[Hashable] = field(default_factory=list)
    makespan_s: float = 0.0

    def keys(self, where: Placement) -> list[Hashable]:
        """Keys placed at `where`, in placement order."""
        return [k for k, p in self.placement.items() if p is where]

    def device_keys(self) -> list[Hashable]:
        """Keys run by the device call: cached first, then copies in flight, then new copies in copy_order."""
        new = set(self.copy_order)
        cached = self.keys(Placement.DEVICE)
        waiting = [k for k in self.keys(Placement.COPY) if k not in new]
        return cached + waiting + list(self.copy_order)
