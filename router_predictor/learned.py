"""A small learned routing-path predictor (ExpertFlow-style), trained from traces.

Shape key: T tokens, L layers, K top-k, E experts, H history layers, d depth, F features.

Input at layer l (all known while layer l runs in decode):
  one-hot experts of the current token at layers l, l-1, .., l-H+1   [H*E] (zeros below 0)
  one-hot experts of the predecessor token at layers l..l+d          [(d+1)*E] (temporal)
  has-predecessor flag                                               [1]
  a learned embedding of l                                           [layer_dim]
Output: logits [d, E] of the experts at layers l+1..l+d; sigmoid gives the probability that
an expert is among the token's top-k there. Trained with binary cross-entropy on every
(token, layer) of a trace. Saved as safetensors (weights + JSON config in the metadata).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moe.router_predictor.predictors import RoutingContext, RoutingPredictor, contexts_for_layer, one_hot_experts
from moe.router_predictor.trace import RoutingTrace

__all__ = ["LearnedConfig", "LearnedPathPredictor", "train_path_predictor", "PREDICTOR_FORMAT"]

PREDICTOR_FORMAT = "moe-path-predictor/1"


@dataclass(kw_only=True)
class LearnedConfig:
    """Model and training settings of the learned path predictor."""

    history: int = 8
    depth: int = 3
    hidden: int = 128
    layer_dim: int = 16
    steps: int = 1000
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("history", "depth", "hidden", "layer_dim", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"learned predictor {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"learned predictor needs lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")


class _PathMLP(nn.Module):
    def __init__(self, cfg: LearnedConfig, num_layers: int, num_experts: int) -> None:
        super().__init__()
        E, d = num_experts, cfg.depth
        n_in = cfg.history * E + (d + 1) * E + 1 + cfg.layer_dim
        self.layer_emb = nn.Embedding(num_layers, cfg.layer_dim)
        self.net = nn.Sequential(nn.Linear(n_in, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden),
                                 nn.ReLU(), nn.Linear(cfg.hidden, d * E))
        self.depth, self.num_experts = d, E

    def forward(self, x_TF: torch.Tensor, layer_T: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x_TF, self.layer_emb(layer_T)], dim=1)
        return self.net(h).view(-1, self.depth, self.num_experts)  # logits [T, d, E]


def _features(ctx: RoutingContext, cfg: LearnedConfig, num_layers: int, num_experts: int) -> torch.Tensor:
    """x [T, F] without the layer embedding (see module doc)."""
    l, T, E = ctx.layer, ctx.ids_TlK.shape[0], num_experts
    parts = []
    for i in range(cfg.history):
        src = l - i
        parts.append(one_hot_experts(ctx.ids_TlK[:, src], E) if src >= 0 else torch.zeros(T, E))
    prev = ctx.prev_ids_TLK
    for j in range(cfg.depth + 1):
        m = l + j
        if prev is None or m >= num_layers:
            parts.append(torch.zeros(T, E))
        else:
            parts.append(one_hot_experts(prev[:, m], E))
    has_prev = torch.zeros(T, 1) if prev is None else (prev[:, 0, :1] >= 0).float()
    parts.append(has_prev)
    return torch.cat(parts, dim=1)


class LearnedPathPredictor(RoutingPredictor):
    """MLP over the routing history; `predict` returns sigmoid probabilities [T, d, E]."""

    name = "learned"

    def __init__(self, config: LearnedConfig, num_layers: int, num_experts: int, top_k: int,
                 model: _PathMLP | None = None) -> None:
        self.config = config
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.model = model or _PathMLP(config, num_layers, num_experts)
        self.model.eval()

    @torch.no_grad()
    def predict(self, ctx: RoutingContext, depth: int = 1) -> torch.Tensor:
        d = self._depth(ctx, depth)
        if d > self.config.depth:
            raise ValueError(f"learned predictor was trained for depth {self.config.depth}, asked for {depth}")
        x_TF = _features(ctx, self.config, self.num_layers, self.num_experts)
        layer_T = torch.full((x_TF.shape[0],), ctx.layer, dtype=torch.long)
        return torch.sigmoid(self.model(x_TF, layer_T)[:, :d])

    def save(self, path) -> None:
        meta = {
            "format": PREDICTOR_FORMAT,
            "config": json.dumps(asdict(self.config)),
            "num_layers": str(self.num_layers),
            "num_experts": str(self.num_experts),
            "top_k": str(self.top_k),
        }
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path) -> "LearnedPathPredictor":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path predictor {path!r} does not exist")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # corrupt header or not safetensors at all
            raise ValueError(f"cannot read path predictor {path!r} as safetensors: {exc}") from None
        if meta.get("format") != PREDICTOR_FORMAT:
            raise ValueError(f"{path!r} is not a path predictor: format {meta.get('format')!r}, "
                             f"expected {PREDICTOR_FORMAT!r}")
        try:
            cfg = LearnedConfig(**json.loads(meta["config"]))
            L, E, K = int(meta["num_layers"]), int(meta["num_experts"]), int(meta["top_k"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"path predictor {path!r} has bad metadata: {exc}") from None
        model = _PathMLP(cfg, L, E)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"path predictor {path!r} weights do not match its config: {exc}") from None
        return cls(cfg, L, E, K, model)


def _dataset(trace: RoutingTrace, cfg: LearnedConfig):
    """Features, layer ids, targets [N, d, E] and target mask [N, d] of every (token, layer < L-1)."""
    L, E, d = trace.num_layers, trace.num_experts, cfg.depth
    ids_TLK = trace.expert_ids.long()
    xs, ls, ys, ms = [], [], [], []
    for l in range(L - 1):
        ctx = contexts_for_layer(trace, l)
        xs.append(_features(ctx, cfg, L, E))
        ls.append(torch.full((trace.num_tokens,), l, dtype=torch.long))
        y = torch.zeros(trace.num_tokens, d, E)
        m = torch.zeros(trace.num_tokens, d)
        for j in range(d):
            if l + 1 + j < L:
                y[:, j] = one_hot_experts(ids_TLK[:, l + 1 + j], E)
                m[:, j] = 1.0
        ys.append(y)
        ms.append(m)
    return torch.cat(xs), torch.cat(ls), torch.cat(ys), torch.cat(ms)


def train_path_predictor(trace: RoutingTrace, config: LearnedConfig | None = None) -> tuple[LearnedPathPredictor, dict]:
    """Fit the predictor on `trace`; returns it and {"loss_first", "loss_last", "examples"}."""
    cfg = config or LearnedConfig()
    if trace.num_layers < 2 or trace.num_tokens == 0:
        raise ValueError("training a path predictor needs a trace with tokens and at least 2 layers")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)  # the initial weights
    model = _PathMLP(cfg, trace.num_layers, trace.num_experts)
    torch.random.set_rng_state(torch_state)
    x, layer, y, mask = _dataset(trace, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    model.train()
    losses = []
    threads = torch.get_num_threads()
    # The matrices are tiny: intra-op threads cost far more than they save (20x on a busy
    # 2-core machine), so train single-threaded and restore the caller's setting.
    torch.set_num_threads(1)
    try:
        for _ in range(cfg.steps):
            idx = torch.randint(0, x.shape[0], (min(cfg.batch_size, x.shape[0]),), generator=gen)
            logits = model(x[idx], layer[idx])
            bce = nn.functional.binary_cross_entropy_with_logits(logits, y[idx], reduction="none").mean(-1)
            loss = (bce * mask[idx]).sum() / mask[idx].sum().clamp(min=1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    model.eval()
    pred = LearnedPathPredictor(cfg, trace.num_layers, trace.num_experts, trace.top_k, model)
    return pred, {"loss_first": losses[0], "loss_last": losses[-1], "examples": int(x.shape[0])}
