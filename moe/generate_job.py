"""The `moe generate` job: JSONL prompts in, JSONL results out.

    read + validate the whole input -> (--resume) repair the output's tail, skip done ids
    -> load tokenizer, then model (demo MoE when no model is named)
    -> GenerationEngine, one output line written and flushed per finished prompt
    -> summary from the engine's timers and `moe.stats(model)`

Everything that can be checked before loading the model is checked first, so bad input
fails in seconds and costs no finished work.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

import moe
from moe.config import RuntimeConfig
from moe.demo import DEMO_DESCRIPTION, build_demo_model
from moe.generate import GenerateConfig, GenerationEngine, GenerationResult, RunSummary
from moe.jsonl import JsonlWriter, read_prompts, resume_output
from moe.loader import resolve_checkpoint

__all__ = ["GenerateJob", "run_job", "load_model", "load_tokenizer", "format_summary"]

# The `moe.stats` counters the summary reports; they are cumulative, so a run reports its delta.
_COUNTERS = ("cache_hits", "cache_misses", "h2d_bytes", "cpu_expert_calls", "gpu_expert_calls", "prefetch_hits")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(folder: str | os.PathLike):
    """`AutoTokenizer` from a local checkpoint folder (remote code stays off)."""
    from transformers import AutoTokenizer

    folder = os.fspath(folder)
    if not any(os.path.exists(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer files in model folder {folder}: expected one of {', '.join(_TOKENIZER_FILES)}"
        )
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load the tokenizer in {folder}: {reason}") from None


# Called with each model `load_model` returns, before any generation: how a launcher
# (e.g. `moe launch`, which enables expert parallelism) adapts the model of a job.
_load_hooks: list = []


def add_load_hook(fn) -> None:
    """Run fn(model) on every model load_model returns from now on in this process."""
    _load_hooks.append(fn)


# Called with the RuntimeConfig (or None) a job asks for, returning the one to load with:
# how `moe launch` makes each rank load only its own experts (RuntimeConfig.ep_shard).
_config_hooks: list = []


def add_config_hook(fn) -> None:
    """Load every model from now on in this process with fn(runtime_config_or_None)."""
    _config_hooks.append(fn)


def load_model(model_id: str | None, *, gpu_memory=None, dtype=None, device=None, runtime=None):
    """(wrapped model, tokenizer): the demo MoE when `model_id` is None, else the
    checkpoint (local folder or Hub id, HF_HUB_OFFLINE honoured) through
    `moe.from_pretrained`; the tokenizer loads first, so a missing one fails fast."""
    for hook in _config_hooks:
        runtime = hook(runtime)
    if model_id is None:
        model, tokenizer = build_demo_model(gpu_memory=gpu_memory, device=device, config=runtime,
                                            dtype=dtype or torch.float32)
    else:
        folder = resolve_checkpoint(model_id)
        tokenizer = load_tokenizer(folder)
        kwargs = {} if gpu_memory is None else {"gpu_memory": gpu_memory}
        model = moe.from_pretrained(str(folder), dtype=dtype, device=device, config=runtime, **kwargs)
    for hook in _load_hooks:
        hook(model)
    return model, tokenizer


@dataclass(kw_only=True)
class GenerateJob:
    """One `moe generate` run. input "-" is stdin, output None is stdout; gpu_memory None
    is the loader's default (for the demo: about half its experts fit)."""

    model: str | None = None
    input: str = "-"
    output: str | None = None
    resume: bool = False
    gpu_memory: int | str | None = None
    device: str | None = None
    dtype: torch.dtype | None = None
    runtime: RuntimeConfig | None = None
    generation: GenerateConfig = field(default_factory=GenerateConfig)
    progress: bool | None = None  # None: only when stderr is a terminal

    def __post_init__(self) -> None:
        if self.output == "-":
            self.output = None
        if self.resume and self.output is None:
            raise ValueError("--resume needs --output FILE: results written to stdout cannot be resumed")


def run_job(job: GenerateJob, *, log: Callable[[str], None]) -> RunSummary | None:
    """Validate the input, skip finished ids, generate the rest, log a summary.

    Returns the engine's summary, or None when nothing was left to do.
    """
    if job.input == "-" and sys.stdin.isatty():
        log("reading prompts from stdin, one JSON object per line; end with Ctrl-D (or pass --input FILE.jsonl)")
    records = read_prompts(job.input)
    done: set = set()
    if job.output is not None:
        if job.input != "-" and os.path.exists(job.output) and os.path.samefile(job.input, job.output):
            raise ValueError(f"--output {job.output} is the input file; choose another output")
        if job.resume:
            done = resume_output(job.output, warn=log)
        elif os.path.exists(job.output) and os.path.getsize(job.output) > 0:
            raise ValueError(
                f"output {job.output} already exists and is not empty: pass --resume to continue it, "
                "or choose another --output"
            )
    pending = [r for r in records if r.id not in done]
    if done:
        log(f"resuming {job.output}: {len(records) - len(pending)} of {len(records)} prompts already done")
        unknown = len(done) - (len(records) - len(pending))
        if unknown:
            log(f"note: {unknown} ids in {job.output} are not in the input; they are left as they are")
    if not pending:
        log("nothing left to generate")
        return None

    log(f"no --model given: using the {DEMO_DESCRIPTION}" if job.model is None else f"loading {job.model}")
    model, tokenizer = load_model(
        job.model, gpu_memory=job.gpu_memory, dtype=job.dtype, device=job.device, runtime=job.runtime
    )
    engine = GenerationEngine(model, tokenizer, config=job.generation)
    before = moe.stats(model)
    disable = None if job.progress is None else not job.progress  # tqdm: None = off unless a tty
    bar = tqdm(total=len(pending), unit="prompt", file=sys.stderr, disable=disable)
    generated = 0
    with JsonlWriter(job.output) as writer, bar:

        def on_result(result: GenerationResult) -> None:
            nonlocal generated
            writer.write(result.to_record())
            generated += result.completion_tokens
            bar.set_postfix_str(f"{generated} tokens", refresh=False)
            bar.update(1)

        summary = engine.run(pending, on_result)
    after = moe.stats(model)
    delta = {k: after[k] - before.get(k, 0) for k in _COUNTERS if k in after}
    log(format_summary(summary, delta))
    return summary


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:,.1f} tok/s" if seconds > 0 else "n/a"


def _bytes(n: float) -> str:
    if n < 1024:
        return f"{n:,.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}"


def format_summary(summary: RunSummary, stats: dict) -> str:
    """Closing summary: throughput, and expert cache/placement counters from `moe.stats`."""
    hits, misses = stats.get("cache_hits", 0), stats.get("cache_misses", 0)
    hit_rate = f"{100.0 * hits / (hits + misses):.1f}%" if hits + misses else "n/a"
    batches = f"{summary.batches} batch" + ("" if summary.batches == 1 else "es")
    return "\n".join([
        f"done: {summary.prompts} prompts in {batches}, {summary.prompt_tokens} prompt tokens, "
        f"{summary.completion_tokens} generated tokens in {summary.generate_s:.2f} s",
        f"  throughput: prefill {_rate(summary.prompt_tokens, summary.prefill_s)}, "
        f"decode {_rate(summary.decode_tokens, summary.decode_s)}, "
        f"generated {_rate(summary.completion_tokens, summary.generate_s)} overall",
        f"  expert cache: hit rate {hit_rate} ({hits} hits, {misses} misses, "
        f"{stats.get('prefetch_hits', 0)} prefetch hits)",
        f"  expert calls: {stats.get('cpu_expert_calls', 0)} on CPU, {stats.get('gpu_expert_calls', 0)} on device; "
        f"copied {_bytes(stats.get('h2d_bytes', 0))} host->device",
    ])
