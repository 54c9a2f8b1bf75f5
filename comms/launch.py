"""Run a Python module on every rank through torchrun, with a bounded failure time.

Why a job cannot hang: torchrun runs with `--max-restarts 0`, so when a rank dies its
monitor stops the others and exits non-zero. When a rank hangs, the ranks waiting for it
in a collective give up after the process group's timeout (comms.group) and exit
non-zero, and torchrun stops the rest: SIGTERM, then SIGKILL for a rank frozen so hard
that it ignores SIGTERM (after torchrun's fixed 30 s grace when a rank failed, after
`shutdown_timeout_s` when the job is stopped from outside). An optional wall-clock limit here kills the
whole process group of a job that overruns for any other reason.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

__all__ = ["LaunchConfig", "torchrun_command", "run_torchrun", "TIMEOUT_EXIT"]

TIMEOUT_EXIT = 124  # like coreutils `timeout`


@dataclass(kw_only=True)
class LaunchConfig:
    """torchrun settings. Single node with no rendezvous given: `--standalone` (free port).

    nproc_per_node: ranks on this node. nnodes: "N" or "MIN:MAX".
    timeout_s: wall-clock limit of the whole job (None: none beyond the group timeouts).
    monitor_interval_s: how often torchrun checks its workers.
    shutdown_timeout_s: when the job is stopped from outside (timeout, Ctrl-C), how long
        torchrun lets the ranks exit after SIGTERM before it kills them.
    extra: further torchrun options, passed through as given.
    """

    nproc_per_node: int = 1
    nnodes: str = "1"
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_backend: str | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    monitor_interval_s: float = 0.5
    shutdown_timeout_s: int = 5
    timeout_s: float | None = None
    extra: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"--timeout must be > 0 seconds, got {self.timeout_s}")
        if not (self.monitor_interval_s > 0 and self.shutdown_timeout_s > 0):
            raise ValueError("monitor interval and shutdown timeout must be > 0 seconds, got "
                             f"{self.monitor_interval_s} and {self.shutdown_timeout_s}")

    @property
    def single_node(self) -> bool:
        return self.nnodes in ("1", "1:1") and not (self.rdzv_endpoint or self.master_addr)


def torchrun_command(config: LaunchConfig, module: str, args: list[str]) -> list[str]:
    """argv of `python -m torch.distributed.run ... -m module args...`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(config.nproc_per_node),
           "--nnodes", config.nnodes, "--max-restarts", "0",
           "--monitor-interval", str(config.monitor_interval_s),
           "--shutdown-timeout", str(config.shutdown_timeout_s)]
    if config.single_node:
        cmd.append("--standalone")
    for flag, value in (("--node-rank", config.node_rank), ("--master-addr", config.master_addr),
                        ("--master-port", config.master_port), ("--rdzv-backend", config.rdzv_backend),
                        ("--rdzv-endpoint", config.rdzv_endpoint), ("--rdzv-id", config.rdzv_id)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + list(config.extra) + ["-m", module, *args]


def run_torchrun(config: LaunchConfig, module: str, args: list[str], *, env: dict | None = None) -> int:
    """Run the job and return its exit status (TIMEOUT_EXIT if the wall-clock limit hit).

    torchrun gets its own session so that a timeout can stop it and every rank at once.
    """
    proc = subprocess.Popen(torchrun_command(config, module, args), env=env, start_new_session=True)
    try:
        return proc.wait(timeout=config.timeout_s)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        return TIMEOUT_EXIT
    except KeyboardInterrupt:
        _stop_group(proc)
        raise


def _stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM torchrun's process group, then SIGKILL what is left after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
