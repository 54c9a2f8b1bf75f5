"""Running kernel code compiled for a generic x86-64 CPU (shared by the kernel tests)."""
import os
import subprocess
import sys


def run_on_generic_target(code: str) -> None:
    """Run `code` in a fresh interpreter whose numba compiles for a generic x86-64 CPU
    (no AVX2 / AVX-512 paths: the kernels' generic vector IR)."""
    env = dict(os.environ, NUMBA_CPU_NAME="generic")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=600)
