"""`moe` command line: thin argument parsing that calls the library.

Each subcommand lives in its own module here and exposes `register(subparsers)`, which
adds its parser and sets `func(args) -> int` as the default.
"""
from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "CliError"]

# Order is the order shown by `moe --help`.
_COMMANDS = ("generate", "trace", "calibrate", "bench", "launch")


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _register(sub, module: str) -> None:
    importlib.import_module(module).register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe", description="MoE-first hybrid CPU-GPU inference for Mixture-of-Experts models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMANDS:
        _register(sub, f"moe.cli.{name}")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    from moe.cli.bench import script_args

    # Benchmark scripts parse their own options (`moe bench decode --help` is theirs).
    args = script_args(argv) or parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, FileNotFoundError, ValueError) as exc:
        # Library errors are written to name the problem; show them without a traceback.
        print(f"moe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moe {args.command}: interrupted", file=sys.stderr)
        return 130
