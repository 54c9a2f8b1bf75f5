"""Routing traces (record, import, file format) and routing-path predictors."""
from moe.router_predictor.evaluate import forecast_table, make_forecaster, recall_at_k
from moe.router_predictor.learned import LearnedConfig, LearnedPathPredictor, train_path_predictor
from moe.router_predictor.predictors import (
    FrequencyPredictor,
    GateLookaheadPredictor,
    RoutingContext,
    RoutingPredictor,
    TransitionConfig,
    TransitionPredictor,
)
from moe.router_predictor.trace import (
    TRACE_FORMAT,
    ImportReport,
    RoutingTrace,
    import_vllm_jsonl,
    load_trace,
    save_trace,
)

__all__ = [
    "RoutingTrace", "save_trace", "load_trace", "import_vllm_jsonl", "ImportReport", "TRACE_FORMAT",
    "RoutingContext", "RoutingPredictor", "FrequencyPredictor", "TransitionPredictor", "TransitionConfig",
    "GateLookaheadPredictor", "LearnedConfig", "LearnedPathPredictor", "train_path_predictor",
    "recall_at_k", "forecast_table", "make_forecaster",
]
