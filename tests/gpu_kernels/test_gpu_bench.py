"""bench/gpu_moe.py: its torch baselines compute the MoE layer, and it skips cleanly without CUDA."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_script import BENCH_DIR, load_bench

from moe.gpu_kernels import fused_moe_reference

_BENCH = BENCH_DIR / "gpu_moe.py"

# (T, E, K, D, F, dtype)
SHAPES = [(1, 8, 2, 16, 24, torch.float32), (5, 4, 1, 9, 7, torch.float32), (33, 8, 2, 16, 12, torch.bfloat16),
          (17, 16, 6, 8, 8, torch.float32)]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def bench():
    return load_bench("gpu_moe")


@pytest.mark.parametrize("baseline", ["loop", "grouped_mm", "bmm"])
@pytest.mark.parametrize("T,E,K,D,F,dtype", SHAPES)
def test_baselines_match_reference(bench, baseline, T, E, K, D, F, dtype):
    """Each torch baseline the benchmark times computes the same layer as the reference."""
    if baseline == "grouped_mm" and bench._grouped_mm() is None:
        pytest.skip("this torch has no grouped_mm")
    if baseline == "grouped_mm" and any(n * dtype.itemsize % 16 for n in (D, F)):
        pytest.skip("torch grouped_mm needs rows of a multiple of 16 bytes")
    g = torch.Generator().manual_seed(T + E)
    x = torch.randn(T, D, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * F, D, generator=g) / D**0.5).to(dtype)
    w2 = (torch.randn(E, D, F, generator=g) / F**0.5).to(dtype)
    ids, weights = bench.routing(T, E, K, seed=T)
    got = bench.BASELINES[baseline](x, w13, w2, ids, weights)
    want = fused_moe_reference(x, w13, w2, ids, weights)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_accounting_counts_active_experts_only(bench):
    """Decode bytes count each used expert once; flops count every routed pair."""
    ids = torch.tensor([[0, 3], [3, 0], [5, 0]])
    assert bench.bytes_read(ids, 4, 8, 2) == 3 * 3 * 4 * 8 * 2 + 2 * 3 * 4 * 2 + 6 * 12
    assert bench.moe_flops(3, 2, 4, 8) == 2 * 6 * 3 * 4 * 8


def test_without_cuda_prints_skip_json():
    """Without CUDA the benchmark exits 0 and its last line is JSON saying it skipped and why."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    proc = subprocess.run([sys.executable, str(_BENCH)], capture_output=True, text=True, timeout=120, check=True)
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["skipped"] is True and "CUDA" in last["reason"]


def test_bad_arguments_are_named(bench):
    """Unknown shapes and malformed token lists are rejected with a message naming them."""
    with pytest.raises(SystemExit):
        bench._parse(["--shapes", "nope"])
    with pytest.raises(SystemExit):
        bench._parse(["--decode-tokens", "1,x"])
    args = bench._parse(["--shapes", "mixtral-8x7b", "--decode-tokens", "1,4"])
    assert args.shapes == ["mixtral-8x7b"] and args.decode_tokens == [1, 4]


@pytest.mark.gpu
def test_benchmark_runs_on_gpu():
    """On a GPU a reduced benchmark run ends with a JSON line holding measured rates and both regimes."""
    cmd = [sys.executable, str(_BENCH), "--shapes", "deepseek-v2-lite", "--decode-tokens", "1,16",
           "--prefill-tokens", "512"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["hbm_gbps"] > 0 and last["matmul_tflops"] > 0
    assert [r["T"] for r in last["decode"]] == [1, 16] and [r["T"] for r in last["prefill"]] == [512]
    assert all(r["max_rel_err_vs_loop"] < 5e-2 for r in last["decode"] + last["prefill"])


_TRACE = Path("/work/shared/data/traces/mixtral-8x7b/humaneval_routing.jsonl")


def test_real_trace_replays_as_routing(bench):
    """The Mixtral HumanEval trace yields top-2 ids over 8 experts with weights summing to one."""
    if not _TRACE.is_file():
        pytest.skip("the Mixtral routing trace is not on this machine")
    trace = bench.load_trace(_TRACE, layer=16)
    ids, weights = bench.trace_routing(trace, 500, 8, 2)
    assert ids.shape == weights.shape == (500, 2)
    assert int(ids.min()) >= 0 and int(ids.max()) < 8 and torch.all(ids[:, 0] != ids[:, 1])
    torch.testing.assert_close(weights.sum(-1), torch.ones(500))
    assert torch.equal(ids[trace[0].shape[0]], ids[0])  # shorter traces repeat


def test_trace_errors_name_line_and_shape(bench, tmp_path):
    """A malformed trace line is reported with its line number; a trace for other shapes is refused."""
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"layer": 0, "experts": [1, 2], "gating_probs": [0.5, 0.5]}\n{"layer": 0, "experts": 3}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2"):
        bench.load_trace(bad, layer=0)
    with pytest.raises(ValueError, match="no routing records for layer 5"):
        bench.load_trace(_one_line(tmp_path), layer=5)
    trace = bench.load_trace(_one_line(tmp_path), layer=0)
    with pytest.raises(ValueError, match="top-6"):
        bench.trace_routing(trace, 4, 64, 6)


def _one_line(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text('{"layer": 0, "experts": [1, 7], "gating_probs": [0.75, 0.25]}\n')
    return path
