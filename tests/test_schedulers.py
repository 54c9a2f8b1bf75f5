"""Every scheduler rule and cache policy gives the same outputs; placement really varies."""
from __future__ import annotations

import pytest
import torch
import transformers as T

import moe
from moe.config import CACHE_POLICIES, SCHEDULERS
from tiny_models import expert_bytes, non_expert_bytes, save_tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("sched") / "q3")


@pytest.fixture(scope="module")
def reference(ckpt):
    ref = T.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(0, ref.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = ref(ids).logits
    gen = ref.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    per_expert, total = expert_bytes(ref)
    return ids, logits, gen, non_expert_bytes(ref) + (total // 4) * per_expert


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_schedulers_give_identical_outputs(ckpt, reference, scheduler):
    """Each rule changes where experts run, never the result."""
    ids, logits, gen, budget = reference
    model = moe.from_pretrained(ckpt, gpu_memory=budget, device="cpu", dtype=torch.float32,
                                config=moe.RuntimeConfig(scheduler=scheduler, copy_threshold_tokens=4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), gen)
    st = moe.stats(model)
    if scheduler == "cpu-only":
        assert st["gpu_expert_calls"] == 0 and st["h2d_bytes"] == 0
    if scheduler == "gpu-only":
        assert st["cpu_expert_calls"] == 0 or st["evictions"] > 0
    if scheduler == "static":
        assert st["evictions"] == 0


@pytest.mark.parametrize("policy", CACHE_POLICIES)
def test_cache_policies_give_identical_outputs(ckpt, reference, policy):
    """The eviction policy changes hit rates, never the result."""
    ids, logits, _, budget = reference
    model = moe.from_pretrained(ckpt, gpu_memory=budget, device="cpu", dtype=torch.float32,
                                config=moe.RuntimeConfig(cache_policy=policy, scheduler="gpu-only"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)
    assert moe.stats(model)["cache_policy"] == policy


def test_routing_observer_sees_every_layer(ckpt):
    """The routing observer gets each MoE layer's top-k ids once per forward."""
    model = moe.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    seen = []
    handle = moe.wrapper.add_routing_observer(model, lambda l, ids, w: seen.append((l, ids.shape)))
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert [l for l, _ in seen] == [0, 1, 2] and all(s == (4, 3) for _, s in seen)
    handle.remove()
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert len(seen) == 3


@pytest.mark.parametrize("policy", ["lru", "predictive"])
def test_gate_lookahead_prefetch_is_lossless_and_used(ckpt, reference, policy, gpu_like_profile):
    """Prefetching with the gate-lookahead predictor copies experts ahead, hits on them,
    and leaves outputs unchanged (lru: the scheduler's impact-driven choice; predictive:
    the policy's own)."""
    ids, logits, gen, budget = reference
    cfg = moe.RuntimeConfig(predictor="gate-lookahead", cache_policy=policy, prefetch_threshold=0.3,
                            cost_profile=gpu_like_profile)
    half = budget + 6 * 3 * 24 * 32 * 4  # room for half of the 3 x 8 experts of 3 x 24 x 32 fp32
    model = moe.from_pretrained(ckpt, gpu_memory=half, device="cpu", dtype=torch.float32, config=cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), gen)
    st = moe.stats(model)
    assert st["prefetches"] > 0 and st["prefetch_hits"] > 0, st


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_cpu_experts_match_dequantized_reference(ckpt, reference, scheme):
    """Quantized CPU experts compute exactly the model whose experts are the dequantized
    weights (so the only change is the quantization error itself)."""
    from moe.cpu_kernels import quantize

    ids, logits, _, budget = reference
    ref = T.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in ref.model.layers:
            ex = layer.mlp.experts
            for e in range(ex.gate_up_proj.shape[0]):
                ex.gate_up_proj[e] = quantize(ex.gate_up_proj[e].contiguous(), scheme, 32).dequantize()
                ex.down_proj[e] = quantize(ex.down_proj[e].contiguous(), scheme, 32).dequantize()
        want = ref(ids).logits
    cfg = moe.RuntimeConfig(quantization=scheme, quant_group_size=32, scheduler="cpu-only")
    model = moe.from_pretrained(ckpt, gpu_memory=budget, device="cpu", dtype=torch.float32, config=cfg)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, logits, rtol=1e-4, atol=1e-4)  # it really was quantized
    assert moe.stats(model)["cpu_expert_calls"] > 0
    rt = moe.wrapper.runtime_of(model)  # the planner sees the packed copy's smaller reads
    assert rt.cpu_expert_bytes == rt.store.cpu_expert_bytes < rt.store.expert_bytes / 2
