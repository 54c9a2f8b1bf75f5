"""Expert parallelism for wrapped models, and the per-rank side of `moe launch`.

Shape key: T tokens on this rank, D hidden size, K experts per token.

Every rank holds a whole copy of the non-expert weights and runs attention on its own
data-parallel share of the input; `enable_expert_parallel` swaps each
`HybridMoeBlock.routed` for one `ExpertParallel` executor, so the family's own gating
picks experts and the executor runs them on whichever rank holds them. A rank's
experts are taken from the block's host store once, onto the executor's device (on
CUDA stacked per layer for the fused Triton kernel; on the CPU run in place by the
Numba kernel); the host store then keeps only what this rank still needs, and the
single-process device cache is released.

Loaded with `RuntimeConfig(ep_shard=EPShard(rank, world_size, placement))` (what
`moe launch` does), a rank reads only its own experts from the checkpoint, so R ranks
on one host hold the experts once between them, not R times.

Expert grouping (comms.grouping) applies here through the placement. Token shuffling
(comms.shuffle) does not: attention is data-parallel with each sequence's KV cache on
its owner, so a token must be back on its owner after every MoE layer; the shuffle's
gains (see `moe bench a2a`) need attention that is not pinned to one rank.

`python -m moe.ep` is what `moe launch` (moe.ep_launch) starts on every rank (see `worker_main`). It
enables expert parallelism on the model that `moe generate` loads through
`moe.generate_job.add_load_hook`; other commands run on every rank unchanged.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from moe.block import HybridMoeBlock
from moe.comms.ep import EPConfig, ExpertParallel
from moe.comms.group import GroupConfig, init_from_env
from moe.comms.placement import REPLICA_DISPATCH, ExpertPlacement
from moe.config import EPShard, RuntimeConfig
from moe.kernels import cpu_expert_ffn, device_fused_moe

__all__ = ["enable_expert_parallel", "executor_of", "moe_blocks", "EPRouted", "worker_main"]


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
    """This rank's experts, one grouped call per layer: (layer, x_ND, ids_NK, weights_NK)
    -> y_ND, where ids_NK is -1 for slots another rank serves.

    With the executor on CUDA the rank's experts of each layer are stacked once in device
    memory and run by the fused Triton kernel, with an expert map (global id -> local
    slot, -1 elsewhere), the contract the kernel has for this. On the CPU each local
    expert runs the Numba kernel on its rows, reading the host store in place (its packed
    copy when the runtime quantises CPU experts): nothing is copied.
    """

    def __init__(self, store, placement: ExpertPlacement, rank: int, device: torch.device,
                 fused: bool | None = None) -> None:
        self.store, self.device, self.E = store, device, placement.num_experts
        self.local = [placement.local_experts(l, rank) for l in range(placement.num_layers)]
        for l, experts in enumerate(self.local):
            for e in experts:
                if not store.holds(l, e):
                    raise ValueError(f"the placement gives this rank (rank {rank}) expert {e} of MoE layer "
                                     f"{l}, which its expert store did not load: load the model with the "
                                     "same placement (RuntimeConfig.ep_shard) that expert parallelism uses")
        self.stacked = []  # per layer when fused (default: on CUDA): (w13_N2FD, w2_NDF, map_G)
        if device.type == "cuda" if fused is None else fused:
            for l, experts in enumerate(self.local):
                D, F2 = store.hidden, 2 * store.inter
                w13 = torch.empty(len(experts), F2, D, dtype=store.dtype, device=device)
                w2 = torch.empty(len(experts), D, F2 // 2, dtype=store.dtype, device=device)
                for i, e in enumerate(experts):
                    a, b = store.expert(l, e)
                    w13[i].copy_(a)
                    w2[i].copy_(b)
                # id E (slots served elsewhere, -1 on the wire) maps to -1 as well
                map_G = torch.full((self.E + 1,), -1, dtype=torch.int32)
                map_G[torch.as_tensor(experts, dtype=torch.long)] = torch.arange(len(experts), dtype=torch.int32)
                self.stacked.append((w13, w2, map_G.to(device)))

    def __call__(self, layer: int, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        if self.stacked:
            w13, w2, map_G = self.stacked[layer]
            ids_NK = torch.where(ids_NK < 0, self.E, ids_NK).to(self.device)
            return device_fused_moe(x_ND, w13, w2, ids_NK, w_NK.to(self.device), map_G)
        y_ND = torch.zeros(x_ND.shape, dtype=torch.float32)
        for e in self.local[layer]:
            rows_M, slot_M = (ids_NK == e).nonzero(as_tuple=True)
            if len(rows_M):
                w13, w2 = self.store.cpu_weights(layer, e)
                out_MD = cpu_expert_ffn(x_ND[rows_M], w13, w2).float()
                y_ND.index_add_(0, rows_M, out_MD * w_NK[rows_M, slot_M, None].float())
        return y_ND.to(x_ND.dtype)


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
    executor = ExpertParallel(placement=placement, grouped_fn=experts, group=group, config=config)
    for block in blocks:
        block.routed = EPRouted(executor, block.layer)
    model._moe_ep = executor
    runtime = getattr(model, "_moe_runtime", None)
    if runtime is not None:  # the single-process expert cache and prefetch no longer run
        runtime.release_device_experts()
    # Host memory keeps only this rank's experts (none on CUDA: they live on the device now).
    keep_LE = placement.holds_LER[:, :, dist.get_rank(group)] & store.held_LE
    store.keep_only(torch.zeros_like(keep_LE) if device.type == "cuda" else keep_LE)
    return executor


def executor_of(model: nn.Module) -> ExpertParallel | None:
    """The executor installed by enable_expert_parallel, or None."""
    return getattr(model, "_moe_ep", None)


# --- per-rank worker of `moe launch` -----------------------------------------------------
@dataclass
class _WorkerContext:
    group: dist.ProcessGroup
    placement: ExpertPlacement | None
    placement_path: str | None
    config: EPConfig
    executors: list = field(default_factory=list)


def _install_generate_hook(ctx: _WorkerContext) -> None:
    """Make `moe generate` load only this rank's experts and run them expert-parallel."""
    import moe.generate_job as job

    shard = EPShard(rank=dist.get_rank(ctx.group), world_size=dist.get_world_size(ctx.group),
                    placement=ctx.placement_path)
    job.add_config_hook(lambda cfg: dataclasses.replace(cfg or RuntimeConfig(), ep_shard=shard))
    job.add_load_hook(lambda model: ctx.executors.append(
        enable_expert_parallel(model, ctx.group, ctx.placement, config=ctx.config)))


_COMM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_worker(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moe.ep", description="one rank of `moe launch`")
    p.add_argument("--placement", default=None, help="placement JSON (default: contiguous)")
    p.add_argument("--group-timeout", type=float, default=300.0, help="collective timeout in seconds")
    p.add_argument("--comm-dtype", choices=sorted(_COMM_DTYPES), default=None,
                   help="dtype of hidden rows on the wire (default: the activations')")
    p.add_argument("--replica-dispatch", choices=REPLICA_DISPATCH, default="balanced",
                   help="how tokens pick among an expert's replicas (EPConfig.replica_dispatch)")
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
        ctx = _WorkerContext(group=group, placement=placement, placement_path=args.placement,
                             config=EPConfig(comm_dtype=comm, replica_dispatch=args.replica_dispatch))
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
                f"{s.expert_calls} expert calls serving {s.expert_rows} rows, "
                f"{s.wire_bytes} bytes sent to other ranks")
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    code = worker_main()
    # Leave without the interpreter's teardown: after the process group is gone, a C++
    # thread that a library still holds (gloo / thread pools) is sometimes destroyed while
    # joinable at exit, and std::terminate aborts a rank whose work is all done and
    # written (seen in ~1 of 5 four-rank runs on the 2-core box). Nothing is left to flush
    # but Python's own streams.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
