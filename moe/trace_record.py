"""Record routing traces from a running model (the glue between runtime and recorder).

Each prompt runs as its own sequence, batch 1: prefill, then greedy decode through
`model.generate`, so a sequence's tokens are contiguous in the trace (prompt tokens, then
one token per decode step; the last generated token is never fed back, so a sequence
holds prompt + max_new_tokens - 1 tokens when generation does not stop early).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from moe.router_predictor.recorder import TraceRecorder
from moe.router_predictor.trace import RoutingTrace, save_trace

__all__ = ["record_trace", "record_trace_file"]


def _num_experts(model) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _model_device(model) -> torch.device:
    try:
        return next(p.device for p in model.parameters() if p.device.type != "meta")
    except StopIteration:
        return torch.device("cpu")


def record_trace(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 16, model_name: str = "",
                 source: str = "") -> RoutingTrace:
    """Run every prompt through `model` (wrapped by moe.wrap) and return its routing trace."""
    from moe.wrapper import add_routing_observer

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        raise ValueError("no prompts to record")
    rec = TraceRecorder()
    handle = add_routing_observer(model, rec.observe)
    device = _model_device(model)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    try:
        for i, prompt in enumerate(prompts):
            ids = list(tokenizer.encode(prompt))
            if not ids:
                raise ValueError(f"prompt {i} encodes to no tokens")
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            rec.begin_sequence()
            try:
                with torch.no_grad():
                    kw = {} if pad is None else {"pad_token_id": pad}
                    model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   max_new_tokens=max_new_tokens, do_sample=False, **kw)
            finally:
                rec.end_sequence()
    finally:
        handle.remove()
    return rec.trace(num_experts=_num_experts(model), model=model_name, source=source)


def record_trace_file(*, model: str | None, input: str, output: str, max_new_tokens: int = 16,
                      gpu_memory=None, device=None) -> tuple[RoutingTrace, int]:
    """`moe trace record`: prompts from a JSONL file (`id`, `prompt` per line) -> trace file.

    model None runs the built-in demo MoE. Returns (trace, number of prompts).
    """
    from moe.generate_job import load_model
    from moe.jsonl import read_prompts

    records = read_prompts(input)
    net, tokenizer = load_model(model, gpu_memory=gpu_memory, device=device)
    trace = record_trace(net, tokenizer, [r.prompt for r in records], max_new_tokens=max_new_tokens,
                         model_name=model or "demo", source=f"record:{os.path.basename(str(input))}")
    save_trace(trace, output)
    return trace, len(records)
