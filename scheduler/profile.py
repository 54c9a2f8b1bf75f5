"""Machine profiles: the calibrated cost model saved as JSON, found again by later runs.

Lookup order of `load_profile(device)`:
  1. `path=` when given;
  2. $MOE_PROFILE when set;
  3. ~/.cache/moe/profile-<hostname>-<device>.json (what `moe calibrate` writes);
  4. otherwise the analytic defaults `AnalyticCostModel.defaults(device)`.
A path named by 1 or 2 must exist; a default path that does not exist just means "not
calibrated yet". A file that exists but is not a valid profile is an error naming it.

File format (JSON object):
    {"format": "moe-profile/1", "host": str, "device": "cpu"|"cuda", "device_name": str,
     "created": ISO-8601 UTC, "dtype": str, "cost_model": {AnalyticCostModel fields},
     "measurements": {free-form numbers the fit came from}}
"""
from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

from moe.scheduler.cost_model import AnalyticCostModel

__all__ = ["PROFILE_FORMAT", "DEVICES", "default_profile_path", "load_profile", "save_profile", "read_profile"]

PROFILE_FORMAT = "moe-profile/1"
DEVICES = ("cpu", "cuda")


def _check_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}: expected one of {', '.join(DEVICES)}")
    return device


def _default_device() -> str:
    import torch  # only when the caller did not say which device

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_profile_path(device: str) -> Path:
    """~/.cache/moe/profile-<hostname>-<device>.json"""
    _check_device(device)
    host = socket.gethostname() or "localhost"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in host)
    return Path.home() / ".cache" / "moe" / f"profile-{safe}-{device}.json"


def read_profile(path: str | os.PathLike) -> dict:
    """The parsed, validated profile at `path` (raises naming the file on any problem)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"cost-model profile {str(path)!r} does not exist; run `moe calibrate`") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"cost-model profile {str(path)!r} is not valid JSON ({exc}); re-run `moe calibrate`") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"cost-model profile {str(path)!r} has format {got!r}, expected {PROFILE_FORMAT!r}")
    if data.get("device") not in DEVICES:
        raise ValueError(f"cost-model profile {str(path)!r} has device {data.get('device')!r}, expected cpu or cuda")
    try:
        data["cost_model"] = AnalyticCostModel.from_dict(data.get("cost_model"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cost-model profile {str(path)!r}: {exc}") from None
    return data


def load_profile(device: str | None = None, *, path: str | os.PathLike | None = None) -> AnalyticCostModel:
    """The cost model for `device` (None: cuda when available, else cpu); see the module docstring."""
    device = _check_device(device) if device is not None else _default_device()
    explicit = path if path is not None else os.environ.get("MOE_PROFILE") or None
    if explicit is None:
        default = default_profile_path(device)
        if not default.exists():
            return AnalyticCostModel.defaults(device)
        explicit = default
    data = read_profile(explicit)
    if data["device"] != device:
        raise ValueError(
            f"cost-model profile {str(explicit)!r} was measured for device {data['device']!r}, "
            f"but this run uses {device!r}; calibrate with `moe calibrate --device {device}`"
        )
    return data["cost_model"]


def save_profile(
    cost: AnalyticCostModel,
    *,
    device: str,
    path: str | os.PathLike | None = None,
    device_name: str = "",
    measurements: dict | None = None,
) -> Path:
    """Write `cost` as a profile (atomically) and return its path (default: default_profile_path)."""
    _check_device(device)
    path = Path(path) if path is not None else default_profile_path(device)
    data = {
        "format": PROFILE_FORMAT,
        "host": socket.gethostname(),
        "device": device,
        "device_name": device_name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": cost.dtype,
        "cost_model": cost.to_dict(),
        "measurements": measurements or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a file
    return path
