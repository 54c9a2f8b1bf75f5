"""The all-to-all replay benchmark behind `moe bench a2a`.

Fits an expert grouping and a shuffle predictor on a profiling trace, replays another
trace (see comms.replay for the exact model) and compares, side by side:

  baseline   contiguous experts, tokens stay home (the usual EP layout)
  shuffle    contiguous experts + token shuffling
  grouping   fitted grouping, tokens stay home
  ours       fitted grouping + token shuffling
  oracle     fitted grouping, every token already on its top-1 expert's rank before each
             layer (perfect speculation; the moves are paid for at the combine)
  hindsight  fitted grouping, the shuffle choosing among the same free candidates with
             knowledge of the next layer (the best any predictor of this shuffle can do)

and, for comparison with accounts that treat the move as free (combine = dispatch
rows), the same table under that accounting.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.comms.grouping import GroupingConfig, fit_grouped_placement
from moe.comms.placement import ExpertPlacement
from moe.comms.replay import ReplayConfig, home_ranks, replay
from moe.comms.shuffle import ShuffleConfig, TransitionShuffler

__all__ = ["A2ABenchConfig", "run_a2a_bench", "format_report"]


@dataclass(kw_only=True)
class A2ABenchConfig:
    """ranks: EP world size; replay, grouping, shuffle: the component configs."""

    ranks: int = 4
    replay: ReplayConfig = None  # type: ignore[assignment]
    grouping: GroupingConfig = None  # type: ignore[assignment]
    shuffle: ShuffleConfig = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.ranks < 2:
            raise ValueError(f"ranks must be >= 2 for expert parallelism, got {self.ranks}")
        self.replay = self.replay or ReplayConfig()
        self.grouping = self.grouping or GroupingConfig()
        self.shuffle = self.shuffle or ShuffleConfig()


class _Hindsight:
    """Picks, among the shuffle's free candidates, one that serves the next layer."""

    def __init__(self, placement: ExpertPlacement, expert_ids_TLK: torch.Tensor, history: int) -> None:
        self.placement, self.ids_TLK = placement, expert_ids_TLK.long()
        self.config = ShuffleConfig(history=history)

    def choose(self, layer, history_THK, candidates_TR, loc_T):
        served_TR = self.placement.holds_LER[layer + 1][self.ids_TLK[:, layer + 1]].any(1)
        s_TR = (candidates_TR & served_TR).double()
        s_TR[torch.arange(len(loc_T)), loc_T] += 1e-6
        return torch.where(candidates_TR, s_TR, -1.0).argmax(1)


def _free_move_rows(ids_TLK, seq_starts, placement, predictor, config: ReplayConfig) -> int:
    """Rows when a token's move to its guessed rank is free (combine rows = dispatch rows)."""
    T, L, _ = ids_TLK.shape
    R = placement.world_size
    loc_T, rows = home_ranks(seq_starts, T, R, config.home), 0
    for l in range(L):
        served_TR = placement.holds_LER[l][ids_TLK[:, l]].any(1)
        rows += 2 * int(served_TR.sum() - served_TR[torch.arange(T), loc_T].sum())
        if l < L - 1 and predictor == "oracle":
            loc_T = placement.primary_rank(l + 1, ids_TLK[:, l + 1, 0])
        elif l < L - 1 and predictor is not None:
            history_THK = ids_TLK[:, max(0, l - predictor.config.history + 1): l + 1].flip(1)
            loc_T = predictor.scores(l, history_THK).argmax(1)
    return rows


def run_a2a_bench(profile, trace, config: A2ABenchConfig) -> dict:
    """Replay `trace` (a RoutingTrace) under placements fitted on `profile`; returns all rows."""
    if profile.num_experts != trace.num_experts or profile.num_layers != trace.num_layers:
        raise ValueError(
            f"profile trace ({profile.num_layers} layers x {profile.num_experts} experts) and measured "
            f"trace ({trace.num_layers} x {trace.num_experts}) must come from one model"
        )
    E, L, R = trace.num_experts, trace.num_layers, config.ranks
    if R > E:
        raise ValueError(f"--ranks {R} exceeds the {E} experts per layer: some rank would hold none")
    ids_TLK, starts = trace.expert_ids.long(), trace.seq_starts
    contiguous = ExpertPlacement.contiguous(L, E, R)
    grouped = fit_grouped_placement(profile.expert_ids, E, R, config.grouping)
    shuf_c = TransitionShuffler(contiguous, profile.expert_ids, config.shuffle)
    shuf_g = TransitionShuffler(grouped, profile.expert_ids, config.shuffle)
    runs = {
        "baseline": (contiguous, None), "shuffle": (contiguous, shuf_c), "grouping": (grouped, None),
        "ours": (grouped, shuf_g), "oracle": (grouped, "oracle"),
        "hindsight": (grouped, _Hindsight(grouped, ids_TLK, config.shuffle.history)),
    }
    rows = {name: replay(ids_TLK, starts, pl, sh, config.replay).as_dict() for name, (pl, sh) in runs.items()}
    base_bytes = rows["baseline"]["bytes"]
    for r in rows.values():
        r["reduction"] = 1.0 - r["bytes"] / base_bytes if base_bytes else 0.0
    free = {name: _free_move_rows(ids_TLK, starts, pl, sh if name != "hindsight" else None, config.replay)
            for name, (pl, sh) in runs.items() if name in ("baseline", "shuffle", "ours", "oracle")}
    free_red = {k: (1.0 - v / free["baseline"] if free["baseline"] else 0.0) for k, v in free.items()}
    ours, oracle = rows["ours"], rows["oracle"]
    bound_gain = base_bytes - oracle["bytes"]
    return {
        "ranks": R, "layers": L, "experts": E, "tokens": trace.num_tokens,
        "profile_tokens": profile.num_tokens, "hidden_size": config.replay.hidden_size,
        "home": config.replay.home, "rows": rows, "free_move_reduction": free_red,
        "placement": grouped.to_json(),
        "summary": {
            "baseline_bytes": base_bytes, "bytes": ours["bytes"],
            "naive_baseline_bytes": rows["baseline"]["naive_bytes"], "lar_baseline": rows["baseline"]["lar"],
            "lar": ours["lar"], "imbalance": ours["imbalance"],
            "imbalance_baseline": rows["baseline"]["imbalance"], "reduction": ours["reduction"],
            "grouping_bytes": rows["grouping"]["bytes"], "oracle_bytes": oracle["bytes"],
            "hindsight_bytes": rows["hindsight"]["bytes"], "spec_hit": ours["spec_hit"],
            "share_of_oracle": (base_bytes - ours["bytes"]) / bound_gain if bound_gain > 0 else None,
        },
    }


def format_report(res: dict) -> str:
    """A human-readable table of run_a2a_bench's result (the JSON line is printed apart)."""
    lines = [
        f"all-to-all replay: {res['tokens']} tokens x {res['layers']} layers, {res['experts']} experts, "
        f"{res['ranks']} ranks, hidden {res['hidden_size']} (bf16 rows), home={res['home']}; "
        f"placement and predictor fitted on {res['profile_tokens']} profile tokens",
        f"{'':10} {'KB/tok/layer':>12} {'reduction':>9} {'LAR':>6} {'imbal':>6} {'worst':>6} {'spec ok':>7}",
    ]
    labels = {"baseline": "baseline", "shuffle": "shuffle", "grouping": "grouping", "ours": "grp+shuf",
              "oracle": "oracle", "hindsight": "hindsight"}
    for name, r in res["rows"].items():
        hit = f"{r['spec_hit']:.3f}" if r["spec_hit"] is not None else "-"
        lines.append(f"{labels[name]:10} {r['bytes_per_token_layer'] / 1e3:12.2f} {r['reduction']:9.3f} "
                     f"{r['lar']:6.3f} {r['imbalance']:6.3f} {r['imbalance_max']:6.3f} {hit:>7}")
    s = res["summary"]
    share = f"{s['share_of_oracle']:.2f}" if s["share_of_oracle"] is not None else "-"
    fr = res["free_move_reduction"]
    base = res["rows"]["baseline"]
    lines += [
        f"without per-rank deduplication the baseline would move {base['naive_bytes'] / base['bytes']:.2f}x "
        "its bytes" if base["bytes"] else "the baseline moves no bytes",
        f"model: a token lives on its data-parallel owner ({res['home']} round-robin) before layer 0; "
        "shuffled, it stays where its combine summed it (its next attention runs there)",
        f"perfect speculation (tokens on their top-1 expert's rank) reaches {res['rows']['oracle']['reduction']:.3f}; "
        f"grouping + shuffling gets {share} of that gain; the best guesses among the free "
        f"candidates would reach {res['rows']['hindsight']['reduction']:.3f}",
        f"if moving a token were free (combine rows = dispatch rows): shuffle {fr['shuffle']:.3f}, "
        f"grp+shuf {fr['ours']:.3f}, oracle {fr['oracle']:.3f}",
    ]
    return "\n".join(lines)
