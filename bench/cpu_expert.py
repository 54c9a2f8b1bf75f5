"""CPU expert FFN: our Numba kernels against torch, and the machine's read bandwidth.

For each expert shape (Mixtral-8x7B: D=4096, F=14336; DeepSeek-V2-Lite: D=2048, F=1408),
weight format (fp32, bf16, int8, int4) and token count T, measures in one run:

* ours:  moe.cpu_kernels.expert_ffn on the weights as stored (bf16 read raw, int8/int4
         packed);
* torch: what a user would otherwise run, F.linear on fp32/bf16 weights; for int8/int4
         the same torch code on weights dequantised once to bf16 (a copy ours avoids);
* bound: memory-read bandwidth of a parallel streaming sum (best of several, measured
         before, between and after the formats; the best is the bound);
* probe: the same streaming sum over 256 MB, one sample after every pair of blocks of
         ours and torch, so that it sees the same minutes of machine load as they do.

Weights come from a pool of distinct experts totalling more than the last-level cache,
visited round-robin, so every call streams its weights from DRAM as in real decode.
They sit in memory as the host expert store keeps them: up to 64 experts (a layer) per
huge-page arena where the host offers transparent huge pages (expert_cache.store.
pack_experts); the torch baseline's weights and the probe's array likewise, so all three
see the same page size. ``--plain-pages`` puts all three in the allocator's pages.
Each pool is visited once untimed before timing: steady-state decode applies experts
it has applied before, and ours caches per-weight checks and views on first sight.
Ours and torch alternate in short blocks of calls so that both see the same machine
load; the calls of the first millisecond after each switch are not timed (see
_time_blocks). Reported:
median time, tokens/s, GB/s of weight bytes read (each side counts the bytes it reads),
and ours as a fraction of the bound; also the best call (``best_*``), which on a shared,
loaded machine is closer to what the hardware does (the bound is a best-of too), and the
1-minute load average at start and end. Goals are judged on medians, twice: against the
run's best probe (``goals``: a median against a best, which on a machine whose
bandwidth drifts by tens of percent mostly measures the drift) and against the median
of the probe samples taken between the same blocks (``goals_same_window``,
``frac_of_probe``: the median over blocks of each block's rate over the sample after
it). The int4-over-bf16 goal compares two formats measured minutes apart;
where the bandwidth flips between runs of a format (a 2-vCPU guest whose vCPUs share a
core or not) that compares two machine states, so with T=1 the two are also timed in
alternating blocks of one run (``int4_over_bf16_interleaved``: the median over block
pairs of the ratio within a pair), which is what ``goals_same_window`` judges. Prints one JSON line last.

    python bench/cpu_expert.py [--quick] [--json] [--threads N] [--repeats N] [--tokens 1,4,16]
                               [--shapes mixtral-8x7b,...] [--wait-idle SECONDS] [--plain-pages]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import numba
import torch
import torch.nn.functional as F

from moe.cpu_kernels import BandwidthProbe, Int4Weight, Int8Weight, expert_ffn, read_bandwidth_gbps, weight_nbytes
from moe.cpu_kernels.hostmem import mapping_of, mappings, thp_mode
from moe.expert_cache.store import pack_experts, weight_tensors

SHAPES = {"mixtral-8x7b": (4096, 14336), "deepseek-v2-lite": (2048, 1408)}
DTYPES = ("fp32", "bf16", "int8", "int4")
TOKENS = (1, 4, 16)
INT4_GROUP = 128
POOL_BYTES = 768 << 20  # > 2x this machine's 260 MiB L3: every call misses the cache
GOAL_FRAC_OF_BOUND = 0.8  # bf16 and int8 at T=1
GOAL_INT4_OVER_BF16 = 2.5  # int4 tokens/s over bf16 tokens/s at T=1
BLOCK = 4  # timed calls per side between switches (see _time_blocks)
LEAD_S = 1e-3  # untimed calls after a switch last at least this long (see _time_blocks)
ARENA_EXPERTS = 64  # experts per huge-page arena: a DeepSeek-V2-Lite layer, as the store packs them


def _random_bf16_rows(rows: int, cols: int, scale: float) -> torch.Tensor:
    """Gaussian [rows, cols] bf16 weight, generated in slices to keep fp32 temporaries small."""
    out = torch.empty((rows, cols), dtype=torch.bfloat16)
    step = max(1, (64 << 20) // (4 * max(cols, 1)))
    for r in range(0, rows, step):
        out[r:r + step] = (torch.randn(min(step, rows - r), cols) * scale).to(torch.bfloat16)
    return out


def _make_expert(D: int, Fh: int, dtype: str):
    """One expert (w13 [2F, D], w2 [D, F]) in ``dtype``; packed formats get random codes."""
    if dtype in ("fp32", "bf16"):
        w13 = _random_bf16_rows(2 * Fh, D, D ** -0.5)
        w2 = _random_bf16_rows(D, Fh, Fh ** -0.5)
        return (w13.float(), w2.float()) if dtype == "fp32" else (w13, w2)
    if dtype == "int8":
        def int8(R, C):
            return Int8Weight(q_RC=torch.randint(-127, 128, (R, C), dtype=torch.int8),
                              scale_R=torch.full((R,), C ** -0.5 / 64))
        return int8(2 * Fh, D), int8(D, Fh)

    def int4(R, C):
        G = math.ceil(C / INT4_GROUP)
        return Int4Weight(packed_RB=torch.randint(0, 256, (R, (C // INT4_GROUP) * INT4_GROUP // 2
                                                           + (C % INT4_GROUP + 1) // 2), dtype=torch.uint8),
                          scale_RG=torch.full((R, G), C ** -0.5 / 4), cols=C, group_size=INT4_GROUP)
    return int4(2 * Fh, D), int4(D, Fh)


def _cpu_idle_fraction(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs idle over ``seconds`` (Linux /proc/stat; None elsewhere)."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total
    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (idle1 - idle0) / max(1, total1 - total0)


def _wait_idle(max_seconds: float, threshold: float = 0.85) -> bool:
    """Wait up to max_seconds for the machine to be mostly idle (other work on a shared
    machine stalls every parallel call for a scheduler tick); True once it is."""
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        idle = _cpu_idle_fraction()
        if idle is None or idle >= threshold:
            return True
    return False


def _expert_bytes(w13, w2) -> int:
    return weight_nbytes(w13) + weight_nbytes(w2)


def _pool(D: int, Fh: int, dtype: str, max_experts: int | None = None, huge_pages: bool = True) -> list:
    """Distinct experts totalling at least POOL_BYTES (at least 2); with huge_pages, in
    huge-page arenas of ARENA_EXPERTS experts, as the expert store keeps them."""
    first = _make_expert(D, Fh, dtype)
    n = max(2, math.ceil(POOL_BYTES / _expert_bytes(*first)))
    if max_experts is not None:
        n = min(n, max_experts)
    pool = [first] + [_make_expert(D, Fh, dtype) for _ in range(n - 1)]
    return _arenas(pool) if huge_pages else pool


def _arenas(pool: list) -> list:
    """The pool's experts copied into huge-page arenas, ARENA_EXPERTS at a time."""
    out = []
    for i in range(0, len(pool), ARENA_EXPERTS):
        out += pack_experts(pool[i:i + ARENA_EXPERTS])
        pool[i:i + ARENA_EXPERTS] = [None] * len(pool[i:i + ARENA_EXPERTS])  # free as we go
    return out


def _huge_fraction(pool: list) -> float | None:
    """Share of the pool's weight bytes the kernel backs with huge pages right now (the
    advice asks for them; a host short of free 2 MiB blocks may still give small pages).
    None where /proc/self/smaps cannot be read."""
    maps = mappings()
    huge_kb, nbytes = {}, 0
    for pair in pool:
        for w in pair:
            for t in weight_tensors(w).values():
                nbytes += t.numel() * t.element_size()
                m = mapping_of(t.data_ptr(), maps)
                if m is None:
                    return None
                huge_kb[m["start"]] = m["huge_kb"]
    return round(min(1.0, sum(huge_kb.values()) * 1024 / nbytes), 3) if nbytes else None


def torch_expert(x_TD: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The plain torch expert a user would write (weights and activations in one dtype)."""
    g_TF, u_TF = F.linear(x_TD, w13).chunk(2, dim=-1)
    return F.linear(F.silu(g_TF) * u_TF, w2)


def _time_blocks(ours, ref, calls: int, block: int = BLOCK,
                 probe: BandwidthProbe | None = None) -> tuple[list[float], list[float], list[float]]:
    """Seconds of ``calls`` calls each of ours(i) and ref(i), in alternating blocks, and
    (with a probe) one bandwidth sample in GB/s after every pair of blocks.

    Each side runs ``block`` timed calls in a row, after untimed calls of at least
    LEAD_S: numba and torch keep separate OpenMP pools whose threads spin for a while
    after a parallel region, so the calls right after a switch share the cores with the
    other library's spinning threads. One untimed call covered that for experts of
    milliseconds; a DeepSeek-V2-Lite int4 expert (~0.12 ms) measured 204, 139, 128 us in
    the first three calls after torch's, ~120 us from then on. Neither side's steady
    state (a decode step runs many experts back to back) includes that; alternating
    blocks still expose both to the same machine load. Every call takes the next index,
    so timed calls never find their weights in cache from a lead-in call.
    """
    t_ours, t_ref, samples = [], [], []
    i = 0
    while len(t_ours) < calls:
        for fn, ts in ((ours, t_ours), (ref, t_ref)):
            lead_end = time.perf_counter() + LEAD_S
            fn(i)
            i += 1
            while time.perf_counter() < lead_end:
                fn(i)
                i += 1
            for _ in range(block):
                t0 = time.perf_counter()
                fn(i)
                ts.append(time.perf_counter() - t0)
                i += 1
        if probe is not None:
            samples.append(probe.sample())
    return t_ours, t_ref, samples


def _block_medians(ts: list[float], block: int = BLOCK) -> list[float]:
    """The median call time of each block of _time_blocks.

    Ratios are taken per block (against the probe sample after it, or the other side's
    block beside it) and their median reported: on the 2-vCPU guest the read bandwidth
    flips between ~35 and ~60 GB/s for minutes at a time, and a ratio of medians over a
    run that straddles a flip compares calls in one state with samples in the other.
    """
    return [statistics.median(ts[k:k + block]) for k in range(0, len(ts) - block + 1, block)]


def bench_format(name: str, D: int, Fh: int, dtype: str, tokens, repeats: int, threads: int,
                 probe: BandwidthProbe | None = None, huge_pages: bool = True):
    """Results for one shape and weight format, all token counts."""
    pool = _pool(D, Fh, dtype, huge_pages=huge_pages)
    x_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    if dtype in ("fp32", "bf16"):
        ref_pool = pool
    else:  # the baseline holds dequantised bf16 copies (its own pool, same DRAM-miss rule)
        n_ref = max(2, math.ceil(POOL_BYTES / (6 * D * Fh)))
        ref_pool = [(pool[i % len(pool)][0].dequantize(torch.bfloat16),
                     pool[i % len(pool)][1].dequantize(torch.bfloat16)) for i in range(n_ref)]
        ref_pool = _arenas(ref_pool) if huge_pages else ref_pool
    pages = dict(huge_frac=_huge_fraction(pool), ref_huge_frac=_huge_fraction(ref_pool))
    ours_bytes = _expert_bytes(*pool[0])
    ref_bytes = _expert_bytes(*ref_pool[0])
    rows = []
    for T in tokens:
        x_TD = torch.randn(T, D).to(x_dtype)
        out = torch.empty_like(x_TD)

        def ours(i):
            expert_ffn(x_TD, *pool[i % len(pool)], out=out, num_threads=threads)

        def ref(i):
            torch_expert(x_TD, *ref_pool[i % len(ref_pool)])

        # Compile, then one untimed pass over each pool: expert_ffn checks a weight and
        # makes its kernel views on first sight and caches them (weight_views.py), and a
        # decode step applies experts it has applied before; steady state is what counts.
        for i in range(len(pool)):
            ours(i)
        for i in range(len(ref_pool)):
            ref(i)
        calls = max(repeats, len(pool), len(ref_pool))
        ts_ours, ts_ref, samples = _time_blocks(ours, ref, calls, probe=probe)
        t_ours, t_ref = statistics.median(ts_ours), statistics.median(ts_ref)
        window = dict(probe_gbps=round(statistics.median(samples), 2),
                      frac_of_probe=round(statistics.median(
                          ours_bytes / t / 1e9 / p for t, p in zip(_block_medians(ts_ours), samples)), 3)) if samples else {}
        rows.append(dict(shape=name, D=D, F=Fh, dtype=dtype, T=T,
                         ms=round(t_ours * 1e3, 3), ref_ms=round(t_ref * 1e3, 3),
                         tokens_per_s=round(T / t_ours, 2), ref_tokens_per_s=round(T / t_ref, 2),
                         gbps=round(ours_bytes / t_ours / 1e9, 2), ref_gbps=round(ref_bytes / t_ref / 1e9, 2),
                         speedup_vs_ref=round(t_ref / t_ours, 2), weight_mb=round(ours_bytes / 1e6, 1),
                         best_gbps=round(ours_bytes / min(ts_ours) / 1e9, 2),
                         best_ref_gbps=round(ref_bytes / min(ts_ref) / 1e9, 2), calls=calls, **pages, **window))
    del pool, ref_pool
    return rows


def int4_over_bf16_interleaved(D: int, Fh: int, repeats: int, threads: int, huge_pages: bool = True) -> float:
    """int4 over bf16 tokens/s at T=1, ours both, timed in alternating blocks of one run
    (the same minutes of machine load and bandwidth): ratio of the median call times."""
    p4 = _pool(D, Fh, "int4", huge_pages=huge_pages)
    p16 = _pool(D, Fh, "bf16", huge_pages=huge_pages)
    x_TD = torch.randn(1, D).bfloat16()
    out = torch.empty_like(x_TD)

    def run4(i):
        expert_ffn(x_TD, *p4[i % len(p4)], out=out, num_threads=threads)

    def run16(i):
        expert_ffn(x_TD, *p16[i % len(p16)], out=out, num_threads=threads)

    for i in range(len(p4)):  # first sight of every weight untimed, as in bench_format
        run4(i)
    for i in range(len(p16)):
        run16(i)
    t4, t16, _ = _time_blocks(run4, run16, max(repeats, len(p4), len(p16)))
    return statistics.median(b / a for a, b in zip(_block_medians(t4), _block_medians(t16)))


def _goals(results: list[dict], bound: float | None, interleaved: dict | None = None) -> dict:
    """The issue's goals at T=1; bound None: each row against its same-window probe, and
    int4 over bf16 from `interleaved` ({shape: ratio}) where measured."""
    goals = {}
    for shape in {r["shape"] for r in results}:
        t1 = {r["dtype"]: r for r in results if r["shape"] == shape and r["T"] == 1}
        for dtype in ("bf16", "int8"):
            if dtype in t1 and (bound is not None or "frac_of_probe" in t1[dtype]):
                frac = t1[dtype]["gbps"] / bound if bound is not None else t1[dtype]["frac_of_probe"]
                goals[f"{shape}/{dtype}_T1_frac_of_bound"] = dict(
                    value=round(frac, 3), target=GOAL_FRAC_OF_BOUND, met=frac >= GOAL_FRAC_OF_BOUND)
        if "int4" in t1 and "bf16" in t1:
            ratio = t1["int4"]["tokens_per_s"] / t1["bf16"]["tokens_per_s"]
            if bound is None and interleaved and shape in interleaved:
                ratio = interleaved[shape]
            goals[f"{shape}/int4_over_bf16_T1_tokens_per_s"] = dict(
                value=round(ratio, 2), target=GOAL_INT4_OVER_BF16, met=ratio >= GOAL_INT4_OVER_BF16)
    return goals


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="DeepSeek-V2-Lite shape only, fewer repeats")
    p.add_argument("--json", action="store_true", help="print only the final JSON line")
    p.add_argument("--threads", type=int, default=None, help="numba threads (default: all)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per point (default 5, quick 3)")
    p.add_argument("--bw-bytes", type=int, default=1 << 30, help="bytes of the bandwidth probe array")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="token counts, comma-separated")
    p.add_argument("--shapes", default=None, help=f"comma-separated subset of {', '.join(SHAPES)}")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each format, wait up to this long for the CPUs to be >= 85%% idle")
    p.add_argument("--plain-pages", action="store_true",
                   help="weights, baseline and probe in the allocator's pages instead of huge pages")
    args = p.parse_args(argv)
    tokens = tuple(int(t) for t in args.tokens.split(","))
    threads = args.threads or numba.get_num_threads()
    repeats = args.repeats or (3 if args.quick else 5)
    shapes = {"deepseek-v2-lite": SHAPES["deepseek-v2-lite"]} if args.quick else SHAPES
    if args.shapes:
        unknown = set(args.shapes.split(",")) - set(SHAPES)
        if unknown:
            p.error(f"unknown shape(s) {sorted(unknown)}; choose from {', '.join(SHAPES)}")
        shapes = {k: SHAPES[k] for k in args.shapes.split(",")}
    torch.set_num_threads(threads)  # the baseline gets the same cores

    def log(msg):
        if not args.json:
            print(msg, flush=True)

    load_start = os.getloadavg()[0]  # other work on the machine skews every number; record it
    huge = not args.plain_pages
    bounds = [read_bandwidth_gbps(args.bw_bytes, repeats=5, num_threads=threads, huge_pages=huge)]
    probe = BandwidthProbe(256 << 20, num_threads=threads, huge_pages=huge)
    log(f"read bandwidth: {bounds[-1]:.2f} GB/s ({threads} threads)")
    results = []
    interleaved = {}
    busy_starts = 0
    for name, (D, Fh) in shapes.items():
        for dtype in DTYPES:
            if args.wait_idle > 0 and not _wait_idle(args.wait_idle):
                busy_starts += 1
            for row in bench_format(name, D, Fh, dtype, tokens, repeats, threads, probe, huge):
                results.append(row)
                log(f"{name:17s} {dtype:5s} T={row['T']:3d}  ours {row['ms']:9.3f} ms {row['gbps']:6.2f} GB/s"
                    f"  torch {row['ref_ms']:9.3f} ms {row['ref_gbps']:6.2f} GB/s  x{row['speedup_vs_ref']}"
                    f"  probe {row['probe_gbps']:6.2f} GB/s (ours {row['frac_of_probe']:.3f} of it)")
            bounds.append(read_bandwidth_gbps(args.bw_bytes, repeats=3, num_threads=threads, huge_pages=huge))
            log(f"read bandwidth: {bounds[-1]:.2f} GB/s")
        if 1 in tokens:
            interleaved[name] = round(int4_over_bf16_interleaved(D, Fh, repeats, threads, huge), 2)
            log(f"{name:17s} int4 over bf16 tokens/s at T=1, alternating blocks: {interleaved[name]:.2f}")
    bound = max(bounds)
    for row in results:
        row["frac_of_bound"] = round(row["gbps"] / bound, 3)
        row["best_frac_of_bound"] = round(row["best_gbps"] / bound, 3)
    summary = dict(bench="cpu_expert", machine=f"CPU, {os.cpu_count()} cores", threads=threads,
                   quick=args.quick, bound_gbps=round(bound, 2),
                   bound_samples_gbps=[round(b, 2) for b in bounds],
                   load_avg_1min=[round(load_start, 2), round(os.getloadavg()[0], 2)],
                   wait_idle_s=args.wait_idle, formats_started_busy=busy_starts,
                   int4_group_size=INT4_GROUP, thp=thp_mode(), pages="plain" if args.plain_pages else "huge",
                   timing=f"alternating blocks of {BLOCK} calls, untimed calls of >= {LEAD_S * 1e3:g} ms after a switch",
                   results=results, int4_over_bf16_interleaved=interleaved, goals=_goals(results, bound),
                   goals_same_window=_goals(results, None, interleaved))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
