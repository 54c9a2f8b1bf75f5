"""Prefill/decode benchmark of the hybrid runtime: every scheduler rule against the baselines.

Synthetic models with the real shapes of Mixtral-8x7B, DeepSeek-V2-Lite and Qwen3-30B-A3B
(random weights built in memory, nothing downloaded). `--scale` shrinks the model dims
and the layer count for a CPU box; expert count and top-k stay real, since they decide
what the cache and the planner see. For every model, prompt length and device expert
budget (share of all expert bytes the device may hold on top of the non-expert
weights), each scheduler rule runs one prompt with greedy decoding and reports:

    prefill and decode tokens/s, cache hit rate, bytes copied host->device,
    share of expert calls run on the CPU, and how many leading tokens match
    the all-on-device run (random weights make near-ties, so a late flip is noise).

Baselines in the same run: the unwrapped model entirely on the device ("all-on-device",
what a user with enough memory runs) and Hugging Face accelerate's CPU offload at the
same budget (when accelerate is installed and the device is CUDA). The physical bound is
the decode roofline from bandwidths measured in this run: bytes each token must read
(non-expert weights + top-k experts per layer) over device memory bandwidth, with the
uncached expert bytes drained at best by CPU reads and PCIe together.

    python bench/decode.py                       # CPU: scale 1/16, 16 new tokens, 3 repeats
    python bench/decode.py --device cuda --scale 1 --layers 4 --new-tokens 128

Prints one line per run, then one JSON line with everything.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers as T

import moe
from moe.scheduler.calibrate import CalibrationConfig, calibrate, measure_h2d, measure_read_gbps
from moe.scheduler.profile import default_profile_path, load_profile, save_profile
from moe.scheduler.planner import RULES
from moe.wrapper import runtime_of

# name: (family, real dims). F = routed-expert hidden size; dense_F = dense/shared MLP size.
MODELS = {
    "mixtral-8x7b": dict(family="mixtral", D=4096, F=14336, L=32, E=8, K=2, heads=32, kv=8, vocab=32000),
    "deepseek-v2-lite": dict(family="deepseek_v2", D=2048, F=1408, dense_F=10944, L=27, E=64, K=6, shared=2,
                             heads=16, kv_lora=512, nope=128, rope=64, v=128, vocab=102400),
    "qwen3-30b-a3b": dict(family="qwen3_moe", D=2048, F=768, dense_F=6144, L=48, E=128, K=8, heads=32, kv=4,
                          head_dim=128, vocab=151936),
}
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_STAT_KEYS = ("cache_hits", "cache_misses", "h2d_bytes", "cpu_expert_calls", "gpu_expert_calls")


def _r(x: float, mult: int, lo: int) -> int:
    return max(lo, int(round(x / mult)) * mult)


def build_config(name: str, scale: float, layers: int | None):
    """transformers config with `name`'s shapes, dims times `scale` (experts and top-k kept)."""
    m, s = MODELS[name], scale
    n_layers = layers or max(3, round(m["L"] * s))
    heads = max(2, round(m["heads"] * s))
    common = dict(vocab_size=_r(m["vocab"] * s, 64, 512), num_hidden_layers=n_layers, num_attention_heads=heads,
                  max_position_embeddings=4096, tie_word_embeddings=False, num_experts_per_tok=m["K"])
    if m["family"] == "mixtral":
        kv = max(1, round(m["kv"] * s))
        while heads % kv:
            kv -= 1
        D = _r(m["D"] * s, 64, 64)
        cfg = T.MixtralConfig(**common, hidden_size=D, intermediate_size=_r(m["F"] * s, 16, 16),
                              num_key_value_heads=kv, num_local_experts=m["E"], head_dim=D // heads)
    elif m["family"] == "deepseek_v2":
        cfg = T.DeepseekV2Config(
            **common, hidden_size=_r(m["D"] * s, 64, 64), intermediate_size=_r(m["dense_F"] * s, 16, 16),
            moe_intermediate_size=_r(m["F"] * s, 8, 8), n_routed_experts=m["E"], n_shared_experts=m["shared"],
            num_key_value_heads=heads, kv_lora_rank=_r(m["kv_lora"] * s, 16, 16), q_lora_rank=None,
            qk_nope_head_dim=_r(m["nope"] * s, 8, 8), qk_rope_head_dim=_r(m["rope"] * s, 8, 8),
            v_head_dim=_r(m["v"] * s, 8, 8), first_k_dense_replace=1, n_group=1, topk_group=1,
            topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False)
    else:
        kv = max(1, round(m["kv"] * s))
        while heads % kv:
            kv -= 1
        cfg = T.Qwen3MoeConfig(
            **common, hidden_size=_r(m["D"] * s, 64, 64), intermediate_size=_r(m["dense_F"] * s, 16, 16),
            moe_intermediate_size=_r(m["F"] * s, 8, 8), num_experts=m["E"], num_key_value_heads=kv,
            head_dim=_r(m["head_dim"] * s, 16, 16), norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    cfg.eos_token_id = cfg.bos_token_id = cfg.pad_token_id = None
    return cfg


def build_model(name: str, scale: float, layers: int | None, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(build_config(name, scale, layers), dtype=dtype)
    return model.eval()


def weight_bytes(model) -> dict:
    """Non-expert bytes, bytes read per token outside the experts, one expert's bytes, expert totals."""
    named = list(model.named_parameters())
    non_expert = sum(p.numel() * p.element_size() for n, p in named if ".experts." not in n)
    embed = model.get_input_embeddings().weight
    gu = [p for n, p in named if n.endswith("experts.gate_up_proj")]
    E, twoF, D = gu[0].shape
    one = 3 * (twoF // 2) * D * gu[0].element_size()
    # An embedding lookup reads one row, not the table.
    read = non_expert - embed.numel() * embed.element_size() + embed.shape[1] * embed.element_size()
    return dict(non_expert=non_expert, non_expert_read=read, expert=one, experts_total=one * E * len(gu),
                moe_layers=len(gu), num_experts=E)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_prompt(model, ids_1P: torch.Tensor, new_tokens: int, device: str, stats=None) -> dict:
    """Greedy prefill + decode; seconds, tokens and (for wrapped models) runtime-stat deltas."""
    snap = (lambda: {k: stats()[k] for k in _STAT_KEYS}) if stats else (lambda: {})
    ids_1P = ids_1P.to(device)
    with torch.inference_mode():
        cache = T.DynamicCache(config=model.config)
        s0 = snap()
        _sync(device)
        t0 = time.perf_counter()
        logits = model(input_ids=ids_1P, cache=cache, use_cache=True, logits_to_keep=1).logits
        nxt_11 = logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        s1 = snap()
        tokens = [int(nxt_11)]
        for _ in range(new_tokens - 1):
            logits = model(input_ids=nxt_11, cache=cache, use_cache=True).logits
            nxt_11 = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(nxt_11))
        _sync(device)
        t2 = time.perf_counter()
        s2 = snap()
    return dict(prefill_s=t1 - t0, decode_s=t2 - t1, tokens=tokens,
                prefill_stats={k: s1[k] - s0[k] for k in s0}, decode_stats={k: s2[k] - s1[k] for k in s1})


def run_repeated(model, ids_1P, new_tokens: int, device: str, repeats: int, stats=None) -> dict:
    """run_prompt `repeats` times: median prefill and decode seconds, stats summed, first run's tokens."""
    runs = [run_prompt(model, ids_1P, new_tokens, device, stats) for _ in range(repeats)]
    out = dict(runs[0])
    out["prefill_s"] = statistics.median(r["prefill_s"] for r in runs)
    out["decode_s"] = statistics.median(r["decode_s"] for r in runs)
    for key in ("prefill_stats", "decode_stats"):
        out[key] = {k: sum(r[key][k] for r in runs) for k in runs[0][key]}
    return out


def _summary(name, prompt, budget, rule, r, ref_tokens, P, N) -> dict:
    def shares(st):
        looked, calls = st["cache_hits"] + st["cache_misses"], st["cpu_expert_calls"] + st["gpu_expert_calls"]
        return (st["cache_hits"] / looked if looked else None, st["cpu_expert_calls"] / calls if calls else None)

    hit_d, cpu_d = shares(r["decode_stats"]) if r["decode_stats"] else (None, None)
    hit_p, cpu_p = shares(r["prefill_stats"]) if r["prefill_stats"] else (None, None)
    match = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref_tokens)) if a != b), len(r["tokens"]))
    return dict(model=name, prompt=P, budget=budget, rule=rule,
                prefill_tok_s=P / r["prefill_s"], decode_tok_s=(N - 1) / r["decode_s"] if N > 1 else None,
                decode_hit_rate=hit_d, decode_cpu_share=cpu_d, prefill_hit_rate=hit_p, prefill_cpu_share=cpu_p,
                decode_h2d_bytes=r["decode_stats"].get("h2d_bytes"), prefill_h2d_bytes=r["prefill_stats"].get("h2d_bytes"),
                tokens_matching_all_on_device=match)


def decode_bound(wb: dict, K: int, device: str, bw: dict, hit_rate: float | None) -> float:
    """Decode tokens/s no implementation can beat with these bandwidths (batch 1)."""
    active = wb["moe_layers"] * K * wb["expert"]
    if device == "cpu":  # "device" and CPU read the same memory
        return bw["cpu_read_gbps"] * 1e9 / (wb["non_expert_read"] + active)
    h = 1.0 if hit_rate is None else hit_rate
    device_s = (wb["non_expert_read"] + h * active) / (bw["device_read_gbps"] * 1e9)
    host_s = (1 - h) * active / ((bw["cpu_read_gbps"] + bw["h2d_gbps"]) * 1e9)
    return 1.0 / max(device_s, host_s)


def accelerate_unavailable(device: str) -> str | None:
    """Why accelerate's offload cannot run here, or None when it can."""
    if importlib.util.find_spec("accelerate") is None:
        return "unavailable: accelerate is not installed"
    if device != "cuda":
        return "unavailable: accelerate offload needs a CUDA device"
    return None


def accelerate_offload(model, budget_bytes: int):
    """`model` dispatched by accelerate with `budget_bytes` on GPU 0 and the rest offloaded to the CPU."""
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(model, max_memory={0: budget_bytes, "cpu": 2**40},
                                       no_split_module_classes=getattr(model, "_no_split_modules", None))
    return dispatch_model(model, device_map=device_map)


def use_profile(path: str | None, device: str, dtype: str, threads: int | None) -> str:
    """Point $MOE_PROFILE (read by every runtime this process builds) at a cost-model profile."""
    if path is not None:
        load_profile(device, path=path)  # fail early on a bad file
        os.environ["MOE_PROFILE"] = path
        return f"profile {path}"
    os.environ.pop("MOE_PROFILE", None)
    default = default_profile_path(device)
    if default.exists():
        return f"{load_profile(device).source} ({default})"
    model, meas = calibrate(CalibrationConfig(device=device, dtype=dtype, quick=True, threads=threads))
    tmp = Path(tempfile.mkdtemp(prefix="moe-bench-")) / "profile.json"
    save_profile(model, device=device, path=tmp, measurements=meas)
    os.environ["MOE_PROFILE"] = str(tmp)
    return f"quick calibration made now ({tmp})"


def warm_up(template, prompt: int, device: str, threads: int | None) -> None:
    """Compile kernels and warm allocators once per model, outside every timed run."""
    model = copy.deepcopy(template)
    wb = weight_bytes(model)
    moe.wrap(model, gpu_memory=wb["non_expert"] + wb["experts_total"] // 2, device=device,
             config=moe.RuntimeConfig(scheduler="dynamic", cpu_threads=threads))
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    run_prompt(model, ids, 3, device)
    runtime_of(model).close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--scale", type=float, default=None, help="dims and layers x this (default: 1 on cuda, 1/16 on cpu)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: real count x scale, >= 3); "
                   "at scale 1 every layer of Mixtral-8x7B is ~2.8 GiB and the run holds two copies in host RAM")
    p.add_argument("--budgets", default="0.25,0.5,0.75", help="device expert budgets, share of all expert bytes")
    p.add_argument("--prompts", default="32,512", help="prompt lengths")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default: 128 cuda, 16 cpu)")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per setting, median reported "
                   "(default: 1 on cuda, 3 on cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and the CPU experts (default: all)")
    p.add_argument("--profile", default=None, help="cost-model profile for the planner (default: this host's "
                   "`moe calibrate` profile, else a quick calibration made now)")
    args = p.parse_args(argv)
    device = args.device
    scale = args.scale if args.scale is not None else (1.0 if device == "cuda" else 1 / 16)
    new_tokens = args.new_tokens or (128 if device == "cuda" else 16)
    repeats = args.repeats or (1 if device == "cuda" else 3)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    bad = [r for r in rules if r not in RULES]
    if bad:
        raise SystemExit(f"unknown rules {bad}; choose from {', '.join(RULES)}")
    budgets = [float(b) for b in args.budgets.split(",")]
    prompts = [int(x) for x in args.prompts.split(",")]
    if not 0 < scale <= 1 or new_tokens < 1 or repeats < 1 or any(not 0 <= b <= 1 for b in budgets):
        raise SystemExit("need 0 < scale <= 1, new tokens >= 1, repeats >= 1 and budgets in [0, 1]")
    dtype = _DTYPES[args.dtype]
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    profile_source = use_profile(args.profile, device, args.dtype, args.threads)
    print(f"# cost model: {profile_source}", flush=True)
    bw = dict(cpu_read_gbps=measure_read_gbps("cpu", nbytes=256 << 20, repeats=5))
    bw["device_read_gbps"] = bw["cpu_read_gbps"] if device == "cpu" else measure_read_gbps("cuda", nbytes=1 << 30)
    bw["h2d_gbps"] = measure_h2d(device, nbytes=64 << 20, repeats=5)[0]
    print(f"# bandwidths GB/s: {', '.join(f'{k}={v:.1f}' for k, v in bw.items())}", flush=True)

    results, baselines = [], []
    for name in models:
        template = build_model(name, scale, args.layers, dtype, args.seed)
        wb = weight_bytes(template)
        K = MODELS[name]["K"]
        gen = torch.Generator().manual_seed(args.seed)
        warm_ids = torch.randint(0, template.config.vocab_size, (1, 8), generator=gen)
        warm_up(template, max(prompts), device, args.threads)
        for P in prompts:
            ids = torch.randint(0, template.config.vocab_size, (1, P), generator=gen)
            ref_model = copy.deepcopy(template).to(device)
            run_prompt(ref_model, warm_ids, 2, device)
            ref = run_repeated(ref_model, ids, new_tokens, device, repeats)
            del ref_model
            row = _summary(name, P, 1.0, "all-on-device", ref, ref["tokens"], P, new_tokens)
            row["bound_decode_tok_s"] = decode_bound(wb, K, device, bw, None)
            baselines.append(row)
            print(json.dumps(row), flush=True)
            for budget in budgets:
                gpu_memory = wb["non_expert"] + int(budget * wb["experts_total"])
                why = accelerate_unavailable(device)
                if why is None:
                    acc_model = accelerate_offload(copy.deepcopy(template), gpu_memory)
                    run_prompt(acc_model, warm_ids, 2, device)
                    arow = _summary(name, P, budget, "accelerate-offload",
                                    run_repeated(acc_model, ids, new_tokens, device, repeats), ref["tokens"], P, new_tokens)
                    del acc_model
                else:
                    arow = dict(model=name, prompt=P, budget=budget, rule="accelerate-offload", status=why)
                baselines.append(arow)
                for rule in rules:
                    model = copy.deepcopy(template)
                    config = moe.RuntimeConfig(scheduler=rule, cpu_threads=args.threads)
                    moe.wrap(model, gpu_memory=gpu_memory, device=device, config=config)
                    rt = runtime_of(model)
                    run_prompt(model, warm_ids, 2, device)  # compile kernels, warm the cache
                    r = run_repeated(model, ids, new_tokens, device, repeats, stats=rt.stats)
                    rt.close()
                    row = _summary(name, P, budget, rule, r, ref["tokens"], P, new_tokens)
                    row["cache_slots"] = rt.cache.num_slots
                    row["bound_decode_tok_s"] = decode_bound(wb, K, device, bw, row["decode_hit_rate"])
                    results.append(row)
                    print(json.dumps(row), flush=True)
                    del model
        del template

    def ratio(rule_a, rule_b, key):
        """Geometric mean of a/b over all (model, prompt, budget) where both ran."""
        idx = {(r["model"], r["prompt"], r["budget"]): r[key] for r in results if r["rule"] == rule_b and r[key]}
        logs = [math.log(r[key] / idx[k]) for r in results if r["rule"] == rule_a and r[key]
                for k in [(r["model"], r["prompt"], r["budget"])] if k in idx]
        return math.exp(sum(logs) / len(logs)) if logs else None

    others = [r for r in rules if r != "dynamic"]
    summary = {f"dynamic_vs_{o}_{k}": ratio("dynamic", o, k)
               for o in others for k in ("decode_tok_s", "prefill_tok_s")} if "dynamic" in rules else {}
    print(json.dumps(dict(
        bench="decode", device=device, device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        host=socket.gethostname(), cpu_threads=args.threads or torch.get_num_threads(), scale=scale, layers=args.layers,
        cost_model=profile_source, load_average=os.getloadavg()[0],
        new_tokens=new_tokens, repeats=repeats, dtype=args.dtype, bandwidths_gbps=bw, summary=summary,
        baselines=baselines, results=results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
