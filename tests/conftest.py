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


@pytest.fixture(scope="session")
def gpu_like_profile(tmp_path_factory):
    """A cost profile in which the device is much faster than the CPU (as with a GPU), so
    that the dynamic planner copies experts and uses the cache even though the tests'
    device is the CPU (whose own profile rightly says copying gains nothing there)."""
    from moe.scheduler import AnalyticCostModel, save_profile

    path = tmp_path_factory.mktemp("profile") / "gpu-like.json"
    return str(save_profile(AnalyticCostModel.defaults("cuda"), device="cpu", path=path))
