"""Every supported family, wrapped and loaded, against transformers' own implementation."""
from __future__ import annotations

import pytest
import torch
import transformers as T

import moe
from tiny_models import FAMILY_CONFIGS, expert_bytes, non_expert_bytes, save_tiny

FAMILIES = list(FAMILY_CONFIGS)
# Device budgets as the share of routed experts that fit: all, about a third, one per layer.
BUDGETS = ["all", "third", "one_per_layer"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {f: save_tiny(f, root / f) for f in FAMILIES}


def _reference(path, dtype=torch.float32):
    return T.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _budget(ref, which: str) -> int:
    per_expert, total = expert_bytes(ref)
    n_moe_layers = sum(1 for n, _ in ref.named_parameters() if n.endswith("experts.gate_up_proj"))
    slots = {"all": total, "third": total // 3, "one_per_layer": n_moe_layers}[which]
    return non_expert_bytes(ref) + slots * per_expert


def _inputs(vocab: int):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (2, 9), generator=g)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("how", ["wrap", "from_pretrained"])
def test_logits_and_greedy_match_transformers(checkpoints, family, budget, how, gpu_like_profile):
    """Logits match transformers to 1e-4 and greedy generation is identical, at every budget."""
    path = checkpoints[family]
    ref = _reference(path)
    ids = _inputs(ref.config.vocab_size)
    gpu_memory = _budget(ref, budget)
    config = moe.RuntimeConfig(cost_profile=gpu_like_profile)
    if how == "wrap":
        model = moe.wrap(_reference(path), gpu_memory=gpu_memory, device="cpu", config=config)
    else:
        model = moe.from_pretrained(path, gpu_memory=gpu_memory, device="cpu", dtype=torch.float32,
                                    config=config)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    gen_kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **gen_kw), ref.generate(ids, **gen_kw))
    st = moe.stats(model)
    assert st["cache_hits"] + st["cache_misses"] > 0
    if budget != "all":
        assert st["cpu_expert_calls"] > 0, st
        assert st["gpu_expert_calls"] > 0 and st["h2d_bytes"] > 0, st
    else:
        # Everything fits: after the first touches, experts stay resident.
        assert st["evictions"] == 0, st


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_bf16_matches_transformers_bf16(checkpoints, family):
    """A bf16 load agrees with transformers' bf16 run to bf16 tolerance."""
    path = checkpoints[family]
    ref = _reference(path, torch.bfloat16)
    ids = _inputs(ref.config.vocab_size)
    model = moe.from_pretrained(path, gpu_memory=_budget(ref, "third"), device="cpu",
                                dtype=torch.bfloat16)
    with torch.no_grad():
        out, want = model(ids).logits.float(), ref(ids).logits.float()
    # Both sides round to bf16 at different points (our CPU kernel keeps fp32 between the
    # two projections), so compare against the logits' scale: a few bf16 ulps of it at
    # worst, and well under one ulp on average.
    scale = want.abs().max().item()
    err = (out - want).abs()
    assert err.max().item() <= 8 * 2**-8 * scale, (err.max().item(), scale)
    assert err.mean().item() <= 2**-8 * scale, (err.mean().item(), scale)


def test_sharded_checkpoint_loads(tmp_path):
    """A checkpoint split over several shards with an index loads to the same logits."""
    path = save_tiny("mixtral", tmp_path / "sharded", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").exists()
    ref = _reference(path)
    ids = _inputs(ref.config.vocab_size)
    model = moe.from_pretrained(path, gpu_memory="1GiB", device="cpu", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
