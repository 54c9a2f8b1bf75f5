"""`moe launch`: run a moe command expert-parallel on every rank through torchrun."""
from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run"]

_EPILOG = """\
examples:
  moe launch --nproc-per-node 4 -- generate --input prompts.jsonl --output out.jsonl
  moe launch --nproc-per-node 2 --self-check 20
Every rank holds the non-expert weights and runs attention on its share of the input;
the experts of each MoE layer are spread over the ranks (--placement, from
`moe bench a2a --save-placement`, or contiguous). For generate the prompts are dealt
over the ranks and the results merged into one --output, every id once; results that
finished before a failure are kept there, so --resume continues. A rank that dies stops
the job at once; one that hangs stops it after --group-timeout seconds (plus up to 30 s
for torchrun to kill a frozen process); either way the exit status is non-zero.
"""


def register(sub) -> None:
    p = sub.add_parser("launch", help="expert-parallel run of a moe command via torchrun",
                       description=__doc__, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N", help="ranks on this node (default: 1)")
    p.add_argument("--nnodes", default="1", help="nodes (torchrun --nnodes; default: 1)")
    p.add_argument("--node-rank", type=int, default=None, help="torchrun --node-rank")
    p.add_argument("--master-addr", default=None, help="torchrun --master-addr")
    p.add_argument("--master-port", type=int, default=None, help="torchrun --master-port")
    p.add_argument("--rdzv-backend", default=None, help="torchrun --rdzv-backend")
    p.add_argument("--rdzv-endpoint", default=None, help="torchrun --rdzv-endpoint")
    p.add_argument("--rdzv-id", default=None, help="torchrun --rdzv-id")
    p.add_argument("--torchrun-arg", action="append", default=[], metavar="ARG",
                   help="pass one more argument to torchrun as is (repeatable)")
    p.add_argument("--placement", default=None, metavar="FILE.json", help="expert placement (default: contiguous)")
    p.add_argument("--group-timeout", type=float, default=300.0, metavar="S",
                   help="seconds a collective waits for a silent rank before the job fails (default: 300)")
    p.add_argument("--comm-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of hidden rows sent between ranks, e.g. bfloat16 to halve the bytes of a "
                        "float32 model (default: the activations' dtype)")
    p.add_argument("--replica-dispatch", choices=["balanced", "hash"], default="balanced",
                   help="with a placement holding replicas: split each replicated expert's remote tokens over "
                        "its copies from counts every rank shares (one small all_gather per layer), or by a "
                        "hash of the token index (no extra collective) (default: balanced)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="wall-clock limit of the whole job")
    p.add_argument("--self-check", type=int, default=0, metavar="STEPS",
                   help="check expert parallelism against the single-process reference for STEPS steps")
    # dest "argv": `command` is the CLI's own name for the subcommand (used in error lines).
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the moe command to run on every rank")
    p.set_defaults(func=run)


def run(args) -> int:
    from moe.cli import CliError
    from moe.comms.launch import LaunchConfig
    from moe.ep_launch import launch_job

    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command and not args.self_check:
        raise CliError("give the moe command to run after --, e.g. `moe launch --nproc-per-node 2 -- generate "
                       "--input prompts.jsonl --output out.jsonl`, or --self-check STEPS")
    config = LaunchConfig(nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=args.node_rank,
                          master_addr=args.master_addr, master_port=args.master_port,
                          rdzv_backend=args.rdzv_backend, rdzv_endpoint=args.rdzv_endpoint,
                          rdzv_id=args.rdzv_id, timeout_s=args.timeout, extra=tuple(args.torchrun_arg))
    try:
        return launch_job(config, command, placement=args.placement, group_timeout_s=args.group_timeout,
                          comm_dtype=args.comm_dtype, replica_dispatch=args.replica_dispatch,
                          self_check_steps=args.self_check,
                          log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
