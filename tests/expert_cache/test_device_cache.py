"""Host store and device cache bookkeeping (CPU as the device tier)."""
from __future__ import annotations

import pytest
import torch

from moe.expert_cache.device_cache import DeviceExpertCache
from moe.expert_cache.store import HostExpertStore


def _store(L=3, E=4, D=8, F=6):
    s = HostExpertStore(num_layers=L, num_experts=E, hidden=D, inter=F, dtype=torch.float32)
    for l in range(L):
        s.set_layer(l, torch.randn(E, 2 * F, D), torch.randn(E, D, F))
    return s


def test_store_streaming_parts_and_missing():
    """Parts streamed one by one assemble the stacked layout; missing parts are listed."""
    s = HostExpertStore(num_layers=1, num_experts=2, hidden=4, inter=3, dtype=torch.float32)
    w1, w3, w2 = torch.randn(3, 4), torch.randn(3, 4), torch.randn(4, 3)
    s.set_part(0, 1, "w1", w1)
    s.set_part(0, 1, "w3", w3)
    assert (0, 1, "w2") in s.missing() and (0, 0, "w1") in s.missing()
    s.set_part(0, 1, "w2", w2)
    w13, got_w2 = s.expert(0, 1)
    assert torch.equal(w13, torch.cat([w1, w3])) and torch.equal(got_w2, w2)
    with pytest.raises(ValueError, match="expected shape"):
        s.set_part(0, 0, "w1", torch.randn(4, 4))


def test_cache_loads_copies_and_evicts_lru():
    """Loads copy exact weights into slots; a full cache evicts the least recently used."""
    store = _store()
    cache = DeviceExpertCache(store, num_slots=2, device="cpu")
    s0 = cache.load(0, 1)
    s1 = cache.load(1, 2)
    assert {s0, s1} == {0, 1} and cache.free_slots == 0
    assert torch.equal(cache.w13_N2FD[s0], store.expert(0, 1)[0])
    cache.policy.on_hit((0, 1))  # (1, 2) is now the least recently used
    s2 = cache.load(2, 3)
    assert s2 == s1 and not cache.resident(1, 2) and cache.resident(0, 1)
    assert torch.equal(cache.w2_NDF[s2], store.expert(2, 3)[1])
    assert cache.h2d_bytes == 3 * store.expert_bytes and cache.evictions == 1


def test_residency_queries_agree_with_slot_table_and_check_keys():
    """slot/resident (a dict, for speed) agree with slot_LE through loads and evictions;
    keys outside the store raise."""
    store = _store()
    cache = DeviceExpertCache(store, num_slots=2, device="cpu")
    for key in [(0, 1), (1, 2), (2, 3), (0, 1)]:
        cache.load(*key)
        for l in range(3):
            for e in range(4):
                assert cache.slot(l, e) == int(cache.slot_LE[l, e])
                assert cache.resident(l, e) == bool(cache.slot_LE[l, e] >= 0)
    for bad in [(3, 0), (0, 4), (-1, 0)]:
        with pytest.raises(IndexError, match="outside the cache"):
            cache.resident(*bad)


def test_cache_respects_protected_and_pinned():
    """Protected and pinned entries are never evicted; with nothing evictable load fails."""
    cache = DeviceExpertCache(_store(), num_slots=2, device="cpu")
    cache.pin([(0, 0)])
    cache.load(0, 1)
    assert cache.load(0, 2, protect=[(0, 1)]) == -1
    assert cache.load(0, 2) >= 0 and cache.resident(0, 0) and not cache.resident(0, 1)


def test_expert_map_marks_only_resident_and_selected():
    """The slot map is -1 for experts not resident or not selected."""
    cache = DeviceExpertCache(_store(), num_slots=3, device="cpu")
    a, b = cache.load(1, 0), cache.load(1, 3)
    assert cache.expert_map(1).tolist() == [a, -1, -1, b]
    assert cache.expert_map(1, [3]).tolist() == [-1, -1, -1, b]


def test_zero_slots():
    """A cache with no slots never loads."""
    cache = DeviceExpertCache(_store(), num_slots=0, device="cpu")
    assert cache.load(0, 0) == -1 and cache.h2d_bytes == 0
