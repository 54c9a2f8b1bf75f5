"""Eviction-policy interface of the expert cache, and LRU.

Keys are `(layer, expert)` pairs. A cache (device slots, or a replay simulator) owns the
slots and asks its policy only two things: bookkeeping calls as entries are used,
inserted and evicted, and `victim(candidates)` when it must free a slot. Policies see only
what a running system knows at that moment (no future).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Sequence

import numpy as np

__all__ = ["CachePolicy", "LRUPolicy", "Key"]

Key = Hashable  # (layer, expert)


class CachePolicy:
    """Base class: ranks resident entries for eviction. Subclasses override what they need."""

    name = "base"

    def observe_routing(self, layer: int, scores_E: np.ndarray | None, active: Sequence[int]) -> None:
        """Called once per layer step, before lookups: router scores (probabilities over
        the layer's E experts, averaged over the step's tokens; None if unknown) and the
        experts the step activates."""

    def observe_forecast(self, layer: int, scores_E: np.ndarray) -> None:
        """A predictor's forecast of a later layer's expert scores (for predictive policies)."""

    def on_hit(self, key: Key) -> None:
        """A resident entry was used."""

    def on_insert(self, key: Key) -> None:
        """An entry was loaded into a slot (and is about to be used, or was prefetched)."""

    def on_evict(self, key: Key) -> None:
        """An entry left the cache."""

    def victim(self, candidates: Sequence[Key]) -> Key:
        """Which of `candidates` (resident, evictable) to evict."""
        raise NotImplementedError


class LRUPolicy(CachePolicy):
    """Evict the least recently used entry."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def on_hit(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    on_insert = on_hit

    def on_evict(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: Sequence[Key]) -> Key:
        if not candidates:
            raise ValueError("no evictable entry: every resident expert is in use by this step")
        cand = set(candidates)
        for key in self._order:
            if key in cand:
                return key
        return candidates[0]  # entries the policy never saw are the oldest of all
