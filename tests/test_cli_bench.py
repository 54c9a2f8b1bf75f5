"""`moe bench` runs the bench/ scripts with their own options."""
from __future__ import annotations

import json

import pytest
import torch

from moe.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_bench_gpu_moe_without_cuda_says_skipped(capsys):
    """Without CUDA the fused-MoE benchmark ends in a JSON line that says why it skipped."""
    assert main(["bench", "gpu-moe"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["skipped"] is True


def test_bench_script_help_is_the_scripts(capsys):
    """Options after the suite name belong to the script (its --help, not moe's)."""
    assert main(["bench", "decode", "--help"]) == 0
    assert "--scale" in capsys.readouterr().out


def test_bench_cpu_layer_names_a_bad_shape(capsys):
    """The layer benchmark refuses an unknown shape before building anything."""
    assert main(["bench", "cpu-layer", "--shapes", "mixtral-8x7b"]) == 2
    assert "unknown shape 'mixtral-8x7b'" in capsys.readouterr().err
