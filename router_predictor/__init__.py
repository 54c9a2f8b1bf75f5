"""Routing traces (record, import, file format) and routing-path predictors."""
from moe.router_predictor.trace import (
    TRACE_FORMAT,
    ImportReport,
    RoutingTrace,
    import_vllm_jsonl,
    load_trace,
    save_trace,
)

__all__ = ["RoutingTrace", "save_trace", "load_trace", "import_vllm_jsonl", "ImportReport", "TRACE_FORMAT"]
