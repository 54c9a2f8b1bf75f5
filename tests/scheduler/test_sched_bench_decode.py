"""bench/decode.py: real shapes scale as documented, the bound is sane, and a tiny run prints its JSON line."""
import json

import pytest
import torch
from bench_script import load_bench

from moe.scheduler.cost_model import AnalyticCostModel
from moe.scheduler.profile import save_profile

@pytest.fixture(scope="module")
def bench():
    return load_bench("decode")


@pytest.mark.parametrize("name", ["mixtral-8x7b", "deepseek-v2-lite", "qwen3-30b-a3b"])
def test_full_scale_configs_have_the_real_shapes(bench, name):
    """At scale 1 the configs carry the published hidden, expert and layer sizes."""
    real = bench.MODELS[name]
    cfg = bench.build_config(name, 1.0, None)
    assert cfg.hidden_size == real["D"] and cfg.num_hidden_layers == real["L"] and cfg.vocab_size == real["vocab"]
    assert cfg.num_experts_per_tok == real["K"]
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "n_routed_experts", None) or cfg.num_experts
    assert experts == real["E"]
    inter = cfg.intermediate_size if name == "mixtral-8x7b" else cfg.moe_intermediate_size
    assert inter == real["F"]


def test_scaled_config_keeps_routing_and_shrinks_dims(bench):
    """--scale shrinks dims and layers but keeps the expert count and top-k."""
    cfg = bench.build_config("qwen3-30b-a3b", 1 / 16, None)
    assert cfg.num_experts == 128 and cfg.num_experts_per_tok == 8
    assert cfg.hidden_size == 128 and cfg.moe_intermediate_size == 48 and cfg.num_hidden_layers == 3


def test_decode_bound_counts_active_bytes_only(bench):
    """On CPU the bound is bandwidth over non-expert bytes plus top-k experts per layer; hits raise it on CUDA."""
    wb = dict(non_expert_read=10**9, expert=10**8, moe_layers=4)
    bw = dict(cpu_read_gbps=20.0, device_read_gbps=2000.0, h2d_gbps=25.0)
    assert bench.decode_bound(wb, 2, "cpu", bw, None) == pytest.approx(20e9 / (10**9 + 8 * 10**8))
    assert bench.decode_bound(wb, 2, "cuda", bw, 1.0) == pytest.approx(2000e9 / (10**9 + 8 * 10**8))
    assert bench.decode_bound(wb, 2, "cuda", bw, 0.5) < bench.decode_bound(wb, 2, "cuda", bw, 0.9)


def test_tiny_run_prints_one_json_line_last(bench, tmp_path, capsys, monkeypatch):
    """A one-model, one-rule run at tiny scale ends with a JSON line holding its result and baselines."""
    prof = save_profile(AnalyticCostModel.defaults("cpu"), device="cpu", path=tmp_path / "p.json")
    monkeypatch.setenv("MOE_PROFILE", str(prof))  # restored after the test; main() sets it too
    threads = torch.get_num_threads()
    try:
        rc = bench.main(["--device", "cpu", "--models", "mixtral-8x7b", "--scale", "0.03125", "--layers", "2",
                         "--prompts", "8", "--budgets", "0.5", "--rules", "dynamic,cpu-only", "--new-tokens", "3",
                         "--repeats", "1", "--threads", "1", "--profile", str(prof)])
    finally:
        torch.set_num_threads(threads)  # main() sets the process-wide thread count
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "decode" and {r["rule"] for r in last["results"]} == {"dynamic", "cpu-only"}
    base = {b["rule"]: b for b in last["baselines"]}
    assert base["accelerate-offload"]["status"].startswith("unavailable")
    assert base["all-on-device"]["decode_tok_s"] > 0
    for r in last["results"]:
        assert r["decode_tok_s"] > 0 and r["bound_decode_tok_s"] > 0 and r["cache_slots"] >= 1
    assert last["summary"]["dynamic_vs_cpu-only_decode_tok_s"] > 0
