"""Expert parallelism on torch.distributed and speculative expert pre-scheduling.

- `placement`: which rank holds which experts (contiguous, EPLB-style replicas, JSON files).
- `dispatch`: deduplicated all_to_all dispatch/combine and the plain-torch reference.
- `ep`: `ExpertParallel`, the per-layer executor, with a drain protocol for lockstep.
- `group`: process groups with timeouts (torchrun env, or local gloo processes).
- `launch`: torchrun runner with bounded failure time; `selfcheck`: distributed check
  of the executor against the reference.
- `grouping`, `shuffle`, `replay`, `a2a_bench`: offline expert grouping, online token
  shuffling, and the all-to-all replay that measures them on routing traces.
"""
from moe.comms.dispatch import plan_dispatch, reference_moe
from moe.comms.ep import EPConfig, ExpertParallel
from moe.comms.group import GroupConfig, init_from_env, run_local
from moe.comms.placement import ExpertPlacement

__all__ = ["ExpertPlacement", "ExpertParallel", "EPConfig", "GroupConfig", "init_from_env", "run_local",
           "plan_dispatch", "reference_moe"]
