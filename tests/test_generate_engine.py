"""Batch generation engine: batching plan, left-padded batches, sampling, eos and limits."""
import pytest
import torch

from moe.demo import ByteTokenizer, build_demo_hf_model
from moe.generate import GenerateConfig, GenerationEngine, generate_records, parse_batch_size, plan_batches
from moe.jsonl import PromptRecord

PROMPTS = ["Hello", "The quick brown fox jumps", "ü", "", "a longer prompt, with punctuation!"]
NEW_TOKENS = 5

# (lengths, batch_size, max_new_tokens, token_budget, max_batch_size, expected batches)
PLAN_CASES = [
    ([5, 3, 9], 1, 4, 100, 64, [[0], [1], [2]]),
    ([5, 3, 9, 1, 2], 2, 4, 100, 64, [[0, 1], [2, 3], [4]]),
    ([5, 3, 9], 8, 4, 100, 64, [[0, 1, 2]]),
    ([5, 3, 9, 9, 1], "auto", 1, 1000, 64, [[2, 3, 0, 1, 4]]),
    ([5, 3, 9, 9, 1], "auto", 1, 20, 64, [[2, 3], [0, 1, 4]]),
    ([5, 3, 9, 9, 1], "auto", 1, 1000, 2, [[2, 3], [0, 1], [4]]),
    ([50, 3], "auto", 10, 20, 64, [[0], [1]]),  # one prompt over the budget still runs alone
    ([7], "auto", 1, 1, 1, [[0]]),
    ([], "auto", 1, 10, 4, []),
    ([], 3, 1, 10, 4, []),
]


@pytest.fixture(scope="module")
def demo():
    return build_demo_hf_model(0), ByteTokenizer()


@pytest.fixture(scope="module")
def reference(demo):
    """Per prompt: the new tokens of a plain, unpadded HF greedy generate call."""
    model, tok = demo
    new_P = []
    for prompt in PROMPTS:
        ids_1S = torch.tensor([tok.encode(prompt)])
        with torch.inference_mode():
            out = model.generate(ids_1S, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        new_P.append(out[0, ids_1S.shape[1]:].tolist())
    return new_P


def _records(prompts):
    return [PromptRecord(id=f"p{i}", prompt=p, line=i + 1) for i, p in enumerate(prompts)]


def _run(model, tok, records, **kwargs):
    results = []
    summary = generate_records(model, tok, records, on_result=results.append, **kwargs)
    return {r.id: r for r in results}, summary, [r.id for r in results]


@pytest.mark.parametrize("lengths,batch_size,new,budget,max_rows,expected", PLAN_CASES)
def test_plan_batches(lengths, batch_size, new, budget, max_rows, expected):
    """plan_batches gives the exact expected grouping and every index exactly once."""
    got = plan_batches(lengths, batch_size=batch_size, max_new_tokens=new, token_budget=budget, max_batch_size=max_rows)
    assert got == expected
    assert sorted(i for b in got for i in b) == list(range(len(lengths)))


def test_config_validation():
    """GenerateConfig and parse_batch_size reject bad values with a message naming the field."""
    assert parse_batch_size("auto") == "auto" and parse_batch_size("AUTO") == "auto"
    assert parse_batch_size("3") == 3 and parse_batch_size(5) == 5
    for bad in ["0", "-2", "many", 0, True, 1.5]:
        with pytest.raises(ValueError, match="batch size"):
            parse_batch_size(bad)
    for kwargs, field in [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1.0}, "temperature"),
                          ({"temperature": float("nan")}, "temperature"), ({"seed": -1}, "seed"),
                          ({"token_budget": 0}, "token_budget"), ({"max_batch_size": 0}, "max_batch_size")]:
        with pytest.raises(ValueError, match=field):
            GenerateConfig(**kwargs)


@pytest.mark.parametrize("batch_size", [1, 3, "auto"])
def test_batched_greedy_matches_plain_generate(demo, reference, batch_size):
    """Left-padded batches give, per prompt, exactly the tokens of an unpadded HF generate call."""
    model, tok = demo
    by_id, summary, order = _run(model, tok, _records(PROMPTS), max_new_tokens=NEW_TOKENS, batch_size=batch_size)
    assert sorted(order) == sorted(f"p{i}" for i in range(len(PROMPTS)))
    for i, (prompt, new) in enumerate(zip(PROMPTS, reference)):
        stop = new.index(tok.eos_token_id) if tok.eos_token_id in new else None
        expected = (len(new), "length") if stop is None else (stop + 1, "stop")
        r = by_id[f"p{i}"]
        assert r.completion == tok.decode(new[:stop])
        assert (r.prompt_tokens, r.completion_tokens, r.finish_reason) == (len(tok.encode(prompt)), *expected)
    assert summary.prompts == len(PROMPTS)
    assert summary.completion_tokens == sum(r.completion_tokens for r in by_id.values())
    assert summary.decode_tokens == summary.completion_tokens - len(PROMPTS)
    assert summary.prompt_tokens == sum(len(tok.encode(p)) for p in PROMPTS)
    assert sum(summary.batch_sizes) == len(PROMPTS) and summary.batches == len(summary.batch_sizes)
    assert summary.prefill_s > 0 and summary.decode_s > 0


def test_sampling_reproducible_and_batch_independent(demo):
    """Sampling repeats with one seed, changes with another, and does not depend on batch composition."""
    model, tok = demo
    records = _records(PROMPTS[:4])
    a, _, _ = _run(model, tok, records, max_new_tokens=8, temperature=0.9, seed=7, batch_size=4)
    b, _, _ = _run(model, tok, records, max_new_tokens=8, temperature=0.9, seed=7, batch_size=1)
    c, _, _ = _run(model, tok, records[1:], max_new_tokens=8, temperature=0.9, seed=7, batch_size="auto")
    d, _, _ = _run(model, tok, records, max_new_tokens=8, temperature=0.9, seed=8, batch_size=4)
    greedy, _, _ = _run(model, tok, records, max_new_tokens=8, batch_size=4)
    assert {k: r.completion for k, r in a.items()} == {k: r.completion for k, r in b.items()}
    assert all(c[k].completion == a[k].completion for k in c)
    assert any(d[k].completion != a[k].completion for k in a)
    assert any(greedy[k].completion != a[k].completion for k in a)


def test_eos_stops_a_row(demo):
    """A row that emits eos finishes with reason "stop", its text ends before eos and eos is counted."""
    model, tok = demo
    plain, _, _ = _run(model, tok, _records(["Hello"]), max_new_tokens=8)
    text = plain["p0"].completion
    stop_byte = ord(text[3])
    first = text.index(text[3])

    class StopTokenizer(ByteTokenizer):
        eos_token_id = stop_byte

    by_id, summary, _ = _run(model, StopTokenizer(), _records(["Hello", "0123"]), max_new_tokens=8, batch_size=2)
    r = by_id["p0"]
    assert (r.completion, r.completion_tokens, r.finish_reason) == (text[:first], first + 1, "stop")
    assert summary.completion_tokens == sum(x.completion_tokens for x in by_id.values())


def test_prompt_beyond_context_is_rejected_before_generating(demo):
    """A prompt that cannot fit the model's context raises before any result is produced."""
    model, tok = demo
    results = []
    engine = GenerationEngine(model, tok, config=GenerateConfig(max_new_tokens=4090))
    records = [PromptRecord(id="ok", prompt="hi", line=1), PromptRecord(id="long", prompt="x" * 10, line=2)]
    with pytest.raises(ValueError, match=r"line 2 \(id 'long'\).*context of 4096"):
        engine.run(records, results.append)
    assert results == []


def test_engine_needs_an_eos_id(demo):
    """A tokenizer and model without any eos id are refused with a clear message."""
    model, _ = demo

    class NoEos(ByteTokenizer):
        eos_token_id = None

    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        with pytest.raises(ValueError, match="no eos token id"):
            GenerationEngine(model, NoEos(), config=GenerateConfig())
    finally:
        model.generation_config.eos_token_id = saved
