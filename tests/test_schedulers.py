"""Every scheduler rule and cache policy gives the same outputs; placement really varies."""
from __future__ import annotations

import pytest
import torch
import transformers as T

import moe
from moe.config import CACHE_POLICIES, SCHEDULERS
from kernel_tol import kernel_tol
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
    """Quantized CPU experts compute the model whose experts are the dequantized weights
    (so the only change is the quantization error itself): exactly for int4 at group 32,
    and for int8 up to the 16-bit rounding of the token where the kernels use it
    (kernel_tol.MADD: ~1e-4 relative, against ~1e-2 from the int8 weights)."""
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
    tol = dict(rtol=1e-4, atol=1e-4)
    if scheme == "int8":
        tol = {k: max(v, kernel_tol(torch.float32, "int8", 2)[k]) for k, v in tol.items()}
    torch.testing.assert_close(out, want, **tol)
    assert not torch.allclose(out, logits, **tol)  # it really was quantized
    assert moe.stats(model)["cpu_expert_calls"] > 0
    rt = moe.wrapper.runtime_of(model)  # the planner sees the packed copy's smaller reads
    assert rt.cpu_expert_bytes == rt.store.cpu_expert_bytes < rt.store.expert_bytes / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheduler", ["cpu-only", "static"])
def test_one_token_cpu_path_equals_general_path(ckpt, reference, dtype, scheduler, monkeypatch):
    """A one-token layer call (decode at batch 1) takes the lean CPU path; its output
    equals the general path's for the same token, alone or beside device experts."""
    import moe.runtime as runtime

    budget = reference[3]
    model = moe.from_pretrained(ckpt, gpu_memory=budget, device="cpu", dtype=dtype,
                                config=moe.RuntimeConfig(scheduler=scheduler))
    rt = moe.wrapper.runtime_of(model)
    assert rt.executor.inline  # a CPU "device": CPU experts run on the calling thread
    routed = runtime.RoutedExperts(rt, 1)
    g = torch.Generator().manual_seed(0)
    x_1D = torch.randn(1, rt.store.hidden, generator=g).to(dtype)
    ids_1K = torch.tensor([[7, 0, 6]])  # static pins the lowest ids: 0 on the device, 6 and 7 not
    w_1K = torch.tensor([[0.5, 0.3, 0.2]], dtype=dtype)
    made = []
    lean = runtime._OneTokenCPU
    monkeypatch.setattr(runtime, "_OneTokenCPU", lambda *a: made.append(1) or lean(*a))
    before = moe.stats(model)["cpu_expert_calls"]
    y_lean = routed(x_1D, ids_1K, w_1K)
    want_cpu = 3 - len({7, 0, 6} & rt.hot_experts(1))
    assert made and moe.stats(model)["cpu_expert_calls"] - before == want_cpu
    assert want_cpu == (3 if scheduler == "cpu-only" else 2)
    made.clear()
    y_general = routed(x_1D.repeat(2, 1), ids_1K.repeat(2, 1), w_1K.repeat(2, 1))  # two rows: general path
    assert not made
    torch.testing.assert_close(y_general[0], y_general[1], rtol=0, atol=0)
    torch.testing.assert_close(y_lean[0], y_general[0])  # both sum in fp32 and round once


def test_one_token_with_a_repeated_expert_id_takes_the_general_path(ckpt):
    """A router that names one expert twice for a token (not top-k, but possible from a
    custom gate) still gets both weighted rows."""
    import moe.runtime as runtime

    model = moe.from_pretrained(ckpt, device="cpu", dtype=torch.float32,
                                config=moe.RuntimeConfig(scheduler="cpu-only"))
    rt = moe.wrapper.runtime_of(model)
    routed = runtime.RoutedExperts(rt, 0)
    x_1D = torch.randn(1, rt.store.hidden, generator=torch.Generator().manual_seed(1))
    y_twice = routed(x_1D, torch.tensor([[3, 3, 5]]), torch.tensor([[0.25, 0.25, 0.5]]))
    y_once = routed(x_1D, torch.tensor([[3, 5, 1]]), torch.tensor([[0.5, 0.5, 0.0]]))
    torch.testing.assert_close(y_twice, y_once)
