"""Test-wide settings: `gpu` tests skip without CUDA; deterministic seeds."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


import sys
from pathlib import Path

# Shared test helpers (tests/tiny_models.py) importable from every test folder.
sys.path.insert(0, str(Path(__file__).parent))
