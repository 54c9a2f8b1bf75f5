"""`moe bench SUITE ...`: cache and predictor replays, all-to-all replay, decode benchmark."""
from __future__ import annotations

# Each suite is a module moe.cli.bench_<name> with `register(subparsers)`.
_SUITES = ("cache", "predictor", "a2a", "decode")


def register(sub) -> None:
    p = sub.add_parser("bench", help="run benchmarks and policy replays")
    suites = p.add_subparsers(dest="suite", metavar="SUITE")
    suites.required = True
    from moe.cli import _register

    for name in _SUITES:
        _register(suites, f"moe.cli.bench_{name}")
