"""All-to-all replay: bytes, locality and load of expert-parallel MoE layers on a trace.

Shape key: T tokens, L layers, K experts per token, R ranks.

Model (stated so the numbers can be checked):
- Before layer 0 every token lives on its home rank, its data-parallel owner: tokens are
  dealt round-robin over ranks (`home="token"`, a batch of decode tokens from many
  requests) or whole sequences are (`home="sequence"`).
- At layer l a token living on `loc` sends one row (D elements) to every distinct rank
  in D_l (the ranks serving its K experts; a local copy always serves) other than `loc`:
  dispatch rows = |D_l - {loc}|.
- Combine: the partial outputs and the residual are summed on the rank where the token
  lives next, `next`, so combine rows = |(D_l | {loc}) - {next}|. next = loc without
  shuffling, and after the last layer, whose output is used (final norm, LM head,
  sampling) where the token lives: only the sampled id, a few bytes, not counted, goes
  to the owner. Without shuffling the combine rows equal the dispatch rows.
- A shuffled token keeps living on `next`: its next attention runs there. That holds
  where attention is not pinned to the data-parallel owner (tensor-parallel or
  replicated attention across the EP group, as in DeepSpeed-MoE); with KV caches pinned
  to the owner the token would have to return home, and only grouping applies.
- Bytes = (dispatch + combine rows) x hidden_size x bytes_per_element. `naive_bytes`
  counts what a dispatch without per-rank deduplication would move (one row per remote
  activation, both directions).
- Local activation rate (LAR): share of the T*L*K activations served on `loc`.
- Replicas: an activation with no local copy goes to the copy the balanced split gives
  it (ExpertPlacement.balanced_quota, computed per round of `batch_tokens` tokens from
  counts every rank shares), or with `replica_dispatch="hash"` to a hashed copy.
- Load imbalance: per layer, max over ranks of activations served / mean; reported as
  the mean over layers and the worst layer.
- Perfect speculation ("oracle"): before every layer l >= 1 the token already lives on
  the rank of its first (top-1) expert, paid for by the same combine rule.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict

import torch

from moe.comms.placement import REPLICA_DISPATCH, ExpertPlacement
from moe.comms.shuffle import DecodeView, TransitionShuffler

__all__ = ["ReplayConfig", "ReplayResult", "replay", "home_ranks"]

HOMES = ("token", "sequence")


@dataclass(kw_only=True)
class ReplayConfig:
    """hidden_size: D; bytes_per_element: 2 for bf16 rows; home: see module doc.
    replica_dispatch: how activations with no local copy pick among an expert's replicas:
    "balanced" (ExpertPlacement.balanced_quota, what the EP executor does by default) or
    "hash" (a hash of the token index, no shared counts).
    batch_tokens: tokens per MoE round for the balanced split, which sees one round's
    counts at a time (0: the whole trace is one round)."""

    hidden_size: int = 4096
    bytes_per_element: int = 2
    home: str = "token"
    replica_dispatch: str = "balanced"
    batch_tokens: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size < 1 or self.bytes_per_element < 1:
            raise ValueError("hidden_size and bytes_per_element must be >= 1")
        if self.home not in HOMES:
            raise ValueError(f"home must be one of {HOMES}, got {self.home!r}")
        if self.replica_dispatch not in REPLICA_DISPATCH:
            raise ValueError(f"replica_dispatch must be one of {REPLICA_DISPATCH}, got {self.replica_dispatch!r}")
        if self.batch_tokens < 0:
            raise ValueError(f"batch_tokens must be >= 0 (0: one round), got {self.batch_tokens}")


@dataclass
class ReplayResult:
    """Totals over the trace; `*_per_token_layer` divide by T*L."""

    bytes: int
    naive_bytes: int
    dispatch_rows: int
    combine_rows: int
    bytes_per_token_layer: float
    lar: float
    imbalance: float
    imbalance_max: float
    spec_hit: float | None  # share of shuffle guesses whose rank served the next layer

    def as_dict(self) -> dict:
        return asdict(self)


def home_ranks(seq_starts: torch.Tensor, num_tokens: int, world_size: int, home: str) -> torch.Tensor:
    """int64 [T]: data-parallel owner of every token."""
    if home == "token":
        return torch.arange(num_tokens) % world_size
    seq_T = torch.repeat_interleave(torch.arange(len(seq_starts) - 1), seq_starts.diff())
    return seq_T % world_size


def replay(expert_ids_TLK: torch.Tensor, seq_starts: torch.Tensor, placement: ExpertPlacement,
           shuffle: TransitionShuffler | str | None = None, config: ReplayConfig | None = None) -> ReplayResult:
    """Replay a routing trace under `placement`.

    shuffle: None (tokens stay home), a fitted TransitionShuffler, or "oracle". The
    shuffler sees a token's routing at layers <= l and, through a DecodeView, the earlier
    tokens of its sequence (its decode features use them only where turned on).
    """
    config = config or ReplayConfig()
    T, L, K = expert_ids_TLK.shape
    R = placement.world_size
    if L != placement.num_layers:
        raise ValueError(f"trace has {L} layers, the placement {placement.num_layers}")
    if T and int(expert_ids_TLK.max()) >= placement.num_experts:
        raise ValueError(f"trace uses expert {int(expert_ids_TLK.max())}, the placement has "
                         f"{placement.num_experts} experts")
    ids_TLK = expert_ids_TLK.long()
    home_T = home_ranks(seq_starts, T, R, config.home)
    token_T = torch.arange(T)
    loc_T = home_T
    view = DecodeView.from_trace(ids_TLK, seq_starts) if isinstance(shuffle, TransitionShuffler) else None
    dispatch = combine = local = 0
    remote_activations = 0
    imb_L = torch.zeros(L, dtype=torch.float64)
    hits = guesses = 0
    balanced = config.replica_dispatch == "balanced" and placement.has_replicas
    for l in range(L):
        if balanced:
            B = config.batch_tokens or max(T, 1)
            dest_TK = torch.cat([placement.balanced_dest_ranks(l, ids_TLK[a:a + B, l], loc_T[a:a + B])
                                 for a in range(0, T, B)]) if T else ids_TLK[:, l].clone()
        else:
            dest_TK = placement.dest_ranks(l, ids_TLK[:, l], loc_T, token_T)
        served_TR = torch.zeros(T, R, dtype=torch.bool).scatter_(1, dest_TK, True)
        at_loc_T = served_TR[token_T, loc_T]
        dispatch += int(served_TR.sum()) - int(at_loc_T.sum())
        local_l = int((dest_TK == loc_T[:, None]).sum())
        local += local_l
        remote_activations += T * K - local_l
        load_R = torch.bincount(dest_TK.flatten(), minlength=R).double()
        imb_L[l] = load_R.max() / load_R.mean() if T else 1.0
        if l > 0 and shuffle is not None:
            hits += int(at_loc_T.sum())
            guesses += T
        cand_TR = served_TR.clone()
        cand_TR[token_T, loc_T] = True
        if l == L - 1 or shuffle is None:
            next_T = loc_T
        elif isinstance(shuffle, str):
            if shuffle != "oracle":
                raise ValueError(f"shuffle must be None, 'oracle' or a TransitionShuffler, got {shuffle!r}")
            next_T = placement.primary_rank(l + 1, ids_TLK[:, l + 1, 0])
        else:
            history_THK = ids_TLK[:, : l + 1].flip(1)
            next_T = shuffle.choose(l, history_THK, cand_TR, loc_T, view)
        combine += int(cand_TR.sum()) - int(cand_TR[token_T, next_T].sum())
        loc_T = next_T
    rows = dispatch + combine
    row_bytes = config.hidden_size * config.bytes_per_element
    nbytes = rows * row_bytes
    return ReplayResult(
        bytes=nbytes, naive_bytes=2 * remote_activations * row_bytes, dispatch_rows=dispatch, combine_rows=combine,
        bytes_per_token_layer=nbytes / max(T * L, 1), lar=local / max(T * L * K, 1),
        imbalance=float(imb_L.mean()), imbalance_max=float(imb_L.max()),
        spec_hit=hits / guesses if guesses else None,
    )
