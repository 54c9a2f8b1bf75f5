"""Expert store (host), device cache slots, eviction and prefetch policies, replay."""
from moe.expert_cache.device_cache import DeviceExpertCache
from moe.expert_cache.policies import make_policy
from moe.expert_cache.policy import CachePolicy, LRUPolicy
from moe.expert_cache.prefetch import PrefetchQueue
from moe.expert_cache.store import HostExpertStore

__all__ = ["HostExpertStore", "DeviceExpertCache", "CachePolicy", "LRUPolicy", "make_policy",
           "PrefetchQueue"]
