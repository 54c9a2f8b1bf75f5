"""Compiles the Triton kernels ahead of time for an sm_90 (H100) target, without a GPU.

Triton lowers to PTX and runs its bundled ptxas for a named target, so a CPU-only machine
can check that the kernels build for a real GPU with the shipped launch settings, and
that the software pipeliner engages (asynchronous global->shared copies). The signature
mimics what Triton's JIT specialises for contiguous tensors at model shapes: unit
strides become constants, pointers and multiples of 16 carry a divisibility hint.

Usage: python gpu_compile_worker.py   (prints one JSON list, one entry per compiled kernel)
Must run without TRITON_INTERPRET, in a process of its own.
"""
from __future__ import annotations

import json
import re


def _compile(fn, sig: dict, consts: dict, divisible: list, opts: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**sig, **{k: "constexpr" for k in consts}}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs=attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    ttgir = kernel.asm["ttgir"]
    return {"kernel": fn.__name__, "consts": {k: v for k, v in consts.items() if k.isupper()}, **opts,
            "shared": int(kernel.metadata.shared), "cubin_bytes": len(kernel.asm["cubin"]),
            "async_copies": len(re.findall(r"async_copy_global_to_local", ttgir))}


def _gemms(wdt: str, cfg, results: list) -> None:
    from moe.gpu_kernels import fused

    prec = "ieee" if wdt == "fp32" else "tf32"
    g, d = cfg.gate_up, cfg.down
    results.append(_compile(
        fused._gate_up_kernel,
        dict(x_ptr=f"*{wdt}", w13_ptr=f"*{wdt}", act_ptr=f"*{wdt}", sorted_ids_ptr="*i32", expert_ids_ptr="*i32",
             num_post_ptr="*i32", num_pairs="i32", top_k="i32", D="i32", F="i32", num_pid_m="i32",
             stride_xt="i32", stride_we="i32", stride_wn="i32", stride_ap="i32"),
        dict(stride_xd=1, stride_wd=1, stride_af=1, BLOCK_M=g.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k,
             GROUP_M=g.group_m, DOT_PRECISION=prec, UPCAST_DOT=False),
        ["x_ptr", "w13_ptr", "act_ptr", "D", "F", "stride_xt", "stride_we", "stride_wn", "stride_ap"],
        dict(num_warps=g.num_warps, num_stages=g.num_stages)))
    results.append(_compile(
        fused._down_kernel,
        dict(act_ptr=f"*{wdt}", w2_ptr=f"*{wdt}", out_ptr="*fp32", topk_weights_ptr="*fp32", sorted_ids_ptr="*i32",
             expert_ids_ptr="*i32", num_post_ptr="*i32", num_pairs="i32", top_k="i32", D="i32", F="i32",
             num_pid_m="i32", stride_ap="i32", stride_we="i32", stride_wd="i32", stride_op="i32", stride_gt="i32"),
        dict(stride_af=1, stride_wf=1, stride_od=1, stride_gk=1, BLOCK_M=d.block_m, BLOCK_N=d.block_n,
             BLOCK_K=d.block_k, GROUP_M=d.group_m, DOT_PRECISION=prec, UPCAST_DOT=False),
        ["act_ptr", "w2_ptr", "out_ptr", "D", "F", "stride_ap", "stride_we", "stride_wd", "stride_op"],
        dict(num_warps=d.num_warps, num_stages=d.num_stages)))


def main() -> None:
    from moe.gpu_kernels import align
    from moe.gpu_kernels.launch_config import load_config_table

    table = load_config_table("default.json")
    results: list = []
    _gemms("bf16", table[min(table)], results)  # decode settings
    _gemms("bf16", table[max(table)], results)  # prefill settings
    results.append(_compile(
        align._moe_align_kernel,
        dict(topk_ids_ptr="*i64", expert_map_ptr="*i64", sorted_ids_ptr="*i32", expert_ids_ptr="*i32",
             num_post_ptr="*i32", num_pairs="i32", num_global="i32", num_slots="i32", p_max="i32", b_max="i32"),
        dict(HAS_MAP=True, BLOCK_SIZE=16, CHUNK=align._CHUNK, SLOTS_POW2=64), [], dict(num_warps=4)))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
