"""JSONL input and output for batch generation.

Input: one JSON object per line with `id` (non-empty string or integer, unique) and
`prompt` (string); other keys are ignored, blank lines are skipped. The whole input is
validated before any generation starts, so a bad line costs no work.

Output: one JSON object per finished prompt, appended with a single write and flushed
at once; earlier lines are never rewritten. A crash can therefore leave at most one torn
last line, which `resume_output` detects and truncates before a resumed run appends.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable

__all__ = ["PromptRecord", "JsonlError", "read_prompts", "parse_prompt_lines", "resume_output", "JsonlWriter"]

RecordId = str | int


class JsonlError(ValueError):
    """A JSONL file that does not hold what was expected; the message names file and line."""


@dataclass(frozen=True, kw_only=True)
class PromptRecord:
    """One input prompt. `line` is its 1-based line number in the input."""

    id: RecordId
    prompt: str
    line: int


def _valid_id(value) -> bool:
    # bool is an int subclass, and floats do not round-trip as ids; reject both.
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and value != "")


def parse_prompt_lines(lines: Iterable[bytes | str], *, source: str) -> list[PromptRecord]:
    """Validate every line and return the records in input order.

    Raises JsonlError naming `source` and the line number for: invalid UTF-8, a line
    that is not JSON or not an object, a missing/invalid `id`, a duplicate `id`, a
    missing/non-string `prompt`, or an input without any record.
    """
    records: list[PromptRecord] = []
    first_line: dict[RecordId, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        where = f"{source} line {lineno}"
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise JsonlError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if lineno == 1:
            raw = raw.removeprefix("\ufeff")
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise JsonlError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise JsonlError(f"{where}: expected a JSON object with 'id' and 'prompt', got {type(obj).__name__}")
        if "id" not in obj:
            raise JsonlError(f"{where}: missing 'id' (expected a non-empty string or an integer)")
        rid = obj["id"]
        if not _valid_id(rid):
            raise JsonlError(f"{where}: 'id' must be a non-empty string or an integer, got {rid!r}")
        if rid in first_line:
            raise JsonlError(f"{where}: duplicate id {rid!r} (first seen on line {first_line[rid]})")
        if "prompt" not in obj:
            raise JsonlError(f"{where}: missing 'prompt' (expected a string)")
        if not isinstance(obj["prompt"], str):
            raise JsonlError(f"{where}: 'prompt' must be a string, got {type(obj['prompt']).__name__}")
        first_line[rid] = lineno
        records.append(PromptRecord(id=rid, prompt=obj["prompt"], line=lineno))
    if not records:
        raise JsonlError(
            f"{source} holds no prompts: expected one JSON object per line with 'id' and 'prompt', "
            'e.g. {"id": "a", "prompt": "Hello"}'
        )
    return records


def read_prompts(path: str | os.PathLike | None, *, stdin: BinaryIO | None = None) -> list[PromptRecord]:
    """Read and validate a prompt file; `path` None or "-" reads `stdin` (default sys.stdin)."""
    if path is None or str(path) == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        return parse_prompt_lines(stream.read().split(b"\n"), source="<stdin>")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"input file {path} not found (expected a JSONL file of prompts, or '-' for stdin)")
    if os.path.isdir(path):
        raise JsonlError(f"input {path} is a directory, expected a JSONL file of prompts")
    with open(path, "rb") as f:
        return parse_prompt_lines(f.read().split(b"\n"), source=path)


def resume_output(path: str | os.PathLike, *, warn: Callable[[str], None]) -> set[RecordId]:
    """Ids already written to the output file `path`, after repairing a torn tail.

    A last line that is not a JSON object with an `id` is what an interrupted write
    leaves: it is truncated away and reported through `warn`. A complete last record
    that only lacks its newline gets one, so the next append starts a fresh line. A bad
    line anywhere else is not a crash artefact, so it raises JsonlError instead of being
    dropped. A missing file means nothing is done yet.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    done: set[RecordId] = set()
    offset = 0
    lineno = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        complete = end != -1
        stop = end + 1 if complete else len(data)
        lineno += 1
        chunk = data[offset:stop]
        rid = _record_id(chunk)
        is_last = not data[stop:].strip()
        if rid is None and chunk.strip():
            if not is_last:
                raise JsonlError(
                    f"output {path} line {lineno}: not a JSON object with an 'id'; "
                    "cannot resume safely (fix or move the file)"
                )
            with open(path, "r+b") as f:
                f.truncate(offset)
            warn(f"output {path}: dropped a torn last line (line {lineno}, {len(chunk)} bytes) from an interrupted run")
            return done
        if rid is not None:
            done.add(rid)
            if not complete:
                with open(path, "ab") as f:
                    f.write(b"\n")
        offset = stop
    return done


def _record_id(chunk: bytes) -> RecordId | None:
    try:
        obj = json.loads(chunk.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(obj, dict) and _valid_id(obj.get("id")):
        return obj["id"]
    return None


class JsonlWriter:
    """Append one JSON object per line to a file (or stdout), flushed record by record.

    Each record goes out as one `os.write` of its whole line (looped only on a short
    write), so a killed process leaves complete lines plus at most one torn last line.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None or str(path) == "-" else os.fspath(path)
        self._fd = None
        if self.path is not None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, record: dict) -> None:
        """Serialise `record` as one UTF-8 JSON line and push it out now."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        if self._fd is None:
            out = getattr(sys.stdout, "buffer", None)
            if out is None:  # a text-only stream (e.g. a test's StringIO)
                sys.stdout.write(line.decode("utf-8"))
            else:
                sys.stdout.flush()
                out.write(line)
            sys.stdout.flush()
            return
        view = memoryview(line)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
