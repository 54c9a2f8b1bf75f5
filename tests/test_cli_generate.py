"""`moe generate` end to end on the demo model, and the JSONL helpers behind it."""
import io
import json
import os
import re
import subprocess
import sys

import pytest

from moe.cli import main
from moe.jsonl import JsonlError, JsonlWriter, parse_prompt_lines, resume_output

PROMPTS = [{"id": "a", "prompt": "Hello"}, {"id": 7, "prompt": "The quick brown fox"},
           {"id": "c", "prompt": "ü"}, {"id": "d", "prompt": "0123456789"}, {"id": "e", "prompt": ""}]
FLAGS = ["--max-new-tokens", "5"]

# (input text, expected error fragment); every case fails validation before any generation.
MALFORMED = [
    ('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"\n', r"line 2: not valid JSON"),
    ('{"id": "a", "prompt": "x"}\n\n[1, 2]\n', r"line 3: expected a JSON object"),
    ('{"prompt": "x"}\n', r"line 1: missing 'id'"),
    ('{"id": null, "prompt": "x"}\n', r"line 1: 'id' must be a non-empty string or an integer"),
    ('{"id": true, "prompt": "x"}\n', r"line 1: 'id' must be"),
    ('{"id": 1.5, "prompt": "x"}\n', r"line 1: 'id' must be"),
    ('{"id": "", "prompt": "x"}\n', r"line 1: 'id' must be"),
    ('{"id": "a"}\n', r"line 1: missing 'prompt'"),
    ('{"id": "a", "prompt": 3}\n', r"line 1: 'prompt' must be a string"),
    ('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"id": "a", "prompt": "z"}\n',
     r"line 3: duplicate id 'a' \(first seen on line 1\)"),
    (b'{"id": "a", "prompt": "\xff"}\n', r"line 1: not valid UTF-8"),
    ("", r"holds no prompts"),
    ("\n  \n\n", r"holds no prompts"),
]


def _write_prompts(path, prompts=PROMPTS):
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    return str(path)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted greedy run over PROMPTS: (input path, output records)."""
    tmp = tmp_path_factory.mktemp("full")
    src, out = _write_prompts(tmp / "in.jsonl"), str(tmp / "out.jsonl")
    assert main(["generate", "--input", src, "--output", out, *FLAGS, "--batch-size", "2"]) == 0
    return src, _read(out)


def test_generate_writes_every_id_once_with_counts(full_run, capsys):
    """Every input id appears exactly once with completion and token counts."""
    _, records = full_run
    assert sorted(map(str, (r["id"] for r in records))) == sorted(str(p["id"]) for p in PROMPTS)
    for r in records:
        assert set(r) == {"id", "completion", "prompt_tokens", "completion_tokens", "finish_reason"}
        prompt = next(p["prompt"] for p in PROMPTS if p["id"] == r["id"])
        assert r["prompt_tokens"] == 1 + len(prompt.encode("utf-8"))
        assert 1 <= r["completion_tokens"] <= 5 and isinstance(r["completion"], str)


def test_generate_says_demo_and_prints_summary(tmp_path, capsys):
    """Without --model the demo is announced; the summary gives throughput and expert-cache counters."""
    src = _write_prompts(tmp_path / "in.jsonl", PROMPTS[:2])
    assert main(["generate", "--input", src, *FLAGS]) == 0
    captured = capsys.readouterr()
    assert "built-in demo MoE" in captured.err
    for fragment in ["tok/s", "expert cache: hit rate", "prefetch hits", "on CPU", "on device", "host->device"]:
        assert fragment in captured.err
    out = [json.loads(line) for line in captured.out.splitlines()]
    assert sorted(str(r["id"]) for r in out) == ["7", "a"]


def test_resume_after_torn_output_matches_uninterrupted_run(full_run, tmp_path, capsys):
    """Resuming from one record plus a torn line finishes every id once with the uninterrupted completions."""
    src, expected = full_run
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(expected[0]) + "\n" + '{"id": "zz", "compl', encoding="utf-8")
    assert main(["generate", "--input", src, "--output", str(out), *FLAGS, "--resume"]) == 0
    assert "torn last line" in capsys.readouterr().err
    got = _read(out)
    assert got[0] == expected[0]
    assert sorted(str(r["id"]) for r in got) == sorted(str(r["id"]) for r in expected)
    assert {r["id"]: r for r in got} == {r["id"]: r for r in expected}

    # A second resume has nothing left to do and leaves the file as it is.
    before = out.read_bytes()
    assert main(["generate", "--input", src, "--output", str(out), *FLAGS, "--resume"]) == 0
    assert "nothing left to generate" in capsys.readouterr().err
    assert out.read_bytes() == before


@pytest.mark.parametrize("text,message", MALFORMED)
def test_malformed_input_exits_2_and_keeps_output(tmp_path, capsys, text, message):
    """A bad input line is reported with its line number (exit 2) and the existing output is untouched."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "old", "completion": "kept"}\n', encoding="utf-8")
    before = out.read_bytes()
    assert main(["generate", "--input", str(src), "--output", str(out), *FLAGS, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe generate: error:")
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert out.read_bytes() == before


def test_bad_arguments_exit_2(tmp_path, capsys):
    """Missing files, an existing output without --resume, --resume to stdout, bad flags and budgets exit 2."""
    src = _write_prompts(tmp_path / "in.jsonl", PROMPTS[:1])
    existing = tmp_path / "existing.jsonl"
    existing.write_text('{"id": "a", "completion": "x"}\n', encoding="utf-8")
    cases = [
        (["--input", str(tmp_path / "missing.jsonl")], "missing.jsonl not found"),
        (["--input", src, "--output", str(existing)], "already exists"),
        (["--input", src, "--resume"], "--resume needs --output"),
        (["--input", src, "--output", src, "--resume"], "is the input file"),
        (["--input", src, "--gpu-memory", "lots"], "cannot read memory size"),
        (["--input", src, "--gpu-memory", "100KB"], "smaller than the model's non-expert weights"),
        (["--input", src, "--batch-size", "0"], "batch size"),
        (["--input", src, "--temperature", "-1"], "temperature"),
        (["--input", src, "--config-cache-policy", "fifo"], "cache_policy"),
        (["--input", src, "--model", str(tmp_path / "nope")], "nope does not exist"),
        (["--input", src, "--model", str(tmp_path)], "no tokenizer files"),
    ]
    for argv, message in cases:
        assert main(["generate", *argv, *FLAGS]) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert existing.read_text(encoding="utf-8") == '{"id": "a", "completion": "x"}\n'


def test_stdin_input_and_stdout_output(full_run, monkeypatch, capsys):
    """Prompts read from stdin ('-') give the same completions as from a file."""
    src, expected = full_run
    with open(src, "rb") as f:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f.read()), encoding="utf-8"))
    assert main(["generate", "--input", "-", *FLAGS, "--batch-size", "auto"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["id"]: r for r in got} == {r["id"]: r for r in expected}


def test_sampling_reproducible_with_seed(tmp_path):
    """Sampling with one seed repeats exactly, another seed differs, and batching does not matter."""
    src = _write_prompts(tmp_path / "in.jsonl")

    def sample(name, seed, batch):
        out = str(tmp_path / name)
        argv = ["generate", "--input", src, "--output", out, "--max-new-tokens", "6",
                "--temperature", "0.8", "--seed", str(seed), "--batch-size", batch]
        assert main(argv) == 0
        return {r["id"]: r["completion"] for r in _read(out)}

    first = sample("s1.jsonl", 3, "auto")
    assert sample("s2.jsonl", 3, "1") == first
    assert sample("s3.jsonl", 4, "auto") != first


def test_jsonl_resume_repairs_only_the_tail(tmp_path):
    """resume_output drops a torn tail, completes a missing newline, and refuses damage in the middle."""
    warnings = []
    path = tmp_path / "out.jsonl"
    assert resume_output(path, warn=warnings.append) == set()
    path.write_bytes(b'{"id": "a"}\n{"id": 2}')
    assert resume_output(path, warn=warnings.append) == {"a", 2}
    assert path.read_bytes() == b'{"id": "a"}\n{"id": 2}\n' and warnings == []
    path.write_bytes(b'{"id": "a"}\n{"id": "b", "comp\n\n')
    assert resume_output(path, warn=warnings.append) == {"a"}
    assert path.read_bytes() == b'{"id": "a"}\n' and "line 2" in warnings[0]
    path.write_bytes(b'{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(JsonlError, match="line 2"):
        resume_output(path, warn=warnings.append)


def test_jsonl_writer_appends_whole_lines(tmp_path):
    """JsonlWriter appends one UTF-8 line per record and never rewrites earlier lines."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": 0}\n')
    with JsonlWriter(str(path)) as w:
        w.write({"id": "x", "completion": "ü\n"})
        assert path.read_bytes().endswith(b"\n")  # flushed before close
    assert path.read_bytes() == b'{"id": 0}\n' + '{"id": "x", "completion": "ü\\n"}\n'.encode("utf-8")
    records = parse_prompt_lines(['\ufeff{"id": 1, "prompt": "p", "extra": 1}', "", '{"id": "1", "prompt": ""}'],
                                 source="mem")
    assert [(r.id, r.prompt, r.line) for r in records] == [(1, "p", 1), ("1", "", 3)]


def test_subprocess_module_entry_point(tmp_path):
    """`python -m moe generate` runs the demo as a real process and writes valid JSONL."""
    src = _write_prompts(tmp_path / "in.jsonl", PROMPTS[:3])
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "moe", "generate", "--input", src, "--output", str(out), "--max-new-tokens", "4"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "built-in demo MoE" in proc.stderr and "expert cache: hit rate" in proc.stderr
    assert sorted(str(r["id"]) for r in _read(out)) == ["7", "a", "c"]


def _save_checkpoint_with_tokenizer(folder):
    """The demo weights as a safetensors checkpoint plus a byte-level HF tokenizer without a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from moe.demo import build_demo_hf_model

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    build_demo_hf_model(0).save_pretrained(folder)
    return tokenizer


def test_generate_from_saved_checkpoint(tmp_path, capsys):
    """--model loads a local safetensors checkpoint and its HF tokenizer (no pad token) through moe.from_pretrained."""
    ckpt = tmp_path / "ckpt"
    tokenizer = _save_checkpoint_with_tokenizer(ckpt)
    src, out = _write_prompts(tmp_path / "in.jsonl", PROMPTS[:3]), str(tmp_path / "out.jsonl")
    argv = ["generate", "--model", str(ckpt), "--input", src, "--output", out, *FLAGS,
            "--gpu-memory", "1.5MB", "--dtype", "float32", "--config-cache-policy", "lfu"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"loading {ckpt}" in err and "demo" not in err and "expert cache: hit rate" in err
    records = {r["id"]: r for r in _read(out)}
    assert sorted(map(str, records)) == ["7", "a", "c"]
    for p in PROMPTS[:3]:
        assert records[p["id"]]["prompt_tokens"] == len(tokenizer.encode(p["prompt"]))
        assert 1 <= records[p["id"]]["completion_tokens"] <= 5


def test_crash_mid_run_leaves_whole_lines_then_resumes(full_run, tmp_path, monkeypatch):
    """A run that dies after its first batch leaves only complete records, and --resume finishes the rest."""
    from moe.generate import GenerationEngine

    src, expected = full_run
    out = str(tmp_path / "out.jsonl")
    real = GenerationEngine._generate_batch
    calls = []

    def dies_on_second_batch(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(self, *args)

    monkeypatch.setattr(GenerationEngine, "_generate_batch", dies_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["generate", "--input", src, "--output", out, *FLAGS, "--batch-size", "2"])
    partial = _read(out)
    assert [r["id"] for r in partial] == [p["id"] for p in PROMPTS[:2]]
    monkeypatch.setattr(GenerationEngine, "_generate_batch", real)
    assert main(["generate", "--input", src, "--output", out, *FLAGS, "--resume"]) == 0
    got = _read(out)
    assert got[:2] == partial
    assert {r["id"]: r for r in got} == {r["id"]: r for r in expected} and len(got) == len(expected)


def test_progress_bar_on_request(tmp_path, capsys):
    """run_job draws a tqdm progress bar on stderr when progress is on."""
    from moe.generate import GenerateConfig
    from moe.generate_job import GenerateJob, run_job

    src = _write_prompts(tmp_path / "in.jsonl", PROMPTS[:2])
    job = GenerateJob(input=src, output=str(tmp_path / "out.jsonl"), progress=True,
                      generation=GenerateConfig(max_new_tokens=3))
    summary = run_job(job, log=lambda msg: None)
    assert summary.prompts == 2
    err = capsys.readouterr().err
    assert "2/2" in err and "prompt" in err
