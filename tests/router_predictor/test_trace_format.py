"""Routing-trace file format: round trips, validation, and the vLLM JSON-lines importer."""
import json

import pytest
import torch
from safetensors.torch import save_file

from moe.router_predictor.trace import RoutingTrace, import_vllm_jsonl, load_trace, save_trace

# (tokens per sequence, layers, experts, top-k, with weights)
TRACE_SHAPES = [
    ([5], 1, 2, 1, False),
    ([3, 7], 4, 8, 2, True),
    ([1, 0, 33], 3, 61, 6, True),
    ([0], 2, 4, 2, False),
]


def _random_trace(lengths, layers, experts, k, with_weights, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(t * layers)]) if t else torch.zeros(0, k)
    ids_TLK = ids.reshape(t, layers, k).to(torch.int16)
    w = torch.rand(t, layers, k, generator=g).to(torch.float16) if with_weights else None
    return RoutingTrace(
        expert_ids=ids_TLK,
        seq_starts=torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0),
        num_experts=experts,
        top_k=k,
        weights=w,
        model="tiny",
        source="test",
    )


@pytest.mark.parametrize("lengths,layers,experts,k,with_weights", TRACE_SHAPES)
def test_trace_save_load_roundtrip_exact(tmp_path, lengths, layers, experts, k, with_weights):
    """A saved trace loads back with identical tensors and metadata."""
    tr = _random_trace(lengths, layers, experts, k, with_weights)
    save_trace(tr, tmp_path / "t.safetensors")
    back = load_trace(tmp_path / "t.safetensors")
    assert torch.equal(back.expert_ids, tr.expert_ids) and back.expert_ids.dtype == torch.int16
    assert torch.equal(back.seq_starts, tr.seq_starts)
    assert (back.weights is None) == (tr.weights is None)
    if tr.weights is not None:
        assert torch.equal(back.weights, tr.weights)
    assert (back.num_experts, back.top_k, back.model, back.source) == (experts, k, "tiny", "test")


def test_trace_select_sequences_and_next_mask():
    """Selecting sequences keeps their rows; next_in_sequence is False at sequence ends."""
    tr = _random_trace([2, 3, 1], 2, 8, 2, True)
    sub = tr.select_sequences([2, 0])
    assert sub.seq_starts.tolist() == [0, 1, 3]
    assert torch.equal(sub.expert_ids, torch.cat([tr.expert_ids[5:6], tr.expert_ids[0:2]]))
    assert tr.next_in_sequence().tolist() == [True, False, True, True, False, False]
    assert tr.sequence_ids().tolist() == [0, 0, 1, 1, 1, 2]
    gaps = RoutingTrace(expert_ids=tr.expert_ids[:3], seq_starts=torch.tensor([0, 0, 2, 2, 3]), num_experts=8, top_k=2)
    assert gaps.next_in_sequence().tolist() == [True, False, False]
    assert gaps.sequence_ids().tolist() == [1, 1, 3]


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(expert_ids=torch.zeros(2, 1, 2, dtype=torch.int32)), "int16"),
        (dict(expert_ids=torch.full((2, 1, 2), 8, dtype=torch.int16)), r"\[0, 8\)"),
        (dict(top_k=3), "top_k"),
        (dict(seq_starts=torch.tensor([0, 3])), "seq_starts"),
        (dict(seq_starts=torch.tensor([0, 2, 1, 2])), "seq_starts"),
        (dict(weights=torch.zeros(2, 1, 2)), "float16"),
    ],
)
def test_trace_validation_names_problem(change, message):
    """Constructing a malformed trace raises ValueError naming the field."""
    kw = dict(
        expert_ids=torch.zeros(2, 1, 2, dtype=torch.int16),
        seq_starts=torch.tensor([0, 2]),
        num_experts=8,
        top_k=2,
    )
    kw.update(change)
    with pytest.raises(ValueError, match=message):
        RoutingTrace(**kw)


def test_trace_load_rejects_bad_files(tmp_path):
    """load_trace names missing files, non-safetensors files, wrong formats and bad ids."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trace(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        load_trace(tmp_path / "junk.safetensors")
    ids = torch.zeros(2, 1, 2, dtype=torch.int16)
    save_file({"expert_ids": ids, "seq_starts": torch.tensor([0, 2])}, str(tmp_path / "w.safetensors"),
              metadata={"format": "other/1"})
    with pytest.raises(ValueError, match="not a routing trace"):
        load_trace(tmp_path / "w.safetensors")
    meta = {"format": "moe-trace/1", "num_experts": "4", "top_k": "2", "model": "", "source": ""}
    save_file({"expert_ids": ids + 5, "seq_starts": torch.tensor([0, 2])}, str(tmp_path / "r.safetensors"),
              metadata=meta)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        load_trace(tmp_path / "r.safetensors")
    save_file({"expert_ids": ids}, str(tmp_path / "m.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="seq_starts"):
        load_trace(tmp_path / "m.safetensors")


def _rows(problem, positions, layers, pos_key="token_idx", expert=lambda p, l: [p % 4, 4 + l % 4]):
    return [
        {"dataset": "d", "problem_id": problem, "layer": l, pos_key: p, "experts": expert(p, l),
         "gating_probs": [0.75, 0.25]}
        for l in range(layers) for p in positions
    ]


def _write(path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")


def test_trace_import_layer_major_and_roundtrip(tmp_path):
    """Layer-major rows of two problems import as two ordered sequences, exactly."""
    rows = _rows(0, range(3), 2) + _rows(1, range(2), 2, pos_key="token_pos")
    _write(tmp_path / "a.jsonl", rows)
    tr, rep = import_vllm_jsonl(tmp_path / "a.jsonl")
    assert tr.seq_starts.tolist() == [0, 3, 5]
    assert tr.num_experts == 6 and tr.top_k == 2 and tr.num_layers == 2  # largest id + 1
    expect = [[[p % 4, 4 + l % 4] for l in range(2)] for p in (0, 1, 2, 0, 1)]
    assert tr.expert_ids.tolist() == expect
    assert torch.equal(tr.weights, torch.tensor([0.75, 0.25], dtype=torch.float16).expand(5, 2, 2))
    assert rep.bad_lines == 0 and rep.dropped_tokens == 0 and rep.tokens == 5
    save_trace(tr, tmp_path / "a.safetensors")
    assert torch.equal(load_trace(tmp_path / "a.safetensors").expert_ids, tr.expert_ids)


def test_trace_import_drops_incomplete_tokens_and_reports_bad_lines(tmp_path):
    """Tokens missing a layer are dropped; malformed lines are skipped and named by number."""
    rows = [r for r in _rows(0, range(4), 3) if not (r["token_idx"] == 2 and r["layer"] == 1)]
    bad = ["{not json", json.dumps({"problem_id": 0, "layer": 0, "token_idx": 9, "experts": "x"}), "", "[]"]
    _write(tmp_path / "b.jsonl", rows, bad)
    tr, rep = import_vllm_jsonl(tmp_path / "b.jsonl")
    assert tr.num_tokens == 3 and rep.dropped_tokens == 1
    assert rep.bad_lines == 3
    first_bad = len(rows) + 1
    assert rep.bad_examples[0].startswith(f"line {first_bad}:")
    assert "experts" in rep.bad_examples[1] and f"line {first_bad + 3}" in rep.bad_examples[2]
    assert "dropped 1 tokens" in rep.summary() and "skipped 3 bad lines" in rep.summary()


def test_trace_import_shared_positions_form_extra_sequence(tmp_path):
    """Token-major rows logged at one reused position become a separate sequence in file order."""
    main = _rows(0, range(2), 2)
    extra = [
        {"dataset": "d", "problem_id": 0, "layer": l, "token_idx": 0, "experts": [t, 7], "gating_probs": [0.5, 0.5]}
        for t in range(3) for l in range(2)
    ]
    _write(tmp_path / "c.jsonl", main + extra)
    tr, rep = import_vllm_jsonl(tmp_path / "c.jsonl")
    assert tr.seq_starts.tolist() == [0, 2, 5]
    assert tr.expert_ids[2:, 0, 0].tolist() == [0, 1, 2]
    assert rep.shared_position_tokens == 3


def test_trace_import_fails_without_valid_rows(tmp_path):
    """An import with no usable line raises ValueError naming the file."""
    _write(tmp_path / "e.jsonl", [], ["{}", "3"])
    with pytest.raises(ValueError, match="no valid routing line"):
        import_vllm_jsonl(tmp_path / "e.jsonl")
    with pytest.raises(FileNotFoundError):
        import_vllm_jsonl(tmp_path / "missing.jsonl")
    _write(tmp_path / "f.jsonl", _rows(0, range(2), 2))
    with pytest.raises(ValueError, match="num_experts=4"):
        import_vllm_jsonl(tmp_path / "f.jsonl", num_experts=4)
