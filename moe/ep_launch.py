"""`moe launch` on the launching host: validate, shard the input over the ranks, run
`python -m moe.ep` on every rank through torchrun, and merge the ranks' results.
"""
from __future__ import annotations

import argparse
import os

from moe.comms.placement import REPLICA_DISPATCH, ExpertPlacement
from moe.ep import _COMM_DTYPES

__all__ = ["launch_job"]

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
               comm_dtype: str | None = None, replica_dispatch: str = "balanced", self_check_steps: int = 0,
               log=print) -> int:
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
    if replica_dispatch not in REPLICA_DISPATCH:
        raise ValueError(f"replica dispatch must be one of {', '.join(REPLICA_DISPATCH)}, got {replica_dispatch!r}")
    base = ["--group-timeout", str(group_timeout_s)] + (["--placement", placement] if placement else []) \
        + (["--comm-dtype", comm_dtype] if comm_dtype else []) \
        + (["--replica-dispatch", replica_dispatch] if replica_dispatch != "balanced" else [])
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
