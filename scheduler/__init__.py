"""Scheduler: cost model + calibration, intra-layer CPU/device planner, prefetch choice, executor.

Work reaches the scheduler as generic `WorkItem`s (no model architecture here):

    items --plan_layer(cost)--> LayerPlan --LayerExecutor.run(run_cpu, start_copy, run_device)-->
"""
from moe.scheduler.cost_model import AnalyticCostModel, CostModel
from moe.scheduler.makespan import Timeline, makespan, simulate
from moe.scheduler.planner import RULES, plan_layer
from moe.scheduler.work import LayerPlan, Placement, WorkItem

__all__ = [
    "AnalyticCostModel", "CostModel", "LayerPlan", "Placement", "RULES", "Timeline", "WorkItem",
    "makespan", "plan_layer", "simulate",
]
