"""The hybrid path on a real CUDA device: pinned store, copy stream, Triton fused MoE."""
from __future__ import annotations

import pytest
import torch
import transformers as T

import moe
from tiny_models import expert_bytes, non_expert_bytes, save_tiny

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_transformers_on_cuda(tmp_path, family, dtype):
    """On CUDA at a one-third budget, logits match transformers on CUDA and greedy output agrees."""
    path = save_tiny(family, tmp_path / family)
    ref = T.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().cuda()
    per_expert, total = expert_bytes(ref)
    budget = non_expert_bytes(ref) + (total // 3) * per_expert
    model = moe.from_pretrained(path, gpu_memory=budget, device="cuda", dtype=dtype)
    store = model._moe_runtime.store
    assert store.layer(0)[0].is_pinned()
    ids = torch.randint(0, ref.config.vocab_size, (2, 9), device="cuda")
    with torch.no_grad():
        out, want = model(ids).logits.float(), ref(ids).logits.float()
    if dtype == torch.float32:
        # TF32 may be used by either side's matmuls on Hopper; allow for it.
        torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-3)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))
    else:
        scale = want.abs().max().item()
        assert (out - want).abs().max().item() <= 8 * 2**-8 * scale
    st = moe.stats(model)
    assert st["h2d_bytes"] > 0 and st["gpu_expert_calls"] > 0 and st["cpu_expert_calls"] > 0, st


def test_cuda_prefetch_and_schedulers_identical(tmp_path):
    """Every scheduler rule, with gate-lookahead prefetch, gives the same logits on CUDA."""
    path = save_tiny("qwen3_moe", tmp_path / "q3")
    ids = torch.randint(0, 96, (2, 9), device="cuda")
    outs = []
    for rule in moe.config.SCHEDULERS:
        cfg = moe.RuntimeConfig(scheduler=rule, predictor="gate-lookahead")
        model = moe.from_pretrained(path, gpu_memory="300KB", device="cuda", dtype=torch.float32,
                                    config=cfg)
        with torch.no_grad():
            outs.append(model(ids).logits)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=2e-3, atol=2e-3)
