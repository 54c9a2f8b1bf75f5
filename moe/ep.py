"""Expert parallelism for wrapped models, and the per-rank side of `moe launch`.

Shape key: T tokens on this rank, D hidden size, K experts per token.

Every rank holds a whole copy of the non-expert weights and runs attention on its own
data-parallel share of the input; `enable_expert_parallel` swaps each
`HybridMoeBlock.routed` for one `ExpertParallel` executor, so the family's own gating
picks experts and the executor runs them on whichever rank holds them. A rank's
experts are taken from the block's host store once, onto the executor's device.

Expert grouping (comms.grouping) applies here through the placement. Token shuffling
(comms.shuffle) does not: attention is data-parallel with each sequence's KV cache on
its owner, so a token must be back on its owner after every MoE layer; the shuffle's
gains (see `moe bench a2a`) need attention that is not pinned to one rank.

`python -m moe.ep` is what `moe launch` starts on every rank (see `worker_main`). It
enables expert parallelism on the model that `moe generate` loads through
`moe.generate_job.add_load_hook`; other commands run on every rank unchanged.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe.block import HybridMoeBlock
from moe.comms.ep import EPConfig, ExpertParallel
from moe.comms.group import GroupConfig, init_from_env
from moe.comms.placement import ExpertPlacement

__all__ = ["enable_expert_parallel", "executor_of", "moe_blocks", "EPRouted", "worker_main", "launch_job"]


def moe_blocks(model: nn.Module) -> list[HybridMoeBlock]:
    """The model's HybridMoeBlocks in MoE-layer order; raises if it has none."""
    blocks = sorted((m for m in model.modules() if isinstance(m, HybridMoeBlock)), key=lambda b: b.layer)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no HybridMoeBlock: wrap it with moe.wrap or "
                         "moe.from_pretrained before enabling expert parallelism")
    if [b.layer for b in blocks] != list(range(len(blocks))):
        raise ValueError(f"MoE layer ordinals {[b.layer for b in blocks]} are not 0..{len(blocks) - 1}")
    return blocks


class _LocalExperts:
    """This rank's experts, on the executor's device: (layer, expert, x_ND) -> y_ND (SwiGLU)."""

    def __init__(self, store, placement: ExpertPlacement, rank: int, device: torch.device) -> None:
        self.weights = {}
        for layer in range(placement.num_layers):
            for e in placement.local_experts(layer, rank):
                w13_2FD, w2_DF = store.expert(layer, e)
                self.weights[layer, e] = (w13_2FD.to(device), w2_DF.to(device))
        self.inter = store.inter

    def __call__(self, layer: int, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        w13_2FD, w2_DF = self.weights[layer, e]
        h_N2F = F.linear(x_ND.to(w13_2FD.dtype), w13_2FD)
        a_NF = F.silu(h_N2F[:, : self.inter]) * h_N2F[:, self.inter:]
        return F.linear(a_NF, w2_DF).to(x_ND.dtype)


class EPRouted:
    """`block.routed` under expert parallelism: (x_TD, ids_TK, weights_TK) -> y_TD."""

    def __init__(self, executor: ExpertParallel, layer: int) -> None:
        self.executor, self.layer = executor, layer

    def __call__(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        return self.executor(self.layer, x_TD, topk_ids_TK, topk_weights_TK)


def enable_expert_parallel(model: nn.Module, group: dist.ProcessGroup | None = None,
                           placement: ExpertPlacement | None = None, *,
                           config: EPConfig | None = None) -> ExpertParallel:
    """Run the routed experts of a wrapped model expert-parallel over `group`.

    placement: None gives the contiguous layout. Every rank must pass the same one.
    Returns the executor; call its `drain()` when this rank has no more input, so that
    it keeps serving its experts to the ranks that still have work.
    """
    blocks = moe_blocks(model)
    store = blocks[0].store
    if store is None:
        raise ValueError("the model's MoE blocks have no host expert store")
    world = dist.get_world_size(group)
    placement = placement or ExpertPlacement.contiguous(len(blocks), store.num_experts, world)
    if (placement.num_layers, placement.num_experts) != (len(blocks), store.num_experts):
        raise ValueError(f"placement covers {placement.num_layers} layers x {placement.num_experts} experts, "
                         f"the model has {len(blocks)} x {store.num_experts}")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
    experts = _LocalExperts(store, placement, dist.get_rank(group), device)
    executor = ExpertParallel(placement=placement, expert_fn=experts, group=group, config=config)
    for block in blocks:
        block.routed = EPRouted(executor, block.layer)
    model._moe_ep = executor
    return executor


def executor_of(model: nn.Module) -> ExpertParallel | None:
    """The executor installed by enable_expert_parallel, or None."""
    return getattr(model, "_moe_ep", None)


# --- per-rank worker of `moe launch` -----------------------------------------------------
@dataclass
class _WorkerContext:
    group: dist.ProcessGroup
    placement: ExpertPlacement | None
    config: EPConfig
    executors: list = field(default_factory=list)


def _install_generate_hook(ctx: _WorkerContext) -> None:
    """Make `moe generate` enable expert parallelism on the model it loads."""
    import moe.generate_job as job

    job.add_load_hook(lambda model: ctx.executors.append(
        enable_expert_parallel(model, ctx.group, ctx.placement, config=ctx.config)))


_COMM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_worker(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moe.ep", description="one rank of `moe launch`")
    p.add_argument("--placement", default=None, help="placement JSON (default: contiguous)")
    p.add_argument("--group-timeout", type=float, default=300.0, help="collective timeout in seconds")
    p.add_argument("--comm-dtype", choices=sorted(_COMM_DTYPES), default=None,
                   help="dtype of hidden rows on the wire (default: the activations')")
    p.add_argument("--self-check", type=int, default=0, metavar="STEPS",
                   help="instead of a command, check EP against the reference for STEPS steps")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- moe command; {rank} is replaced")
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command and not args.self_check:
        p.error("give a moe command after --, or --self-check STEPS")
    return args


def _run_command(argv: list[str]) -> int:
    """`moe ARGV` in this process, parsing with the one command's module only."""
    import importlib

    from moe.cli import CliError

    parser = argparse.ArgumentParser(prog="moe")
    try:
        module = importlib.import_module(f"moe.cli.{argv[0]}")
    except ModuleNotFoundError:
        raise ValueError(f"unknown moe command {argv[0]!r}") from None
    module.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, FileNotFoundError, ValueError) as exc:
        print(f"moe {argv[0]}: error: {exc}", file=sys.stderr)
        return 2


def worker_main(argv: list[str] | None = None) -> int:
    """One rank: join the group, run the command (EP on the model it loads), drain, leave."""
    args = _parse_worker(sys.argv[1:] if argv is None else argv)
    group = init_from_env(GroupConfig(timeout_s=args.group_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    log = lambda msg: print(f"moe launch: rank {rank}/{world} (pid {os.getpid()}): {msg}", file=sys.stderr, flush=True)
    try:
        if args.self_check:
            from moe.comms.selfcheck import CheckCase, check_rank

            log(f"self-check, {args.self_check} steps")
            cases = (CheckCase(layers=2, experts=max(8, world), k=2, d=32, f=48, max_tokens=16,
                               steps=args.self_check + world),)
            log(f"self-check passed ({check_rank(rank, world, cases, group)} layer calls match the reference)")
            return 0
        placement = ExpertPlacement.load(args.placement) if args.placement else None
        comm = _COMM_DTYPES[args.comm_dtype] if args.comm_dtype else None
        ctx = _WorkerContext(group=group, placement=placement, config=EPConfig(comm_dtype=comm))
        _install_generate_hook(ctx)
        code = _run_command([a.replace("{rank}", str(rank)) for a in args.command])
        if code != 0:
            return code
        for ex in ctx.executors:
            ex.drain()
        dist.barrier(group)
        if ctx.executors:
            s = ctx.executors[0].stats
            log(f"done: {s.rounds} rounds, {s.local_activations}/{s.activations} activations local, "
                f"{s.wire_bytes} bytes sent to other ranks")
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- `moe launch` on the launching host: shard, run, merge -------------------------------
_PAD_ID = "__moe_launch_pad_{rank}__"


def _strip_options(argv: list[str], valued: tuple[str, ...], flags: tuple[str, ...]) -> list[str]:
    """argv without the given options (`--opt v`, `--opt=v`) and flags."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in valued:
            skip = True
        elif a in flags or any(a.startswith(v + "=") for v in valued):
            continue
        else:
            out.append(a)
    return out


def _write_shards(records, world: int, folder: str) -> list[int]:
    """Deal prompts round-robin into shard-{r}.jsonl; a rank left empty gets one pad prompt
    (a copy of the first, under a reserved id) so that it loads the model and serves its
    experts like every other rank. Returns the real prompt count per rank."""
    import json

    counts = []
    for r in range(world):
        mine = [{"id": rec.id, "prompt": rec.prompt} for rec in records[r::world]]
        counts.append(len(mine))
        if not mine:
            mine = [{"id": _PAD_ID.format(rank=r), "prompt": records[0].prompt}]
        with open(os.path.join(folder, f"shard-{r}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(m, ensure_ascii=False) + "\n" for m in mine)
    return counts


def _merge_outputs(records, world: int, folder: str, output: str | None) -> tuple[int, list[int]]:
    """Append the finished results in `folder` to `output` in input order.

    Returns (results written, ranks that left an output file). On several nodes every
    node's launcher has its own folder, which only its own ranks write to.
    """
    import json

    from moe.jsonl import JsonlWriter

    found, ranks = {}, []
    for r in range(world):
        path = os.path.join(folder, f"out-{r}.jsonl")
        if not os.path.exists(path):
            continue
        ranks.append(r)
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:  # a torn last line of a killed rank
                    continue
                if isinstance(obj, dict) and "id" in obj:
                    found.setdefault(obj["id"], obj)
    written = 0
    with JsonlWriter(output) as writer:
        for rec in records:
            if rec.id in found:
                writer.write(found[rec.id])
                written += 1
    return written, ranks


def launch_job(config, command: list[str], *, placement: str | None = None, group_timeout_s: float = 300.0,
               comm_dtype: str | None = None, self_check_steps: int = 0, log=print) -> int:
    """`moe launch`: run `moe COMMAND` on every rank through torchrun, expert-parallel.

    For `generate`, the input is validated here, dealt round-robin over the ranks, and the
    per-rank results are merged into one --output (every id once, input order). Results
    that finished before a failure are merged too, so `--resume` continues the run. On
    several nodes each node's launcher appends its own ranks' results (one write per
    line, so a shared --output file gets every id once, grouped by node).
    Raises RuntimeError with a message naming the failure when the job fails or times out.
    """
    import shutil
    import tempfile

    from moe.comms.launch import TIMEOUT_EXIT, run_torchrun

    if comm_dtype is not None and comm_dtype not in _COMM_DTYPES:
        raise ValueError(f"comm dtype must be one of {', '.join(sorted(_COMM_DTYPES))}, got {comm_dtype!r}")
    base = ["--group-timeout", str(group_timeout_s)] + (["--placement", placement] if placement else []) \
        + (["--comm-dtype", comm_dtype] if comm_dtype else [])
    if self_check_steps:
        return _finish(run_torchrun(config, "moe.ep", base + ["--self-check", str(self_check_steps)]),
                       config, TIMEOUT_EXIT, "")
    if placement:
        ranks = ExpertPlacement.load(placement).world_size  # a malformed file fails here, not on every rank
        if config.nnodes.isdigit() and ranks != config.nproc_per_node * int(config.nnodes):
            raise ValueError(f"placement file {placement} is for {ranks} ranks, the job has "
                             f"{config.nproc_per_node * int(config.nnodes)}")
    if not command:
        raise ValueError("give the moe command to run after --, e.g. `moe launch --nproc-per-node 2 -- generate ...`")
    if command[0] == "launch":
        raise ValueError("moe launch cannot launch itself; give the command to run after --")
    if command[0] != "generate":
        return _finish(run_torchrun(config, "moe.ep", base + ["--", *command]), config, TIMEOUT_EXIT, "")
    from moe.cli import generate as generate_cli

    parser = argparse.ArgumentParser(prog="moe launch -- ")
    generate_cli.register(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(command)
    if not config.nnodes.isdigit():
        raise ValueError(f"sharding generate needs a fixed node count, got --nnodes {config.nnodes}")
    from moe.jsonl import read_prompts, resume_output

    world = config.nproc_per_node * int(config.nnodes)
    records = read_prompts(ns.input)
    done: set = set()
    if ns.output is not None and os.path.exists(ns.output) and os.path.getsize(ns.output) > 0:
        if not ns.resume:
            raise ValueError(f"output {ns.output} already exists and is not empty: pass --resume to continue "
                             "it, or choose another --output")
        done = resume_output(ns.output, warn=log)
    pending = [r for r in records if r.id not in done]
    if not pending:
        log("moe launch: nothing left to generate")
        return 0
    folder = tempfile.mkdtemp(prefix=".moe-launch-", dir=os.path.dirname(os.path.abspath(ns.output or ".")))
    try:
        counts = _write_shards(pending, world, folder)
        log(f"moe launch: {len(pending)} prompts over {world} ranks ({', '.join(map(str, counts))})")
        rest = _strip_options(command[1:], ("--input", "--output"), ("--resume",))
        argv = ["generate", *rest, "--input", os.path.join(folder, "shard-{rank}.jsonl"),
                "--output", os.path.join(folder, "out-{rank}.jsonl")]
        rc = run_torchrun(config, "moe.ep", base + ["--", *argv])
        written, ranks = _merge_outputs(pending, world, folder, ns.output)
        # On several nodes this launcher sees only its own ranks' results.
        expected = len(pending) if world == config.nproc_per_node else sum(counts[r] for r in ranks)
        where = f"; {written} of {expected} results were written to {ns.output or 'stdout'}"
        if rc == 0 and written != expected:
            raise RuntimeError(f"the ranks finished but only {written} of {expected} results came back")
        return _finish(rc, config, TIMEOUT_EXIT, where + (" (rerun with --resume to finish)" if ns.output else ""))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _finish(rc: int, config, timeout_exit: int, where: str) -> int:
    if rc == 0:
        return 0
    if rc == timeout_exit:
        raise RuntimeError(f"the expert-parallel job did not finish within --timeout {config.timeout_s:g} s "
                           f"and was stopped{where}")
    raise RuntimeError(f"a rank of the expert-parallel job failed or stopped responding (torchrun exit "
                       f"status {rc}; see the rank's error above){where}")


if __name__ == "__main__":
    sys.exit(worker_main())
