"""Distributed self-check of expert parallelism against the single-process reference.

Every rank builds the same random SwiGLU experts from a shared seed, routes its own
random tokens through `ExpertParallel`, and compares with `reference_moe` computed
locally over all experts. Ranks run different numbers of steps and tokens (zero
included) and drain when done, which exercises the lockstep protocol. Used by the tests
and by `moe launch --self-check` to validate a cluster before a long job.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe.comms.dispatch import reference_moe
from moe.comms.ep import EPConfig, ExpertParallel
from moe.comms.placement import ExpertPlacement

__all__ = ["CheckCase", "SwigluExperts", "check_rank", "TOLERANCES"]

# (atol, rtol) by dtype of the activations.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10),
              torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


@dataclass(frozen=True, kw_only=True)
class CheckCase:
    """One configuration: L layers, E experts, top-K, hidden D, expert hidden F,
    up to `max_tokens` tokens per step, `steps` steps on rank 0 (rank r runs fewer),
    `replicas` extra expert slots per rank, activations in `dtype`, replicas chosen by
    `replica_dispatch` (EPConfig)."""

    layers: int = 2
    experts: int = 8
    k: int = 2
    d: int = 16
    f: int = 24
    max_tokens: int = 9
    steps: int = 3
    replicas: int = 0
    dtype: torch.dtype = torch.float32
    replica_dispatch: str = "balanced"

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.experts:
            raise ValueError(f"k must lie in [1, experts={self.experts}], got {self.k}")
        if min(self.layers, self.d, self.f, self.steps) < 1 or self.max_tokens < 0:
            raise ValueError("layers, d, f, steps must be >= 1 and max_tokens >= 0")


class SwigluExperts:
    """Random experts w13_L E 2F D, w2_L E D F shared by every rank (same seed)."""

    def __init__(self, case: CheckCase, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        shape = (case.layers, case.experts)
        self.w13_LE2FD = torch.randn(*shape, 2 * case.f, case.d, generator=g) / case.d ** 0.5
        self.w2_LEDF = torch.randn(*shape, case.d, case.f, generator=g) / case.f ** 0.5
        self.f = case.f

    def __call__(self, layer: int, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        h_N2F = x_ND.double() @ self.w13_LE2FD[layer, e].double().T
        a_NF = torch.nn.functional.silu(h_N2F[:, : self.f]) * h_N2F[:, self.f:]
        return (a_NF @ self.w2_LEDF[layer, e].double().T).to(x_ND.dtype)


def _route(x_TD: torch.Tensor, case: CheckCase, g: torch.Generator):
    logits_TE = torch.randn(x_TD.shape[0], case.experts, generator=g)
    w_TK, ids_TK = torch.softmax(logits_TE, -1).topk(case.k, dim=-1)
    return ids_TK, w_TK / w_TK.sum(-1, keepdim=True)


def check_rank(rank: int, world_size: int, cases: tuple[CheckCase, ...], group=None) -> int:
    """Run every case on this rank; raise AssertionError on any mismatch. Returns #checks."""
    checks = 0
    for case in cases:
        experts = SwigluExperts(case)
        placement = ExpertPlacement.contiguous(case.layers, case.experts, world_size) \
            if case.experts >= world_size else ExpertPlacement(
                holds_LER=torch.ones(case.layers, case.experts, world_size, dtype=torch.bool))
        if case.replicas:
            load_LE = torch.arange(case.experts, 0, -1).double().expand(case.layers, -1)
            placement = placement.with_replicas(load_LE, case.replicas)
        ep = ExpertParallel(placement=placement, expert_fn=experts, group=group,
                            config=EPConfig(replica_dispatch=case.replica_dispatch))
        g = torch.Generator().manual_seed(1000 + rank)
        steps = max(1, case.steps - rank)  # uneven work: later ranks drain early
        for step in range(steps):
            T = int(torch.randint(0, case.max_tokens + 1, (1,), generator=g)) if rank % 2 else case.max_tokens
            x_TD = torch.randn(T, case.d, generator=g).to(case.dtype)
            for layer in range(case.layers):
                ids_TK, w_TK = _route(x_TD, case, g)
                got_TD = ep(layer, x_TD, ids_TK, w_TK)
                want_TD = reference_moe(x_TD, ids_TK, w_TK, lambda e, x: experts(layer, e, x))
                atol, rtol = TOLERANCES[case.dtype]
                torch.testing.assert_close(got_TD, want_TD, atol=atol, rtol=rtol,
                                           msg=lambda m: f"rank {rank} {case} step {step} layer {layer}: {m}")
                checks += 1
                x_TD = (x_TD + got_TD).to(case.dtype)
        ep.drain()
    if dist.is_initialized():
        dist.barrier(group)
    return checks
