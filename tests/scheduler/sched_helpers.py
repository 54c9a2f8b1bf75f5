"""Random layer generators shared by the scheduler tests (not a test module)."""
from __future__ import annotations

import random

from moe.scheduler.cost_model import AnalyticCostModel, CostModel
from moe.scheduler.work import WorkItem

# Expert shapes (D, F) of Mixtral-8x7B, DeepSeek-V2-Lite, Qwen3-30B-A3B, and an odd one.
EXPERT_SHAPES = [(4096, 14336), (2048, 1408), (2048, 768), (33, 511)]
BYTES_PER_WEIGHT = [2, 1]  # bf16, 8-bit
TOKEN_CHOICES = [1, 1, 1, 2, 3, 5, 8, 17, 33, 64, 200, 511]


class TableCost(CostModel):
    """Cost model with arbitrary per-key times: cpu/device from a table, copies from bytes."""

    def __init__(self, times: dict, copy_s_per_byte: float = 1e-3) -> None:
        self.times = times
        self.copy_s_per_byte = copy_s_per_byte

    def cpu_time(self, item):
        return self.times[item.key][0]

    def device_time(self, item):
        return self.times[item.key][1]

    def copy_time(self, nbytes):
        return nbytes * self.copy_s_per_byte


def random_machine(rng: random.Random) -> AnalyticCostModel:
    """A random but plausible machine: CPU, device and link rates over their real ranges."""
    return AnalyticCostModel(
        cpu_read_gbps=rng.uniform(8, 120), cpu_gflops=rng.uniform(80, 3000), cpu_call_s=rng.uniform(0, 5e-5),
        device_read_gbps=rng.uniform(300, 3500), device_gflops=rng.uniform(2e4, 6e5), device_call_s=rng.uniform(0, 2e-5),
        h2d_gbps=rng.uniform(4, 60), copy_call_s=rng.uniform(0, 2e-5),
    )


def random_expert_layer(rng: random.Random, n: int) -> tuple[list[WorkItem], AnalyticCostModel, int | None, float]:
    """n active experts of one model: same size, random tokens, some cached or in flight."""
    d, f = rng.choice(EXPERT_SHAPES)
    nbytes = 3 * d * f * rng.choice(BYTES_PER_WEIGHT)
    cost = random_machine(rng)
    copy_s = cost.copy_time(nbytes)
    items = []
    for e in range(n):
        r = rng.random()
        items.append(WorkItem(
            key=(7, e), tokens=rng.choice(TOKEN_CHOICES), weight_bytes=nbytes, flops_per_token=6 * d * f,
            cached=r < 0.3, copy_ready_s=rng.uniform(0, 2 * copy_s) if 0.3 <= r < 0.4 else None,
        ))
    max_copies = rng.choice([None, None, 0, 1, 2, 3])
    link_free_s = rng.choice([0.0, 0.0, copy_s])
    return items, cost, max_copies, link_free_s


def random_table_layer(rng: random.Random, n: int) -> tuple[list[WorkItem], TableCost, int | None, float]:
    """n items with unrelated CPU, device and copy times (harder than real layers)."""
    times, items = {}, []
    for i in range(n):
        times[i] = (rng.uniform(0.1, 10), rng.uniform(0.01, 5))
        r = rng.random()
        items.append(WorkItem(
            key=i, tokens=1, weight_bytes=rng.randint(100, 10000), flops_per_token=1, cached=r < 0.3,
            copy_ready_s=rng.uniform(0, 5) if 0.3 <= r < 0.45 else None,
        ))
    return items, TableCost(times), rng.choice([None, None, 0, 1, 2, 3]), rng.choice([0.0, 0.0, 2.0])
