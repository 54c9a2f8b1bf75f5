"""`moe bench a2a`: replay a routing trace under EP placements fitted on another trace."""
from __future__ import annotations

import argparse
import json

__all__ = ["register", "run"]

_EPILOG = """\
Replays --trace under the expert grouping and shuffle predictor fitted on --profile and
prints, for the contiguous baseline, grouping, shuffling, both, perfect speculation, the
best guesses in hindsight and (apart, costing expert memory) replicas: all-to-all bytes
per token and layer, local activation rate, per-rank load imbalance (max/mean per layer)
and the share of shuffle guesses that were right. The last line is one JSON object with
baseline_bytes, bytes, lar_baseline, lar, imbalance (headline: the fitted grouping with
shuffling, no replicas; bytes count the move of a token's residual). The predictor's
settings are chosen by cross-validation inside --profile; --decode lets it also use the
routing of earlier tokens of the same sequence, which only decode traffic knows.
Traces are moe-trace/1 safetensors files (`moe trace import` converts vLLM JSON lines).
"""


def register(sub) -> None:
    p = sub.add_parser("a2a", help="all-to-all replay: expert grouping and token shuffling on a trace",
                       description=__doc__, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, metavar="P.safetensors", help="trace the placement is fitted on")
    p.add_argument("--trace", required=True, metavar="T.safetensors", help="trace that is replayed and measured")
    p.add_argument("--ranks", type=int, default=4, metavar="R", help="expert-parallel ranks (default: 4)")
    p.add_argument("--hidden-size", type=int, default=4096, metavar="D", help="model hidden size (default: 4096)")
    p.add_argument("--home", choices=["token", "sequence"], default="token",
                   help="data-parallel owner of a token: tokens dealt round-robin, or whole sequences (default: token)")
    p.add_argument("--load-cap", type=float, default=1.2, metavar="X",
                   help="max per-rank load over the mean, per layer, on the profile (default: 1.2)")
    p.add_argument("--load-folds", type=int, default=1, metavar="N",
                   help="the load cap must also hold on N consecutive parts of the profile (default: 1)")
    p.add_argument("--history", type=_history, default="auto", metavar="H",
                   help="layers of a token's routing the shuffle predictor looks at, or 'auto': chosen by "
                        "cross-validation inside the profile (default: auto)")
    p.add_argument("--decode", action="store_true",
                   help="the traced tokens are decode tokens: the shuffle may use the routing of the earlier "
                        "tokens of the same sequence (known in decode, not in prefill), if the in-profile "
                        "cross-validation finds it helps")
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="extra expert slots per rank of the separate replicas row; 0 drops the row (default: 1)")
    p.add_argument("--replica-layers", type=int, default=None, metavar="K",
                   help="give the replica slots only to the K layers most imbalanced on the profile "
                        "(default: every layer)")
    p.add_argument("--replica-dispatch", choices=["balanced", "hash"], default="balanced",
                   help="how a token with no local copy picks among replicas: split from counts every rank "
                        "shares (one small all_gather per layer), or a hash of the token index (default: balanced)")
    p.add_argument("--batch-tokens", type=int, default=0, metavar="B",
                   help="tokens per MoE round seen by the balanced replica split (default: 0, the whole trace "
                        "is one round)")
    p.add_argument("--save-placement", metavar="FILE.json", default=None,
                   help="write the fitted placement (for `moe launch --placement`)")
    p.add_argument("--save-replicated", metavar="FILE.json", default=None,
                   help="write the placement of the replicas row (for `moe launch --placement`)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.set_defaults(func=run)


def _history(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"history must be 'auto' or a number of layers, got {text!r}") from None


def run(args) -> int:
    from moe.comms.a2a_bench import A2ABenchConfig, format_report, run_a2a_bench
    from moe.comms.grouping import GroupingConfig
    from moe.comms.placement import ExpertPlacement
    from moe.comms.replay import ReplayConfig
    from moe.comms.shuffle import ShuffleConfig
    from moe.router_predictor.trace import load_trace
    import torch

    config = A2ABenchConfig(
        ranks=args.ranks,
        replay=ReplayConfig(hidden_size=args.hidden_size, home=args.home, replica_dispatch=args.replica_dispatch,
                            batch_tokens=args.batch_tokens),
        grouping=GroupingConfig(load_cap=args.load_cap, load_folds=args.load_folds),
        shuffle=ShuffleConfig() if args.history == "auto" else ShuffleConfig(history=args.history),
        histories=A2ABenchConfig.histories if args.history == "auto" else (),
        decode=args.decode,
        replicas=args.replicas,
        replica_layers=args.replica_layers,
    )
    if args.save_replicated and not args.replicas:
        raise ValueError("--save-replicated needs --replicas >= 1 (there is no replicas row to save)")
    # Thousands of small tensor ops: a thread pool only adds wake-ups, and on a busy box
    # its spinning threads stretch a few seconds of work to a minute.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_a2a_bench(load_trace(args.profile), load_trace(args.trace), config)
    finally:
        torch.set_num_threads(threads)
    if args.save_placement:
        ExpertPlacement.from_json(res["placement"]).save(args.save_placement)
    if args.save_replicated:
        ExpertPlacement.from_json(res["replicated_placement"]).save(args.save_replicated)
    if not args.json:
        print(format_report(res))
    line = dict(res["summary"], ranks=res["ranks"], tokens=res["tokens"], hidden_size=res["hidden_size"],
                bench="a2a")
    print(json.dumps(line))
    return 0
