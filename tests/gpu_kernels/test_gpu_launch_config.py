"""Launch settings of the fused-MoE kernels: JSON tables, lookup and validation."""
from __future__ import annotations

import json
from importlib import resources

import pytest

from moe.gpu_kernels import launch_config as lc
from moe.gpu_kernels.launch_config import FusedMoELaunchConfig, GemmLaunchConfig

GOOD = {"block_m": 16, "block_n": 64, "block_k": 128, "group_m": 1, "num_warps": 4, "num_stages": 4}


def _shipped_files():
    return sorted(p.name for p in resources.files("moe.gpu_kernels").joinpath("configs").iterdir()
                  if p.name.endswith(".json"))


def test_default_table_ships_and_loads():
    """The package ships configs/default.json and it parses into valid settings."""
    assert "default.json" in _shipped_files()
    table = lc.load_config_table("default.json")
    assert table and all(isinstance(v, FusedMoELaunchConfig) for v in table.values())
    assert 1 in table and max(table) >= 4096


@pytest.mark.parametrize("name", _shipped_files())
def test_every_shipped_table_is_valid(name):
    """Every JSON file in configs/ is a valid settings table whose text round-trips the formatter."""
    table = lc.load_config_table(name)
    text = resources.files("moe.gpu_kernels").joinpath("configs", name).read_text()
    assert lc._parse_table(lc.format_config_table(table), name) == table
    assert json.loads(text).keys() == {str(m) for m in table}


@pytest.mark.parametrize("tokens,want", [(1, 1), (3, 2), (5, 4), (48, 32), (50, 64), (100_000, 4096)])
def test_nearest_token_count_wins(tokens, want):
    """The entry whose token count is nearest the call's T is chosen (ties go to the smaller)."""
    table = lc.load_config_table("default.json")
    got = lc.get_launch_config(num_tokens=tokens, num_slots=8, intermediate=14336, hidden=4096, device_name=None)
    assert got == table[want]


def test_unknown_device_falls_back_to_default():
    """A device without a tuned file gets the default table."""
    got = lc.get_launch_config(num_tokens=1, num_slots=3, intermediate=5, hidden=7, device_name="No Such GPU")
    assert got == lc.load_config_table("default.json")[1]


def test_tuned_file_takes_precedence(monkeypatch):
    """When a file for (E, N, K, device) exists it is used instead of the default."""
    tuned = {1: FusedMoELaunchConfig.from_dict({"gate_up": {**GOOD, "block_n": 32}, "down": GOOD})}
    real = lc.load_config_table

    def fake(name):
        return tuned if name == "E=8,N=14336,K=4096,device_name=Fake_GPU_80GB.json" else real(name)

    monkeypatch.setattr(lc, "load_config_table", fake)
    got = lc.get_launch_config(num_tokens=9, num_slots=8, intermediate=14336, hidden=4096, device_name="Fake GPU 80GB")
    assert got.gate_up.block_n == 32


def test_config_file_name_replaces_spaces():
    """File names key on E, N=F, K=D and the device name with spaces as underscores."""
    assert lc.config_file_name(8, 14336, 4096, "NVIDIA H100 80GB HBM3") == (
        "E=8,N=14336,K=4096,device_name=NVIDIA_H100_80GB_HBM3.json")


BAD_GEMM = [("block_m", 8), ("block_n", 48), ("block_k", 512), ("group_m", 0), ("num_warps", 3), ("num_stages", 0),
            ("block_m", True)]


@pytest.mark.parametrize("field,value", BAD_GEMM)
def test_gemm_config_rejects_bad_values(field, value):
    """Tile sizes that Triton cannot use and bad launch knobs are refused with the field's name."""
    with pytest.raises(ValueError, match=field):
        GemmLaunchConfig(**{**GOOD, field: value})


def test_block_m_must_agree_between_gemms():
    """Both GEMMs walk one padded row layout, so differing block_m is refused."""
    with pytest.raises(ValueError, match="block_m"):
        FusedMoELaunchConfig(gate_up=GemmLaunchConfig(**GOOD), down=GemmLaunchConfig(**{**GOOD, "block_m": 32}))


@pytest.mark.parametrize("text,match", [("[]", "non-empty object"), ("{", "not valid JSON"),
                                        ('{"x": {}}', "not a token count"), ('{"0": {}}', ">= 1"),
                                        ('{"1": {"gate_up": {}}}', "keys"),
                                        ('{"1": {"gate_up": {"bogus": 1}, "down": {}}}', "bad GEMM settings")])
def test_malformed_table_is_named(text, match):
    """A malformed table raises ValueError naming the file and the problem."""
    with pytest.raises(ValueError, match=match) as info:
        lc._parse_table(text, "configs/x.json")
    assert "configs/x.json" in str(info.value)


def test_fit_shared_memory_lowers_stages_only_when_needed():
    """Stages drop until the pipelined tiles fit; settings that fit are returned unchanged."""
    cfg = GemmLaunchConfig(**{**GOOD, "block_m": 64, "block_n": 128, "block_k": 64, "num_stages": 4})
    stage_bf16 = 64 * 64 * 2 + 2 * 64 * 128 * 2
    assert lc.fit_shared_memory(cfg, a_bytes=2, b_bytes=2, b_tiles=2, limit_bytes=4 * stage_bf16) is cfg
    fp32 = lc.fit_shared_memory(cfg, a_bytes=4, b_bytes=4, b_tiles=2, limit_bytes=4 * stage_bf16)
    assert fp32.num_stages == 2 and fp32.block_n == cfg.block_n
    assert lc.fit_shared_memory(cfg, a_bytes=4, b_bytes=4, b_tiles=2, limit_bytes=1).num_stages == 1
