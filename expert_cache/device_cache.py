"""Device expert cache: a pool of N expert slots on the fast tier, shared by all layers.

Shape key: N slots, L MoE layers, E experts, D model dim, F expert hidden dim.
The pool is w13_N2FD / w2_NDF on `device`; `slot_LE[l, e]` is the slot holding expert
(l, e) or -1. One global pool (rather than fixed slots per layer) lets hot layers hold
more experts than cold ones; the policy decides who leaves.

Copies run on their own CUDA stream from pinned host memory; `wait(stream)` makes a
compute stream wait for the copies issued so far (an event, no host synchronisation).
Before a slot is overwritten the copy stream waits for the compute stream, so a kernel
still reading the old expert is never raced.
"""
from __future__ import annotations

from typing import Iterable

import torch

from moe.expert_cache.policy import CachePolicy, LRUPolicy
from moe.expert_cache.store import HostExpertStore

__all__ = ["DeviceExpertCache"]


class DeviceExpertCache:
    def __init__(self, store: HostExpertStore, *, num_slots: int, device: torch.device | str,
                 policy: CachePolicy | None = None) -> None:
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        self.store, self.device = store, torch.device(device)
        self.num_slots = num_slots
        self.policy = policy or LRUPolicy()
        D, F, dt = store.hidden, store.inter, store.dtype
        self.w13_N2FD = torch.empty(num_slots, 2 * F, D, dtype=dt, device=self.device)
        self.w2_NDF = torch.empty(num_slots, D, F, dtype=dt, device=self.device)
        self.slot_LE = torch.full((store.num_layers, store.num_experts), -1, dtype=torch.int64)
        self._key_of_slot: list[tuple[int, int] | None] = [None] * num_slots
        # slot_LE as a dict for the per-expert queries of every layer call: a tensor index
        # from cold caches costs several microseconds, a dict lookup well under one.
        self._slot_of: dict[tuple[int, int], int] = {}
        self._free = list(range(num_slots - 1, -1, -1))
        self._map_cache: dict[int, torch.Tensor] = {}
        self._pinned: set[tuple[int, int]] = set()
        self.h2d_bytes = 0
        self.loads = 0
        self.evictions = 0
        cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._copy_event = torch.cuda.Event() if cuda else None

    # -- queries -----------------------------------------------------------------------
    def slot(self, layer: int, expert: int) -> int:
        self._check_key(layer, expert)
        return self._slot_of.get((layer, expert), -1)

    def resident(self, layer: int, expert: int) -> bool:
        self._check_key(layer, expert)
        return (layer, expert) in self._slot_of

    def _check_key(self, layer: int, expert: int) -> None:
        L, E = self.store.num_layers, self.store.num_experts
        if not (0 <= layer < L and 0 <= expert < E):
            raise IndexError(f"expert ({layer}, {expert}) is outside the cache's {L} layers x {E} experts")

    def resident_experts(self, layer: int) -> list[int]:
        return (self.slot_LE[layer] >= 0).nonzero().flatten().tolist()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def evictable(self, protect: Iterable[tuple[int, int]] = ()) -> int:
        """Slots a new load could use now: free ones plus resident entries that are
        neither pinned nor in `protect`."""
        protected = set(protect) | self._pinned
        taken = sum(1 for k in self._key_of_slot if k is not None and k in protected)
        return self.num_slots - taken

    def expert_map(self, layer: int, experts: Iterable[int] | None = None) -> torch.Tensor:
        """int32 [E] on device: slot of each expert of `layer`, or -1. With `experts`,
        only those are mapped (the others run elsewhere)."""
        if experts is None:
            m = self._map_cache.get(layer)
            if m is None:
                m = self.slot_LE[layer].to(torch.int32).to(self.device)
                self._map_cache[layer] = m
            return m
        m_E = torch.full((self.store.num_experts,), -1, dtype=torch.int32)
        ids = torch.as_tensor(list(experts), dtype=torch.int64)
        if ids.numel():
            m_E[ids] = self.slot_LE[layer, ids].to(torch.int32)
        return m_E.to(self.device)

    # -- changes -----------------------------------------------------------------------
    def pin(self, keys: Iterable[tuple[int, int]]) -> None:
        """Load and keep these experts resident (never evicted), e.g. a static hot set."""
        for layer, e in keys:
            self.load(layer, e)
            self._pinned.add((layer, e))

    def load(self, layer: int, expert: int, protect: Iterable[tuple[int, int]] = ()) -> int:
        """Make (layer, expert) resident, evicting by policy among entries not in
        `protect`. Returns the slot, or -1 if no slot can be freed."""
        s = self.slot(layer, expert)
        if s >= 0:
            return s
        if self._free:
            s = self._free.pop()
        else:
            protected = set(protect) | self._pinned
            candidates = [k for k in self._key_of_slot if k is not None and k not in protected]
            if not candidates:
                return -1
            victim = self.policy.victim(candidates)
            s = self.evict(*victim)
        self._copy_in(layer, expert, s)
        self.slot_LE[layer, expert] = s
        self._slot_of[(layer, expert)] = s
        self._key_of_slot[s] = (layer, expert)
        self._map_cache.pop(layer, None)
        self.policy.on_insert((layer, expert))
        self.loads += 1
        return s

    def evict(self, layer: int, expert: int) -> int:
        s = self.slot(layer, expert)
        if s < 0:
            raise KeyError(f"expert ({layer}, {expert}) is not resident")
        self.slot_LE[layer, expert] = -1
        del self._slot_of[(layer, expert)]
        self._key_of_slot[s] = None
        self._map_cache.pop(layer, None)
        self.policy.on_evict((layer, expert))
        self.evictions += 1
        return s

    def release(self) -> None:
        """Give back every slot's device memory; the cache then holds nothing (used when
        the model runs expert-parallel and each rank keeps its own experts instead)."""
        self.wait()
        evictions = self.evictions  # emptying the pool is not the policy evicting
        for key in [k for k in self._key_of_slot if k is not None]:
            self.evict(*key)
        self.evictions = evictions
        self._pinned.clear()
        self.num_slots = 0
        self._free, self._key_of_slot = [], []
        D, F, dt = self.store.hidden, self.store.inter, self.store.dtype
        self.w13_N2FD = torch.empty(0, 2 * F, D, dtype=dt, device=self.device)
        self.w2_NDF = torch.empty(0, D, F, dtype=dt, device=self.device)

    def _copy_in(self, layer: int, expert: int, s: int) -> None:
        w13_2FD, w2_DF = self.store.expert(layer, expert)
        if self._copy_stream is None:
            self.w13_N2FD[s].copy_(w13_2FD)
            self.w2_NDF[s].copy_(w2_DF)
        else:
            # The slot may still be read by kernels queued on the compute stream.
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                self.w13_N2FD[s].copy_(w13_2FD, non_blocking=True)
                self.w2_NDF[s].copy_(w2_DF, non_blocking=True)
            self._copy_event.record(self._copy_stream)
        self.h2d_bytes += self.store.expert_bytes

    def wait(self) -> None:
        """Make the current stream wait for every copy issued so far."""
        if self._copy_event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._copy_event)
