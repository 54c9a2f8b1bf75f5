"""Hub ids resolve through huggingface_hub's local cache, offline, without network."""
from __future__ import annotations

import shutil

import pytest
import torch

import moe
from moe.loader import CheckpointError, resolve_checkpoint
from tiny_models import save_tiny


def _fake_hub_cache(root, repo_id: str, ckpt) -> None:
    """Lay a checkpoint out the way huggingface_hub caches a downloaded snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(ckpt, repo / "snapshots" / commit)


def test_hub_id_loads_from_local_cache_offline(tmp_path, monkeypatch):
    """With HF_HUB_OFFLINE=1 a cached Hub id loads to the same model as its folder."""
    ckpt = save_tiny("olmoe", tmp_path / "src")
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "tiny-org/tiny-olmoe", ckpt)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    folder = resolve_checkpoint("tiny-org/tiny-olmoe")
    assert (folder / "model.safetensors").exists()
    ids = torch.randint(0, 96, (1, 5))
    a = moe.from_pretrained("tiny-org/tiny-olmoe", device="cpu", dtype=torch.float32)
    b = moe.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_uncached_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    """An uncached Hub id in offline mode names the id instead of hanging or crashing."""
    import huggingface_hub.constants as C

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="nobody/nothing"):
        resolve_checkpoint("nobody/nothing")
