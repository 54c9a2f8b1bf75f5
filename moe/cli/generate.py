"""`moe generate`: offline batch generation, JSONL prompts in, JSONL completions out."""
from __future__ import annotations

import argparse
import sys

from moe.config import CACHE_POLICIES, PREDICTORS, SCHEDULERS

__all__ = ["register", "run"]

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}

_EPILOG = """\
input lines:  {"id": "q1", "prompt": "Hello"}           (id: string or integer, unique)
output lines: {"id": "q1", "completion": "...", "prompt_tokens": 6,
               "completion_tokens": 32, "finish_reason": "length"}
Each output line is written and flushed when its prompt finishes; --resume skips the
ids already in --output. Without --model a small built-in demo MoE is used (no network).
"""


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="batch generation from a JSONL file of prompts",
        description="Generate a completion for every prompt of a JSONL file with the hybrid CPU/GPU MoE runtime.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="PATH|HUB_ID", default=None,
                   help="local checkpoint folder or Hugging Face Hub id (default: the built-in demo MoE)")
    p.add_argument("--input", metavar="FILE.jsonl|-", default="-",
                   help="prompts, one JSON object per line (default: stdin)")
    p.add_argument("--output", metavar="FILE.jsonl", default=None, help="results (default: stdout)")
    p.add_argument("--max-new-tokens", metavar="N", type=int, default=128,
                   help="most tokens generated per prompt (default: 128)")
    p.add_argument("--gpu-memory", metavar="SIZE", default=None,
                   help="device budget for all weights, e.g. 8GiB; what the non-expert weights leave over becomes "
                        "expert cache (default: the loader's; for the demo, about half its experts fit)")
    p.add_argument("--batch-size", metavar="N|auto", default="auto",
                   help="prompts per batch, or 'auto' to size batches by prompt length (default: auto)")
    p.add_argument("--temperature", metavar="T", type=float, default=0.0, help="0 is greedy (default); > 0 samples")
    p.add_argument("--seed", metavar="S", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--resume", action="store_true", help="append to --output, skipping ids it already holds")
    p.add_argument("--device", default=None, help="fast tier, e.g. cuda, cuda:1 or cpu (default: cuda when present)")
    p.add_argument("--dtype", choices=["auto", *_DTYPES], default="auto",
                   help="weight dtype (default: the checkpoint's; float32 for the demo)")
    p.add_argument("--config-cache-policy", metavar="POLICY", default=None,
                   help=f"expert cache eviction policy: {', '.join(CACHE_POLICIES)}")
    p.add_argument("--config-scheduler", metavar="RULE", default=None,
                   help=f"per-layer expert placement rule: {', '.join(SCHEDULERS)}")
    p.add_argument("--config-predictor", metavar="NAME", default=None,
                   help=f"routing predictor for prefetch: none, {', '.join(name for name in PREDICTORS if name)}")
    p.add_argument("--config-cpu-threads", metavar="N", type=int, default=None, help="threads for CPU experts")
    p.set_defaults(func=run)


def _runtime_config(args):
    """A RuntimeConfig from the --config-* flags given, or None (the runtime's defaults)."""
    from moe.config import RuntimeConfig

    fields: dict = {}
    if args.config_cache_policy is not None:
        fields["cache_policy"] = args.config_cache_policy
    if args.config_scheduler is not None:
        fields["scheduler"] = args.config_scheduler
    if args.config_predictor is not None:
        fields["predictor"] = None if args.config_predictor.lower() == "none" else args.config_predictor
    if args.config_cpu_threads is not None:
        fields["cpu_threads"] = args.config_cpu_threads
    return RuntimeConfig(**fields) if fields else None


def run(args) -> int:
    import torch

    from moe.config import parse_size
    from moe.generate import GenerateConfig
    from moe.generate_job import GenerateJob, run_job

    if args.gpu_memory is not None:
        parse_size(args.gpu_memory)  # a typo fails now, not after the input is read and the model built
    job = GenerateJob(
        model=args.model,
        input=args.input,
        output=args.output,
        resume=args.resume,
        gpu_memory=args.gpu_memory,
        device=args.device,
        dtype=None if args.dtype == "auto" else getattr(torch, _DTYPES[args.dtype]),
        runtime=_runtime_config(args),
        generation=GenerateConfig(
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            temperature=args.temperature,
            seed=args.seed,
        ),
    )
    run_job(job, log=lambda msg: print(f"moe generate: {msg}", file=sys.stderr, flush=True))
    return 0
