"""moe: MoE-first hybrid CPU-GPU inference.

Public API (DESIGN.md section 5): `wrap`, `from_pretrained`, `stats`, `RuntimeConfig`.
Heavy modules load on first use so that `import moe.cpu_kernels` stays light.
"""
from __future__ import annotations

from moe.config import RuntimeConfig

__all__ = ["wrap", "from_pretrained", "stats", "RuntimeConfig", "__version__"]
__version__ = "0.1.0"


def wrap(hf_model, gpu_memory="8GiB", device=None, config=None):
    """Replace the sparse MoE blocks of `hf_model` in place; see moe.wrapper.wrap."""
    from moe.wrapper import wrap as _wrap

    return _wrap(hf_model, gpu_memory=gpu_memory, device=device, config=config)


def from_pretrained(path_or_hub_id, gpu_memory="8GiB", dtype=None, device=None, config=None):
    """Load a checkpoint straight into the hybrid runtime; see moe.loader.from_pretrained."""
    from moe.loader import from_pretrained as _load

    return _load(path_or_hub_id, gpu_memory=gpu_memory, dtype=dtype, device=device, config=config)


def stats(model) -> dict:
    """Runtime counters of a wrapped model; see moe.wrapper.stats."""
    from moe.wrapper import stats as _stats

    return _stats(model)
