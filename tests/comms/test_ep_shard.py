"""Expert-parallel ranks load only their own experts (RuntimeConfig.ep_shard) and still
reproduce the single-process model; stats report the experts each rank ran."""
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers as T
from safetensors.torch import load_file, save_file

import moe
from moe.comms.group import run_local
from moe.comms.placement import ExpertPlacement
from moe.config import EPShard, RuntimeConfig
from moe.ep import enable_expert_parallel, moe_blocks
from moe.loader import CheckpointError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import save_tiny  # noqa: E402

PROMPT = [[3, 17, 5, 90, 42, 7, 1], [8, 8, 64, 2, 31, 5, 11]]


def _only_rank_experts(src: Path, dst: Path, keep_LE: torch.Tensor) -> Path:
    """A copy of the checkpoint without the expert tensors other ranks hold."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    kept = {}
    for k, v in tensors.items():
        parts = k.split(".")
        if "experts" in parts:
            layer, e = int(parts[parts.index("layers") + 1]), int(parts[parts.index("experts") + 1])
            if not keep_LE[layer, e]:
                continue
        kept[k] = v
    save_file(kept, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny("mixtral", tmp_path_factory.mktemp("shard") / "mixtral")


def test_shard_never_needs_other_ranks_experts(ckpt, tmp_path):
    """Rank 0 of 2 loads from a checkpoint that lacks rank 1's experts; a full load of it fails naming one."""
    cfg = T.AutoConfig.from_pretrained(str(ckpt))
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    keep_LE = ExpertPlacement.contiguous(L, E, 2).holds_LER[:, :, 0]
    part = _only_rank_experts(ckpt, tmp_path / "part", keep_LE)
    model = moe.from_pretrained(part, device="cpu", config=RuntimeConfig(ep_shard=EPShard(rank=0, world_size=2)))
    store = moe_blocks(model)[0].store
    assert torch.equal(store.held_LE, keep_LE)
    assert store.total_bytes == store.expert_bytes * L * E // 2
    assert moe.stats(model)["cache_slots"] == 0
    with pytest.raises(KeyError, match=f"expert {E - 1} of MoE layer 0 is not held"):
        store.expert(0, E - 1)
    with pytest.raises(CheckpointError, match="lacks .* expert tensors"):
        moe.from_pretrained(part, device="cpu")


def test_shard_with_a_placement_of_other_shape_is_refused(ckpt, tmp_path):
    """A placement file for another model or world size is refused before any weight is read."""
    path = tmp_path / "p.json"
    ExpertPlacement.contiguous(3, 8, 2).save(path)
    with pytest.raises(ValueError, match="placement .* covers 3 MoE layers x 8 experts on 2 ranks"):
        moe.from_pretrained(ckpt, device="cpu",
                            config=RuntimeConfig(ep_shard=EPShard(rank=0, world_size=2, placement=str(path))))
    with pytest.raises(ValueError, match="rank 2 of world_size 2"):
        EPShard(rank=2, world_size=2)


def _rank_worker(rank: int, world: int, ckpt: str, placement: str, ref_logits: torch.Tensor) -> None:
    shard = EPShard(rank=rank, world_size=world, placement=placement)
    model = moe.from_pretrained(ckpt, device="cpu", config=RuntimeConfig(ep_shard=shard))
    store = moe_blocks(model)[0].store
    pl = ExpertPlacement.load(placement)
    assert torch.equal(store.held_LE, pl.holds_LER[:, :, rank])
    enable_expert_parallel(model, dist.group.WORLD, pl)
    ids = torch.tensor(PROMPT)[rank::world]  # data parallel: each rank its own rows
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, ref_logits[rank::world], rtol=1e-4, atol=1e-4)
    s = moe.stats(model)
    assert s["ep"]["rank"] == rank and s["ep"]["expert_calls"] > 0
    assert s["cpu_expert_calls"] == s["ep"]["expert_calls"]
    assert s["ep"]["activations"] == ids.numel() * pl.num_layers * 2


def test_two_sharded_ranks_match_transformers(ckpt, tmp_path):
    """Two gloo ranks, each holding half the experts under a non-contiguous placement, give transformers' logits."""
    ref = T.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = ref(torch.tensor(PROMPT)).logits
    cfg = ref.config
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    rank_LE = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(l)) % 2 for l in range(L)])
    path = tmp_path / "placement.json"
    ExpertPlacement.from_ranks(rank_LE, 2).save(path)
    run_local(2, _rank_worker, str(ckpt), str(path), ref_logits, timeout_s=60)


def test_fused_local_experts_equal_the_per_expert_path(ckpt):
    """The stacked fused path (CUDA's, here through its torch reference) equals the per-expert CPU kernels."""
    from moe.ep import _LocalExperts

    model = moe.from_pretrained(ckpt, device="cpu")
    store = moe_blocks(model)[0].store
    pl = ExpertPlacement.from_ranks(torch.tensor([[0, 1, 0, 1, 1, 0]] * store.num_layers), 2)
    per_expert = _LocalExperts(store, pl, 1, torch.device("cpu"), fused=False)
    fused = _LocalExperts(store, pl, 1, torch.device("cpu"), fused=True)
    g = torch.Generator().manual_seed(0)
    x_ND = torch.randn(9, store.hidden, generator=g)
    ids_NK = torch.tensor([[1, 3], [4, -1], [-1, 1], [3, 4], [-1, -1], [1, 4], [3, -1], [4, 1], [-1, 3]])
    w_NK = torch.rand(9, 2, generator=g)
    for layer in range(store.num_layers):
        torch.testing.assert_close(fused(layer, x_ND, ids_NK, w_NK), per_expert(layer, x_ND, ids_NK, w_NK),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_one_rank_nccl_ep_matches_transformers(ckpt):
    """On CUDA (NCCL, one rank) the fused Triton path behind EP reproduces transformers' logits."""
    from moe.comms.group import find_free_port

    ref = T.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        want = ref(ids).logits
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1)
    try:
        model = moe.from_pretrained(ckpt, device="cuda", config=RuntimeConfig(ep_shard=EPShard(rank=0, world_size=1)))
        enable_expert_parallel(model, dist.group.WORLD)
        with torch.no_grad():
            got = model(ids.cuda()).logits.cpu()
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
        assert moe.stats(model)["gpu_expert_calls"] > 0
    finally:
        dist.destroy_process_group()
