"""Bad checkpoints and bad arguments get clear errors that name the problem."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers as T

import moe
from moe.families import UnsupportedModelError
from moe.loader import CheckpointError
from moe.wrapper import BudgetError
from tiny_models import non_expert_bytes, save_tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny("mixtral", tmp_path_factory.mktemp("ck") / "mixtral")


def _copy(ckpt, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(ckpt, dst)
    return dst


def test_missing_path(tmp_path):
    """A folder that does not exist is named in the error."""
    with pytest.raises(FileNotFoundError, match="nope"):
        moe.from_pretrained(tmp_path / "nope", device="cpu")


def test_truncated_shard(ckpt, tmp_path):
    """A truncated shard is reported as corrupt or truncated, with its path."""
    d = _copy(ckpt, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        moe.from_pretrained(d, device="cpu")


def test_garbage_shard(ckpt, tmp_path):
    """A shard that is not safetensors at all is reported with its name."""
    d = _copy(ckpt, tmp_path)
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        moe.from_pretrained(d, device="cpu")


def test_pickled_weights_are_refused(ckpt, tmp_path):
    """Only safetensors are read; a folder with only .bin weights says so."""
    d = _copy(ckpt, tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors"):
        moe.from_pretrained(d, device="cpu")


def test_config_does_not_match_weights(ckpt, tmp_path):
    """A config whose sizes differ from the weights names the tensor and both shapes."""
    d = _copy(ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config"):
        moe.from_pretrained(d, device="cpu")


def test_config_with_fewer_layers_than_weights(ckpt, tmp_path):
    """Weights for layers the config does not have are an error, not silently dropped."""
    d = _copy(ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match"):
        moe.from_pretrained(d, device="cpu")


def test_missing_expert_tensor(ckpt, tmp_path):
    """A checkpoint lacking one expert tensor names the layer, expert and part."""
    from safetensors.torch import load_file, save_file

    d = _copy(ckpt, tmp_path)
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"MoE layer 1 .* expert 3 w2"):
        moe.from_pretrained(d, device="cpu")


def test_missing_index_shard(ckpt, tmp_path):
    """An index that names a missing shard says which."""
    d = _copy(ckpt, tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        moe.from_pretrained(d, device="cpu")


def test_budget_smaller_than_non_expert_weights(ckpt):
    """A budget below the non-expert weights gives both sizes."""
    ref = T.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    need = non_expert_bytes(ref)
    with pytest.raises(BudgetError, match=rf"{need} bytes"):
        moe.wrap(ref, gpu_memory=need - 1, device="cpu")
    with pytest.raises(BudgetError, match="MiB"):
        moe.from_pretrained(ckpt, gpu_memory="1KB", device="cpu")


def test_unsupported_architecture_lists_supported():
    """A non-supported model is refused with the list of supported families."""
    cfg = T.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(UnsupportedModelError, match="mixtral.*deepseek_v3"):
        moe.wrap(T.LlamaForCausalLM(cfg), device="cpu")


def test_bad_sizes_and_config():
    """Malformed sizes and config values are named."""
    from moe.config import parse_size

    assert parse_size("8GiB") == 8 * 2**30 and parse_size("500MB") == 500 * 10**6
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot read memory size"):
        parse_size("eight gigs")
    with pytest.raises(ValueError, match="scheduler"):
        moe.RuntimeConfig(scheduler="fastest")
    with pytest.raises(TypeError):
        moe.RuntimeConfig("lru")  # keyword-only


def test_double_wrap_refused(ckpt):
    """Wrapping a wrapped model is an error."""
    m = moe.from_pretrained(ckpt, device="cpu")
    with pytest.raises(ValueError, match="already wrapped"):
        moe.wrap(m, device="cpu")
