"""Summary statistics of a routing trace: what caches and predictors can exploit.

Shape key: T tokens, L layers, K top-k, E experts.

- frequency [L, E]: share of a layer's K slots each expert takes (rows sum to 1);
- temporal reuse [L]: P(an expert token t uses at layer l is used by token t+1 at layer l),
  over consecutive tokens of one sequence; chance level is K/E;
- inter-layer transition strength [L-1]: top-K recall of layer l+1's experts by the
  one-layer transition table P(e' at l+1 | experts at l) fitted on the trace itself,
  beside the same recall of the per-layer frequency prior, and the mutual information
  (bits) between the top-1 experts of adjacent layers.
"""
from __future__ import annotations

import math

import torch

from moe.router_predictor.predictors import one_hot_experts
from moe.router_predictor.trace import RoutingTrace

__all__ = ["trace_stats", "format_stats"]


def trace_stats(trace: RoutingTrace) -> dict:
    """The statistics above as plain lists and floats (JSON-ready: undefined values are None)."""
    T, L, K, E = trace.num_tokens, trace.num_layers, trace.top_k, trace.num_experts
    ids_TLK = trace.expert_ids.long()
    oh_TLE = one_hot_experts(ids_TLK.reshape(-1, K), E).reshape(T, L, E)
    counts_LE = oh_TLE.sum(0)
    freq_LE = counts_LE / counts_LE.sum(1, keepdim=True).clamp(min=1)

    nxt_T = trace.next_in_sequence()
    pairs = int(nxt_T.sum())
    if pairs:
        reused_L = (oh_TLE[:-1][nxt_T[:-1]] * oh_TLE[1:][nxt_T[:-1]]).sum((0, 2))
        reuse_L = (reused_L / (pairs * K)).tolist()
        reuse_all = float(reused_L.sum() / (pairs * K * L))
    else:
        reuse_L, reuse_all = [float("nan")] * L, float("nan")

    trans_recall, prior_recall, mi_bits = [], [], []
    top1_TL = ids_TLK[:, :, 0]
    for l in range(L - 1):
        table_EE = oh_TLE[:, l].T @ oh_TLE[:, l + 1]  # co-occurrence counts
        score_TE = oh_TLE[:, l] @ table_EE
        tgt_TE = oh_TLE[:, l + 1]
        trans_recall.append(_recall(score_TE, tgt_TE, K))
        prior_recall.append(_recall(counts_LE[l + 1].expand(T, E), tgt_TE, K))
        mi_bits.append(_mutual_info(top1_TL[:, l], top1_TL[:, l + 1], E))
    return _nan_to_none({
        "tokens": T, "layers": L, "experts": E, "top_k": K, "sequences": trace.num_sequences,
        "model": trace.model, "source": trace.source,
        "frequency": freq_LE.tolist(),
        "temporal_reuse": {"per_layer": reuse_L, "mean": reuse_all, "chance": K / E},
        "transition": {
            "recall_per_layer": trans_recall,
            "recall_mean": _mean(trans_recall),
            "prior_recall_mean": _mean(prior_recall),
            "top1_mutual_info_bits_mean": _mean(mi_bits),
        },
    })


def _nan_to_none(x):
    # JSON has no NaN: a trace without token pairs or with one layer leaves some values undefined.
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def _fmt(x) -> str:
    return "  n/a" if x is None else f"{x:.3f}"


def _recall(score_TE: torch.Tensor, tgt_TE: torch.Tensor, k: int) -> float:
    if score_TE.shape[0] == 0:
        return float("nan")
    # A tiny index-dependent offset breaks ties the same way for every predictor.
    top = (score_TE - 1e-9 * torch.arange(score_TE.shape[1])).topk(k, dim=1).indices
    return float(tgt_TE.gather(1, top).sum() / (tgt_TE.shape[0] * k))


def _mutual_info(a_T: torch.Tensor, b_T: torch.Tensor, E: int) -> float:
    if a_T.numel() == 0:
        return float("nan")
    joint = torch.zeros(E, E)
    joint.index_put_((a_T, b_T), torch.ones(a_T.numel()), accumulate=True)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * (joint[nz] / (pa @ pb)[nz]).log2()).sum())


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def format_stats(stats: dict) -> str:
    """A short human-readable report of trace_stats output."""
    lines = [
        f"{stats['tokens']} tokens in {stats['sequences']} sequences, {stats['layers']} layers, "
        f"top-{stats['top_k']} of {stats['experts']} experts  (model {stats['model'] or '?'}, "
        f"source {stats['source'] or '?'})",
        f"temporal reuse (same layer, next token): {_fmt(stats['temporal_reuse']['mean'])} "
        f"(chance {stats['temporal_reuse']['chance']:.3f})",
        f"inter-layer transition recall@{stats['top_k']}: {_fmt(stats['transition']['recall_mean'])} "
        f"(frequency prior {_fmt(stats['transition']['prior_recall_mean'])}); top-1 mutual information "
        f"{_fmt(stats['transition']['top1_mutual_info_bits_mean'])} bits",
        "layer  reuse  transition  hottest experts (share)",
    ]
    trans = stats["transition"]["recall_per_layer"] + [None]
    for l, freq in enumerate(stats["frequency"]):
        hot = sorted(range(len(freq)), key=lambda e: -freq[e])[:3]
        hot_s = " ".join(f"{e}({freq[e]:.2f})" for e in hot)
        lines.append(f"{l:5d}  {_fmt(stats['temporal_reuse']['per_layer'][l])}  {_fmt(trans[l]):>10s}  {hot_s}")
    return "\n".join(lines)
