"""Host memory for expert weights: transparent huge pages where the kernel offers them.

Shape key: N bytes.

A decode step streams every active expert's bytes from DRAM once. With 4 KiB pages that
is one TLB miss per 4 KiB, and in a virtual machine each miss walks two page tables
(guest and host). On the 2-core Zen 3 KVM guest, same-process A/B through expert_ffn
(T == 1, two threads), cold pools of whole experts packed into huge-page arenas as the
store keeps them, against the same experts in the torch allocator's 4 KiB pages:
    Mixtral-8x7B       bf16 1.12x, 1.13x   int8 1.04x, 1.14x   int4 1.00x
    DeepSeek-V2-Lite   bf16 1.08x          int8 1.07x, 1.02x   int4 1.07x
while the plain streaming sum of the bandwidth probe moved by -8% to +8% between the
two page sizes, with no sign: one sequential stream per thread, which the page walker
keeps up with.

Linux gives an anonymous private mapping huge pages when transparent huge pages are
"always" on, or "madvise" and the range is advised (MADV_HUGEPAGE). Elsewhere, or for
arrays under one huge page, these helpers fall back to ordinary allocations: the data
are the same either way, only the page size differs.

Only whole, aligned 2 MiB ranges are advised, so a tensor never takes more physical
memory than its bytes rounded up to 4 KiB (a huge page over its tail would waste up to
2 MiB). `pack` places many tensors in one such arena, so that a layer's experts share
huge pages instead of each leaving a 4 KiB-paged tail.
"""
from __future__ import annotations

import bisect
import functools
import mmap
import re
import sys

import numpy as np
import torch

__all__ = ["HUGE_PAGE", "thp_mode", "huge_pages_enabled", "empty_huge", "empty_huge_np", "pack", "mappings",
           "mapping_of"]

HUGE_PAGE = 2 << 20
_ALIGN = 64  # start of each packed tensor: a cache line
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), or None
    where there is none to read (not Linux, or no THP support)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open(_THP_ENABLED) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


@functools.cache
def huge_pages_enabled() -> bool:
    """Whether empty_huge can hand out huge-page-backed memory on this host (read once:
    every large allocation asks)."""
    return thp_mode() in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE")


def empty_huge_np(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of nbytes whose whole 2 MiB ranges are advised as
    huge pages (see module doc); a plain numpy array where that is not possible."""
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
    if nbytes < HUGE_PAGE or not huge_pages_enabled():
        return np.empty(nbytes, np.uint8)
    # Private: a shared anonymous mapping is shmem, which has its own (usually off) THP
    # setting. One extra huge page of address space (never touched) buys the alignment.
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = np.frombuffer(m, np.uint8)  # holds the mapping open for as long as a view lives
    start = -buf.ctypes.data % HUGE_PAGE
    whole = nbytes // HUGE_PAGE * HUGE_PAGE
    m.madvise(mmap.MADV_HUGEPAGE, start, whole)
    return buf[start:start + nbytes]


def empty_huge(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype) on the CPU, backed by huge pages where possible."""
    shape = tuple(shape)
    if any(not isinstance(s, int) or s < 0 for s in shape):
        raise ValueError(f"shape must hold ints >= 0, got {shape}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(empty_huge_np(nbytes)).view(dtype).view(shape)


def pack(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of CPU tensors in one huge-page arena: each a contiguous view of the same
    shape and dtype, starting on a 64-byte boundary. The arena lives as long as any view.
    Tensors too small for a huge page between them come back as plain contiguous copies."""
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            raise ValueError(f"pack takes CPU tensors, got {type(t).__name__}"
                             + (f" on {t.device}" if isinstance(t, torch.Tensor) else ""))
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    if total < HUGE_PAGE:
        return [t.detach().clone(memory_format=torch.contiguous_format) for t in tensors]
    arena = torch.from_numpy(empty_huge_np(total))
    out = []
    for t, off in zip(tensors, offsets):
        n = t.numel() * t.element_size()
        view = arena[off:off + n].view(t.dtype).view(t.shape)
        view.copy_(t.detach())
        out.append(view)
    return out


def mappings() -> list[dict] | None:
    """This process's memory mappings in address order, from /proc/self/smaps, each
    {"start", "end": its address range, "kb": its size, "advised": the huge-page advice
    is set, "huge_kb": how much of it the kernel backs with huge pages now}; None where
    smaps cannot be read."""
    try:
        with open("/proc/self/smaps") as f:
            text = f.read()
    except OSError:
        return None
    out: list[dict] = []
    for line in text.splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            lo, hi = int(m.group(1), 16), int(m.group(2), 16)
            out.append({"start": lo, "end": hi, "kb": (hi - lo) >> 10, "advised": False, "huge_kb": 0})
        elif out and line.startswith("AnonHugePages:"):
            out[-1]["huge_kb"] = int(line.split()[1])
        elif out and line.startswith("VmFlags:"):
            out[-1]["advised"] = "hg" in line.split()[1:]
    return out


def mapping_of(addr: int, maps: list[dict] | None = None) -> dict | None:
    """The mapping (as in `mappings`) holding address addr; None where smaps cannot be
    read or addr is not mapped. Pass `maps` to look up many addresses in one reading."""
    maps = mappings() if maps is None else maps
    if not maps:
        return None
    i = bisect.bisect_right([m["start"] for m in maps], addr) - 1
    return maps[i] if i >= 0 and addr < maps[i]["end"] else None
