"""`moe bench predictor`: recall@k of every routing-path predictor on a trace.

The frequency prior is the baseline; predictors are fitted on --train (default: the
measured trace, reported as "fit": "in-sample"). Gate lookahead needs the model's hidden
states, which a trace does not hold; it is measured inside a running model instead.
"""
from __future__ import annotations

import json

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("predictor", help="recall@k of the routing-path predictors on a trace")
    p.add_argument("--trace", required=True, help="trace to measure (.safetensors)")
    p.add_argument("--train", default=None, help="trace to fit the predictors on (default: --trace)")
    p.add_argument("--learned", default=None,
                   help="a trained path predictor (.safetensors); default: train one on --train now")
    p.add_argument("--depth", type=int, default=3, help="layers ahead to measure (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.set_defaults(func=run)


def run(args) -> int:
    from moe.cli.bench_cache import load_fit_and_measure
    from moe.router_predictor.evaluate import recall_at_k
    from moe.router_predictor.learned import LearnedConfig, LearnedPathPredictor, train_path_predictor
    from moe.router_predictor.predictors import FrequencyPredictor, TransitionPredictor

    if args.depth < 1:
        raise ValueError(f"--depth must be >= 1, got {args.depth}")
    measure, fit, fit_label = load_fit_and_measure(args.trace, args.train)
    if args.learned:
        learned = LearnedPathPredictor.load(args.learned)
        if (learned.num_layers, learned.num_experts) != (measure.num_layers, measure.num_experts):
            raise ValueError(f"--learned predictor is for {learned.num_layers} layers x {learned.num_experts} "
                             f"experts, the trace has {measure.num_layers} x {measure.num_experts}")
    else:
        learned, _ = train_path_predictor(fit, LearnedConfig(depth=args.depth))
    depth = min(args.depth, learned.config.depth)
    predictors = {
        "frequency": FrequencyPredictor.fit(fit),
        "transition": TransitionPredictor.fit(fit),
        "learned": learned,
    }
    ks = sorted({1, 2, measure.top_k, min(2 * measure.top_k, measure.num_experts)})
    out = {"trace": args.trace, "train": args.train or args.trace, "fit": fit_label, "depth": depth,
           "predictors": {name: recall_at_k(p, measure, ks=ks, depth=depth) for name, p in predictors.items()},
           "skipped": {"gate-lookahead": "needs the model's hidden states; a trace holds routing only"}}
    if not args.json:
        print(f"{measure.num_tokens} tokens x {measure.num_layers} layers, top-{measure.top_k} of "
              f"{measure.num_experts}; fitted on {out['train']} ({fit_label})")
        cols = [f"l+{j}" for j in range(1, depth + 1)] + [f"l+1..l+{depth}"]
        print(f"{'predictor':12s} {'k':>3s} " + " ".join(f"{c:>9s}" for c in cols))
        for name, rec in out["predictors"].items():
            for k in ks:
                row = rec[f"recall@{k}"]
                print(f"{name:12s} {k:3d} " + " ".join(f"{row[c]:9.3f}" for c in cols))
    print(json.dumps(out))
    return 0
