"""`moe trace` and `moe bench cache|predictor` commands, trace statistics and the routing recorder."""
import argparse
import json

import pytest
import torch

from moe.cli import bench_cache, bench_predictor, trace as trace_cli
from moe.router_predictor.recorder import TraceRecorder
from moe.router_predictor.stats import format_stats, trace_stats
from moe.router_predictor.trace import RoutingTrace, load_trace, save_trace


def _parser():
    parser = argparse.ArgumentParser(prog="moe")
    sub = parser.add_subparsers(dest="command")
    trace_cli.register(sub)
    bench = sub.add_parser("bench").add_subparsers(dest="suite")
    bench_cache.register(bench)
    bench_predictor.register(bench)
    return parser


def _run(argv, capsys):
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    return capsys.readouterr().out.strip().splitlines()


def _jsonl(path, tokens=30, layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for layer in range(layers):
        for t in range(tokens):
            e = torch.randperm(6, generator=g)[:2].tolist()
            rows.append({"problem_id": t // 12, "layer": layer, "token_idx": t % 12, "experts": e,
                         "gating_probs": [0.6, 0.4]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")


def test_trace_cli_import_stats_bench(tmp_path, capsys):
    """Import, stats and both benches run end to end and end in one JSON line."""
    _jsonl(tmp_path / "a.jsonl", seed=0)
    _jsonl(tmp_path / "b.jsonl", seed=1)
    for name in ("a", "b"):
        out = _run(["trace", "import", "--format", "vllm-jsonl", str(tmp_path / f"{name}.jsonl"),
                    str(tmp_path / f"{name}.safetensors"), "--model", "tiny"], capsys)
        assert "skipped 1 bad lines (line 91: not valid JSON" in out[-1]
    tr = load_trace(tmp_path / "a.safetensors")
    assert (tr.num_tokens, tr.num_layers, tr.num_sequences, tr.model) == (30, 3, 3, "tiny")
    st = json.loads(_run(["trace", "stats", str(tmp_path / "a.safetensors"), "--json"], capsys)[-1])
    assert st["tokens"] == 30 and len(st["frequency"]) == 3
    res = json.loads(_run(["bench", "cache", "--trace", str(tmp_path / "a.safetensors"), "--train",
                           str(tmp_path / "b.safetensors"), "--capacity", "3"], capsys)[-1])
    assert res["capacity"] == 3 and res["fit"] == "train"
    assert set(res["policies"]) == {"lru", "lfu", "score", "predictive", "static-hot", "belady"}
    bel = res["policies"]["belady"]
    for r in res["policies"].values():
        assert r["loads"] == r["misses"] + r["prefetches"] and r["accesses"] == 30 * 3 * 2
        if r["prefetches"] == 0:
            assert r["hit_rate"] <= bel["hit_rate"]
    pred = json.loads(_run(["bench", "predictor", "--trace", str(tmp_path / "a.safetensors"), "--depth", "2",
                            "--json"], capsys)[-1])
    assert pred["fit"] == "in-sample"
    assert set(pred["predictors"]) == {"frequency", "transition", "learned"}
    assert 0.0 <= pred["predictors"]["transition"]["recall@2"]["l+1"] <= 1.0


def test_trace_cli_train_predictor_and_errors(tmp_path, capsys):
    """train-predictor writes a loadable predictor; bad inputs raise errors naming the problem."""
    _jsonl(tmp_path / "a.jsonl")
    _run(["trace", "import", "--format", "vllm-jsonl", str(tmp_path / "a.jsonl"), str(tmp_path / "a.safetensors")],
         capsys)
    out = json.loads(_run(["trace", "train-predictor", "--trace", str(tmp_path / "a.safetensors"), "--output",
                           str(tmp_path / "p.safetensors"), "--steps", "30", "--depth", "2"], capsys)[-1])
    assert "recall@2" in out and out["examples"] == 30 * 2
    pred = json.loads(_run(["bench", "predictor", "--trace", str(tmp_path / "a.safetensors"), "--learned",
                            str(tmp_path / "p.safetensors"), "--json"], capsys)[-1])
    assert pred["depth"] == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        args = _parser().parse_args(["bench", "cache", "--trace", str(tmp_path / "x.safetensors"), "--capacity", "2"])
        args.func(args)
    with pytest.raises(ValueError, match="below top-k"):
        args = _parser().parse_args(["bench", "cache", "--trace", str(tmp_path / "a.safetensors"), "--capacity", "1"])
        args.func(args)
    with pytest.raises(ValueError, match="unknown cache policies"):
        args = _parser().parse_args(["bench", "cache", "--trace", str(tmp_path / "a.safetensors"), "--capacity", "2",
                                     "--policies", "lru,mru"])
        args.func(args)


def test_trace_stats_known_answers():
    """Temporal reuse and frequencies match a hand-made trace; the text report renders."""
    ids = torch.tensor([[[0, 1]], [[0, 2]], [[3, 2]], [[3, 2]]], dtype=torch.int16)  # one layer, 4 tokens
    tr = RoutingTrace(expert_ids=ids, seq_starts=torch.tensor([0, 3, 4]), num_experts=4, top_k=2)
    st = trace_stats(tr)
    # pairs (0,1): reuse 1 of 2; (1,2): 1 of 2; token 3 starts a new sequence -> 2 of 4 over K*pairs.
    assert st["temporal_reuse"]["per_layer"] == [0.5]
    assert st["frequency"] == [[0.25, 0.125, 0.375, 0.25]]
    assert "temporal reuse" in format_stats(st)
    # One layer: no transitions; the JSON holds None, never NaN.
    assert st["transition"]["recall_mean"] is None and "NaN" not in json.dumps(st)


def test_trace_recorder_assembles_forwards():
    """Observer calls of a prefill and decode steps become one contiguous sequence per prompt."""
    rec = TraceRecorder()
    for prompt_len, steps in ((3, 2), (1, 1)):
        rec.begin_sequence()
        for T in [prompt_len] + [1] * steps:
            for layer in range(2):
                ids = torch.arange(T * 2).reshape(T, 2) % 5 + layer
                rec.observe(layer, ids, torch.full((T, 2), 0.5))
        rec.end_sequence()
    tr = rec.trace(num_experts=8, model="m", source="s")
    assert tr.seq_starts.tolist() == [0, 5, 7] and tr.expert_ids.shape == (7, 2, 2)
    assert tr.expert_ids[:3, 1].tolist() == [[1, 2], [3, 4], [5, 1]]  # (arange % 5) + layer
    assert tr.weights.dtype == torch.float16
    rec.begin_sequence()
    rec.observe(0, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="in order"):
        rec.observe(2, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="recorded expert id"):
        TraceRecorder.trace(_recorded_one(), num_experts=2)


def _recorded_one():
    rec = TraceRecorder()
    rec.begin_sequence()
    rec.observe(0, torch.tensor([[4, 1]]), torch.ones(1, 2))
    rec.end_sequence()
    return rec


def test_trace_roundtrip_of_recorded_trace(tmp_path):
    """A recorded trace saves and loads back exactly."""
    tr = _recorded_one().trace()
    save_trace(tr, tmp_path / "r.safetensors")
    back = load_trace(tmp_path / "r.safetensors")
    assert torch.equal(back.expert_ids, tr.expert_ids) and back.num_experts == 5
