"""Launch settings of the fused-MoE kernels, read from JSON files in `configs/`.

Shape key: E weight slots (dim 0 of w13/w2), N = F the expert's intermediate size, K = D
the hidden size, M = T tokens in the call.

A tuned file is named ``E={E},N={F},K={D},device_name={name}.json`` (spaces in the CUDA
device name become underscores) and maps M (as a string) to one entry per GEMM::

    {"16": {"gate_up": {"block_m": 16, "block_n": 64, "block_k": 128, "group_m": 1,
                        "num_warps": 4, "num_stages": 4},
            "down":    {...}}, ...}

The entry whose M is nearest to the call's T is used. When no file matches the shape and
device, `default.json` (same format) applies. Settings live in JSON rather than code so
that tuning for a new GPU is a data change (see `bench/gpu_moe.py --tune`).
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from importlib import resources

__all__ = [
    "GemmLaunchConfig",
    "FusedMoELaunchConfig",
    "config_file_name",
    "load_config_table",
    "get_launch_config",
    "fit_shared_memory",
    "format_config_table",
]

_DEFAULT_FILE = "default.json"
_GEMMS = ("gate_up", "down")


def _is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


@dataclass(frozen=True, kw_only=True)
class GemmLaunchConfig:
    """Tile sizes and launch knobs of one grouped GEMM.

    block_m: rows (token-expert pairs) per program; also the padding unit of the
        alignment op, since a block must hold rows of one expert only.
    block_n / block_k: output columns / reduction depth per program step.
    group_m: row blocks sharing a column band before moving on (L2 reuse of weights).
    num_warps / num_stages: Triton launch options (ignored by the interpreter).
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        # tl.dot needs every tile dimension >= 16 and tl.arange needs powers of two.
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not _is_pow2(v) or v < 16 or v > 256:
                raise ValueError(f"GemmLaunchConfig.{name} must be a power of two in [16, 256], got {v!r}")
        if not isinstance(self.group_m, int) or self.group_m < 1:
            raise ValueError(f"GemmLaunchConfig.group_m must be an int >= 1, got {self.group_m!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemmLaunchConfig.num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"GemmLaunchConfig.num_stages must be an int in [1, 8], got {self.num_stages!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class FusedMoELaunchConfig:
    """Settings of the two GEMMs of one fused-MoE call.

    Both GEMMs walk the same sorted, padded row list, so they must share block_m.
    """

    gate_up: GemmLaunchConfig
    down: GemmLaunchConfig

    def __post_init__(self) -> None:
        for name in _GEMMS:
            if not isinstance(getattr(self, name), GemmLaunchConfig):
                raise TypeError(f"FusedMoELaunchConfig.{name} must be a GemmLaunchConfig")
        if self.gate_up.block_m != self.down.block_m:
            raise ValueError(
                "FusedMoELaunchConfig: gate_up.block_m and down.block_m must be equal "
                f"(one padded row layout), got {self.gate_up.block_m} and {self.down.block_m}"
            )

    @property
    def block_m(self) -> int:
        return self.gate_up.block_m

    @classmethod
    def from_dict(cls, entry: dict, *, where: str = "config") -> "FusedMoELaunchConfig":
        if not isinstance(entry, dict) or set(entry) != set(_GEMMS):
            raise ValueError(f"{where}: expected an object with keys {list(_GEMMS)}, got {entry!r}")
        try:
            return cls(**{g: GemmLaunchConfig(**entry[g]) for g in _GEMMS})
        except TypeError as exc:
            raise ValueError(f"{where}: bad GEMM settings: {exc}") from None

    def to_dict(self) -> dict:
        return {g: getattr(self, g).to_dict() for g in _GEMMS}


def config_file_name(num_slots: int, intermediate: int, hidden: int, device_name: str) -> str:
    """File name holding tuned settings for this (E, N=F, K=D, device) key."""
    return f"E={num_slots},N={intermediate},K={hidden},device_name={device_name.replace(' ', '_')}.json"


def _parse_table(text: str, where: str) -> dict[int, FusedMoELaunchConfig]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{where}: expected a non-empty object mapping token counts to settings")
    table = {}
    for key, entry in raw.items():
        try:
            m = int(key)
        except ValueError:
            raise ValueError(f"{where}: key {key!r} is not a token count") from None
        if m < 1:
            raise ValueError(f"{where}: token count key must be >= 1, got {m}")
        table[m] = FusedMoELaunchConfig.from_dict(entry, where=f"{where}[{key}]")
    return table


def format_config_table(table: dict[int, FusedMoELaunchConfig]) -> str:
    """JSON text of a settings table, one line per (M, GEMM), sorted by M."""
    lines = []
    for m in sorted(table):
        gemms = [f'    "{g}": {json.dumps(getattr(table[m], g).to_dict())}' for g in _GEMMS]
        lines.append(f'  "{m}": {{\n' + ",\n".join(gemms) + "\n  }")
    return "{\n" + ",\n".join(lines) + "\n}\n"


@functools.lru_cache(maxsize=None)
def load_config_table(file_name: str) -> dict[int, FusedMoELaunchConfig] | None:
    """Settings table from `configs/<file_name>`, or None when the package has no such file."""
    ref = resources.files(__package__).joinpath("configs", file_name)
    if not ref.is_file():
        return None
    return _parse_table(ref.read_text(encoding="utf-8"), f"moe.gpu_kernels configs/{file_name}")


def get_launch_config(
    *, num_tokens: int, num_slots: int, intermediate: int, hidden: int, device_name: str | None
) -> FusedMoELaunchConfig:
    """Settings for a call with T=num_tokens: the tuned file for the key if any, else the default."""
    table = None
    if device_name:
        table = load_config_table(config_file_name(num_slots, intermediate, hidden, device_name))
    if table is None:
        table = load_config_table(_DEFAULT_FILE)
        if table is None:
            raise FileNotFoundError(f"moe.gpu_kernels is missing its configs/{_DEFAULT_FILE}")
    m = min(table, key=lambda key: (abs(key - num_tokens), key))
    return table[m]


def fit_shared_memory(
    cfg: GemmLaunchConfig, *, a_bytes: int, b_bytes: int, b_tiles: int, limit_bytes: int
) -> GemmLaunchConfig:
    """`cfg` with num_stages lowered until the pipelined tiles fit in `limit_bytes` of shared memory.

    Each stage holds one [block_m, block_k] activation tile and `b_tiles` [block_k, block_n]
    weight tiles; fp32 weights double the footprint of a setting tuned for bf16.
    """
    stage = cfg.block_m * cfg.block_k * a_bytes + b_tiles * cfg.block_k * cfg.block_n * b_bytes
    stages = cfg.num_stages
    while stages > 1 and stages * stage > limit_bytes:
        stages -= 1
    if stages == cfg.num_stages:
        return cfg
    return GemmLaunchConfig(**{**cfg.to_dict(), "num_stages": stages})
