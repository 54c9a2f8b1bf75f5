"""Family record and gating description."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Family", "GatingSpec", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The model is not one of the supported MoE families."""


@dataclass(frozen=True, kw_only=True)
class GatingSpec:
    """Arguments of cpu_kernels.routing.select_experts for one family, plus two dtype rules
    that decide bit-level agreement with the reference implementation."""

    top_k: int
    score: str = "softmax"
    renormalize: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    scaling: float = 1.0
    renorm_eps: float = 0.0
    sorted_topk: bool = True
    router_fp32: bool = False            # logits computed from fp32 hidden and weight
    weights_in_logits_dtype: bool = False  # top-k weights cast back to the logits' dtype
    has_correction_bias: bool = False

    def select_kwargs(self) -> dict:
        return dict(score=self.score, renormalize=self.renormalize, n_group=self.n_group,
                    topk_group=self.topk_group, group_score=self.group_score,
                    scaling=self.scaling, renorm_eps=self.renorm_eps, sorted_topk=self.sorted_topk)


@dataclass(frozen=True, kw_only=True)
class Family:
    """One supported architecture.

    model_types: values of `config.model_type`.
    block_classes: class names of its sparse MoE blocks in transformers.
    gating: config -> GatingSpec.
    num_experts / moe_inter: config -> routed experts per layer / expert hidden size.
    shared / shared_gate: attribute names of the shared expert and its sigmoid gate on
        the block (None when the family has none).
    ckpt_block: name of the block in checkpoints when it differs from the module name.
    """

    name: str
    model_types: tuple[str, ...]
    block_classes: tuple[str, ...]
    gating: Callable[[object], GatingSpec]
    num_experts: Callable[[object], int]
    moe_inter: Callable[[object], int]
    shared: str | None = None
    shared_gate: str | None = None
    ckpt_block: str = "mlp"
    _expert_key: re.Pattern = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        blocks = "|".join(sorted({"mlp", self.ckpt_block}))
        # Per-expert checkpoint tensors (the format checkpoints on the Hub use) and the
        # stacked layout transformers 5 keeps in memory.
        pat = (rf"^(?:model\.)?layers\.(\d+)\.(?:{blocks})\.experts\."
               r"(?:(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight|(gate_up_proj|down_proj))$")
        object.__setattr__(self, "_expert_key", re.compile(pat))

    def parse_expert_key(self, key: str) -> tuple[int, int | None, str] | None:
        """(decoder layer, expert or None for a stacked tensor, part) for an expert tensor
        key of a checkpoint; part is "w1"|"w3"|"w2" per expert, "w13"|"w2" stacked."""
        m = self._expert_key.match(key)
        if not m:
            return None
        layer = int(m.group(1))
        if m.group(4):
            return layer, None, {"gate_up_proj": "w13", "down_proj": "w2"}[m.group(4)]
        part = {"w1": "w1", "gate_proj": "w1", "w3": "w3", "up_proj": "w3",
                "w2": "w2", "down_proj": "w2"}[m.group(3)]
        return layer, int(m.group(2)), part

    def module_key(self, ckpt_key: str) -> str:
        """Module parameter name of a non-expert checkpoint tensor."""
        if self.ckpt_block != "mlp":
            return re.sub(rf"\.{re.escape(self.ckpt_block)}\.", ".mlp.", ckpt_key)
        return ckpt_key
