"""CPU expert kernels (Numba, nogil) with plain-torch references.

expert_ffn(x_TD, w13, w2, out=None, *, num_threads=None): one SwiGLU expert on the CPU;
weights fp32/bf16 tensors or packed objects from quantize(w, "int8" | "int4"). One token
(T == 1) with bf16, int8 or int4 (group 128) weights runs as one fused kernel call
(decode.py); other cases run two matmuls (expert_ffn_kernels.py, int4_kernels.py; 2 <= T
<= 16: small_t.py, small_t_int4.py).
"""
from .expert_ffn import expert_ffn, expert_ffn_reference, weight_nbytes
from .membw import BandwidthProbe, read_bandwidth_gbps
from .numba_util import max_threads, thread_cap
from .quant import INT4_GROUP_SIZES, QUANT_SCHEMES, Int4Weight, Int8Weight, quantize

__all__ = [
    "expert_ffn", "expert_ffn_reference", "weight_nbytes",
    "quantize", "Int8Weight", "Int4Weight", "QUANT_SCHEMES", "INT4_GROUP_SIZES",
    "read_bandwidth_gbps", "BandwidthProbe", "thread_cap", "max_threads",
]

# Routing helpers shared by every model family (plain torch, any device).
from .routing import group_by_expert, select_experts  # noqa: E402

__all__ += ["select_experts", "group_by_expert"]
