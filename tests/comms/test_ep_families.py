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
    s = moe.stats(model)  # the single-process cache is gone; the EP executor's expert calls count
    assert s["cache_slots"] == 0 and s["ep"]["expert_calls"] > 0 and s["ep"]["lar"] == 1.0
    assert s["cpu_expert_calls"] == s["ep"]["expert_calls"] and s["ep"]["expert_rows"] == ep.stats.activations


def test_executor_needs_exactly_one_expert_function(group):
    """ExpertParallel refuses both or neither of the per-expert and grouped functions."""
    from moe.comms.ep import ExpertParallel

    p = ExpertPlacement.contiguous(1, 4, 1)
    with pytest.raises(ValueError, match="exactly one of expert_fn"):
        ExpertParallel(placement=p, group=group)
    with pytest.raises(ValueError, match="exactly one of expert_fn"):
        ExpertParallel(placement=p, group=group, expert_fn=lambda l, e, x: x, grouped_fn=lambda l, x, i, w: x)
