"""`moe.wrap`: turn a transformers MoE model into a hybrid CPU/device model in place."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from moe.block import HybridMoeBlock
from moe.config import RuntimeConfig, parse_size
from moe.expert_cache.device_cache import DeviceExpertCache
from moe.expert_cache.policies import make_policy
from moe.expert_cache.store import HostExpertStore
from moe.families import Family, family_for_config
from moe.prefetch import Prefetcher, gate_callables
from moe.runtime import HybridRuntime

__all__ = ["wrap", "stats", "add_routing_observer", "runtime_of", "BudgetError", "install_runtime", "held_experts",
           "resolve_device"]


class BudgetError(ValueError):
    """The device budget cannot hold the non-expert weights."""


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available")
    return dev


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layers at .model.layers; "
                         "pass a *ForCausalLM model of a supported MoE family")
    return layers


def moe_layer_indices(model: nn.Module, family: Family) -> list[int]:
    """Decoder-layer indices whose MLP is a sparse MoE block of `family`."""
    return [i for i, layer in enumerate(_decoder_layers(model))
            if type(getattr(layer, "mlp", None)).__name__ in family.block_classes]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Plan:
    num_slots: int
    non_expert_bytes: int
    budget: int


def plan_budget(gpu_memory, non_expert_bytes: int, expert_bytes: int, num_experts_total: int) -> _Plan:
    budget = parse_size(gpu_memory)
    if budget < non_expert_bytes:
        raise BudgetError(
            f"gpu_memory={gpu_memory!r} ({budget / 2**20:.1f} MiB) is smaller than the model's "
            f"non-expert weights ({non_expert_bytes / 2**20:.1f} MiB, {non_expert_bytes} bytes), "
            "which must all live on the device; raise gpu_memory")
    slots = min((budget - non_expert_bytes) // expert_bytes, num_experts_total)
    return _Plan(num_slots=int(slots), non_expert_bytes=non_expert_bytes, budget=budget)


def held_experts(config: RuntimeConfig, num_layers: int, num_experts: int) -> torch.Tensor | None:
    """bool [L, E]: the routed experts this process keeps (None: all), from config.ep_shard."""
    shard = config.ep_shard
    if shard is None:
        return None
    from moe.comms.placement import ExpertPlacement

    if shard.placement is None:
        placement = ExpertPlacement.contiguous(num_layers, num_experts, shard.world_size)
    else:
        placement = ExpertPlacement.load(shard.placement)
    if (placement.num_layers, placement.num_experts, placement.world_size) != \
            (num_layers, num_experts, shard.world_size):
        raise ValueError(f"placement {shard.placement} covers {placement.num_layers} MoE layers x "
                         f"{placement.num_experts} experts on {placement.world_size} ranks; the model has "
                         f"{num_layers} x {num_experts} and the run {shard.world_size} ranks")
    return placement.holds_LER[:, :, shard.rank].clone()


def install_runtime(model: nn.Module, *, family: Family, moe_layers: list[int],
                    store: HostExpertStore, gpu_memory, device: torch.device,
                    config: RuntimeConfig) -> HybridRuntime:
    """Replace the sparse blocks at `moe_layers` (experts already in `store`) with
    HybridMoeBlocks driven by one runtime, and move non-expert weights to `device`."""
    layers = _decoder_layers(model)
    non_expert = _bytes(p for n, p in model.named_parameters() if ".experts." not in n + ".")
    plan = plan_budget(gpu_memory, non_expert, store.expert_bytes,
                       0 if config.ep_shard is not None else store.num_layers * store.num_experts)
    if config.quantization is not None:
        store.quantize_for_cpu(config.quantization, config.quant_group_size)
    policy = make_policy(config.cache_policy)
    cache = DeviceExpertCache(store, num_slots=plan.num_slots, device=device, policy=policy)
    runtime = HybridRuntime(store=store, cache=cache, config=config, device=device)
    gating = family.gating(model.config)
    for ordinal, i in enumerate(moe_layers):
        old = layers[i].mlp
        layers[i].mlp = HybridMoeBlock(
            gate=old.gate, gating=gating, num_experts=store.num_experts, layer=ordinal,
            routed=runtime.routed(ordinal), store=store,
            shared=getattr(old, family.shared) if family.shared else None,
            shared_gate=getattr(old, family.shared_gate) if family.shared_gate else None)
        del old
    model.to(device)
    # cpu-only keeps no experts on the device and static keeps a fixed set; and where the
    # "device" shares the CPU's cores and memory a copy can never shorten a layer: no
    # prefetch (and no forecasting work) in those cases.
    shared = getattr(runtime.planner.cost, "shared_cores", False)
    if config.predictor is not None and config.scheduler not in ("cpu-only", "static") and not shared \
            and config.ep_shard is None:
        blocks = [layers[i].mlp for i in moe_layers]
        runtime.prefetcher = Prefetcher(
            predictor=_make_predictor(config, blocks, gating.top_k, store.num_experts),
            cache=cache, counters=runtime.counters, planner=runtime.planner,
            weight_bytes=store.expert_bytes, flops_per_token=runtime.flops_per_token,
            depth=config.prefetch_depth, threshold=config.prefetch_threshold)
    model._moe_runtime = runtime
    model._moe_budget = plan
    return runtime


def _make_predictor(config: RuntimeConfig, blocks, top_k: int, num_experts: int):
    from moe.router_predictor import predictors as P

    if config.predictor == "gate-lookahead":
        return P.GateLookaheadPredictor(gate_callables(blocks), top_k=top_k, num_experts=num_experts)
    if config.predictor == "learned":
        from moe.router_predictor.learned import LearnedPathPredictor

        pred = LearnedPathPredictor.load(config.predictor_file)
    else:
        from moe.router_predictor import load_trace

        trace = load_trace(config.predictor_file)
        fit = P.TransitionPredictor if config.predictor == "transition" else P.FrequencyPredictor
        pred = fit.fit(trace)
    if (pred.num_layers, pred.num_experts) != (len(blocks), num_experts):
        raise ValueError(f"predictor from {config.predictor_file} is for {pred.num_layers} MoE layers x "
                         f"{pred.num_experts} experts, but the model has {len(blocks)} x {num_experts}")
    return pred


def wrap(hf_model: nn.Module, gpu_memory="8GiB", device=None, config: RuntimeConfig | None = None):
    """Replace the sparse MoE blocks of `hf_model` in place and return it.

    hf_model: a transformers PreTrainedModel of a supported MoE family, weights on CPU.
    gpu_memory: bytes (int) or a size string ("8GiB", "500MB") for ALL parameter bytes
        this model may hold on `device`: non-expert weights first, the rest becomes
        expert cache slots. KV cache and activations are not counted.
    device: the fast tier; None picks "cuda" when present, else "cpu".
    config: RuntimeConfig (defaults when None).
    Outputs match the unwrapped model to floating-point tolerance.
    """
    config = config or RuntimeConfig()
    if not isinstance(config, RuntimeConfig):
        raise TypeError(f"config must be a moe.RuntimeConfig, got {type(config).__name__}")
    if getattr(hf_model, "_moe_runtime", None) is not None:
        raise ValueError("this model is already wrapped by moe.wrap")
    family = family_for_config(getattr(hf_model, "config", None))
    moe_layers = moe_layer_indices(hf_model, family)
    if not moe_layers:
        raise ValueError(f"found no {family.name} sparse MoE blocks "
                         f"({', '.join(family.block_classes)}) in {type(hf_model).__name__}")
    device = resolve_device(device)
    layers = _decoder_layers(hf_model)
    first = layers[moe_layers[0]].mlp.experts
    E, twoF, D = first.gate_up_proj.shape
    if first.gate_up_proj.device.type == "meta":
        raise ValueError("the model's expert weights are on the meta device; load real weights first")
    store = HostExpertStore(num_layers=len(moe_layers), num_experts=E, hidden=D, inter=twoF // 2,
                            dtype=first.gate_up_proj.dtype,
                            pin_memory=config.pin_memory if config.pin_memory is not None
                            else device.type == "cuda",
                            held_LE=held_experts(config, len(moe_layers), E))
    for ordinal, i in enumerate(moe_layers):
        experts = layers[i].mlp.experts
        store.set_layer(ordinal, experts.gate_up_proj.data, experts.down_proj.data)
        # The store now owns the weights; drop the module so model.to(device) skips them.
        del layers[i].mlp.experts
    install_runtime(hf_model, family=family, moe_layers=moe_layers, store=store,
                    gpu_memory=gpu_memory, device=device, config=config)
    return hf_model


def runtime_of(model: nn.Module) -> HybridRuntime:
    rt = getattr(model, "_moe_runtime", None)
    if rt is None:
        raise ValueError("model is not wrapped: call moe.wrap(model) or moe.from_pretrained(...) first")
    return rt


def stats(model: nn.Module) -> dict:
    """Counters: cache_hits, cache_misses, h2d_bytes, cpu_expert_calls, gpu_expert_calls,
    prefetch_hits, plus hit_rate, copies, evictions, cache_slots, tokens, ...

    Under expert parallelism (moe.ep) the routed experts run on the ranks that hold them:
    the expert calls this rank served count as cpu_ or gpu_expert_calls (by the executor's
    device), and "ep" holds the executor's counters (rounds, local/remote activations,
    bytes sent to other ranks, the local activation rate "lar")."""
    out = runtime_of(model).stats()
    ep = getattr(model, "_moe_ep", None)
    if ep is not None:
        s = dataclasses.asdict(ep.stats)
        s.update(rank=ep.rank, world_size=ep.world_size, device=str(ep.device),
                 lar=s["local_activations"] / s["activations"] if s["activations"] else 0.0)
        out["ep"] = s
        out["gpu_expert_calls" if ep.device.type == "cuda" else "cpu_expert_calls"] += s["expert_calls"]
    return out


class _ObserverHandle:
    def __init__(self, rt: HybridRuntime, fn) -> None:
        self._rt, self._fn = rt, fn

    def remove(self) -> None:
        if self._fn in self._rt.observers:
            self._rt.observers.remove(self._fn)


def add_routing_observer(model: nn.Module, fn) -> _ObserverHandle:
    """Call fn(layer, topk_ids_TK, topk_weights_TK) (CPU tensors) at every MoE layer of
    every forward. Returns a handle with .remove()."""
    rt = runtime_of(model)
    rt.observers.append(fn)
    return _ObserverHandle(rt, fn)
