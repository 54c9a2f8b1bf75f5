"""A prefetch queue: pending expert copies ordered by priority, cancellable.

The runtime pushes forecast experts with their forecast probability as priority, pops
the most urgent when the copy stream is idle, raises a priority when a nearer layer's
forecast confirms it, and cancels what a fresh forecast no longer wants. A heap with
lazy deletion keeps every operation O(log n); equal priorities pop first-in first-out.
Thread-safe: the forecasting thread and the copy thread may share one queue.
"""
from __future__ import annotations

import heapq
import itertools
import threading
from typing import Hashable

__all__ = ["PrefetchQueue"]


class PrefetchQueue:
    """Pending prefetches: push(key, priority), cancel(key), reprioritise(key, p), pop() -> highest."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Hashable]] = []  # (-priority, seq, key)
        self._live: dict[Hashable, tuple[float, int]] = {}  # key -> its current heap entry
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def push(self, key: Hashable, priority: float) -> None:
        """Queue `key`; if already queued, its priority becomes `priority` (keeps its FIFO place
        only if the priority is unchanged)."""
        p = float(priority)
        if p != p:  # NaN would break the heap order
            raise ValueError(f"prefetch priority of {key!r} must be a number, got NaN")
        with self._lock:
            cur = self._live.get(key)
            if cur is not None and cur[0] == -p:
                return
            entry = (-p, next(self._seq))
            self._live[key] = entry
            heapq.heappush(self._heap, (entry[0], entry[1], key))

    def reprioritise(self, key: Hashable, priority: float) -> bool:
        """Change a queued key's priority; False (and nothing queued) if it is not queued."""
        with self._lock:
            if key not in self._live:
                return False
        self.push(key, priority)
        return True

    def cancel(self, key: Hashable) -> bool:
        """Drop `key` if queued; True if it was."""
        with self._lock:
            return self._live.pop(key, None) is not None

    def pop(self) -> tuple[Hashable, float]:
        """Remove and return (key, priority) of the highest priority; IndexError when empty."""
        with self._lock:
            while self._heap:
                neg_p, seq, key = heapq.heappop(self._heap)
                if self._live.get(key) == (neg_p, seq):
                    del self._live[key]
                    return key, -neg_p
            raise IndexError("pop from an empty prefetch queue")

    def peek(self) -> tuple[Hashable, float] | None:
        """(key, priority) that pop() would return, or None when empty."""
        with self._lock:
            while self._heap:
                neg_p, seq, key = self._heap[0]
                if self._live.get(key) == (neg_p, seq):
                    return key, -neg_p
                heapq.heappop(self._heap)  # stale entry of a cancelled or re-pushed key
            return None

    def clear(self) -> None:
        with self._lock:
            self._heap.clear()
            self._live.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._live

    def priority(self, key: Hashable) -> float | None:
        with self._lock:
            cur = self._live.get(key)
            return None if cur is None else -cur[0]
