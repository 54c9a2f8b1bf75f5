"""Model-family adapters: where a family's sparse MoE blocks live and how they gate.

Each supported family is one `Family` record (see specs.py). Everything else in the
runtime is family-agnostic: it sees routed experts as stacked SwiGLU weights, a gate
(router weight + `GatingSpec`) and optional shared experts.
"""
from moe.families.base import Family, GatingSpec, UnsupportedModelError
from moe.families.specs import FAMILIES, family_for_config, supported_names

__all__ = ["Family", "GatingSpec", "UnsupportedModelError", "FAMILIES", "family_for_config",
           "supported_names"]
