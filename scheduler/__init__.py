"""Scheduler: cost model + calibration, intra-layer CPU/device planner, prefetch choice, executor.

Work reaches the scheduler as generic `WorkItem`s (no model architecture here):

    items --LayerPlanner.plan / plan_layer(cost)--> LayerPlan
          --LayerExecutor.run(run_cpu, start_copy, run_device)--> done
    forecast of later layers --choose_prefetch--> keys to copy now

The cost model comes from `load_profile()` (a `moe calibrate` profile, else analytic
defaults). `moe.scheduler.calibrate` (measurements, imports torch) and
`moe.scheduler.exhaustive` (reference optimum) are imported on demand.
"""
from moe.scheduler.cost_model import AnalyticCostModel, CostModel
from moe.scheduler.executor import LayerExecutor
from moe.scheduler.makespan import Timeline, makespan, simulate
from moe.scheduler.planner import RULES, LayerPlanner, plan_layer
from moe.scheduler.prefetch import LayerForecast, choose_prefetch
from moe.scheduler.profile import default_profile_path, load_profile, save_profile
from moe.scheduler.work import LayerPlan, Placement, WorkItem

__all__ = [
    "AnalyticCostModel", "CostModel", "LayerExecutor", "LayerForecast", "LayerPlan", "LayerPlanner",
    "Placement", "RULES", "Timeline", "WorkItem", "choose_prefetch", "default_profile_path",
    "load_profile", "makespan", "plan_layer", "save_profile", "simulate",
]
