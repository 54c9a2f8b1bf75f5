"""Online token shuffling: send each token, at layer l's combine, to the rank most likely
to hold one of its layer-(l+1) experts.

Shape key: T tokens, L layers, K experts per token, E experts, R ranks.

At layer l's combine the partial expert outputs of a token come back from the ranks
that served it (D_l) and are summed with its residual from the rank it lived on (loc).
Summing them on any rank of D_l | {loc} instead of on loc costs no extra row, so the
shuffle only chooses among those candidates: it never adds bytes, and a wrong guess
costs only the ordinary remote dispatch at layer l+1. Outputs never change.

The choice: the candidate r with the highest estimated P(r serves the token at l+1),
learned from a profiling trace under the same placement, from the token's routing in
the last `history` layers: its expert pair at layer l and its single experts at layers
l-1, l-2, ..., combined naive-Bayes style (sum of smoothed log-odds ratios).

Optional trajectory kernel (`kernel_temperature` > 0): a second estimate of the same
probability by kernel regression over the profile's tokens, weighting each by how many
experts it shared with this token at layers l, l-1, ... (layer l-h counted
`kernel_decay`**h times), softmax-sharpened by the temperature, and smoothed towards
the marginal with `prior` pseudo-counts against the U reference tokens (every one of
them carries some weight). Naive Bayes treats the layers as independent evidence; the
kernel sees whole routing paths. The guess mixes the two log-odds (`kernel_weight`).

Decode-only features. In decode, the earlier tokens of a sequence finished all their
layers one or more steps before this token reaches layer l, so their routing is known.
The replay hands it over as a `DecodeView` that exposes, for token t, only those tokens.
- `temporal=True`: naive Bayes also reads the previous token's experts at layer l+1
  (consecutive tokens share experts more often than chance).
- `online=True`: the kernel's references also include the earlier tokens of the token's
  own sequence, with their served ranks at l+1 (the predictor keeps learning while it
  serves, from the past only).
Neither is available in prefill, where a prompt's tokens run through the layers
together: turn them on only for decode traffic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.comms.placement import ExpertPlacement

__all__ = ["ShuffleConfig", "TransitionShuffler", "DecodeView", "previous_token", "previous_experts"]


@dataclass(kw_only=True)
class ShuffleConfig:
    """history: earlier layers whose experts inform the guess (1 = layer l only).
    prior: pseudo-counts of the backoff estimate added to each conditional.
    temporal: also use the previous token's layer-(l+1) experts (decode only, see above).
    kernel_temperature: sharpness of the trajectory kernel; 0 turns the kernel off.
    kernel_decay: weight of layer l-h in the kernel's similarity is kernel_decay**h.
    online: the kernel also learns from the earlier tokens of the sequence (decode only).
    kernel_weight: the kernel's share of the mixed log-odds (0.5: the plain mean).
    """

    history: int = 3
    prior: float = 2.0
    temporal: bool = False
    kernel_temperature: float = 0.0
    kernel_decay: float = 0.85
    online: bool = False
    kernel_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.history < 1:
            raise ValueError(f"history must be >= 1 layer, got {self.history}")
        if not isinstance(self.temporal, bool) or not isinstance(self.online, bool):
            raise ValueError(f"temporal and online must be bools, got {self.temporal!r} and {self.online!r}")
        if self.prior <= 0:
            raise ValueError(f"prior must be > 0 pseudo-counts, got {self.prior}")
        if self.kernel_temperature < 0:
            raise ValueError(f"kernel_temperature must be >= 0 (0: no kernel), got {self.kernel_temperature}")
        if not 0 < self.kernel_decay <= 1:
            raise ValueError(f"kernel_decay must lie in (0, 1], got {self.kernel_decay}")
        if not 0 <= self.kernel_weight <= 1:
            raise ValueError(f"kernel_weight must lie in [0, 1], got {self.kernel_weight}")
        if self.online and not self.kernel_temperature > 0:
            raise ValueError("online learning feeds the kernel: it needs kernel_temperature > 0")


_EPS = 1e-3  # keeps smoothed probabilities off 0 and 1 before the logit


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def previous_token(seq_starts: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """int64 [T]: index of the previous token of the same sequence, -1 for a first token."""
    prev_T = torch.arange(num_tokens) - 1
    firsts = seq_starts[:-1][seq_starts[:-1] < seq_starts[1:]]
    prev_T[firsts.long()] = -1
    return prev_T


def previous_experts(ids_TLK: torch.Tensor, prev_T: torch.Tensor, layer: int) -> torch.Tensor:
    """int64 [T, K]: the previous token's experts at `layer`, -1 rows for first tokens."""
    out_TK = ids_TLK[prev_T.clamp(min=0), layer].long()
    return torch.where(prev_T[:, None] >= 0, out_TK, -1)


@dataclass(frozen=True, kw_only=True)
class DecodeView:
    """The replayed tokens as a decode step sees them: token t may read only the tokens
    before it in its own sequence (they finished all their layers).

    ids_TLK: int64 [T, L, K]; prev_T: int64 [T] the token just before (-1: none);
    earlier_TT: bool [T, T], [t, u] True where u is before t in t's sequence (O(T^2)).
    """

    ids_TLK: torch.Tensor
    prev_T: torch.Tensor
    earlier_TT: torch.Tensor

    @classmethod
    def from_trace(cls, ids_TLK: torch.Tensor, seq_starts: torch.Tensor) -> "DecodeView":
        T = ids_TLK.shape[0]
        seq_T = torch.repeat_interleave(torch.arange(len(seq_starts) - 1), seq_starts.diff())
        pos_T = torch.arange(T)
        earlier_TT = (seq_T[:, None] == seq_T[None, :]) & (pos_T[None, :] < pos_T[:, None])
        return cls(ids_TLK=ids_TLK.long(), prev_T=previous_token(seq_starts, T), earlier_TT=earlier_TT)


def _served_ranks(placement: ExpertPlacement, layer: int, ids_TK: torch.Tensor) -> torch.Tensor:
    """bool [T, R]: ranks holding at least one of each token's experts."""
    return placement.holds_LER[layer][ids_TK.long()].any(dim=1)


class TransitionShuffler:
    """Predicts a token's serving ranks at layer l+1 from its routing at layers <= l.

    Fitted counts (profile trace, the same placement as at run time):
      single_LHER[l, h, e, r]: tokens with expert e at layer l-h that used rank r at l+1.
      pair_LPR[l, pair, r]:    same for the unordered expert set at layer l (K = 2 only).
      prev_LER[l, e, r]:       tokens whose previous token used e at l+1 and that used r at
                               l+1 (temporal only; seq_starts [S+1] gives the sequences).
    """

    def __init__(self, placement: ExpertPlacement, expert_ids_TLK: torch.Tensor,
                 config: ShuffleConfig | None = None, seq_starts: torch.Tensor | None = None) -> None:
        self.config = config or ShuffleConfig()
        self.placement = placement
        T, L, K = expert_ids_TLK.shape
        E, R, H = placement.num_experts, placement.world_size, self.config.history
        if L != placement.num_layers:
            raise ValueError(f"profile trace has {L} layers, the placement {placement.num_layers}")
        ids_TLK = expert_ids_TLK.long()
        hot_TLE = torch.zeros(T, L, E, dtype=torch.float64).scatter_(2, ids_TLK, 1.0)
        served_TLR = torch.stack([_served_ranks(placement, l, ids_TLK[:, l]) for l in range(L)], 1).double()
        self.single_LHER = torch.zeros(L, H, E, R, dtype=torch.float64)
        self.single_n_LHE = torch.zeros(L, H, E, dtype=torch.float64)
        for l in range(L - 1):
            for h in range(min(H, l + 1)):
                self.single_LHER[l, h] = hot_TLE[:, l - h].T @ served_TLR[:, l + 1]
                self.single_n_LHE[l, h] = hot_TLE[:, l - h].sum(0)
        self.pair_code_TL = self._pair_code(ids_TLK) if K == 2 else None
        P = E * E
        self.pair_LPR = torch.zeros(L, P, R, dtype=torch.float64)
        self.pair_n_LP = torch.zeros(L, P, dtype=torch.float64)
        if self.pair_code_TL is not None:
            for l in range(L - 1):
                self.pair_LPR[l].index_add_(0, self.pair_code_TL[:, l], served_TLR[:, l + 1])
                self.pair_n_LP[l] += torch.bincount(self.pair_code_TL[:, l], minlength=P).double()
        self.base_LR = served_TLR.mean(0)  # marginal, for layers or experts never seen
        self.hot_TLE, self.served_TLR = hot_TLE, served_TLR  # the kernel's reference tokens
        self.prev_LER = torch.zeros(L, E, R, dtype=torch.float64)
        self.prev_n_LE = torch.zeros(L, E, dtype=torch.float64)
        if self.config.temporal:
            starts = seq_starts if seq_starts is not None else torch.tensor([0, T])
            prev_T = previous_token(starts, T)
            has_T = prev_T >= 0
            prev_hot_TLE = hot_TLE[prev_T.clamp(min=0)] * has_T[:, None, None]
            for l in range(L - 1):
                self.prev_LER[l] = prev_hot_TLE[:, l + 1].T @ served_TLR[:, l + 1]
                self.prev_n_LE[l] = prev_hot_TLE[:, l + 1].sum(0)

    def _pair_code(self, ids_TLK: torch.Tensor) -> torch.Tensor:
        lo, hi = ids_TLK.min(2).values, ids_TLK.max(2).values
        return lo * self.placement.num_experts + hi

    def scores(self, layer: int, history_THK: torch.Tensor, view: DecodeView | None = None) -> torch.Tensor:
        """float64 [T, R]: log-odds that rank r serves the token at layer+1.

        history_THK: the token's experts at layers layer, layer-1, ... (any number of rows;
        naive Bayes reads the first `history`, the kernel all). view: the other tokens as
        decode sees them (row t of history_THK is token t of the view); only the decode
        features read it, and only where the config turns them on.
        """
        if view is not None and view.ids_TLK.shape[0] != history_THK.shape[0]:
            raise ValueError(f"decode view has {view.ids_TLK.shape[0]} tokens, the history {history_THK.shape[0]}")
        last = layer + 1 >= self.base_LR.shape[0]
        prev_next_TK = None
        if self.config.temporal and view is not None and not last:
            prev_next_TK = previous_experts(view.ids_TLK, view.prev_T, layer + 1)
        s_TR = self._bayes(layer, history_THK, prev_next_TK)
        if self.config.kernel_temperature > 0 and not last:
            w = self.config.kernel_weight
            s_TR = (1 - w) * s_TR + w * self._kernel(layer, history_THK, view if self.config.online else None)
        return s_TR

    def _kernel(self, layer: int, history_THK: torch.Tensor, view: DecodeView | None) -> torch.Tensor:
        """float64 [T, R]: the trajectory kernel's log-odds (module doc) over U references:
        the profile's tokens, and with a view the earlier tokens of each token's sequence."""
        T, H = history_THK.shape[:2]
        H = min(H, layer + 1)
        E = self.placement.num_experts
        w_H = self.config.kernel_decay ** torch.arange(H, dtype=torch.float64)
        hot_THE = torch.zeros(T, H, E, dtype=torch.float64).scatter_(2, history_THK[:, :H].long(), 1.0)
        ref_UHE = self.hot_TLE[:, layer - H + 1: layer + 1]
        served_UR = self.served_TLR[:, layer + 1]
        allowed_TU = torch.ones(T, ref_UHE.shape[0], dtype=torch.bool)
        if view is not None:
            past_ids_TLK = view.ids_TLK[:, layer - H + 1: layer + 2]
            past_hot = torch.zeros(*past_ids_TLK.shape[:2], E, dtype=torch.float64).scatter_(2, past_ids_TLK, 1.0)
            ref_UHE = torch.cat([ref_UHE, past_hot[:, :H]])
            served_UR = torch.cat([served_UR, _served_ranks(self.placement, layer + 1, past_ids_TLK[:, H]).double()])
            allowed_TU = torch.cat([allowed_TU, view.earlier_TT], 1)
        ref_UHE = ref_UHE.flip(1) * w_H[None, :, None]
        sim_TU = hot_THE.reshape(T, H * E) @ ref_UHE.reshape(-1, H * E).T
        logit_TU = torch.where(allowed_TU, self.config.kernel_temperature * sim_TU, float("-inf"))
        w_TU = torch.softmax(logit_TU, dim=1)
        n_T1, a = allowed_TU.sum(1, keepdim=True).double(), self.config.prior
        base_R = self.base_LR[layer + 1].clamp(_EPS, 1 - _EPS)
        p_TR = ((w_TU @ served_UR) * n_T1 + a * base_R) / (n_T1 + a)
        return _logit(p_TR.clamp(_EPS, 1 - _EPS))

    def _bayes(self, layer: int, history_THK: torch.Tensor,
               prev_next_TK: torch.Tensor | None = None) -> torch.Tensor:
        """float64 [T, R]: the naive-Bayes log-odds.

        history_THK: the token's experts at layers layer, layer-1, ... (H' <= history rows).
        prev_next_TK: the previous token's experts at layer+1 (-1 rows: no previous token);
        given only when the config is temporal.
        Naive Bayes over features: the expert set at `layer` (pair table, K = 2) or its
        single experts, the single experts of earlier layers, and (temporal) those of the
        previous token at layer+1; each conditional is smoothed towards the marginal with
        `prior` pseudo-counts.
        """
        a = self.config.prior
        base_R = self.base_LR[min(layer + 1, self.base_LR.shape[0] - 1)].clamp(_EPS, 1 - _EPS)
        base_logit_R = _logit(base_R)
        s_TR = base_logit_R.expand(history_THK.shape[0], -1).clone()
        H = min(history_THK.shape[1], self.config.history, layer + 1)
        for h in range(H):
            if h == 0 and self.pair_code_TL is not None and history_THK.shape[2] == 2:
                code_T = self._pair_code(history_THK[:, :1])[:, 0]
                terms = [(self.pair_LPR[layer][code_T], self.pair_n_LP[layer][code_T][:, None])]
            else:
                ids_TK = history_THK[:, h].long()
                cnt_ER, n_E = self.single_LHER[layer, h], self.single_n_LHE[layer, h]
                terms = [(cnt_ER[ids_TK[:, k]], n_E[ids_TK[:, k]][:, None]) for k in range(ids_TK.shape[1])]
            for cnt_TR, n_T1 in terms:
                p_TR = ((cnt_TR + a * base_R) / (n_T1 + a)).clamp(_EPS, 1 - _EPS)
                s_TR += _logit(p_TR) - base_logit_R
        if prev_next_TK is not None:
            for k in range(prev_next_TK.shape[1]):
                e_T = prev_next_TK[:, k].long()
                cnt_TR, n_T1 = self.prev_LER[layer][e_T.clamp(min=0)], self.prev_n_LE[layer][e_T.clamp(min=0)][:, None]
                p_TR = ((cnt_TR + a * base_R) / (n_T1 + a)).clamp(_EPS, 1 - _EPS)
                s_TR += torch.where(e_T[:, None] >= 0, _logit(p_TR) - base_logit_R, 0.0)
        return s_TR

    def choose(self, layer: int, history_THK: torch.Tensor, candidates_TR: torch.Tensor,
               loc_T: torch.Tensor, view: DecodeView | None = None) -> torch.Tensor:
        """int64 [T]: the candidate rank with the best score (ties: stay on loc_T)."""
        s_TR = self.scores(layer, history_THK, view)
        s_TR[torch.arange(len(loc_T)), loc_T] += 1e-9  # stay put on ties
        return torch.where(candidates_TR, s_TR, float("-inf")).argmax(1)
