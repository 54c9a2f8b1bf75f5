"""Fused-MoE GPU benchmark: the Triton kernel beside the torch a user would write instead.

    python bench/gpu_moe.py [--shapes mixtral-8x7b,deepseek-v2-lite] [--dtype bf16]
    python bench/gpu_moe.py --tune [--tune-out DIR]     # write tuned launch-setting JSON

Decode (T = 1..64) is bound by reading the active experts' weights, so it is reported as
a fraction of the HBM bandwidth measured in the same run (a device-to-device copy); only
the bytes of experts that some token uses are counted. Prefill (T = 4096) is bound by
tensor-core math, so it is reported as a fraction of the bf16/fp16 matmul rate measured in
the same run (one large torch.mm). Baselines, timed in the same run:
    loop        per-expert torch loop in the weights' dtype (what HF Mixtral does)
    grouped_mm  torch grouped GEMM over expert-sorted rows, where torch has it
    bmm         tokens padded to the largest expert's count, one bmm over all slots
Our path is timed eagerly and replayed from a CUDA graph (the latter shows the kernels
without Python launch cost). Needs CUDA; elsewhere it prints a JSON line saying it skipped.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as Fn

SHAPES = {
    "mixtral-8x7b": dict(E=8, K=2, D=4096, F=14336),
    "deepseek-v2-lite": dict(E=64, K=6, D=2048, F=1408),  # a 64-expert layer with small experts
}
DECODE_TOKENS = (1, 2, 4, 8, 16, 32, 64)
PREFILL_TOKENS = (4096,)
GOALS = {"decode_frac_hbm": 0.70, "prefill_frac_matmul": 0.60, "decode_speedup_vs_loop": 3.0}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---- baselines (plain torch) -------------------------------------------------------------

def moe_loop(x_TD, w13_E2FD, w2_EDF, topk_ids_TK, topk_weights_TK):
    """Per-expert loop in the weights' dtype, as Hugging Face's Mixtral block runs it."""
    F = w2_EDF.shape[2]
    y_TD = torch.zeros_like(x_TD)
    for e in topk_ids_TK.unique().tolist():
        t, k = torch.where(topk_ids_TK == e)
        h = Fn.linear(x_TD[t], w13_E2FD[e])
        out = Fn.linear(Fn.silu(h[:, :F]) * h[:, F:], w2_EDF[e])
        y_TD.index_add_(0, t, out * topk_weights_TK[t, k, None].to(x_TD.dtype))
    return y_TD


def _sorted_pairs(topk_ids_TK, num_slots):
    flat_P = topk_ids_TK.flatten()
    order_P = torch.argsort(flat_P, stable=True)
    counts_E = torch.bincount(flat_P, minlength=num_slots)
    return flat_P, order_P, counts_E


def _grouped_mm():
    return getattr(Fn, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def moe_grouped_mm(x_TD, w13_E2FD, w2_EDF, topk_ids_TK, topk_weights_TK):
    """Rows sorted by expert, then two torch grouped GEMMs with per-expert row offsets."""
    gmm = _grouped_mm()
    K, F = topk_ids_TK.shape[1], w2_EDF.shape[2]
    flat_P, order_P, counts_E = _sorted_pairs(topk_ids_TK, w13_E2FD.shape[0])
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    tok_P = order_P // K
    h_P2F = gmm(x_TD[tok_P].to(w13_E2FD.dtype), w13_E2FD.transpose(1, 2), offs=offs_E)
    out_PD = gmm(Fn.silu(h_P2F[:, :F]) * h_P2F[:, F:], w2_EDF.transpose(1, 2), offs=offs_E)
    out_PD = out_PD.float() * topk_weights_TK.flatten()[order_P, None].float()
    y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device).index_add_(0, tok_P, out_PD)
    return y_TD.to(x_TD.dtype)


def moe_bmm(x_TD, w13_E2FD, w2_EDF, topk_ids_TK, topk_weights_TK):
    """Tokens padded to the busiest expert's count C, then one bmm per projection over all slots."""
    E, D, F = w2_EDF.shape
    K = topk_ids_TK.shape[1]
    flat_P, order_P, counts_E = _sorted_pairs(topk_ids_TK, E)
    C = int(counts_E.max())
    slot_P = flat_P[order_P]
    pos_P = torch.arange(flat_P.numel(), device=x_TD.device) - (torch.cumsum(counts_E, 0) - counts_E)[slot_P]
    tok_P = order_P // K
    x_ECD = x_TD.new_zeros((E, C, D), dtype=w13_E2FD.dtype)
    x_ECD[slot_P, pos_P] = x_TD[tok_P].to(w13_E2FD.dtype)
    h_EC2F = torch.bmm(x_ECD, w13_E2FD.transpose(1, 2))
    out_ECD = torch.bmm(Fn.silu(h_EC2F[..., :F]) * h_EC2F[..., F:], w2_EDF.transpose(1, 2))
    out_PD = out_ECD[slot_P, pos_P].float() * topk_weights_TK.flatten()[order_P, None].float()
    y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device).index_add_(0, tok_P, out_PD)
    return y_TD.to(x_TD.dtype)


BASELINES = {"loop": moe_loop, "grouped_mm": moe_grouped_mm, "bmm": moe_bmm}


# ---- accounting --------------------------------------------------------------------------

def routing(T, E, K, *, seed=0, device="cpu"):
    """Distinct top-k experts per token from random router logits, and renormalised weights."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(T, E, generator=g).softmax(-1)
    w_TK, ids_TK = probs.topk(K, dim=-1)
    return ids_TK.to(device), (w_TK / w_TK.sum(-1, keepdim=True)).to(device)


def load_trace(path, *, layer):
    """(expert ids, gating probs) per token of one layer from a routing-trace JSONL file.

    Lines are JSON objects with "layer", "experts" (top-k ids) and "gating_probs", as vLLM
    recorded for Mixtral-8x7B; lines of other layers are skipped.
    """
    ids, probs = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if rec["layer"] != layer:
                    continue
                ids.append([int(e) for e in rec["experts"]])
                probs.append([float(p) for p in rec["gating_probs"]])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: expected a JSON object with layer, experts and gating_probs ({exc})") from None
            if len(ids[-1]) != len(probs[-1]) or len(ids[-1]) != len(ids[0]):
                raise ValueError(f"{path}:{n}: experts and gating_probs must have the same top-k length throughout")
    if not ids:
        raise ValueError(f"{path}: no routing records for layer {layer}")
    return torch.tensor(ids), torch.tensor(probs)


def trace_routing(trace, T, E, K, *, device="cpu"):
    """The trace's first T tokens (repeating it if shorter), weights renormalised over the top-k."""
    ids_NK, probs_NK = trace
    if ids_NK.shape[1] != K or int(ids_NK.max()) >= E or int(ids_NK.min()) < 0:
        raise ValueError(f"trace routes top-{ids_NK.shape[1]} over experts [{int(ids_NK.min())}, {int(ids_NK.max())}]; "
                         f"the shape needs top-{K} over [0, {E - 1}]")
    rows = torch.arange(T) % ids_NK.shape[0]
    w_TK = probs_NK[rows]
    return ids_NK[rows].to(device), (w_TK / w_TK.sum(-1, keepdim=True)).to(device)


def bytes_read(topk_ids_TK, D, F, itemsize):
    """Bytes a decode step must read: weights of the experts in use, plus activations in and out."""
    active = int(topk_ids_TK.unique().numel())
    T, K = topk_ids_TK.shape
    return active * 3 * D * F * itemsize + 2 * T * D * itemsize + T * K * (8 + 4)


def moe_flops(T, K, D, F):
    """Multiply-adds x2 of gate/up ([2F, D]) and down ([D, F]) for every routed pair."""
    return 2 * T * K * 3 * D * F


# ---- timing ------------------------------------------------------------------------------

def time_ms(fn, *, graph=False):
    import triton.testing as tt

    if graph:  # replays from a CUDA graph: no Python launch cost, no L2 flush between calls
        return float(tt.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    # Eager: Triton flushes L2 before each call, so weights are read from HBM every time.
    return float(tt.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def measure_hbm_gbps(device, gib=1.0):
    """Device copy bandwidth: bytes read plus written per second."""
    n = int(gib * 2**30) // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def measure_matmul_tflops(device, dtype, n=8192):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: torch.mm(a, b))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _weights(shape, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    E, D, F = shape["E"], shape["D"], shape["F"]
    w13 = (torch.randn(E, 2 * F, D, device=device, generator=g, dtype=dtype) / D**0.5)
    w2 = (torch.randn(E, D, F, device=device, generator=g, dtype=dtype) / F**0.5)
    return w13, w2


def _case_routing(shape, T, device, trace):
    E, K = shape["E"], shape["K"]
    if trace is not None and trace[0].shape[1] == K and int(trace[0].max()) < E:
        return trace_routing(trace, T, E, K, device=device) + ("trace",)
    return routing(T, E, K, seed=T, device=device) + ("random",)


def run_case(name, shape, T, dtype, device, w13, w2, hbm_gbps, mm_tflops, trace=None):
    from moe.gpu_kernels import fused_moe

    E, K, D, F = shape["E"], shape["K"], shape["D"], shape["F"]
    x = torch.randn(T, D, device=device, dtype=dtype)
    ids, weights, source = _case_routing(shape, T, device, trace)
    ours = fused_moe(x, w13, w2, ids, weights)
    ref = moe_loop(x, w13, w2, ids, weights)
    row = {"shape": name, "T": T, "E": E, "K": K, "D": D, "F": F, "routing": source,
           "active_experts": int(ids.unique().numel()),
           "max_rel_err_vs_loop": float((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)),
           "ours_ms": time_ms(lambda: fused_moe(x, w13, w2, ids, weights))}
    row["ours_graph_ms"] = time_ms(lambda: fused_moe(x, w13, w2, ids, weights), graph=True)
    for base, fn in BASELINES.items():
        if base == "grouped_mm" and _grouped_mm() is None:
            row[f"{base}_ms"] = None
            row[f"{base}_note"] = "torch has no grouped_mm"
            continue
        try:
            row[f"{base}_ms"] = time_ms(lambda: fn(x, w13, w2, ids, weights))
        except (RuntimeError, torch.OutOfMemoryError) as exc:  # e.g. grouped_mm unsupported on this GPU
            row[f"{base}_ms"] = None
            row[f"{base}_note"] = str(exc).splitlines()[0][:160]
    row["speedup_vs_loop"] = row["loop_ms"] / row["ours_ms"] if row["loop_ms"] else None
    if T <= 64:
        row["bytes"] = bytes_read(ids, D, F, w13.element_size())
        row["ours_gbps"] = row["bytes"] / (row["ours_ms"] * 1e-3) / 1e9
        row["frac_hbm"] = row["ours_gbps"] / hbm_gbps
        row["frac_hbm_graph"] = row["bytes"] / (row["ours_graph_ms"] * 1e-3) / 1e9 / hbm_gbps
    else:
        row["flops"] = moe_flops(T, K, D, F)
        row["ours_tflops"] = row["flops"] / (row["ours_ms"] * 1e-3) / 1e12
        row["frac_matmul"] = row["ours_tflops"] / mm_tflops
    return row


def summarize(decode, prefill):
    out = {}
    if decode:
        out["decode_frac_hbm_min"] = min(r["frac_hbm"] for r in decode)
        out["decode_frac_hbm_graph_min"] = min(r["frac_hbm_graph"] for r in decode)
        out["decode_speedup_vs_loop_min"] = min((r["speedup_vs_loop"] or 0.0) for r in decode)
    if prefill:
        out["prefill_frac_matmul_min"] = min(r["frac_matmul"] for r in prefill)
    out["goals"] = GOALS
    out["met"] = {
        "decode_frac_hbm": out.get("decode_frac_hbm_min", 0) >= GOALS["decode_frac_hbm"],
        "decode_frac_hbm_graph": out.get("decode_frac_hbm_graph_min", 0) >= GOALS["decode_frac_hbm"],
        "prefill_frac_matmul": out.get("prefill_frac_matmul_min", 0) >= GOALS["prefill_frac_matmul"],
        "decode_speedup_vs_loop": out.get("decode_speedup_vs_loop_min", 0) >= GOALS["decode_speedup_vs_loop"],
    }
    return out


# ---- tuning ------------------------------------------------------------------------------

def _gemm_grid(block_m, many_blocks):
    from moe.gpu_kernels import GemmLaunchConfig

    for bn in (32, 64, 128):
        for bk in (64, 128):
            for warps in (4, 8):
                for stages in (3, 4):
                    for gm in ((1, 8) if many_blocks else (1,)):
                        yield GemmLaunchConfig(block_m=block_m, block_n=bn, block_k=bk, group_m=gm,
                                               num_warps=warps, num_stages=stages)


def tune_tokens(shape, T, dtype, device, w13, w2):
    """Best settings for T tokens: per block_m, the gate/up GEMM then the down GEMM (coordinate search)."""
    from moe.gpu_kernels import FusedMoELaunchConfig, GemmLaunchConfig, get_launch_config, invoke_fused_moe

    E, K, D, F = shape["E"], shape["K"], shape["D"], shape["F"]
    x = torch.randn(T, D, device=device, dtype=dtype)
    ids, weights = routing(T, E, K, seed=T, device=device)
    rows_per_expert = T * K / E
    start = get_launch_config(num_tokens=T, num_slots=E, intermediate=F, hidden=D, device_name=None)

    def timed(cfg):
        try:
            return time_ms(lambda: invoke_fused_moe(x, w13, w2, ids, weights, config=cfg))
        except Exception:  # settings this GPU cannot run (e.g. out of shared memory)
            return float("inf")

    best, best_ms = None, float("inf")
    for bm in (16, 32, 64, 128):
        if bm > 16 and bm > 2 * rows_per_expert:
            continue  # mostly padding
        many = T * K / bm > 64
        down = GemmLaunchConfig(**{**start.down.to_dict(), "block_m": bm})
        gate_up = min(_gemm_grid(bm, many), key=lambda c: timed(FusedMoELaunchConfig(gate_up=c, down=down)))
        down = min(_gemm_grid(bm, many), key=lambda c: timed(FusedMoELaunchConfig(gate_up=gate_up, down=c)))
        cfg = FusedMoELaunchConfig(gate_up=gate_up, down=down)
        ms = timed(cfg)
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best, best_ms


def tune(shapes, tokens, dtype, device, out_dir: Path):
    from moe.gpu_kernels.launch_config import config_file_name, format_config_table

    written = []
    for name in shapes:
        shape = SHAPES[name]
        w13, w2 = _weights(shape, dtype, device)
        table = {}
        for T in tokens:
            table[T], ms = tune_tokens(shape, T, dtype, device, w13, w2)
            print(f"tune {name} T={T}: {ms:.3f} ms {table[T].to_dict()}", flush=True)
        path = out_dir / config_file_name(shape["E"], shape["F"], shape["D"], torch.cuda.get_device_name(device))
        path.write_text(format_config_table(table))
        written.append(str(path))
        del w13, w2
        torch.cuda.empty_cache()
    return written


# ---- main --------------------------------------------------------------------------------

def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {list(SHAPES)}")
    p.add_argument("--decode-tokens", default=",".join(map(str, DECODE_TOKENS)))
    p.add_argument("--prefill-tokens", default=",".join(map(str, PREFILL_TOKENS)))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--trace", type=Path, default=None,
                   help="routing-trace JSONL (layer, experts, gating_probs per token) used for shapes with the "
                        "same top-k and expert count, e.g. the Mixtral-8x7B HumanEval trace; default random routing")
    p.add_argument("--trace-layer", type=int, default=16, help="which layer of --trace to replay")
    p.add_argument("--tune", action="store_true", help="search launch settings and write configs JSON files")
    p.add_argument("--tune-out", type=Path, default=Path(__file__).resolve().parent.parent / "gpu_kernels" / "configs")
    args = p.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {unknown}; expected some of {list(SHAPES)}")
    try:
        args.decode_tokens = [int(t) for t in args.decode_tokens.split(",") if t]
        args.prefill_tokens = [int(t) for t in args.prefill_tokens.split(",") if t]
    except ValueError:
        p.error("--decode-tokens/--prefill-tokens take comma-separated integers")
    if any(t < 1 for t in args.decode_tokens + args.prefill_tokens):
        p.error("token counts must be >= 1")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    result = {"bench": "gpu_moe", "dtype": args.dtype}
    if not torch.cuda.is_available():
        result.update(skipped=True, reason="no CUDA device: the Triton fused-MoE kernels need a GPU")
        print(json.dumps(result))
        return 0
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    result["device"] = torch.cuda.get_device_name(device)
    if args.tune:
        args.tune_out.mkdir(parents=True, exist_ok=True)
        result["tuned_files"] = tune(args.shapes, sorted(set(args.decode_tokens + args.prefill_tokens)),
                                     dtype, device, args.tune_out)
        print(json.dumps(result))
        return 0
    trace = load_trace(args.trace, layer=args.trace_layer) if args.trace else None
    if trace is not None:
        result["trace"] = {"file": args.trace.name, "layer": args.trace_layer, "tokens": int(trace[0].shape[0])}
    result["hbm_gbps"] = measure_hbm_gbps(device)
    result["matmul_tflops"] = measure_matmul_tflops(device, dtype)
    print(f"{result['device']}: copy {result['hbm_gbps']:.0f} GB/s, {args.dtype} mm {result['matmul_tflops']:.0f} TFLOP/s",
          flush=True)
    decode, prefill = [], []
    for name in args.shapes:
        shape = SHAPES[name]
        w13, w2 = _weights(shape, dtype, device)
        for T in args.decode_tokens + args.prefill_tokens:
            row = run_case(name, shape, T, dtype, device, w13, w2, result["hbm_gbps"], result["matmul_tflops"], trace)
            (decode if T <= 64 else prefill).append(row)
            frac = f"{row['frac_hbm_graph']:.2f} of HBM" if "frac_hbm" in row else f"{row['frac_matmul']:.2f} of mm"
            print(f"{name} T={T}: ours {row['ours_ms']:.3f} ms (graph {row['ours_graph_ms']:.3f}), "
                  f"loop {row['loop_ms']} ms, speedup {row['speedup_vs_loop']}, {frac}", flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    result.update(decode=decode, prefill=prefill, summary=summarize(decode, prefill))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
