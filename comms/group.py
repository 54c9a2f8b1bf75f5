"""Process groups for expert parallelism: start from torchrun's environment, or locally.

A collective waits for every rank. A rank that dies or hangs must not leave the others
blocked forever, so every group here is created with a finite timeout: a collective that
waits longer raises on the ranks still alive, they exit non-zero, and torchrun's monitor
then stops the whole job.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["GroupConfig", "init_from_env", "find_free_port", "run_local"]


@dataclass(kw_only=True)
class GroupConfig:
    """backend: "gloo", "nccl" or None (nccl with CUDA, else gloo).
    timeout_s: how long a collective may wait for a peer before it raises.
    """

    backend: str | None = None
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo', 'nccl' or None, got {self.backend!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {self.timeout_s}")

    def resolved_backend(self) -> str:
        return self.backend or ("nccl" if torch.cuda.is_available() else "gloo")


def init_from_env(config: GroupConfig | None = None) -> dist.ProcessGroup:
    """Join the default process group from RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.

    Idempotent: returns the existing default group if one is up. With nccl, binds this
    process to GPU LOCAL_RANK first.
    """
    if dist.is_initialized():
        return dist.group.WORLD
    config = config or GroupConfig()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"expert parallelism needs the torchrun environment; {', '.join(missing)} "
                           "not set (start the job with `moe launch`)")
    backend = config.resolved_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=config.timeout_s))
    return dist.group.WORLD


def find_free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_worker(rank: int, world_size: int, port: int, timeout_s: float, fn: Callable, args: tuple):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # R processes share the cores
    init_from_env(GroupConfig(backend="gloo", timeout_s=timeout_s))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_local(world_size: int, fn: Callable, *args, timeout_s: float = 60.0) -> None:
    """Run fn(rank, world_size, *args) in `world_size` gloo processes on loopback.

    fn must be a module-level function (it is pickled into the children). Raises if any
    rank raises; the group timeout bounds how long the others wait.
    """
    mp.start_processes(_local_worker, args=(world_size, find_free_port(), timeout_s, fn, args),
                       nprocs=world_size, join=True, start_method="spawn")
