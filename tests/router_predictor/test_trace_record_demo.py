"""`moe trace record` on the built-in demo MoE: the recorded routing matches the model's run."""
import argparse
import json

import torch

from moe.cli import trace as trace_cli
from moe.demo import ByteTokenizer
from moe.router_predictor.trace import load_trace


def test_trace_record_demo_model(tmp_path, capsys):
    """Recording two prompts gives two contiguous sequences of prompt + new - 1 tokens each."""
    prompts = ["hello", "routing traces"]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"id": i, "prompt": p}) for i, p in enumerate(prompts)))
    parser = argparse.ArgumentParser()
    trace_cli.register(parser.add_subparsers())
    args = parser.parse_args(["trace", "record", "--input", str(tmp_path / "p.jsonl"), "--output",
                              str(tmp_path / "t.safetensors"), "--max-new-tokens", "3"])
    assert args.func(args) == 0
    assert "recorded" in capsys.readouterr().out
    tr = load_trace(tmp_path / "t.safetensors")
    tok = ByteTokenizer()
    lengths = (tr.seq_starts[1:] - tr.seq_starts[:-1]).tolist()
    # Greedy decode may stop early at end-of-text, never run longer.
    for n, p in zip(lengths, prompts):
        assert len(tok.encode(p)) <= n <= len(tok.encode(p)) + 2
    assert tr.num_sequences == 2 and tr.top_k == 2 and tr.num_experts == 8
    assert tr.model == "demo" and tr.weights is not None
    assert torch.all(tr.weights.float() > 0)
