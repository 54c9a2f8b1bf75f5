"""`moe bench cache`: replay a routing trace through every cache policy.

Baseline (LRU, what a user gets by default) and bound (Belady, the offline optimum for
demand fetch) run side by side with the others on the same trace. Policies are tuned and
predictors fitted on --train (never on the measured trace); without --train they are fitted
on the measured trace itself, which the output says ("fit": "in-sample").
"""
from __future__ import annotations

import json

__all__ = ["register", "load_fit_and_measure"]


def register(sub) -> None:
    p = sub.add_parser("cache", help="expert-cache hit rate and loads of every policy on a routing trace")
    p.add_argument("--trace", required=True, help="trace to measure (.safetensors)")
    p.add_argument("--capacity", required=True, type=int, help="cache slots per MoE layer")
    p.add_argument("--train", default=None, help="trace to fit predictors and tune policies on (default: --trace)")
    p.add_argument("--load-budget", type=float, default=1.25,
                   help="predictive policy: loads at most this many times LRU's on the train trace (default 1.25)")
    p.add_argument("--policies", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.set_defaults(func=run)


def load_fit_and_measure(trace_path: str, train_path: str | None):
    """(measured trace, fit trace, fit label); the two must have the same layers and experts."""
    from moe.router_predictor.trace import load_trace

    measure = load_trace(trace_path)
    if train_path is None:
        return measure, measure, "in-sample"
    fit = load_trace(train_path)
    if (fit.num_layers, fit.num_experts, fit.top_k) != (measure.num_layers, measure.num_experts, measure.top_k):
        raise ValueError(
            f"--train trace has {fit.num_layers} layers, top-{fit.top_k} of {fit.num_experts} experts; "
            f"--trace has {measure.num_layers}, top-{measure.top_k} of {measure.num_experts}"
        )
    return measure, fit, "train"


def _replay_trace(trace, table):
    from moe.expert_cache.compare import ReplayTrace
    from moe.router_predictor.evaluate import make_forecaster

    return ReplayTrace(
        ids_TLK=trace.expert_ids.long().numpy(),
        seq_starts=trace.seq_starts.tolist(),
        weights_TLK=None if trace.weights is None else trace.weights.float().numpy(),
        forecaster=None if table is None else make_forecaster(table),
    )


def run(args) -> int:
    from moe.expert_cache.compare import CompareConfig, compare_policies
    from moe.expert_cache.policies import POLICY_NAMES
    from moe.router_predictor.evaluate import forecast_table, out_of_fold_forecast_table
    from moe.router_predictor.predictors import TransitionPredictor

    measure, fit, fit_label = load_fit_and_measure(args.trace, args.train)
    names = tuple(POLICY_NAMES if args.policies is None else [n.strip() for n in args.policies.split(",") if n.strip()])
    cfg = CompareConfig(capacity=args.capacity, num_experts=measure.num_experts, load_budget=args.load_budget,
                        policies=names)
    fit_table = meas_table = None
    if "predictive" in names:
        # The predictive policy's forecasts: the transition predictor fitted on the train
        # trace; on the train trace itself (for tuning), out-of-fold so it is not memorised.
        meas_table = forecast_table(TransitionPredictor.fit(fit), measure, depth=1)
        fit_table = out_of_fold_forecast_table(TransitionPredictor.fit, fit, depth=1)
    out = compare_policies(_replay_trace(measure, meas_table), _replay_trace(fit, fit_table), cfg)
    out.update(trace=args.trace, train=args.train or args.trace, fit=fit_label, predictor="transition")
    if not args.json:
        print(f"{measure.num_tokens} tokens x {measure.num_layers} layers, {args.capacity} of "
              f"{measure.num_experts} experts cached per layer; fitted on {out['train']} ({fit_label})")
        print(f"{'policy':12s} {'hit rate':>8s} {'of Belady':>9s} {'loads':>7s} {'prefetch':>8s} {'useful':>7s}")
        for name, r in out["policies"].items():
            print(f"{name:12s} {r['hit_rate']:8.3f} {r.get('of_belady', float('nan')):9.3f} {r['loads']:7d} "
                  f"{r['prefetches']:8d} {r['useful_prefetches']:7d}")
    print(json.dumps(out))
    return 0
