"""Routing helpers shared by every model family (plain torch, any device).

Shape key: T tokens, E experts, K experts per token (top-k), G expert groups.

`select_experts` covers the gating rules of the supported families:
- softmax over all experts, top-k, optional renormalisation (Mixtral, Qwen-MoE, OLMoE);
- group-limited top-k: keep the best `topk_group` of `n_group` groups, then top-k inside
  them (DeepSeek-V2 "group_limited_greedy", DeepSeek-V3);
- sigmoid scores with a per-expert correction bias that steers selection but not the
  weights (DeepSeek-V3);
- a routed scaling factor applied to the final weights.
`group_by_expert` is the counting sort every expert-parallel or per-expert path uses.
"""
from __future__ import annotations

import torch

__all__ = ["select_experts", "group_by_expert"]


def select_experts(
    logits_TE: torch.Tensor,
    top_k: int,
    *,
    score: str = "softmax",
    renormalize: bool = False,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "max",
    correction_bias_E: torch.Tensor | None = None,
    scaling: float = 1.0,
    renorm_eps: float = 0.0,
    sorted_topk: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their weights.

    logits_TE: router logits (any float dtype; scores are computed in fp32).
    score: "softmax" or "sigmoid".
    group_score: how a group is ranked when n_group > 1: "max" (best expert) or
        "top2sum" (sum of its two best experts).
    correction_bias_E: added to the scores for *selection* only.
    renorm_eps: added to the denominator of the renormalisation.
    sorted_topk: torch.topk's `sorted`; kept so that the order of the K slots matches
        the reference implementation of each family.
    Returns (weights_TK fp32, ids_TK int64).
    """
    if logits_TE.dim() != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {tuple(logits_TE.shape)}")
    T, E = logits_TE.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in 1..{E} (number of experts), got {top_k}")
    if score == "softmax":
        scores_TE = torch.softmax(logits_TE.float(), dim=-1)
    elif score == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE.float())
    else:
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")

    choice_TE = scores_TE if correction_bias_E is None else scores_TE + correction_bias_E.float()
    if n_group > 1:
        if E % n_group:
            raise ValueError(f"{E} experts cannot be split into n_group={n_group} equal groups")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group must be in 1..{n_group}, got {topk_group}")
        grouped_TGX = choice_TE.view(T, n_group, E // n_group)
        if group_score == "max":
            group_TG = grouped_TGX.max(dim=-1).values
        elif group_score == "top2sum":
            group_TG = grouped_TGX.topk(2, dim=-1).values.sum(dim=-1)
        else:
            raise ValueError(f"group_score must be 'max' or 'top2sum', got {group_score!r}")
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
        keep_TG.scatter_(1, torch.topk(group_TG, k=topk_group, dim=-1, sorted=False).indices, True)
        keep_TE = keep_TG.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
        # Softmax scores are >= 0, so masking to 0 (DeepSeek-V2) and to -inf select the
        # same experts unless a kept group has fewer than K positive scores; -inf is the
        # exact rule of V3, and 0 of V2.
        fill = 0.0 if correction_bias_E is None and score == "softmax" else float("-inf")
        choice_TE = choice_TE.masked_fill(~keep_TE, fill)

    ids_TK = torch.topk(choice_TE, k=top_k, dim=-1, sorted=sorted_topk).indices
    weights_TK = scores_TE.gather(1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + renorm_eps)
    if scaling != 1.0:
        weights_TK = weights_TK * scaling
    return weights_TK, ids_TK


def group_by_expert(ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counting sort of the T*K (token, slot) pairs by expert.

    Returns (order_N, offsets_E1): `order_N` (int64, N = T*K) lists flat indices into
    ids_TK.view(-1), stably sorted by expert, and the pairs of expert e are
    order_N[offsets_E1[e]:offsets_E1[e + 1]]. Token of a flat index i is i // K.
    """
    flat_N = ids_TK.reshape(-1).long()
    if flat_N.numel() and (int(flat_N.min()) < 0 or int(flat_N.max()) >= num_experts):
        raise ValueError(f"expert ids must be in 0..{num_experts - 1}")
    counts_E = torch.bincount(flat_N, minlength=num_experts)
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat_N.device)
    torch.cumsum(counts_E, 0, out=offsets_E1[1:])
    order_N = torch.sort(flat_N, stable=True).indices
    return order_N, offsets_E1
