"""One MoE layer at decode (batch 1, one token) on the CPU: our runtime against transformers.

Decode at batch 1 calls every MoE layer with one token, so each layer runs K small
experts back to back; between them the caches hold weight bytes, not code, and any
per-expert Python or torch work is paid from cold caches. This bench measures what a
whole routed-expert layer call costs, for DeepSeek-V2-Lite (E=64, K=6, D=2048, F=1408)
and Qwen3-30B-A3B (E=128, K=8, D=2048, F=768) at their real sizes, three MoE layers
visited round-robin (more weight bytes than the last-level cache), random routing:

    ours     the wrapped model's routed-expert call (moe.runtime.RoutedExperts) with
             scheduler "cpu-only": routing bookkeeping, planner, executor, the Numba
             experts and the combine (bf16 weights; int8 rows: quantization="int8")
    kernels  the same K experts through moe.cpu_kernels.expert_ffn alone, back to back,
             on the calling thread (where the runtime runs them with a CPU "device"):
             the floor ours can reach; ours / kernels - 1 is what the orchestration adds
    torch    transformers' own experts module (model.layers[l].mlp.experts) on the same
             token and routing, bf16: what a user runs without this project
    bound    K experts' weight bytes (as stored for that format) over the memory-read
             bandwidth measured in the same run

The three alternate in short blocks (first call of each block untimed). Medians.
Prints one line per shape and format, then one JSON line.

    python bench/cpu_layer.py [--shapes deepseek-v2-lite,qwen3-30b-a3b] [--formats bf16,int8]
                              [--calls 60] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import MODELS, build_model  # noqa: E402  (the synthetic real-shape models)

import moe  # noqa: E402
from moe.cpu_kernels import expert_ffn, read_bandwidth_gbps  # noqa: E402
from moe.runtime import RoutedExperts  # noqa: E402
from moe.wrapper import runtime_of  # noqa: E402

SHAPES = ("deepseek-v2-lite", "qwen3-30b-a3b")
FORMATS = ("bf16", "int8")
MOE_LAYERS = 3
BLOCK = 4


def _time_blocks(fns: dict, calls: int, args_of) -> dict:
    """Median seconds per call of each fn(args_of(i)), alternating blocks of BLOCK calls."""
    ts = {k: [] for k in fns}
    i = 0
    while len(next(iter(ts.values()))) < calls:
        for k, fn in fns.items():
            fn(*args_of(i))  # untimed: the first call after a switch
            for j in range(1, BLOCK + 1):
                a = args_of(i + j)
                t0 = time.perf_counter()
                fn(*a)
                ts[k].append(time.perf_counter() - t0)
        i += BLOCK + 1
    return {k: statistics.median(v) for k, v in ts.items()}


def bench_shape(name: str, fmt: str, calls: int) -> dict:
    m = MODELS[name]
    layers = MOE_LAYERS + (1 if m["family"] == "deepseek_v2" else 0)  # deepseek: layer 0 is dense
    model = build_model(name, 1.0, layers, torch.bfloat16, seed=0)
    blocks = [l for l in model.model.layers if hasattr(l.mlp, "experts")]
    hf_experts = [b.mlp.experts for b in blocks]  # kept: wrap() moves them into its store
    cfg = moe.RuntimeConfig(scheduler="cpu-only", quantization=None if fmt == "bf16" else fmt)
    moe.wrap(model, gpu_memory=64 << 30, device="cpu", config=cfg)
    rt = runtime_of(model)
    routed = [RoutedExperts(rt, l) for l in range(len(blocks))]
    E, K, D = m["E"], m["K"], rt.store.hidden
    g = torch.Generator().manual_seed(0)
    x_1D = torch.randn(1, D, generator=g).to(torch.bfloat16)
    plans = []
    for i in range(256):  # fixed random routings, reused round-robin
        ids_1K = torch.randperm(E, generator=g)[:K][None]
        w_1K = torch.softmax(torch.randn(1, K, generator=g), -1).to(torch.bfloat16)
        plans.append((i % len(blocks), ids_1K, w_1K))

    def ours(l, ids_1K, w_1K):
        routed[l](x_1D, ids_1K, w_1K)

    out_1D = torch.empty_like(x_1D)

    def kernel_loop(l, ids_1K):
        for e in ids_1K[0].tolist():
            expert_ffn(x_1D, *rt.store.cpu_weights(l, e), out=out_1D)

    def kernels(l, ids_1K, w_1K):
        kernel_loop(l, ids_1K)  # on this thread, as the runtime with a CPU "device"

    def hf(l, ids_1K, w_1K):
        with torch.inference_mode():
            hf_experts[l](x_1D, ids_1K, w_1K)

    fns = {"ours": ours, "kernels": kernels, "torch": hf}
    for fn in fns.values():  # compile, make the kernel views: steady state is what counts
        for p in plans[:2 * len(blocks) * E // K]:
            fn(*p)
    med = _time_blocks(fns, calls, lambda i: plans[i % len(plans)])
    layer_bytes = K * rt.cpu_expert_bytes
    return dict(shape=name, format=fmt, E=E, K=K, D=D, F=rt.store.inter,
                ms=round(med["ours"] * 1e3, 3), kernels_ms=round(med["kernels"] * 1e3, 3),
                torch_ms=round(med["torch"] * 1e3, 3),
                speedup_vs_torch=round(med["torch"] / med["ours"], 2),
                overhead_vs_kernels=round(med["ours"] / med["kernels"] - 1, 3),
                layer_mb=round(layer_bytes / 1e6, 1), _ours_s=med["ours"], _bytes=layer_bytes)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--calls", type=int, default=60, help="timed calls per side (default 60)")
    p.add_argument("--json", action="store_true", help="print only the final JSON line")
    args = p.parse_args(argv)
    shapes, formats = args.shapes.split(","), args.formats.split(",")
    for s in shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    for f in formats:
        if f not in FORMATS:
            p.error(f"unknown format {f!r}; choose from {', '.join(FORMATS)}")
    threads = torch.get_num_threads()
    bounds = [read_bandwidth_gbps(1 << 30, repeats=5)]
    rows = []
    for s in shapes:
        for f in formats:
            row = bench_shape(s, f, args.calls)
            rows.append(row)
            bounds.append(read_bandwidth_gbps(1 << 30, repeats=3))
            if not args.json:
                print(f"{s:17s} {f:5s} ours {row['ms']:7.3f} ms  kernels {row['kernels_ms']:7.3f} ms"
                      f"  torch {row['torch_ms']:7.3f} ms  x{row['speedup_vs_torch']} vs torch,"
                      f" +{row['overhead_vs_kernels']:.1%} over kernels", flush=True)
    bound = max(bounds)  # the best probe: what the hardware can do
    for row in rows:
        bound_s = row.pop("_bytes") / (bound * 1e9)
        row["bound_ms"] = round(bound_s * 1e3, 3)
        row["frac_of_bound"] = round(bound_s / row.pop("_ours_s"), 3)
    summary = dict(bench="cpu_layer", machine=f"CPU, {os.cpu_count()} cores", threads=threads,
                   bound_gbps=round(bound, 2), bound_samples_gbps=[round(b, 2) for b in bounds],
                   timing=f"alternating blocks of {BLOCK} calls, first call after a switch untimed; medians",
                   results=rows)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
