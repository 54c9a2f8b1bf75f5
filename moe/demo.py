"""A small, deterministic Mixtral-style MoE with a byte tokenizer, built locally.

`moe generate` with no `--model` runs on it, so the command works on a fresh machine
with no network and no weights on disk; tests and trace recording use it too.

Shape key: V vocabulary (259), D hidden (64), F expert hidden (128), E experts (8),
L layers (4), K experts per token (2).

The weights are random but seeded and drawn in a fixed order from a private generator,
so the model is bit-identical across runs and does not touch the global RNG. Two small
structural choices make its output pleasant to look at without training:

- hidden dimension 0 is a constant "bias channel": every token embeds 1.0 there and no
  layer writes to it (row 0 of o_proj and of every expert's down projection is zero), so
  after the final norm it is positive and column 0 of `lm_head` acts as a logit bias;
- that bias is strongly negative for non-printable bytes, so greedy and sampled
  completions are readable ASCII instead of replacement characters.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "ByteTokenizer",
    "build_demo_model",
    "build_demo_hf_model",
    "demo_config",
    "demo_gpu_memory",
    "DEMO_DESCRIPTION",
]

_BYTE_VOCAB = 256
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
# Bytes the demo model may emit freely: printable ASCII plus newline.
_PRINTABLE = frozenset(range(32, 127)) | {10}
# Logit offset of every other id (before the final norm's scaling); large enough that
# sampling at temperature 1 almost never picks one, small enough to stay finite in fp16.
_NON_PRINTABLE_BIAS = -40.0

DEMO_DESCRIPTION = (
    "built-in demo MoE (Mixtral-style, 4 layers, 8 experts, top-2, hidden 64, random seeded "
    "weights, byte tokenizer): completions are not meaningful text"
)


class ByteTokenizer:
    """UTF-8 byte tokenizer: ids 0..255 are bytes, then bos (256), eos (257), pad (258)."""

    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    pad_token_id = PAD_ID
    vocab_size = _BYTE_VOCAB + 3

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`: bos first (when `add_special_tokens`), then its UTF-8 bytes."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return [BOS_ID, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special ids are dropped, invalid UTF-8 becomes U+FFFD.

        Special ids are always dropped: they have no byte form, and `skip_special_tokens`
        is accepted only so the call matches Hugging Face tokenizers.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        for i in ids:
            if not 0 <= int(i) < self.vocab_size:
                raise ValueError(f"token id {i} is outside the byte vocabulary [0, {self.vocab_size})")
        data = bytes(int(i) for i in ids if int(i) < _BYTE_VOCAB)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259, bos=256, eos=257, pad=258)"


def demo_config():
    """The demo's `MixtralConfig` (V=259, D=64, F=128, E=8, K=2, L=4)."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )


def _seeded_init_(model, seed: int) -> None:
    """Overwrite every parameter from a private generator, in sorted-name order.

    Weights are drawn fan-in scaled (std 1/sqrt(fan_in)) rather than with the usual
    std=0.02: logits and router scores then have unit spread, so greedy decoding and
    top-k routing have wide margins and do not flip on floating-point noise.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            if name.endswith("norm.weight"):
                value = torch.ones(p.shape)
            elif name.endswith("embed_tokens.weight"):
                value = torch.randn(p.shape, generator=gen)
            else:
                value = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1])
            # Drawn in fp32 and then cast, so every dtype sees the same values.
            p.copy_(value.to(p.dtype))
        _install_bias_channel_(model)


def _install_bias_channel_(model) -> None:
    """Reserve hidden dim 0 as a constant channel and bias non-printable logits down."""
    model.model.embed_tokens.weight[:, 0] = 1.0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[0, :] = 0.0
        layer.mlp.experts.down_proj[:, 0, :] = 0.0  # [E, D, F]: output row 0 of each expert
    lm_head_VD = model.lm_head.weight
    lm_head_VD[:, 0] = 0.0
    for token_id in range(lm_head_VD.shape[0]):
        if token_id not in _PRINTABLE and token_id != EOS_ID:
            lm_head_VD[token_id, 0] = _NON_PRINTABLE_BIAS


def build_demo_hf_model(seed: int = 0, *, dtype: torch.dtype = torch.float32):
    """The unwrapped demo `MixtralForCausalLM` on CPU, in eval mode, bit-identical per seed."""
    from transformers import MixtralForCausalLM

    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    # Construction runs Hugging Face's own random init; keep it off the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        model = MixtralForCausalLM(demo_config())
    model.to(dtype)
    _seeded_init_(model, seed)
    return model.eval()


def demo_gpu_memory(hf_model) -> int:
    """Device budget (bytes) for all non-expert weights plus half of all experts.

    The demo uses it by default so that a run exercises both the device expert cache
    and CPU experts.
    """
    expert_bytes = 0
    other_bytes = 0
    num_experts = 0
    for name, p in hf_model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if ".experts." in name:
            expert_bytes += nbytes
        else:
            other_bytes += nbytes
    for layer in hf_model.model.layers:
        num_experts += layer.mlp.experts.num_experts
    per_expert = expert_bytes // max(num_experts, 1)
    return other_bytes + (num_experts // 2) * per_expert


def build_demo_model(*, seed: int = 0, gpu_memory=None, device=None, config=None, dtype=torch.float32):
    """The demo model wrapped by `moe.wrap`, and its `ByteTokenizer`.

    gpu_memory: bytes or a size string for all weights on `device`; None picks
        `demo_gpu_memory` (about half the experts fit in the cache).
    Returns (model, tokenizer).
    """
    import moe

    hf_model = build_demo_hf_model(seed, dtype=dtype)
    if gpu_memory is None:
        gpu_memory = demo_gpu_memory(hf_model)
    model = moe.wrap(hf_model, gpu_memory=gpu_memory, device=device, config=config)
    return model, ByteTokenizer()
