"""Expert parallelism on every supported family: EP logits equal transformers' own model."""
import copy
import datetime
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers as T

import moe
from moe.comms.group import find_free_port
from moe.comms.placement import ExpertPlacement
from moe.ep import enable_expert_parallel, moe_blocks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import FAMILY_CONFIGS, make_config  # noqa: E402


@pytest.fixture(scope="module")
def group():
    """A one-rank gloo group: every round still goes through plan, all_to_all and combine."""
    if dist.is_initialized():
        pytest.skip("a default process group is already up in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield dist.group.WORLD
    dist.destroy_process_group()


def _hf_model(family: str):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(make_config(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or name.endswith("gate.weight"):
                p.normal_(0, 0.5)  # so that routing and experts dominate the logits
    return model.eval()


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_ep_logits_match_transformers(group, family):
    """The EP executor behind every family's gating and shared experts reproduces transformers' logits."""
    ref = _hf_model(family)
    model = moe.wrap(copy.deepcopy(ref), gpu_memory=2**30, device="cpu")
    store = moe_blocks(model)[0].store
    placement = ExpertPlacement.contiguous(store.num_layers, store.num_experts, 1)
    ep = enable_expert_parallel(model, group, placement)
    ids = torch.randint(0, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert ep.stats.rounds == store.num_layers and ep.stats.activations == 18 * store.num_layers * \
        moe_blocks(model)[0].gating.top_k
