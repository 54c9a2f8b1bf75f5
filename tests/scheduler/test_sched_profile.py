"""Profiles: save/load round trip, lookup order, bad files; `moe calibrate --quick` end to end."""
import argparse
import json

import pytest

from moe.scheduler.calibrate import CalibrationConfig, fit_roofline
from moe.scheduler.cost_model import AnalyticCostModel
from moe.scheduler.profile import PROFILE_FORMAT, default_profile_path, load_profile, read_profile, save_profile


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty home directory and no $MOE_PROFILE."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MOE_PROFILE", raising=False)
    return tmp_path


def test_falls_back_to_analytic_defaults(home):
    """Without any profile, load_profile gives the analytic defaults for the device."""
    assert load_profile("cpu") == AnalyticCostModel.defaults("cpu")
    assert load_profile("cuda") == AnalyticCostModel.defaults("cuda")


def test_round_trip_through_the_default_path(home):
    """A saved profile lands in ~/.cache/moe/profile-<host>-<device>.json and loads back equal."""
    model = AnalyticCostModel(cpu_read_gbps=12.5, per_kind={"expert": {"cpu_gflops": 50.0}}, source="calibrated:test")
    path = save_profile(model, device="cpu", measurements={"x": 1})
    assert path == default_profile_path("cpu") and path.is_relative_to(home / ".cache" / "moe")
    assert load_profile("cpu") == model
    assert read_profile(path)["measurements"] == {"x": 1}
    assert load_profile("cuda") == AnalyticCostModel.defaults("cuda")  # other device: not calibrated


def test_env_and_explicit_path_take_precedence(home, tmp_path, monkeypatch):
    """path= beats $MOE_PROFILE, which beats the default path; a named path must exist."""
    a = save_profile(AnalyticCostModel(h2d_gbps=1.0), device="cpu", path=tmp_path / "a.json")
    b = save_profile(AnalyticCostModel(h2d_gbps=2.0), device="cpu", path=tmp_path / "b.json")
    save_profile(AnalyticCostModel(h2d_gbps=3.0), device="cpu")
    assert load_profile("cpu").h2d_gbps == 3.0
    monkeypatch.setenv("MOE_PROFILE", str(a))
    assert load_profile("cpu").h2d_gbps == 1.0
    assert load_profile("cpu", path=b).h2d_gbps == 2.0
    monkeypatch.setenv("MOE_PROFILE", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_profile("cpu")


BAD_FILES = [
    ("{not json", "not valid JSON"),
    (json.dumps({"format": "other/1"}), "format"),
    (json.dumps({"format": PROFILE_FORMAT, "device": "tpu"}), "device"),
    (json.dumps({"format": PROFILE_FORMAT, "device": "cpu", "cost_model": {"cpu_read_gbps": -1}}), "cpu_read_gbps"),
    (json.dumps({"format": PROFILE_FORMAT, "device": "cpu", "cost_model": {"warp": 1}}), "warp"),
]


@pytest.mark.parametrize("text,word", BAD_FILES)
def test_bad_profile_names_the_file_and_problem(home, tmp_path, text, word):
    """A corrupt or foreign profile raises an error naming the file and what is wrong."""
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=word) as exc:
        load_profile("cpu", path=path)
    assert "bad.json" in str(exc.value)


def test_device_mismatch_and_unknown_device(home, tmp_path):
    """A profile measured for another device, or an unknown device name, is rejected."""
    path = save_profile(AnalyticCostModel(), device="cuda", path=tmp_path / "gpu.json")
    with pytest.raises(ValueError, match="calibrate --device cpu"):
        load_profile("cpu", path=path)
    with pytest.raises(ValueError, match="tpu"):
        load_profile("tpu")


def test_fit_roofline_recovers_known_rates():
    """Samples generated from a roofline give back its bandwidth and FLOP rate."""
    nbytes, fpt, call = 10**8, 10**7, 1e-4
    samples = [(t, call + max(nbytes / 20e9, t * fpt / 500e9)) for t in (1, 4, 64, 1024)]
    bw, gflops = fit_roofline(nbytes, fpt, samples, call)
    assert bw == pytest.approx(20.0) and gflops == pytest.approx(500.0)
    with pytest.raises(ValueError, match="sample"):
        fit_roofline(nbytes, fpt, [], call)


def test_calibration_config_validation():
    """Unknown devices and dtypes, bad thread counts and cuda without a GPU are rejected."""
    with pytest.raises(ValueError, match="device"):
        CalibrationConfig(device="npu")
    with pytest.raises(ValueError, match="dtype"):
        CalibrationConfig(dtype="float8")
    with pytest.raises(ValueError, match="threads"):
        CalibrationConfig(threads=0)


def test_moe_calibrate_quick_writes_a_loadable_profile(home, tmp_path, capsys):
    """`moe calibrate --quick --output P` measures this CPU and writes a profile load_profile accepts."""
    from moe.cli import calibrate as cli

    parser = argparse.ArgumentParser(prog="moe")
    cli.register(parser.add_subparsers())
    out = tmp_path / "prof.json"
    args = parser.parse_args(["calibrate", "--device", "cpu", "--quick", "--output", str(out), "--dtype", "float32"])
    assert args.func(args) == 0
    assert str(out) in capsys.readouterr().out
    data = read_profile(out)
    model = data["cost_model"]
    assert data["device"] == "cpu" and model.dtype == "float32" and model.source.startswith("calibrated:")
    assert model.cpu_read_gbps > 0 and model.h2d_gbps > 0 and set(model.per_kind) == {"expert"}
    assert {t for t, _ in data["measurements"]["cpu_expert"]["tokens_seconds"]} == {1, 16}
    assert data["measurements"]["device_expert"]["impl"] == "moe.gpu_kernels.fused_moe_reference"
    assert model.shared_cores
    assert load_profile("cpu", path=out) == model


@pytest.mark.gpu
def test_cuda_calibration_measures_device_and_link(home, tmp_path):
    """On a CUDA machine the quick calibration fills device rates and pinned H2D bandwidth from measurements."""
    from moe.scheduler.calibrate import calibrate

    model, meas = calibrate(CalibrationConfig(device="cuda", quick=True))
    assert not model.shared_cores and model.h2d_gbps > 0.5 and model.device_read_gbps > model.h2d_gbps
    assert meas["device_expert"]["impl"] in ("moe.gpu_kernels.fused_moe", "torch")
    assert len(meas["device_expert"]["tokens_seconds"]) == 2
    path = save_profile(model, device="cuda", path=tmp_path / "gpu.json", measurements=meas)
    assert load_profile("cuda", path=path) == model
