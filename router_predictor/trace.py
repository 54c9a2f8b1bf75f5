"""Routing traces: which experts every token chose at every MoE layer.

Shape key: T tokens (all sequences, concatenated), L MoE layers, K top-k, S sequences.

File format (`moe-trace/1`): one safetensors file with
    expert_ids  int16   [T, L, K]   expert chosen by token t at layer l, rank k
    weights     float16 [T, L, K]   its routing weight (optional)
    seq_starts  int64   [S + 1]     token offsets: sequence s is rows seq_starts[s]:seq_starts[s+1]
and string metadata `format=moe-trace/1`, `model`, `num_experts`, `top_k`, `source`.
Tokens of one sequence are contiguous and in generation order, so "token t+1" is the
next token of the same sequence unless t+1 == seq_starts[s+1].
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["RoutingTrace", "save_trace", "load_trace", "import_vllm_jsonl", "ImportReport", "TRACE_FORMAT"]

TRACE_FORMAT = "moe-trace/1"
_MAX_EXPERTS = torch.iinfo(torch.int16).max  # ids are stored as int16


@dataclass(kw_only=True)
class RoutingTrace:
    """Top-k routing of T tokens over L MoE layers; validated on construction.

    expert_ids: int16 [T, L, K], every id in [0, num_experts).
    seq_starts: int64 [S + 1], non-decreasing, seq_starts[0] == 0, seq_starts[-1] == T.
    weights: float16 [T, L, K] or None.
    """

    expert_ids: torch.Tensor  # int16 [T, L, K]
    seq_starts: torch.Tensor  # int64 [S + 1]
    num_experts: int
    top_k: int
    weights: torch.Tensor | None = None  # float16 [T, L, K]
    model: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        ids = self.expert_ids
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int16 or ids.dim() != 3:
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"trace expert_ids must be an int16 tensor [tokens, layers, k], got {got}")
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or not (
            1 <= self.num_experts <= _MAX_EXPERTS
        ):
            raise ValueError(f"trace num_experts must be an int in [1, {_MAX_EXPERTS}], got {self.num_experts!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not (1 <= self.top_k <= self.num_experts):
            raise ValueError(f"trace top_k must be an int in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        if ids.shape[2] != self.top_k:
            raise ValueError(f"trace expert_ids has k={ids.shape[2]} per layer but top_k={self.top_k}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_experts):
            raise ValueError(
                f"trace expert_ids must lie in [0, {self.num_experts}), found "
                f"min {int(ids.min())} and max {int(ids.max())}"
            )
        s = self.seq_starts
        if not isinstance(s, torch.Tensor) or s.dtype != torch.int64 or s.dim() != 1 or s.numel() < 1:
            got = f"{s.dtype} {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"trace seq_starts must be an int64 tensor [sequences + 1], got {got}")
        if int(s[0]) != 0 or int(s[-1]) != ids.shape[0] or bool((s[1:] < s[:-1]).any()):
            raise ValueError(
                f"trace seq_starts must rise from 0 to the token count {ids.shape[0]}, "
                f"got {s[:4].tolist()}...{s[-2:].tolist()}"
            )
        w = self.weights
        if w is not None:
            if not isinstance(w, torch.Tensor) or w.dtype != torch.float16 or w.shape != ids.shape:
                got = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
                raise ValueError(f"trace weights must be float16 {tuple(ids.shape)} like expert_ids, got {got}")
        if not isinstance(self.model, str) or not isinstance(self.source, str):
            raise ValueError("trace model and source must be strings")

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def num_sequences(self) -> int:
        return int(self.seq_starts.numel() - 1)

    def sequence_ids(self) -> torch.Tensor:
        """int64 [T]: the sequence each token belongs to."""
        lengths_S = self.seq_starts[1:] - self.seq_starts[:-1]
        return torch.repeat_interleave(torch.arange(self.num_sequences), lengths_S)

    def next_in_sequence(self) -> torch.Tensor:
        """bool [T]: token t+1 exists and belongs to the same sequence as token t."""
        ok_T = torch.ones(self.num_tokens, dtype=torch.bool)
        ends_S = self.seq_starts[1:]
        ok_T[ends_S[ends_S > self.seq_starts[:-1]] - 1] = False  # last token of each non-empty sequence
        return ok_T

    def select_sequences(self, seqs: list[int] | range) -> "RoutingTrace":
        """A new trace holding the given sequences, in the given order."""
        starts = self.seq_starts.tolist()
        rows = [torch.arange(starts[s], starts[s + 1]) for s in seqs]
        idx_T = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        lengths = [starts[s + 1] - starts[s] for s in seqs]
        new_starts = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
        return RoutingTrace(
            expert_ids=self.expert_ids[idx_T].contiguous(),
            seq_starts=new_starts,
            num_experts=self.num_experts,
            top_k=self.top_k,
            weights=None if self.weights is None else self.weights[idx_T].contiguous(),
            model=self.model,
            source=self.source,
        )


def save_trace(trace: RoutingTrace, path) -> None:
    """Write `trace` as a `moe-trace/1` safetensors file."""
    tensors = {"expert_ids": trace.expert_ids.contiguous(), "seq_starts": trace.seq_starts.contiguous()}
    if trace.weights is not None:
        tensors["weights"] = trace.weights.contiguous()
    meta = {
        "format": TRACE_FORMAT,
        "model": trace.model,
        "num_experts": str(trace.num_experts),
        "top_k": str(trace.top_k),
        "source": trace.source,
    }
    save_file(tensors, os.fspath(path), metadata=meta)


def load_trace(path) -> RoutingTrace:
    """Read and validate a `moe-trace/1` safetensors file (format, dtypes, shapes, id range)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"routing trace {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            tensors = {name: f.get_tensor(name) for name in names}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"cannot read routing trace {path!r} as safetensors: {exc}") from None
    if meta.get("format") != TRACE_FORMAT:
        raise ValueError(
            f"{path!r} is not a routing trace: metadata format is {meta.get('format')!r}, expected {TRACE_FORMAT!r}"
        )
    for name in ("expert_ids", "seq_starts"):
        if name not in tensors:
            raise ValueError(f"routing trace {path!r} lacks the tensor {name!r}")
    extra = names - {"expert_ids", "seq_starts", "weights"}
    if extra:
        raise ValueError(f"routing trace {path!r} holds unexpected tensors {sorted(extra)}")
    ints = {}
    for key in ("num_experts", "top_k"):
        try:
            ints[key] = int(meta[key])
        except (KeyError, ValueError):
            raise ValueError(
                f"routing trace {path!r} metadata {key!r} must be an integer, got {meta.get(key)!r}"
            ) from None
    try:
        return RoutingTrace(
            expert_ids=tensors["expert_ids"],
            seq_starts=tensors["seq_starts"],
            weights=tensors.get("weights"),
            num_experts=ints["num_experts"],
            top_k=ints["top_k"],
            model=meta.get("model", ""),
            source=meta.get("source", ""),
        )
    except ValueError as exc:
        raise ValueError(f"routing trace {path!r}: {exc}") from None


@dataclass(kw_only=True)
class ImportReport:
    """What an import kept and dropped; `summary()` is one human-readable line."""

    lines: int = 0  # non-blank lines read
    rows_used: int = 0
    bad_lines: int = 0
    bad_examples: list[str] = field(default_factory=list)  # "line N: reason", first few
    tokens: int = 0
    dropped_tokens: int = 0  # tokens that lacked some layers
    sequences: int = 0
    num_layers: int = 0
    shared_position_tokens: int = 0  # tokens logged at a position an earlier token already had

    def summary(self) -> str:
        parts = [f"imported {self.tokens} tokens in {self.sequences} sequences x {self.num_layers} layers "
                 f"from {self.rows_used} of {self.lines} lines"]
        if self.dropped_tokens:
            parts.append(f"dropped {self.dropped_tokens} tokens missing some layers")
        if self.shared_position_tokens:
            parts.append(f"{self.shared_position_tokens} tokens reused an earlier token's position "
                         "and were kept in file order as separate sequences")
        if self.bad_lines:
            parts.append(f"skipped {self.bad_lines} bad lines ({'; '.join(self.bad_examples)})")
        return "; ".join(parts)


_MAX_EXAMPLES = 5


def _parse_row(obj) -> tuple[object, int, int, list[int], list[float] | None]:
    """(sequence key, position, layer, experts, probs) of one JSON row, or ValueError saying why."""
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    if "problem_id" not in obj:
        raise ValueError("missing 'problem_id'")
    pid = obj["problem_id"]
    if not isinstance(pid, (int, str)) or isinstance(pid, bool):
        raise ValueError("'problem_id' must be an int or a string")
    pos_key = "token_idx" if "token_idx" in obj else "token_pos" if "token_pos" in obj else None
    if pos_key is None:
        raise ValueError("missing 'token_idx' (or 'token_pos')")
    pos, layer = obj[pos_key], obj.get("layer")
    for name, v in ((pos_key, pos), ("layer", layer)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name!r} must be an int >= 0, got {v!r}")
    experts = obj.get("experts")
    if not isinstance(experts, list) or not experts or not all(
        isinstance(e, int) and not isinstance(e, bool) and 0 <= e < _MAX_EXPERTS for e in experts
    ):
        raise ValueError(f"'experts' must be a non-empty list of expert ids >= 0, got {experts!r}")
    probs = obj.get("gating_probs")
    if probs is not None:
        if not isinstance(probs, list) or len(probs) != len(experts) or not all(
            isinstance(p, (int, float)) and not isinstance(p, bool) for p in probs
        ):
            raise ValueError(f"'gating_probs' must be a list of {len(experts)} numbers, got {probs!r}")
    seq_key = (obj.get("dataset", ""), pid)
    return seq_key, pos, layer, experts, probs


def import_vllm_jsonl(path, *, num_experts: int | None = None, model: str = "") -> tuple[RoutingTrace, ImportReport]:
    """Import per-(token, layer) JSON lines as written by a vLLM routing hook.

    Each line: {"problem_id", "layer", "token_idx" | "token_pos", "experts": [k ids],
    "gating_probs": [k floats], "dataset"?}. A sequence is one (dataset, problem_id), in order
    of first appearance; its tokens are ordered by position. Where one position holds
    several tokens (rows logged without a position), they are told apart in file order
    (a layer that does not rise starts the next token), and all but the first at each
    position form one extra sequence in file order. Tokens lacking any layer are dropped;
    malformed lines are skipped; both are counted in the report. Raises ValueError if no
    complete token remains. num_experts defaults to the largest id + 1.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"routing JSON-lines file {path!r} does not exist")
    rep = ImportReport()
    # seq_key -> position -> list of tokens, each a {layer: (experts, probs)} dict
    seqs: dict[object, dict[int, list[dict]]] = {}
    last_layer: dict[tuple, int] = {}
    top_k = None
    have_probs = None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rep.lines += 1
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not valid JSON ({exc.msg})") from None
                seq_key, pos, layer, experts, probs = _parse_row(obj)
                if top_k is not None and len(experts) != top_k:
                    raise ValueError(f"{len(experts)} experts where earlier lines have {top_k}")
                if have_probs is not None and (probs is not None) != have_probs:
                    raise ValueError("'gating_probs' present on some lines and missing on others")
            except ValueError as exc:
                rep.bad_lines += 1
                if len(rep.bad_examples) < _MAX_EXAMPLES:
                    rep.bad_examples.append(f"line {lineno}: {exc}")
                continue
            top_k = len(experts)
            have_probs = probs is not None
            tokens = seqs.setdefault(seq_key, {}).setdefault(pos, [])
            if not tokens or layer <= last_layer[(seq_key, pos)]:
                tokens.append({})
            tokens[-1][layer] = (experts, probs)
            last_layer[(seq_key, pos)] = layer
            rep.rows_used += 1
    if rep.rows_used == 0:
        raise ValueError(f"{path!r} holds no valid routing line: skipped {rep.bad_lines} bad lines "
                         f"({'; '.join(rep.bad_examples)})")
    num_layers = 1 + max(layer for by_pos in seqs.values() for toks in by_pos.values() for t in toks for layer in t)
    ids_rows, w_rows, lengths = [], [], []

    def add_sequence(toks: list[dict]) -> None:
        n = 0
        for tok in toks:
            if len(tok) != num_layers:
                rep.dropped_tokens += 1
                continue
            ids_rows.append([tok[layer][0] for layer in range(num_layers)])
            if have_probs:
                w_rows.append([tok[layer][1] for layer in range(num_layers)])
            n += 1
        if n:
            lengths.append(n)

    for by_pos in seqs.values():
        # The first token seen at each position is the sequence itself; later tokens logged
        # at an already-used position are another stream (e.g. a batch logged without
        # positions), kept in file order as a sequence of their own so that they do not
        # interleave with the main one.
        add_sequence([by_pos[pos][0] for pos in sorted(by_pos)])
        extra = [tok for pos in sorted(by_pos) for tok in by_pos[pos][1:]]
        rep.shared_position_tokens += len(extra)
        add_sequence(extra)
    rep.tokens, rep.sequences, rep.num_layers = len(ids_rows), len(lengths), num_layers
    if not ids_rows:
        raise ValueError(f"{path!r} holds no token with all {num_layers} layers ({rep.summary()})")
    ids_TLK = torch.tensor(ids_rows, dtype=torch.int64)
    found = int(ids_TLK.max()) + 1
    if num_experts is None:
        num_experts = found
    elif found > num_experts:
        raise ValueError(f"{path!r} uses expert id {found - 1} but num_experts={num_experts}")
    trace = RoutingTrace(
        expert_ids=ids_TLK.to(torch.int16),
        seq_starts=torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0),
        num_experts=num_experts,
        top_k=top_k,
        weights=torch.tensor(w_rows, dtype=torch.float32).to(torch.float16) if have_probs else None,
        model=model,
        source=f"vllm-jsonl:{os.path.basename(path)}",
    )
    return trace, rep
