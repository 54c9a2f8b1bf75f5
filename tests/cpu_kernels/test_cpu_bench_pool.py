"""bench/cpu_expert.py: its weight pools sit in huge-page arenas as the store keeps them, values unchanged."""
import pytest
import torch
from bench_script import load_bench

from moe.cpu_kernels import expert_ffn


@pytest.fixture(scope="module")
def bench():
    return load_bench("cpu_expert")


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
def test_arena_pool_equals_the_plain_pool(bench, dtype, monkeypatch):
    """Copies into arenas keep every expert's values and kernel output; the huge-page share is a fraction."""
    monkeypatch.setattr(bench, "ARENA_EXPERTS", 2)
    torch.manual_seed(0)
    plain = bench._pool(256, 512, dtype, max_experts=3, huge_pages=False)
    packed = bench._arenas(list(plain))
    x = torch.randn(1, 256).bfloat16()
    assert len(packed) == 3
    for a, b in zip(plain, packed):
        assert torch.equal(expert_ffn(x, *a), expert_ffn(x, *b))
    frac = bench._huge_fraction(packed)
    assert frac is None or 0.0 <= frac <= 1.0
