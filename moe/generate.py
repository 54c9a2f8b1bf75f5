"""Batch generation engine: prompt records in, one result per record out through a callback.

    records --tokenize--> prompt ids (validated against the context length up front)
            --plan------> batches (fixed size in input order, or "auto": longest first,
                          sized to a token budget so padding and KV memory stay bounded)
            --generate--> HF `model.generate` on a left-padded batch + attention mask
            --on_result-> GenerationResult per row, as soon as its batch finishes

Greedy by default. With temperature > 0 every row samples with its own generator seeded
from (seed, record id) through the Gumbel-max trick, so a sampled completion does not
depend on which other prompts share its batch: runs are reproducible with the same seed,
and a resumed run gives what an uninterrupted one would have.

The engine holds no global state and only needs `encode`/`decode` from the tokenizer, so
a caller can feed it any shard of the records (one rank's share in expert parallelism).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from moe.jsonl import PromptRecord

__all__ = [
    "GenerateConfig",
    "GenerationResult",
    "RunSummary",
    "GenerationEngine",
    "generate_records",
    "plan_batches",
    "parse_batch_size",
]


def parse_batch_size(value: int | str) -> int | str:
    """`"auto"` or a positive int (also from a string such as "8")."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"batch size must be a positive integer or 'auto', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"batch size must be a positive integer or 'auto', got {value!r}")
    return value


@dataclass(kw_only=True)
class GenerateConfig:
    """How prompts are batched and decoded.

    max_new_tokens: generated tokens per prompt at most (eos stops a row earlier).
    batch_size: rows per `generate` call, or "auto" (see `plan_batches`).
    temperature: 0 is greedy; > 0 samples from softmax(logits / temperature).
    seed: with temperature > 0, the seed each row's generator derives from.
    token_budget: "auto" only: most padded (prompt + new) tokens in one batch.
    max_batch_size: "auto" only: most rows in one batch.
    """

    max_new_tokens: int = 128
    batch_size: int | str = "auto"
    temperature: float = 0.0
    seed: int = 0
    token_budget: int = 16384
    max_batch_size: int = 64

    def __post_init__(self) -> None:
        self.batch_size = parse_batch_size(self.batch_size)
        for name in ("max_new_tokens", "token_budget", "max_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    """One finished prompt. completion_tokens counts every generated token, eos included;
    finish_reason is "stop" (eos) or "length" (max_new_tokens)."""

    id: str | int
    completion: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str

    def to_record(self) -> dict:
        """The output JSONL object."""
        return {
            "id": self.id,
            "completion": self.completion,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
        }


@dataclass(kw_only=True)
class RunSummary:
    """Counters of one engine run. Prefill time ends when the first logits of a batch are
    ready; decode time is the rest of that batch's `generate` call."""

    prompts: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decode_tokens: int = 0  # generated after each row's first token, i.e. by decode steps
    prefill_s: float = 0.0
    decode_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def generate_s(self) -> float:
        return self.prefill_s + self.decode_s


def plan_batches(
    lengths_P: Sequence[int], *, batch_size: int | str, max_new_tokens: int, token_budget: int, max_batch_size: int
) -> list[list[int]]:
    """Group prompt indices into batches; every index appears exactly once.

    Fixed `batch_size`: consecutive chunks in input order. "auto": prompts sorted longest
    first (ties by index), so each batch pads little and the largest batch, the one most
    likely to run out of memory, comes first; a batch grows while rows * (longest prompt
    + max_new_tokens) stays within `token_budget` and rows <= `max_batch_size`. A prompt
    that alone exceeds the budget still gets a batch of its own.
    """
    n = len(lengths_P)
    if batch_size != "auto":
        return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    order = sorted(range(n), key=lambda i: (-lengths_P[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths_P[current[0]] if current else lengths_P[i]
        if current and (
            len(current) >= max_batch_size or (len(current) + 1) * (longest + max_new_tokens) > token_budget
        ):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _row_seed(seed: int, record_id) -> int:
    digest = hashlib.sha256(f"{seed}:{json.dumps(record_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class _GumbelSampler:
    """Logits processor that turns greedy argmax into per-row sampling.

    argmax(logits / T + Gumbel noise) is a draw from softmax(logits / T); the noise of
    row b comes from its own generator, so rows never share random state.
    """

    def __init__(self, temperature: float, seeds_B: Sequence[int]):
        self.temperature = temperature
        self.generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds_B]

    def __call__(self, input_ids_BS, scores_BV):
        vocab = scores_BV.shape[-1]
        u_BV = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in self.generators])
        u_BV = u_BV.clamp_(min=1e-20, max=1.0 - 1e-16)
        gumbel_BV = -torch.log(-torch.log(u_BV))
        return scores_BV.float() / self.temperature + gumbel_BV.to(scores_BV.device, torch.float32)


class _PrefillClock:
    """Pass-through logits processor that timestamps the first logits of a batch."""

    def __init__(self):
        self.first_logits_at: float | None = None

    def __call__(self, input_ids_BS, scores_BV):
        if self.first_logits_at is None:
            if scores_BV.is_cuda:
                torch.cuda.synchronize(scores_BV.device)
            self.first_logits_at = time.perf_counter()
        return scores_BV


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


class GenerationEngine:
    """Runs batches of prompt records through `model.generate` (see module docstring)."""

    def __init__(self, model, tokenizer, *, config: GenerateConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        model_eos = _as_id_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
        self.eos_ids = sorted(set(_as_id_list(getattr(tokenizer, "eos_token_id", None)) + model_eos))
        if not self.eos_ids:
            raise ValueError("the tokenizer and the model's generation_config define no eos token id")
        pad = getattr(tokenizer, "pad_token_id", None)
        # Many causal LMs ship without a pad token; padded positions are masked out anyway.
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        self.max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.device = model.get_input_embeddings().weight.device

    def tokenize(self, records: Sequence[PromptRecord]) -> list[list[int]]:
        """Prompt ids per record; raises ValueError naming the record if one cannot run."""
        ids_P = []
        for rec in records:
            ids = list(self.tokenizer.encode(rec.prompt))
            if not ids:
                raise ValueError(f"line {rec.line} (id {rec.id!r}): the prompt encodes to no tokens")
            total = len(ids) + self.config.max_new_tokens
            if self.max_positions is not None and total > self.max_positions:
                raise ValueError(
                    f"line {rec.line} (id {rec.id!r}): {len(ids)} prompt tokens + max_new_tokens "
                    f"{self.config.max_new_tokens} = {total} exceeds the model's context of {self.max_positions}"
                )
            ids_P.append(ids)
        return ids_P

    def run(self, records: Iterable[PromptRecord], on_result: Callable[[GenerationResult], None]) -> RunSummary:
        """Generate every record; `on_result` gets each result as soon as its batch is done.

        All prompts are tokenized and checked before the first batch runs.
        """
        records = list(records)
        ids_P = self.tokenize(records)
        cfg = self.config
        summary = RunSummary()
        batches = plan_batches(
            [len(ids) for ids in ids_P],
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            token_budget=cfg.token_budget,
            max_batch_size=cfg.max_batch_size,
        )
        for batch in batches:
            results = self._generate_batch([records[i] for i in batch], [ids_P[i] for i in batch], summary)
            for result in results:
                on_result(result)
        return summary

    def _generate_batch(self, records, ids_B, summary: RunSummary) -> list[GenerationResult]:
        from transformers import GenerationConfig, LogitsProcessorList

        cfg = self.config
        rows, width = len(ids_B), max(len(ids) for ids in ids_B)
        input_ids_BS = torch.full((rows, width), self.pad_id, dtype=torch.long)
        attention_mask_BS = torch.zeros((rows, width), dtype=torch.long)
        for b, ids in enumerate(ids_B):  # left padding: every row's last token is at -1
            input_ids_BS[b, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask_BS[b, width - len(ids):] = 1
        gen_config = GenerationConfig(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,  # sampling, when asked for, is done by _GumbelSampler
            num_beams=1,
            repetition_penalty=1.0,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
        )
        clock = _PrefillClock()
        processors = LogitsProcessorList([clock])
        if cfg.temperature > 0:
            processors.append(_GumbelSampler(cfg.temperature, [_row_seed(cfg.seed, r.id) for r in records]))
        start = time.perf_counter()
        # no_grad rather than inference_mode: buffers the runtime allocates lazily during this
        # call must stay usable by later calls made outside inference mode.
        with torch.no_grad():
            out_BT = self.model.generate(
                input_ids=input_ids_BS.to(self.device),
                attention_mask=attention_mask_BS.to(self.device),
                generation_config=gen_config,
                logits_processor=processors,
            )
        new_BN = out_BT[:, width:].cpu()
        end = time.perf_counter()
        first = clock.first_logits_at if clock.first_logits_at is not None else end

        results = [self._result(rec, ids, row) for rec, ids, row in zip(records, ids_B, new_BN.tolist())]
        summary.prompts += rows
        summary.batches += 1
        summary.batch_sizes.append(rows)
        summary.prompt_tokens += sum(len(ids) for ids in ids_B)
        summary.completion_tokens += sum(r.completion_tokens for r in results)
        summary.decode_tokens += sum(max(r.completion_tokens - 1, 0) for r in results)
        summary.prefill_s += first - start
        summary.decode_s += end - first
        return results

    def _result(self, record: PromptRecord, prompt_ids: list[int], new_ids: list[int]) -> GenerationResult:
        eos = set(self.eos_ids)
        stop = next((i for i, t in enumerate(new_ids) if t in eos), None)
        # Rows that finish early are filled with pad up to the batch's length; text ends at eos.
        kept = new_ids if stop is None else new_ids[:stop]
        return GenerationResult(
            id=record.id,
            completion=self.tokenizer.decode(kept, skip_special_tokens=True),
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(new_ids) if stop is None else stop + 1,
            finish_reason="length" if stop is None else "stop",
        )


def generate_records(
    model,
    tokenizer,
    records: Iterable[PromptRecord],
    *,
    max_new_tokens: int = 128,
    batch_size: int | str = "auto",
    temperature: float = 0.0,
    seed: int = 0,
    on_result: Callable[[GenerationResult], None],
) -> RunSummary:
    """Generate a completion for every record; see `GenerationEngine`."""
    config = GenerateConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature, seed=seed)
    return GenerationEngine(model, tokenizer, config=config).run(records, on_result)
