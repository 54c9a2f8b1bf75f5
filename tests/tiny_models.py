"""Tiny random checkpoints of every supported family, built with transformers' own classes."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

__all__ = ["FAMILY_CONFIGS", "make_config", "save_tiny", "non_expert_bytes", "expert_bytes"]

_COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8)

FAMILY_CONFIGS = {
    "mixtral": lambda: T.MixtralConfig(**_COMMON, intermediate_size=40, num_local_experts=6,
                                       num_experts_per_tok=2),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**_COMMON, intermediate_size=48, moe_intermediate_size=24,
                                          shared_expert_intermediate_size=40, num_experts=6,
                                          num_experts_per_tok=2, decoder_sparse_step=1,
                                          mlp_only_layers=[1], norm_topk_prob=False),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**_COMMON, intermediate_size=48, moe_intermediate_size=24,
                                          num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
                                          head_dim=8),
    "olmoe": lambda: T.OlmoeConfig(**_COMMON, intermediate_size=24, num_experts=8,
                                   num_experts_per_tok=2, norm_topk_prob=False),
    "deepseek_v2": lambda: T.DeepseekV2Config(**{**_COMMON, **_MLA}, intermediate_size=48,
                                              moe_intermediate_size=24, n_routed_experts=8,
                                              n_shared_experts=1, num_experts_per_tok=2,
                                              first_k_dense_replace=1, n_group=4, topk_group=2,
                                              topk_method="group_limited_greedy", q_lora_rank=None,
                                              routed_scaling_factor=1.5),
    "deepseek_v3": lambda: T.DeepseekV3Config(**{**_COMMON, **_MLA}, intermediate_size=48,
                                              moe_intermediate_size=24, n_routed_experts=8,
                                              n_shared_experts=1, num_experts_per_tok=2,
                                              first_k_dense_replace=1, n_group=4, topk_group=2,
                                              q_lora_rank=24, routed_scaling_factor=2.5,
                                              norm_topk_prob=True),
}


def make_config(family: str):
    cfg = FAMILY_CONFIGS[family]()
    cfg.eos_token_id = cfg.bos_token_id = cfg.pad_token_id = None
    return cfg


def save_tiny(family: str, folder: Path, *, seed: int = 0, max_shard_size=None) -> Path:
    """Random tiny checkpoint of `family` saved with save_pretrained (safetensors)."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(make_config(family))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # make the bias matter in tests
                buf.copy_(torch.randn_like(buf) * 0.1)
        for name, p in model.named_parameters():
            if "experts" in name or name.endswith("gate.weight"):
                p.normal_(0, 0.5)  # larger than the init so routing and experts dominate
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kw)
    return folder


def expert_params(model) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if ".experts." in n]


def non_expert_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)


def expert_bytes(model) -> int:
    """Bytes of one routed expert, and the number of routed experts in the model."""
    gu = [p for n, p in model.named_parameters() if n.endswith("experts.gate_up_proj")]
    E, twoF, D = gu[0].shape
    return 3 * (twoF // 2) * D * gu[0].element_size(), E * len(gu)
