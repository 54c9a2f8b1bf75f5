"""`moe trace record|import|stats|train-predictor`: routing traces and the learned predictor."""
from __future__ import annotations

import json
import os

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("trace", help="record, import, inspect routing traces; train the path predictor")
    cmds = p.add_subparsers(dest="trace_command", metavar="ACTION")
    cmds.required = True

    r = cmds.add_parser("record", help="record every MoE layer's top-k routing while the model generates")
    r.add_argument("--model", default=None, help="checkpoint folder or Hub id (default: the built-in demo MoE)")
    r.add_argument("--input", required=True, help="JSONL prompts, one {\"id\", \"prompt\"} per line ('-': stdin)")
    r.add_argument("--output", required=True, help="trace file to write (.safetensors)")
    r.add_argument("--max-new-tokens", type=int, default=16, help="greedy decode steps per prompt (default 16)")
    r.add_argument("--gpu-memory", default=None, help="GPU budget for all weights, e.g. 8GiB")
    r.add_argument("--device", default=None, help="fast tier device (default: cuda if present, else cpu)")
    r.set_defaults(func=_record)

    i = cmds.add_parser("import", help="convert a routing log from another system into a trace")
    i.add_argument("--format", required=True, choices=["vllm-jsonl"], help="input format")
    i.add_argument("input", metavar="IN", help="input file")
    i.add_argument("output", metavar="OUT", help="trace file to write (.safetensors)")
    i.add_argument("--model", default="", help="model name stored in the trace")
    i.add_argument("--num-experts", type=int, default=None, help="experts per layer (default: largest id + 1)")
    i.set_defaults(func=_import)

    s = cmds.add_parser("stats", help="expert frequencies, temporal reuse, inter-layer transitions")
    s.add_argument("trace", metavar="T.safetensors")
    s.add_argument("--json", action="store_true", help="print one JSON object only")
    s.set_defaults(func=_stats)

    t = cmds.add_parser("train-predictor", help="train the learned routing-path predictor on a trace")
    t.add_argument("--trace", required=True, help="training trace (.safetensors)")
    t.add_argument("--output", required=True, help="predictor file to write (.safetensors)")
    t.add_argument("--eval", default=None, help="trace to measure recall on (default: the training trace)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1000)")
    t.add_argument("--history", type=int, default=None, help="layers of routing history (default 8)")
    t.add_argument("--depth", type=int, default=None, help="layers predicted ahead (default 3)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_train)


def _record(args) -> int:
    from moe.trace_record import record_trace_file

    trace, n = record_trace_file(model=args.model, input=args.input, output=args.output,
                                 max_new_tokens=args.max_new_tokens, gpu_memory=args.gpu_memory, device=args.device)
    print(f"recorded {trace.num_tokens} tokens of {n} prompts x {trace.num_layers} MoE layers "
          f"(top-{trace.top_k} of {trace.num_experts}) to {args.output}")
    return 0


def _import(args) -> int:
    from moe.router_predictor.trace import import_vllm_jsonl, save_trace

    _check_output(args.output)
    trace, report = import_vllm_jsonl(args.input, num_experts=args.num_experts, model=args.model)
    save_trace(trace, args.output)
    print(f"{report.summary()}; wrote {args.output}")
    return 0


def _stats(args) -> int:
    from moe.router_predictor.stats import format_stats, trace_stats
    from moe.router_predictor.trace import load_trace

    st = trace_stats(load_trace(args.trace))
    if not args.json:
        print(format_stats(st))
    print(json.dumps(st))
    return 0


def _train(args) -> int:
    from moe.router_predictor.evaluate import recall_at_k
    from moe.router_predictor.learned import LearnedConfig, train_path_predictor
    from moe.router_predictor.trace import load_trace

    _check_output(args.output)
    train = load_trace(args.trace)
    evaluate = load_trace(args.eval) if args.eval else train
    if (evaluate.num_layers, evaluate.num_experts) != (train.num_layers, train.num_experts):
        raise ValueError(f"--eval trace has {evaluate.num_layers} layers x {evaluate.num_experts} experts, "
                         f"the training trace {train.num_layers} x {train.num_experts}")
    kw = {k: v for k, v in (("steps", args.steps), ("history", args.history), ("depth", args.depth)) if v is not None}
    cfg = LearnedConfig(seed=args.seed, **kw)
    pred, info = train_path_predictor(train, cfg)
    pred.save(args.output)
    rec = recall_at_k(pred, evaluate, ks=(1, 2, 4), depth=cfg.depth)
    out = {"output": args.output, "train": args.trace, "eval": args.eval or args.trace, **info, **rec}
    print(f"trained on {info['examples']} (token, layer) examples: loss {info['loss_first']:.3f} -> "
          f"{info['loss_last']:.3f}; recall@2 of the next layer {rec['recall@2']['l+1']:.3f}; wrote {args.output}")
    print(json.dumps(out))
    return 0


def _check_output(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder} does not exist")
