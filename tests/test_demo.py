"""The built-in demo MoE and its byte tokenizer."""
import pytest
import torch

import moe
from moe.demo import (
    ByteTokenizer,
    build_demo_hf_model,
    build_demo_model,
    demo_config,
    demo_gpu_memory,
)

TEXTS = ["", "a", "Hello, world!", "tab\tnew\nline", "ünïcødé", "日本語", "emoji 🙂 mix", "x" * 333]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(text):
    """encode puts bos first and then the UTF-8 bytes; decode gives the text back."""
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 256
    assert ids[1:] == list(text.encode("utf-8"))
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == text


def test_tokenizer_special_ids_and_bad_bytes():
    """decode drops bos/eos/pad, replaces invalid UTF-8 and rejects ids outside the vocabulary."""
    tok = ByteTokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.decode([256, 104, 105, 257, 258, 258]) == "hi"
    assert tok.decode(torch.tensor([104, 0xFF, 105])) == "h\ufffdi"
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        tok.decode([259])
    with pytest.raises(TypeError, match="expects a str"):
        tok.encode(b"bytes")


def test_demo_config_shape():
    """The demo config is the small Mixtral the docs promise: V=259, D=64, F=128, L=4, E=8, K=2."""
    cfg = demo_config()
    got = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
           cfg.num_local_experts, cfg.num_experts_per_tok)
    assert got == (259, 64, 128, 4, 8, 2)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (256, 257, 258)


def test_demo_model_bit_identical_and_rng_neutral():
    """Two builds with one seed are bit-identical, another seed differs, and the global RNG is untouched."""
    state = torch.get_rng_state()
    a = build_demo_hf_model(0).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    b = build_demo_hf_model(0).state_dict()
    c = build_demo_hf_model(1).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_demo_model_dtype_is_a_cast_of_fp32():
    """A bf16 demo holds exactly the fp32 demo's weights cast to bf16."""
    w32 = build_demo_hf_model(0).state_dict()
    w16 = build_demo_hf_model(0, dtype=torch.bfloat16).state_dict()
    for name, p in w16.items():
        if p.is_floating_point() and "rotary" not in name:
            assert p.dtype == torch.bfloat16
            assert torch.equal(p, w32[name].to(torch.bfloat16)), name
    with pytest.raises(ValueError, match="floating"):
        build_demo_hf_model(0, dtype=torch.int8)


def test_demo_greedy_text_is_printable():
    """The bias channel keeps greedy completions in printable ASCII."""
    model, tok = build_demo_hf_model(0), ByteTokenizer()
    for prompt in ["Hello", "ü", ""]:
        ids_1S = torch.tensor([tok.encode(prompt)])
        out = model.generate(ids_1S, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, ids_1S.shape[1]:].tolist()
        assert all(t == 10 or 32 <= t < 127 or t == tok.eos_token_id for t in new), new


def test_demo_gpu_memory_fits_half_the_experts():
    """The default budget is all non-expert bytes plus exactly half of the experts' bytes."""
    model = build_demo_hf_model(0)
    expert = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
    other = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." not in n)
    assert demo_gpu_memory(model) == other + expert // 2
    assert demo_gpu_memory(build_demo_hf_model(0, dtype=torch.float16)) == (other + expert // 2) // 2


def test_wrapped_demo_matches_unwrapped_and_uses_both_tiers(gpu_like_profile):
    """The wrapped demo decodes the same greedy tokens as plain transformers and runs experts on CPU and device."""
    tok = ByteTokenizer()
    ref = build_demo_hf_model(0)
    # A device much faster than the CPU (as with a GPU) makes the planner use both tiers.
    model, tokenizer = build_demo_model(seed=0, config=moe.RuntimeConfig(cost_profile=gpu_like_profile))
    assert isinstance(tokenizer, ByteTokenizer)
    ids_1S = torch.tensor([tok.encode("The quick brown fox")])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        logits_ref = ref(ids_1S).logits
        logits = model(ids_1S).logits
        torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(model.generate(ids_1S, **kwargs), ref.generate(ids_1S, **kwargs))
    stats = moe.stats(model)
    assert stats["cpu_expert_calls"] > 0
    assert stats["gpu_expert_calls"] > 0
    assert stats["cache_misses"] > 0
