"""The supported families. Gating rules follow each family's reference implementation
in transformers (tests compare against it)."""
from __future__ import annotations

from moe.families.base import Family, GatingSpec, UnsupportedModelError

__all__ = ["FAMILIES", "family_for_config", "supported_names"]


def _softmax_gate(cfg, *, renorm: bool, logits_dtype: bool) -> GatingSpec:
    return GatingSpec(top_k=cfg.num_experts_per_tok, renormalize=renorm,
                      weights_in_logits_dtype=logits_dtype)


def _deepseek_v2_gate(cfg) -> GatingSpec:
    method = getattr(cfg, "topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedModelError(f"DeepSeek-V2 topk_method {method!r} is not supported "
                                    "(supported: greedy, group_limited_greedy)")
    grouped = method == "group_limited_greedy"
    return GatingSpec(top_k=cfg.num_experts_per_tok, score="softmax",
                      n_group=cfg.n_group if grouped else 1,
                      topk_group=cfg.topk_group if grouped else 1, group_score="max",
                      scaling=float(cfg.routed_scaling_factor), sorted_topk=False, router_fp32=True)


def _deepseek_v3_gate(cfg) -> GatingSpec:
    return GatingSpec(top_k=cfg.num_experts_per_tok, score="sigmoid",
                      renormalize=bool(cfg.norm_topk_prob), renorm_eps=1e-20,
                      n_group=cfg.n_group, topk_group=cfg.topk_group, group_score="top2sum",
                      scaling=float(cfg.routed_scaling_factor), sorted_topk=False,
                      router_fp32=True, has_correction_bias=True)


FAMILIES: tuple[Family, ...] = (
    Family(name="mixtral", model_types=("mixtral",), block_classes=("MixtralSparseMoeBlock",),
           gating=lambda c: _softmax_gate(c, renorm=True, logits_dtype=False),
           num_experts=lambda c: c.num_local_experts, moe_inter=lambda c: c.intermediate_size,
           ckpt_block="block_sparse_moe"),
    Family(name="qwen2_moe", model_types=("qwen2_moe",), block_classes=("Qwen2MoeSparseMoeBlock",),
           gating=lambda c: _softmax_gate(c, renorm=bool(c.norm_topk_prob), logits_dtype=True),
           num_experts=lambda c: c.num_experts, moe_inter=lambda c: c.moe_intermediate_size,
           shared="shared_expert", shared_gate="shared_expert_gate"),
    Family(name="qwen3_moe", model_types=("qwen3_moe",), block_classes=("Qwen3MoeSparseMoeBlock",),
           gating=lambda c: _softmax_gate(c, renorm=bool(c.norm_topk_prob), logits_dtype=True),
           num_experts=lambda c: c.num_experts, moe_inter=lambda c: c.moe_intermediate_size),
    Family(name="olmoe", model_types=("olmoe",), block_classes=("OlmoeSparseMoeBlock",),
           gating=lambda c: _softmax_gate(c, renorm=bool(c.norm_topk_prob), logits_dtype=True),
           num_experts=lambda c: c.num_experts, moe_inter=lambda c: c.intermediate_size),
    Family(name="deepseek_v2", model_types=("deepseek_v2",), block_classes=("DeepseekV2Moe",),
           gating=_deepseek_v2_gate, num_experts=lambda c: c.n_routed_experts,
           moe_inter=lambda c: c.moe_intermediate_size, shared="shared_experts"),
    Family(name="deepseek_v3", model_types=("deepseek_v3",), block_classes=("DeepseekV3MoE",),
           gating=_deepseek_v3_gate, num_experts=lambda c: c.n_routed_experts,
           moe_inter=lambda c: c.moe_intermediate_size, shared="shared_experts"),
)


def supported_names() -> list[str]:
    return [f.name for f in FAMILIES]


def family_for_config(config) -> Family:
    """The Family of a transformers config, or UnsupportedModelError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise UnsupportedModelError(
        f"unsupported model architecture {model_type!r}: supported MoE families are "
        f"{', '.join(supported_names())}")
