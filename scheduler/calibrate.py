"""Calibration: measure this machine and fit the roofline cost model to it.

What is measured (medians unless said otherwise; each number lands in the profile's
"measurements" so a reader can check the fit):

- CPU memory-read bandwidth (`moe.cpu_kernels.membw` when present, else a torch sum over
  a buffer far larger than the caches) -> cpu_read_gbps;
- a dense matmul in the weight dtype -> cpu_gflops (what "linear" items get);
- a SwiGLU expert FFN (`moe.cpu_kernels.expert_ffn` when present, else plain torch) at
  several token counts, cycling over a pool of experts larger than the last-level cache
  so every call reads its weights from DRAM -> per_kind["expert"] CPU rates; the same for
  the device path the runtime calls (`moe.gpu_kernels` fused MoE over one slot);
- a tiny expert call -> cpu_call_s (the fixed cost of one call);
- with device="cuda": the same on the device (read bandwidth, matmul, expert FFN, call
  latency) and pinned host->device copies -> h2d_gbps, copy_call_s;
- with device="cpu": the "device" is the CPU itself running the fused-MoE reference (what
  the runtime's device path runs there), and a "copy" is a host memcpy.

Rates are "best achieved": bandwidth from the call that reached the most bytes per
second (one token), FLOP rate from the call that reached the most FLOP/s (most tokens);
the roofline through them matches the end points and is optimistic near the ridge.
"""
from __future__ import annotations

import functools
import math
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe.scheduler.cost_model import AnalyticCostModel
from moe.scheduler.work import WorkItem

__all__ = ["CalibrationConfig", "calibrate", "fit_roofline", "measure_read_gbps", "measure_matmul_gflops", "measure_h2d"]

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(kw_only=True)
class CalibrationConfig:
    """What `calibrate` measures.

    device: "cpu" or "cuda" (the fast tier to calibrate besides the CPU).
    dtype: weight dtype of the expert and matmul measurements ("bfloat16" or "float32").
    quick: small buffers and few repeats (seconds; for tests and smoke runs).
    threads: CPU threads during the measurements, for torch and the Numba expert kernel
        (None: their current settings, by default all cores).
    """

    device: str = "cpu"
    dtype: str = "bfloat16"
    quick: bool = False
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"calibration device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"calibration dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("calibration device 'cuda' requested but torch sees no CUDA device")

    # Sizes: an expert of DeepSeek-V2-Lite's shape (full) or a small one (quick).
    @property
    def expert_dims(self) -> tuple[int, int]:
        return (512, 704) if self.quick else (2048, 1408)

    @property
    def token_counts(self) -> tuple[int, ...]:
        return (1, 16) if self.quick else (1, 4, 16, 64, 256)

    @property
    def pool_bytes(self) -> int:
        return (16 << 20) if self.quick else (288 << 20)

    @property
    def stream_bytes(self) -> int:
        return (64 << 20) if self.quick else (1 << 30)

    @property
    def repeats(self) -> int:
        return 3 if self.quick else 7


def fit_roofline(nbytes: int, flops_per_token: int, samples: list[tuple[int, float]], call_s: float) -> tuple[float, float]:
    """(read GB/s, GFLOP/s) of the roofline through measured (tokens, seconds) samples."""
    if not samples:
        raise ValueError("fit_roofline needs at least one (tokens, seconds) sample")
    bw = flops = 0.0
    for tokens, seconds in samples:
        busy = max(seconds - call_s, 1e-9)
        bw = max(bw, nbytes / busy / 1e9)
        flops = max(flops, tokens * flops_per_token / busy / 1e9)
    return bw, flops


def _median_time(
    fn: Callable[[int], None], repeats: int, sync: Callable[[], None] = lambda: None, budget_s: float = 0.1
) -> float:
    """Median seconds of fn(i) for i = 2, 3, ... after untimed warm-up calls fn(0), fn(1).

    Runs at least `repeats` calls and keeps going until `budget_s` has passed (at most
    1000 calls): cheap calls get many samples, so the median shrugs off the odd stall of
    a busy machine.
    """
    for r in range(2):
        fn(r)
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < budget_s and len(times) < 1000):
        t0 = time.perf_counter()
        fn(2 + len(times))
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _torch_expert(x_TD, w13_2FD, w2_DF):
    f = w2_DF.shape[1]
    gu_T2F = x_TD @ w13_2FD.T
    return (torch.nn.functional.silu(gu_T2F[:, :f]) * gu_T2F[:, f:]) @ w2_DF.T


def _expert_fn(device: str, threads: int | None, side: str) -> tuple[Callable, str]:
    """The expert FFN the runtime runs on `side` ("cpu" or "device"), timed on `device`.

    cpu: the project's Numba kernel (plain torch if it is missing). device: the fused-MoE
    op the runtime calls, over one slot (Triton on CUDA, its torch reference elsewhere),
    so its per-call work (routing bookkeeping, dtype handling) is part of the measurement.
    """
    if side == "cpu":
        try:
            from moe.cpu_kernels.expert_ffn import expert_ffn
        except ImportError:
            return _torch_expert, "torch"
        return functools.partial(expert_ffn, num_threads=threads), "moe.cpu_kernels.expert_ffn"
    try:
        import moe.gpu_kernels as gk
    except ImportError:
        return _torch_expert, "torch"
    if device == "cuda":
        op, name = gk.fused_moe, "moe.gpu_kernels.fused_moe"
    else:
        op, name = gk.fused_moe_reference, "moe.gpu_kernels.fused_moe_reference"

    def one_slot(x_TD, w13_2FD, w2_DF):
        ids_T1 = torch.zeros(x_TD.shape[0], 1, dtype=torch.int64, device=x_TD.device)
        weights_T1 = torch.ones(x_TD.shape[0], 1, dtype=torch.float32, device=x_TD.device)
        return op(x_TD, w13_2FD.unsqueeze(0), w2_DF.unsqueeze(0), ids_T1, weights_T1)

    return one_slot, name


def _measure_experts(cfg: CalibrationConfig, device: str, sync: Callable[[], None], side: str) -> dict:
    """Expert FFN timings of the runtime's `side` path on `device`: medians, call latency, fitted rates."""
    dtype = _DTYPES[cfg.dtype]
    d, f = cfg.expert_dims
    fn, impl = _expert_fn(device, cfg.threads, side)
    nbytes = 3 * d * f * torch.finfo(dtype).bits // 8
    pool = max(2, math.ceil(cfg.pool_bytes / nbytes))
    gen = torch.Generator().manual_seed(0)
    w13 = [(torch.randn(2 * f, d, generator=gen) * 0.02).to(device=device, dtype=dtype) for _ in range(pool)]
    w2 = [(torch.randn(d, f, generator=gen) * 0.02).to(device=device, dtype=dtype) for _ in range(pool)]
    samples = []
    for tokens in cfg.token_counts:
        x_TD = torch.randn(tokens, d, generator=gen).to(device=device, dtype=dtype)
        # Each call uses the next expert of the pool, so its weights come from memory.
        secs = _median_time(lambda i: fn(x_TD, w13[i % pool], w2[i % pool]), cfg.repeats, sync)
        samples.append((tokens, secs))
    tiny_x = torch.randn(1, 16, generator=gen).to(device=device, dtype=dtype)
    tiny_w13 = torch.randn(32, 16, generator=gen).to(device=device, dtype=dtype)
    tiny_w2 = torch.randn(16, 16, generator=gen).to(device=device, dtype=dtype)
    call_s = _median_time(lambda r: fn(tiny_x, tiny_w13, tiny_w2), cfg.repeats, sync)
    call_s = min(call_s, 0.5 * samples[0][1])  # a tiny call cannot cost more than half a real one
    bw, gflops = fit_roofline(nbytes, 6 * d * f, samples, call_s)
    model = AnalyticCostModel(cpu_read_gbps=bw, cpu_gflops=gflops, cpu_call_s=call_s)
    probe = lambda t: model.cpu_time(_probe_item(t, nbytes, 6 * d * f))  # noqa: E731
    return {
        "impl": impl, "D": d, "F": f, "weight_bytes": nbytes, "pool": pool, "call_s": call_s,
        "read_gbps": bw, "gflops": gflops,
        "tokens_seconds": [[t, s] for t, s in samples],
        "fit_rel_error": {str(t): probe(t) / s - 1.0 for t, s in samples},
    }


def _probe_item(tokens: int, nbytes: int, fpt: int) -> WorkItem:
    return WorkItem(key="probe", tokens=tokens, weight_bytes=nbytes, flops_per_token=fpt)


def _sync_for(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def measure_read_gbps(device: str = "cpu", *, nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Read bandwidth (GB/s) of `device` memory: a reduction over a buffer far larger than the caches."""
    if device == "cpu":
        try:
            from moe.cpu_kernels.membw import read_bandwidth_gbps
        except ImportError:
            pass
        else:
            return read_bandwidth_gbps(nbytes, repeats=repeats)
    a_N = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    secs = _median_time(lambda r: a_N.sum(), repeats, _sync_for(device))
    return a_N.numel() * 4 / secs / 1e9


def measure_matmul_gflops(device: str = "cpu", *, n: int = 1024, dtype: torch.dtype = torch.bfloat16,
                          repeats: int = 7) -> float:
    """Dense n x n x n matmul rate (GFLOP/s) on `device` in `dtype`."""
    a = torch.randn(n, n).to(device=device, dtype=dtype)
    b = torch.randn(n, n).to(device=device, dtype=dtype)
    secs = _median_time(lambda r: a @ b, repeats, _sync_for(device))
    return 2 * n**3 / secs / 1e9


def measure_h2d(device: str = "cpu", *, nbytes: int = 512 << 20, repeats: int = 7) -> tuple[float, float]:
    """(GB/s, seconds per small copy) of host->device copies: from pinned memory on CUDA, memcpy on CPU."""
    pin = device == "cuda"
    sync = _sync_for(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, pin_memory=pin)
    dst = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    secs = _median_time(lambda r: dst.copy_(src, non_blocking=pin), repeats, sync)
    small_src = torch.ones(1024, dtype=torch.float32, pin_memory=pin)
    small_dst = torch.empty(1024, dtype=torch.float32, device=device)
    call_s = _median_time(lambda r: small_dst.copy_(small_src, non_blocking=pin), repeats, sync)
    return nbytes / max(secs - call_s, 1e-9) / 1e9, call_s


def calibrate(cfg: CalibrationConfig) -> tuple[AnalyticCostModel, dict]:
    """Measure this machine; returns (cost model, measurements) ready for `save_profile`."""
    prev_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        t0 = time.perf_counter()
        dtype = _DTYPES[cfg.dtype]
        copy_bytes = (32 << 20) if cfg.quick else (512 << 20)
        threads = cfg.threads or torch.get_num_threads()
        cpu_expert = _measure_experts(cfg, "cpu", _sync_for("cpu"), "cpu")
        if cfg.threads is not None:
            # Numba's OpenMP layer shares the thread count with torch; set it again.
            torch.set_num_threads(cfg.threads)
        cpu_bw = measure_read_gbps("cpu", nbytes=cfg.stream_bytes, repeats=cfg.repeats)
        cpu_gflops = measure_matmul_gflops("cpu", n=256 if cfg.quick else 1024, dtype=dtype, repeats=cfg.repeats)
        measurements = {
            "cpu_threads": threads, "dtype": cfg.dtype, "quick": cfg.quick,
            "cpu_stream_read_gbps": cpu_bw, "cpu_matmul_gflops": cpu_gflops, "cpu_expert": cpu_expert,
        }
        cpu_rates = dict(cpu_read_gbps=cpu_bw, cpu_gflops=cpu_gflops, cpu_call_s=cpu_expert["call_s"])
        expert_rates = dict(
            cpu_read_gbps=cpu_expert["read_gbps"], cpu_gflops=cpu_expert["gflops"], cpu_call_s=cpu_expert["call_s"]
        )
        if cfg.device == "cuda":
            dev_expert = _measure_experts(cfg, "cuda", _sync_for("cuda"), "device")
            dev_bw = measure_read_gbps("cuda", nbytes=cfg.stream_bytes, repeats=cfg.repeats)
            dev_gflops = measure_matmul_gflops("cuda", n=2048 if cfg.quick else 8192, dtype=dtype, repeats=cfg.repeats)
            h2d_gbps, copy_call_s = measure_h2d("cuda", nbytes=copy_bytes, repeats=cfg.repeats)
            measurements.update(device_stream_read_gbps=dev_bw, device_matmul_gflops=dev_gflops, device_expert=dev_expert)
            dev_rates = dict(device_read_gbps=dev_bw, device_gflops=dev_gflops, device_call_s=dev_expert["call_s"])
            expert_rates.update(
                device_read_gbps=dev_expert["read_gbps"], device_gflops=dev_expert["gflops"],
                device_call_s=dev_expert["call_s"],
            )
        else:
            # The "device" of a CPU-only run computes its experts with the fused-MoE
            # reference (plain torch), not with the CPU kernel: time that path.
            dev_expert = _measure_experts(cfg, "cpu", _sync_for("cpu"), "device")
            if cfg.threads is not None:
                torch.set_num_threads(cfg.threads)
            h2d_gbps, copy_call_s = measure_h2d("cpu", nbytes=copy_bytes, repeats=cfg.repeats)
            measurements.update(device_expert=dev_expert)
            dev_rates = {k.replace("cpu_", "device_"): v for k, v in cpu_rates.items()}
            expert_rates.update(
                device_read_gbps=dev_expert["read_gbps"], device_gflops=dev_expert["gflops"],
                device_call_s=dev_expert["call_s"],
            )
        measurements.update(h2d_gbps=h2d_gbps, copy_call_s=copy_call_s, seconds=time.perf_counter() - t0)
        model = AnalyticCostModel(
            **cpu_rates, **dev_rates, h2d_gbps=h2d_gbps, copy_call_s=copy_call_s,
            per_kind={"expert": expert_rates}, shared_cores=cfg.device == "cpu", dtype=cfg.dtype,
            source=f"calibrated:{socket.gethostname()}",
        )
        return model, measurements
    finally:
        torch.set_num_threads(prev_threads)
