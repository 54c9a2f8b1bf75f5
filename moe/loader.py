"""`moe.from_pretrained`: safetensors checkpoint -> hybrid model, experts streamed into
the host store (no second full copy of the model in RAM).

Steps: resolve the folder (local, or Hub snapshot of safetensors/config/tokenizer files)
-> config and family check -> build the model skeleton on the meta device -> replace
its sparse blocks -> materialise the non-expert weights on `device` -> stream every
checkpoint tensor once: experts into the store, the rest into the model -> check that
everything the model needs was present -> install the runtime.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from moe.config import RuntimeConfig
from moe.expert_cache.store import HostExpertStore
from moe.families import family_for_config
from moe.wrapper import _decoder_layers, held_experts, install_runtime, moe_layer_indices, resolve_device

__all__ = ["from_pretrained", "resolve_checkpoint", "CheckpointError"]

_HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                 "tokenizer*", "special_tokens_map.json", "*.model", "vocab*", "merges.txt",
                 "added_tokens.json", "chat_template*"]


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match its config."""


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder holding the checkpoint: the path itself, or a Hub snapshot."""
    p = Path(path_or_hub_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_hub_id)
    looks_local = p.is_absolute() or s.startswith(".") or p.exists() or s.count("/") != 1
    if looks_local:
        if p.exists():
            raise CheckpointError(f"{s} is a file; expected a checkpoint folder with config.json "
                                  "and *.safetensors")
        raise FileNotFoundError(f"checkpoint folder {s} does not exist")
    from huggingface_hub import snapshot_download  # honours HF_HUB_OFFLINE and the local cache

    try:
        return Path(snapshot_download(repo_id=s, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        raise CheckpointError(f"cannot get {s!r} from the Hugging Face Hub or its local cache: "
                              f"{type(exc).__name__}: {exc}") from exc


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
        return [folder / f for f in files]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    others = [f.name for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    hint = (f" (found {', '.join(others)}: only safetensors are loaded, pickled weights never are)"
            if others else "")
    raise CheckpointError(f"no *.safetensors weights in {folder}{hint}")


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:
        raise CheckpointError(f"cannot read safetensors shard {path}: it is corrupt or truncated "
                              f"({type(exc).__name__}: {exc})") from exc


def _fix_non_persistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers that checkpoints do not hold (rotary inv_freq, ...) were left uninitialised
    by the meta build; rebuild their modules from the config to get their values."""
    for name, module in model.named_modules():
        bufs = [b for b in getattr(module, "_non_persistent_buffers_set", ()) if b in module._buffers]
        if not bufs:
            continue
        fresh = None
        for args, kwargs in (((), {"config": model.config}), ((model.config,), {})):
            try:
                with torch.device("cpu"):
                    fresh = type(module)(*args, **kwargs)
                break
            except TypeError:
                continue
        if fresh is None:
            raise CheckpointError(f"cannot rebuild the buffers {bufs} of {name} ({type(module).__name__})")
        for b in bufs:
            module._buffers[b] = fresh._buffers[b].to(device)


def from_pretrained(path_or_hub_id, gpu_memory="8GiB", dtype=None, device=None,
                    config: RuntimeConfig | None = None):
    """Load a safetensors checkpoint of a supported MoE family into the hybrid runtime.

    path_or_hub_id: local folder or Hugging Face Hub id. dtype: weight dtype (default:
    the checkpoint config's dtype, else float32). Other arguments as moe.wrap.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config or RuntimeConfig()
    folder = resolve_checkpoint(path_or_hub_id)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    family = family_for_config(hf_config)
    shards = _shard_files(folder)
    device = resolve_device(device)
    if dtype is None:
        dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=False)
    model.eval()
    layers = _decoder_layers(model)
    moe_layers = moe_layer_indices(model, family)
    if not moe_layers:
        raise CheckpointError(f"config of {folder} has no sparse MoE layers")
    ordinal_of = {i: o for o, i in enumerate(moe_layers)}
    E = family.num_experts(hf_config)
    F = family.moe_inter(hf_config)
    D = hf_config.hidden_size
    expert_dtype = layers[moe_layers[0]].mlp.experts.gate_up_proj.dtype
    store = HostExpertStore(num_layers=len(moe_layers), num_experts=E, hidden=D, inter=F,
                            dtype=expert_dtype,
                            pin_memory=config.pin_memory if config.pin_memory is not None
                            else device.type == "cuda",
                            held_LE=held_experts(config, len(moe_layers), E))
    for i in moe_layers:
        del layers[i].mlp.experts
    # Non-expert tensors are loaded on CPU first: the budget check must run before
    # anything is placed on the device.
    model.to_empty(device="cpu")
    _fix_non_persistent_buffers(model, torch.device("cpu"))
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update({n: b for n, b in model.named_buffers(remove_duplicate=False)})
    loaded: set[str] = set()

    for shard in shards:
        with _open(shard) as f:
            for key in f.keys():
                parsed = family.parse_expert_key(key)
                if parsed is not None and parsed[1] is not None and parsed[0] in ordinal_of \
                        and 0 <= parsed[1] < E and not store.holds(ordinal_of[parsed[0]], parsed[1]):
                    continue  # another expert-parallel rank's expert: never read it
                try:
                    tensor = f.get_tensor(key)
                except Exception as exc:
                    raise CheckpointError(f"cannot read tensor {key} from {shard}: the shard is "
                                          f"corrupt or truncated ({exc})") from exc
                if parsed is not None:
                    layer, expert, part = parsed
                    if layer not in ordinal_of:
                        raise CheckpointError(
                            f"{shard.name}: {key} holds experts for decoder layer {layer}, which "
                            "the config does not make a MoE layer: the config does not match the weights")
                    try:
                        if expert is None:
                            for e in range(E):
                                store.set_part(ordinal_of[layer], e, part, tensor[e])
                        else:
                            store.set_part(ordinal_of[layer], expert, part, tensor)
                    except ValueError as exc:
                        raise CheckpointError(f"{shard.name}: {key}: {exc}") from exc
                    continue
                name = family.module_key(key)
                target = targets.get(name)
                if target is None:
                    raise CheckpointError(f"{shard.name}: tensor {key} has no place in a "
                                          f"{type(model).__name__} built from {folder / 'config.json'}: "
                                          "the config does not match the weights")
                if tuple(target.shape) != tuple(tensor.shape):
                    raise CheckpointError(f"{shard.name}: {key} has shape {tuple(tensor.shape)} but the "
                                          f"config gives {tuple(target.shape)}: the config does not "
                                          "match the weights")
                with torch.no_grad():
                    target.copy_(tensor)
                loaded.add(name)

    tied = _tied_names(model)
    needed = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    needed |= {n for n, _ in model.named_buffers(remove_duplicate=False)
               if n.rsplit(".", 1)[-1] not in _non_persistent(model, n)}
    absent = sorted(needed - loaded - tied)
    if absent:
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        raise CheckpointError(f"checkpoint {folder} lacks tensors the config needs: {shown}")
    missing = store.missing()
    if missing:
        l, e, p = missing[0]
        raise CheckpointError(f"checkpoint {folder} lacks {len(missing)} expert tensors, first: "
                              f"MoE layer {l} (decoder layer {moe_layers[l]}) expert {e} {p}")
    if tied:
        model.tie_weights()
    install_runtime(model, family=family, moe_layers=moe_layers, store=store,
                    gpu_memory=gpu_memory, device=device, config=config)
    model.name_or_path = str(path_or_hub_id)
    return model


def _non_persistent(model: nn.Module, buffer_name: str) -> set[str]:
    owner = model.get_submodule(buffer_name.rsplit(".", 1)[0]) if "." in buffer_name else model
    return set(getattr(owner, "_non_persistent_buffers_set", ()))


def _tied_names(model: nn.Module) -> set[str]:
    """Parameters that tie_weights() fills from another (e.g. lm_head from the embeddings)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    out = model.get_output_embeddings()
    if out is None:
        return set()
    return {f"{n}.weight" for n, m in model.named_modules() if m is out}
