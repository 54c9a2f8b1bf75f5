"""`moe bench SUITE ...`: cache and predictor replays, all-to-all replay, and the
benchmark scripts of bench/ (decode, CPU expert kernels and layers, GPU fused MoE)."""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

# Replays with a library module moe.cli.bench_<name> exposing `register(subparsers)`.
_SUITES = ("cache", "predictor", "a2a")
# Benchmarks that live as scripts in bench/ of the source tree (each prints one JSON line last).
_SCRIPTS = {
    "decode": ("decode.py", "prefill/decode tokens/s of every scheduler rule vs offload baselines"),
    "cpu-expert": ("cpu_expert.py", "CPU expert kernels in GB/s against the measured memory bandwidth"),
    "cpu-layer": ("cpu_layer.py", "one MoE layer at batch-1 decode on the CPU: runtime vs kernels vs transformers"),
    "gpu-moe": ("gpu_moe.py", "Triton fused MoE against HBM bandwidth and the matmul rate (CUDA)"),
}


def bench_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "bench"


def script_args(argv: list[str]) -> argparse.Namespace | None:
    """The parsed command when argv is `bench <script suite> ...`, else None."""
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in _SCRIPTS:
        return argparse.Namespace(command="bench", suite=argv[1], script_args=argv[2:],
                                  func=_run_script)
    return None


def _run_script(args) -> int:
    script = bench_dir() / _SCRIPTS[args.suite][0]
    if not script.exists():
        raise FileNotFoundError(f"benchmark script {script} not found: the bench/ scripts ship with "
                                "the source checkout (pip install -e .)")
    argv = list(args.script_args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        sys.argv = saved
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="run benchmarks and policy replays")
    suites = p.add_subparsers(dest="suite", metavar="SUITE")
    suites.required = True
    from moe.cli import _register

    for name in _SUITES:
        _register(suites, f"moe.cli.bench_{name}")
    for name, (script, help_) in _SCRIPTS.items():
        # Parsed by script_args() before argparse sees them; listed here for --help.
        suites.add_parser(name, help=f"{help_} (bench/{script}; its options follow)")
