"""`moe launch`: expert-parallel generate through torchrun, sharding and merging, failures."""
import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from moe.cli import CliError, launch
from moe.comms.placement import ExpertPlacement

# The launcher as a user runs it, parsing `moe launch` only (one line per error, exit 2).
_LAUNCHER = """
import argparse, sys
from moe.cli import CliError, launch
p = argparse.ArgumentParser(prog="moe")
launch.register(p.add_subparsers(dest="command"))
a = p.parse_args(["launch", *sys.argv[1:]])
try:
    sys.exit(a.func(a))
except (CliError, ValueError, FileNotFoundError) as exc:
    print(f"moe launch: error: {exc}", file=sys.stderr)
    sys.exit(2)
"""
PROMPTS = [{"id": "a", "prompt": "Hello"}, {"id": 7, "prompt": "def f(x):"}, {"id": "c", "prompt": "MoE"},
           {"id": "d", "prompt": "x" * 11}, {"id": "e", "prompt": "1 2 3"}, {"id": 9, "prompt": "zz"}]


def _launch_in_process(argv):
    parser = argparse.ArgumentParser(prog="moe")
    launch.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["launch", *argv])
    return args.func(args)


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _write_prompts(path):
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))


def test_launch_generate_matches_single_process_and_resumes(tmp_path):
    """Four EP ranks (uneven shards, replicas) give the single-process completions, every id once, after resuming."""
    from moe.generate import GenerateConfig
    from moe.generate_job import GenerateJob, run_job

    _write_prompts(tmp_path / "in.jsonl")
    gen = GenerateConfig(max_new_tokens=6, batch_size=1)
    run_job(GenerateJob(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "ref.jsonl"), device="cpu",
                        generation=gen, progress=False), log=lambda m: None)
    want = (tmp_path / "ref.jsonl").read_text().splitlines()
    assert len(want) == len(PROMPTS)
    placement = ExpertPlacement.contiguous(4, 8, 4).with_replicas(torch.arange(32.0).reshape(4, 8), 1)
    placement.save(tmp_path / "placement.json")
    (tmp_path / "out.jsonl").write_text(want[0] + "\n")  # a run that stopped after one result
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, "--nproc-per-node", "4", "--placement", str(tmp_path / "placement.json"),
         "--group-timeout", "60", "--timeout", "120", "--", "generate", "--input", str(tmp_path / "in.jsonl"),
         "--output", str(tmp_path / "out.jsonl"), "--resume", "--max-new-tokens", "6", "--batch-size", "1",
         "--device", "cpu"],
        env=_env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in got] == [json.loads(x) for x in want]
    assert "5 prompts over 4 ranks (2, 1, 1, 1)" in proc.stderr and time.monotonic() - t0 < 120
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".moe-launch-")]
    rounds = {line.split("done: ")[1].split(" rounds")[0] for line in proc.stderr.splitlines() if "rounds," in line}
    assert len(rounds) == 1  # every rank joined every round: those with less work drained


def _drain(q):
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return


def test_launch_fails_fast_when_a_rank_dies(tmp_path):
    """Killing one rank mid-run ends the launcher with a non-zero exit and a message, well within the timeouts."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, "--nproc-per-node", "2", "--group-timeout", "20", "--self-check", "100000"],
        env=_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    # A reader thread, not select() on the buffered pipe: readline() may pull both ranks' lines into the
    # buffer at once, after which select() sees an empty pipe and the second line is never looked at.
    lines = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True)
    reader.start()
    pid, seen, deadline = None, "", time.monotonic() + 60
    try:
        while pid is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                continue
            seen += line
            if "rank 1/2 (pid " in line and "self-check" in line:
                pid = int(line.split("(pid ")[1].split(")")[0])
        assert pid is not None, seen[-2000:]
        time.sleep(1.0)  # let it reach the collectives
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
        reader.join(timeout=30)  # it ends at end of file, after the launcher's last line
        rest = "".join(_drain(lines))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 45
    assert "moe launch: error: a rank of the expert-parallel job failed or stopped responding" in rest


def test_launch_refuses_bad_requests_before_starting(tmp_path):
    """No command, a bad placement, or an existing output without --resume fail at once with a message."""
    _write_prompts(tmp_path / "in.jsonl")
    (tmp_path / "out.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(CliError, match="give the moe command to run after --"):
        _launch_in_process(["--nproc-per-node", "2"])
    with pytest.raises(FileNotFoundError, match="placement file"):
        _launch_in_process(["--placement", str(tmp_path / "nope.json"), "--", "generate"])
    ExpertPlacement.contiguous(4, 8, 4).save(tmp_path / "p4.json")
    with pytest.raises(ValueError, match="is for 4 ranks, the job has 2"):
        _launch_in_process(["--nproc-per-node", "2", "--placement", str(tmp_path / "p4.json"), "--", "generate"])
    with pytest.raises(ValueError, match="already exists and is not empty"):
        _launch_in_process(["--nproc-per-node", "2", "--", "generate", "--input", str(tmp_path / "in.jsonl"),
                            "--output", str(tmp_path / "out.jsonl")])
    with pytest.raises(ValueError, match="cannot launch itself"):
        _launch_in_process(["--", "launch"])
    from moe.comms.launch import LaunchConfig
    from moe.ep_launch import launch_job

    with pytest.raises(ValueError, match="replica dispatch must be"):
        launch_job(LaunchConfig(nproc_per_node=2), ["generate"], replica_dispatch="random")


def test_worker_passes_the_replica_dispatch_on():
    """`moe launch --replica-dispatch hash` reaches each rank's EPConfig through the worker's arguments."""
    from moe.ep import _parse_worker

    assert _parse_worker(["--replica-dispatch", "hash", "--", "generate"]).replica_dispatch == "hash"
    assert _parse_worker(["--", "generate"]).replica_dispatch == "balanced"


def test_enable_needs_a_wrapped_model():
    """Enabling EP on a model without HybridMoeBlocks names what is missing."""
    from moe.ep import enable_expert_parallel

    with pytest.raises(ValueError, match="has no HybridMoeBlock"):
        enable_expert_parallel(torch.nn.Linear(2, 2))


def test_shards_pad_empty_ranks_and_merge_keeps_input_order(tmp_path):
    """Ranks without prompts get one pad prompt; merging drops pads and torn lines and keeps input order."""
    from moe.ep_launch import _merge_outputs, _strip_options, _write_shards
    from moe.jsonl import PromptRecord

    records = [PromptRecord(id=i, prompt=f"p{i}", line=i + 1) for i in range(2)]
    assert _write_shards(records, 4, str(tmp_path)) == [1, 1, 0, 0]
    pad = json.loads((tmp_path / "shard-3.jsonl").read_text())
    assert pad["id"] == "__moe_launch_pad_3__" and pad["prompt"] == "p0"
    (tmp_path / "out-1.jsonl").write_text('{"id": 1, "completion": "b"}\n')
    (tmp_path / "out-3.jsonl").write_text('{"id": "__moe_launch_pad_3__", "completion": "x"}\n')
    (tmp_path / "out-0.jsonl").write_text('{"id": 0, "completion": "a"}\n{"id": 5, "compl')
    written, ranks = _merge_outputs(records, 4, str(tmp_path), str(tmp_path / "final.jsonl"))
    assert (written, ranks) == (2, [0, 1, 3])
    assert [json.loads(x)["id"] for x in (tmp_path / "final.jsonl").read_text().splitlines()] == [0, 1]
    argv = ["--input", "a", "--output=b", "--resume", "--max-new-tokens", "4"]
    assert _strip_options(argv, ("--input", "--output"), ("--resume",)) == ["--max-new-tokens", "4"]
