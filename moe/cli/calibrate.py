"""`moe calibrate`: measure this machine's cost model and save it as a JSON profile."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="measure the cost model (CPU/device bandwidth, expert FFN, H2D copies)",
        description="Measure CPU memory bandwidth, a CPU expert FFN at a few token counts and, with "
        "--device cuda, the device and pinned host->device copies; save a JSON profile that later "
        "runs load automatically ($MOE_PROFILE, else ~/.cache/moe/profile-<host>-<device>.json).",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="fast tier to calibrate (default: cuda if present, else cpu)")
    p.add_argument("--output", default=None, metavar="PATH", help="where to write the profile (default: the per-host cache path)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="weight dtype to measure (default: bfloat16)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads during the measurements (default: torch's setting)")
    p.add_argument("--quick", action="store_true", help="small buffers, few repeats: a few seconds, less accurate")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from moe.scheduler.calibrate import CalibrationConfig, calibrate
    from moe.scheduler.profile import save_profile

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = CalibrationConfig(device=device, dtype=args.dtype, quick=args.quick, threads=args.threads)
    model, measurements = calibrate(cfg)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    path = save_profile(model, device=device, path=args.output, device_name=name, measurements=measurements)
    expert = model.per_kind["expert"]
    print(f"cpu: read {model.cpu_read_gbps:.1f} GB/s, matmul {model.cpu_gflops:.1f} GFLOP/s, "
          f"expert {expert['cpu_read_gbps']:.1f} GB/s / {expert['cpu_gflops']:.1f} GFLOP/s, "
          f"call {expert['cpu_call_s'] * 1e6:.0f} us")
    print(f"{device}: read {model.device_read_gbps:.1f} GB/s, matmul {model.device_gflops:.1f} GFLOP/s, "
          f"h2d {model.h2d_gbps:.1f} GB/s")
    print(f"wrote {path} ({measurements['seconds']:.1f} s)")
    return 0
