"""The all-to-all replay benchmark behind `moe bench a2a`.

Fits an expert grouping and a shuffle predictor on a profiling trace, replays another
trace (see comms.replay for the exact model) and compares, side by side:

  baseline   contiguous experts, tokens stay home (the usual EP layout)
  shuffle    contiguous experts + token shuffling
  grouping   fitted grouping, tokens stay home
  balanced   a layout fitted for load balance alone (tokens stay home): the imbalance a
             layout fitted on this profile can reach on the measured trace, for reference
  ours       fitted grouping + token shuffling
  oracle     fitted grouping, every token already on its top-1 expert's rank before each
             layer (perfect speculation; the moves are paid for at the combine)
  hindsight  fitted grouping, the shuffle choosing among the same free candidates with
             knowledge of the next layer (the best any predictor of this shuffle can do)
  replicas   grouping + shuffling with `replicas` extra expert slots per rank filled
             EPLB-style from the profile's loads: it costs expert memory the baseline does
             not spend, so it is shown apart and never the headline
  rep_only   the contiguous layout with the same replica slots, tokens stay home: what the
             replicas alone do, to tell their share from that of grouping and shuffling

and, for comparison with accounts that treat the move as free (combine = dispatch
rows), the same table under that accounting.

The shuffle's settings (naive-Bayes history, trajectory kernel, and with `decode` the
features that read the earlier tokens of a sequence) are chosen by cross-validation
inside the profile: fit on one half (token order), replay the other, both ways, keep
the setting with the fewest bytes. The measured trace is never consulted for a choice.
The summary also gives the bootstrap noise of the measured load imbalance (on short
traces it is of the order of the gap between a balanced and a grouped layout) and the
mean imbalance of random layouts on the measured trace: what a layout that knows
nothing of its loads gets there.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from moe.comms.grouping import GroupingConfig, affinity_stats, fit_grouped_placement, layouts
from moe.comms.placement import ExpertPlacement
from moe.comms.replay import ReplayConfig, home_ranks, replay
from moe.comms.shuffle import DecodeView, ShuffleConfig, TransitionShuffler

__all__ = ["A2ABenchConfig", "run_a2a_bench", "format_report", "select_shuffle", "imbalance_spread",
           "random_layout_imbalance"]


@dataclass(kw_only=True)
class A2ABenchConfig:
    """ranks: EP world size; replay, grouping, shuffle: the component configs.
    histories: history lengths the in-profile cross-validation chooses from (empty: use
    shuffle.history as given). decode: the replayed tokens are decode tokens, so the
    cross-validation may also turn on the shuffle's decode features (temporal, online);
    the shuffle config's own decode features stay on either way.
    kernel_temperatures, kernel_decays, kernel_weights: the trajectory-kernel grid the
    cross-validation tries besides no kernel (empty temperatures: the shuffle config's
    kernel as given); weights are the kernel's share of the mixed log-odds.
    replicas: extra expert slots per rank of the separate replicas row (0: no such row).
    replica_layers: layers given those slots, the most imbalanced on the profile (None: all).
    """

    ranks: int = 4
    replay: ReplayConfig = None  # type: ignore[assignment]
    grouping: GroupingConfig = None  # type: ignore[assignment]
    shuffle: ShuffleConfig = None  # type: ignore[assignment]
    histories: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    decode: bool = False
    kernel_temperatures: tuple[float, ...] = (1.0, 2.0, 4.0)
    kernel_decays: tuple[float, ...] = (0.7, 0.85, 1.0)
    kernel_weights: tuple[float, ...] = (0.5, 0.75)
    replicas: int = 1
    replica_layers: int | None = None

    def __post_init__(self) -> None:
        if self.ranks < 2:
            raise ValueError(f"ranks must be >= 2 for expert parallelism, got {self.ranks}")
        self.histories = tuple(self.histories)
        if any(h < 1 for h in self.histories):
            raise ValueError(f"histories must be >= 1 layer each, got {self.histories}")
        self.kernel_temperatures, self.kernel_decays = tuple(self.kernel_temperatures), tuple(self.kernel_decays)
        self.kernel_weights = tuple(self.kernel_weights)
        if any(not 0 < w <= 1 for w in self.kernel_weights) or (self.kernel_temperatures and not self.kernel_weights):
            raise ValueError(f"kernel_weights must be in (0, 1] and not empty, got {self.kernel_weights}")
        if any(k <= 0 for k in self.kernel_temperatures) or any(not 0 < d <= 1 for d in self.kernel_decays):
            raise ValueError(f"kernel_temperatures must be > 0 and kernel_decays in (0, 1], got "
                             f"{self.kernel_temperatures} and {self.kernel_decays}")
        if self.kernel_temperatures and not self.kernel_decays:
            raise ValueError("kernel_decays must not be empty when kernel_temperatures are given")
        if self.replicas < 0:
            raise ValueError(f"replicas must be >= 0 extra slots per rank, got {self.replicas}")
        if self.replica_layers is not None and self.replica_layers < 0:
            raise ValueError(f"replica_layers must be >= 0 layers, got {self.replica_layers}")
        self.replay = self.replay or ReplayConfig()
        self.grouping = self.grouping or GroupingConfig()
        self.shuffle = self.shuffle or ShuffleConfig()


class _Hindsight:
    """Picks, among the shuffle's free candidates, one that serves the next layer."""

    def __init__(self, placement: ExpertPlacement, expert_ids_TLK: torch.Tensor, history: int) -> None:
        self.placement, self.ids_TLK = placement, expert_ids_TLK.long()
        self.config = ShuffleConfig(history=history)

    def choose(self, layer, history_THK, candidates_TR, loc_T, view=None):
        served_TR = self.placement.holds_LER[layer + 1][self.ids_TLK[:, layer + 1]].any(1)
        s_TR = (candidates_TR & served_TR).double()
        s_TR[torch.arange(len(loc_T)), loc_T] += 1e-6
        return torch.where(candidates_TR, s_TR, -1.0).argmax(1)


def _free_move_rows(ids_TLK, seq_starts, placement, predictor, config: ReplayConfig) -> int:
    """Rows when a token's move to its guessed rank is free (combine rows = dispatch rows)."""
    T, L, _ = ids_TLK.shape
    R = placement.world_size
    loc_T, rows = home_ranks(seq_starts, T, R, config.home), 0
    view = DecodeView.from_trace(ids_TLK, seq_starts) if isinstance(predictor, TransitionShuffler) else None
    for l in range(L):
        served_TR = placement.holds_LER[l][ids_TLK[:, l]].any(1)
        rows += 2 * int(served_TR.sum() - served_TR[torch.arange(T), loc_T].sum())
        if l < L - 1 and predictor == "oracle":
            loc_T = placement.primary_rank(l + 1, ids_TLK[:, l + 1, 0])
        elif l < L - 1 and predictor is not None:
            history_THK = ids_TLK[:, : l + 1].flip(1)
            loc_T = predictor.scores(l, history_THK, view).argmax(1)
    return rows


def imbalance_spread(placement: ExpertPlacement, ids_TLK: torch.Tensor, draws: int = 100, seed: int = 0) -> float:
    """Standard deviation of the mean-over-layers load imbalance of a one-copy placement
    over bootstrap resamples of the tokens: the sampling noise of the measured imbalance."""
    T = ids_TLK.shape[0]
    if T == 0 or bool((placement.holds_LER.sum(2) > 1).any()):
        return 0.0
    rank_TLK = placement.holds_LER.long().argmax(2)[torch.arange(ids_TLK.shape[1])[None, :, None], ids_TLK.long()]
    g = torch.Generator().manual_seed(seed)
    R, vals = placement.world_size, []
    for _ in range(draws):
        pick_TLK = rank_TLK[torch.randint(0, T, (T,), generator=g)]
        load_LR = torch.nn.functional.one_hot(pick_TLK, R).sum((0, 2)).double()
        vals.append(float((load_LR.max(1).values / load_LR.mean(1)).mean()))
    return float(torch.tensor(vals).std())


def random_layout_imbalance(ids_TLK: torch.Tensor, num_experts: int, world_size: int, draws: int = 4096,
                            seed: int = 0) -> float:
    """Mean-over-layers load imbalance of a one-copy layout drawn uniformly at random
    (every rank holding its contiguous share of experts), averaged over layouts: every
    layout when there are at most `draws` per layer, else `draws` random ones.

    What a placement that knows nothing of the measured trace's loads gets on it: a
    layout fitted on another trace can be judged against this, not only against the
    contiguous one (a single draw of the same kind).
    """
    T, L, _ = ids_TLK.shape
    if T == 0:
        return 1.0
    base_E = ExpertPlacement.contiguous(1, num_experts, world_size).holds_LER[0].long().argmax(1)
    counts = torch.bincount(base_E, minlength=world_size).tolist()
    all_NE = layouts(counts, draws)
    if all_NE is None:
        g = torch.Generator().manual_seed(seed)
        all_NE = torch.stack([base_E[torch.randperm(num_experts, generator=g)] for _ in range(draws)])
    load_LE = torch.zeros(L, num_experts, dtype=torch.float64)
    load_LE.scatter_add_(1, ids_TLK.long().permute(1, 0, 2).reshape(L, -1),
                         torch.ones(L, ids_TLK.shape[0] * ids_TLK.shape[2], dtype=torch.float64))
    onehot_NER = torch.nn.functional.one_hot(all_NE, world_size).double()
    rank_LNR = torch.einsum("le,ner->lnr", load_LE, onehot_NER)
    return float((rank_LNR.amax(2) / rank_LNR.mean(2)).mean())


def _halves(ids_TLK: torch.Tensor, starts: torch.Tensor):
    """The first and second half of a trace in token order, each with its own seq_starts."""
    T = ids_TLK.shape[0]
    out = []
    for a, b in ((0, T // 2), (T // 2, T)):
        inner = [int(s) - a for s in starts.tolist() if a < s < b]
        out.append((ids_TLK[a:b], torch.tensor([0, *inner, b - a], dtype=torch.int64)))
    return out


def _label(cfg: ShuffleConfig) -> str:
    kernel = (f"kernel={cfg.kernel_temperature:g}/{cfg.kernel_decay:g}/{cfg.kernel_weight:g}"
              if cfg.kernel_temperature else "kernel=off")
    return f"history={cfg.history} temporal={cfg.temporal} {kernel} online={cfg.online}"


def select_shuffle(placement: ExpertPlacement, ids_TLK: torch.Tensor, starts: torch.Tensor,
                   config: A2ABenchConfig) -> tuple[ShuffleConfig, dict]:
    """The shuffle setting with the fewest replayed bytes across the two halves of a profile.

    Each half fits a shuffler that replays the other half under `placement`. Two stages:
    the naive-Bayes history (and temporal feature, in decode), then, with those, the
    trajectory kernel (off, or each weight x temperature x decay, offline and, in decode,
    online).
    Ties keep the earlier, simpler setting. Returns the chosen config and {label:
    held-out bytes} for every setting tried.
    """
    base = config.shuffle
    if not config.histories and not config.kernel_temperatures:
        return base, {}
    if base.online and not config.kernel_temperatures:
        raise ValueError("an online shuffle needs its kernel: give kernel_temperatures to choose it from")
    parts = _halves(ids_TLK, starts)
    tried: dict[str, int] = {}

    def held_out_bytes(cfg: ShuffleConfig) -> int:
        nbytes = 0
        for (fit_ids, fit_starts), (test_ids, test_starts) in ((parts[0], parts[1]), (parts[1], parts[0])):
            sh = TransitionShuffler(placement, fit_ids, cfg, fit_starts)
            nbytes += replay(test_ids, test_starts, placement, sh, config.replay).bytes
        tried[_label(cfg)] = nbytes
        return nbytes

    def best_of(cfgs: list[ShuffleConfig]) -> ShuffleConfig:
        scored = [(held_out_bytes(c), i, c) for i, c in enumerate(cfgs)]
        return min(scored, key=lambda x: x[:2])[2]

    temporals = (True,) if base.temporal else ((False, True) if config.decode else (False,))
    onlines = (True,) if base.online else ((False, True) if config.decode else (False,))
    bayes = [replace(base, history=h, temporal=t, kernel_temperature=0.0, online=False)
             for t in temporals for h in (config.histories or (base.history,))]
    chosen = best_of(bayes) if len(bayes) > 1 else bayes[0]
    if config.kernel_temperatures:
        kernels = [chosen] + [replace(chosen, kernel_temperature=k, kernel_decay=d, kernel_weight=w, online=o)
                              for o in onlines for w in config.kernel_weights
                              for k in config.kernel_temperatures for d in config.kernel_decays]
        if _label(chosen) not in tried:
            tried[_label(chosen)] = held_out_bytes(chosen)
        chosen = best_of(kernels)
    return chosen, tried


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
    prof_ids, prof_starts = profile.expert_ids.long(), profile.seq_starts
    grouped = fit_grouped_placement(prof_ids, E, R, config.grouping)
    shuffle_cfg, tried = select_shuffle(grouped, prof_ids, prof_starts, config)
    shuf_c = TransitionShuffler(contiguous, prof_ids, shuffle_cfg, prof_starts)
    shuf_g = TransitionShuffler(grouped, prof_ids, shuffle_cfg, prof_starts)
    balanced = fit_grouped_placement(prof_ids, E, R, replace(config.grouping, load_cap=1.0, intra_weight=0.0,
                                                             inter_weight=0.0))
    runs = {
        "baseline": (contiguous, None), "shuffle": (contiguous, shuf_c), "grouping": (grouped, None),
        "balanced": (balanced, None),
        "ours": (grouped, shuf_g), "oracle": (grouped, "oracle"),
        "hindsight": (grouped, _Hindsight(grouped, ids_TLK, shuffle_cfg.history)),
    }
    if config.replicas:
        load_LE = affinity_stats(prof_ids, E).load_LE
        rep_layers = min(config.replica_layers, L) if config.replica_layers is not None else None
        replicated = grouped.with_replicas(load_LE, config.replicas, layers=rep_layers)
        runs["replicas"] = (replicated, TransitionShuffler(replicated, prof_ids, shuffle_cfg, prof_starts))
        runs["rep_only"] = (contiguous.with_replicas(load_LE, config.replicas, layers=rep_layers), None)
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
        "shuffle": {"history": shuffle_cfg.history, "temporal": shuffle_cfg.temporal, "online": shuffle_cfg.online,
                    "kernel_temperature": shuffle_cfg.kernel_temperature, "kernel_decay": shuffle_cfg.kernel_decay,
                    "kernel_weight": shuffle_cfg.kernel_weight,
                    "cv_bytes": tried},
        "placement": grouped.to_json(),
        "replicated_placement": replicated.to_json() if config.replicas else None,
        "summary": {
            "baseline_bytes": base_bytes, "bytes": ours["bytes"],
            "naive_baseline_bytes": rows["baseline"]["naive_bytes"], "lar_baseline": rows["baseline"]["lar"],
            "lar": ours["lar"], "imbalance": ours["imbalance"],
            "imbalance_baseline": rows["baseline"]["imbalance"], "reduction": ours["reduction"],
            "imbalance_balanced": rows["balanced"]["imbalance"], "imbalance_sd": imbalance_spread(grouped, ids_TLK),
            "imbalance_random": random_layout_imbalance(ids_TLK, E, R),
            "grouping_bytes": rows["grouping"]["bytes"], "oracle_bytes": oracle["bytes"],
            "hindsight_bytes": rows["hindsight"]["bytes"], "spec_hit": ours["spec_hit"],
            "share_of_oracle": (base_bytes - ours["bytes"]) / bound_gain if bound_gain > 0 else None,
            "history": shuffle_cfg.history, "temporal": shuffle_cfg.temporal, "online": shuffle_cfg.online,
            "decode": config.decode,
            "kernel": [shuffle_cfg.kernel_temperature, shuffle_cfg.kernel_decay, shuffle_cfg.kernel_weight]
            if shuffle_cfg.kernel_temperature
            else None,
            "replicas_reduction": rows["replicas"]["reduction"] if "replicas" in rows else None,
            "replicas_imbalance": rows["replicas"]["imbalance"] if "replicas" in rows else None,
            "rep_only_reduction": rows["rep_only"]["reduction"] if "rep_only" in rows else None,
            "rep_only_imbalance": rows["rep_only"]["imbalance"] if "rep_only" in rows else None,
            "replicas_extra_memory": (int(replicated.holds_LER.sum()) / (L * E) - 1.0) if config.replicas else None,
            "replica_dispatch": config.replay.replica_dispatch,
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
    labels = {"baseline": "baseline", "shuffle": "shuffle", "grouping": "grouping", "balanced": "balanced",
              "ours": "grp+shuf",
              "oracle": "oracle", "hindsight": "hindsight", "replicas": "+replicas", "rep_only": "rep only"}
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
        f"shuffle predictor: last {res['shuffle']['history']} layers of routing"
        + (", previous token's next-layer routing (decode)" if res["shuffle"]["temporal"] else "")
        + (f", trajectory kernel (temperature {res['shuffle']['kernel_temperature']:g}, decay "
           f"{res['shuffle']['kernel_decay']:g}, weight {res['shuffle']['kernel_weight']:g})"
           if res["shuffle"]["kernel_temperature"] else "")
        + (" learning online from the earlier tokens of each sequence (decode)" if res["shuffle"]["online"] else "")
        + (" (chosen by cross-validation inside the profile)" if res["shuffle"]["cv_bytes"] else ""),
    ]
    lines.append(f"load imbalance of grp+shuf {s['imbalance']:.3f}; its sampling noise over the measured tokens "
                 f"(bootstrap sd) {s['imbalance_sd']:.3f}; a layout fitted for balance alone gets "
                 f"{s['imbalance_balanced']:.3f}, and a layout drawn at random {s['imbalance_random']:.3f} on average")
    if "replicas" in res["rows"]:
        lines.append(f"+replicas spends {s['replicas_extra_memory']:.1%} more expert memory (EPLB-style copies of "
                     f"hot experts, {s['replica_dispatch']} replica dispatch) that the baseline does not: a "
                     "separate comparison, not the headline; `rep only` gives the same slots to the contiguous "
                     "layout without grouping or shuffling")
    return "\n".join(lines)
