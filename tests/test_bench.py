"""`edgeops bench` measured here and predicted from profiles; `edgeops targets`.

Real onnxruntime on models built here. No timing thresholds: the only latency comparison is
between two models whose work differs ~100x, which no amount of noise on this box reverses.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgeops import targets
from edgeops.agent import bench_runner
from edgeops.bench.measure import Settings, bench
from edgeops.cli import cli
from edgeops.errors import UsageError
from edgeops.paths import REPO_TARGETS

REPORT_KEYS = {"schema", "mode", "where", "model", "settings", "measurement", "environment",
               "prediction", "target", "device", "budget", "warnings", "seconds"}
STATS = ("min", "p50", "p90", "p95", "p99", "p99.9", "max")


def mlp(path: Path, width: int, layers: int = 3) -> Path:
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) * 0.05, f"w{i}")
        inits.append(w)
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"])]
        prev = f"r{i}"
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, path)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return mlp(tmp_path_factory.mktemp("bench") / "small.onnx", 32)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    return mlp(tmp_path_factory.mktemp("bench") / "big.onnx", 512, layers=6)


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGEOPS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# ----------------------------------------------------------------------------- statistics

def test_summarize_matches_numpy_and_flags_noise():
    rng = np.random.default_rng(1)
    quiet = 1.0 + 0.01 * rng.standard_normal(2000)
    s = bench_runner.summarize(quiet, np)
    assert s["latency_ms"]["p50"] == pytest.approx(np.median(quiet))
    assert s["latency_ms"]["p99.9"] == pytest.approx(np.percentile(quiet, 99.9))
    lo, hi = s["p50_ci95_ms"]
    assert lo <= s["latency_ms"]["p50"] <= hi and hi - lo < 0.01
    assert s["cv"] == pytest.approx(np.std(quiet, ddof=1) / np.mean(quiet))
    assert not s["noise"]["noisy"] and s["tail_note"] is None

    noisy = np.concatenate([quiet, np.full(100, 5.0)])         # 5 % of runs 5x slower
    assert bench_runner.summarize(noisy, np)["noise"]["noisy"]
    drifting = np.linspace(1.0, 1.5, 400)                          # thermal throttling shape
    d = bench_runner.summarize(drifting, np, cv_threshold=0.5)
    assert d["noise"]["noisy"] and "drift" in d["noise"]["reasons"][0]
    few = bench_runner.summarize(quiet[:50], np)
    assert few["tail_note"] and "50 runs" in few["tail_note"]


# ----------------------------------------------------------------------------- measured here

def test_local_measurement_report(small):
    rep = bench(small, settings=Settings(min_seconds=0.5, warmup=5))
    d = rep.to_dict()
    assert set(d) == REPORT_KEYS
    assert d["mode"] == "measured" and d["where"] == "local" and d["prediction"] is None
    m = d["measurement"]
    assert m["runs"] >= 10 and m["phases"]["warmup_runs"] == 5
    assert m["phases"]["steady_seconds"] >= 0.5
    assert m["phases"]["session_create_ms"] > 0 and m["phases"]["first_inference_ms"] > 0
    lat = m["latency_ms"]
    vals = [lat[k] for k in STATS]
    assert vals == sorted(vals) and lat["min"] > 0
    assert m["throughput_ips"] > 0 and m["peak_rss_mb"] > m["rss_before_session_mb"] > 0
    assert 0 < m["cpu_percent"] < 220
    env = d["environment"]
    assert env["onnxruntime"] == __import__("onnxruntime").__version__
    assert env["threads"] == 1 and env["logical_cores"] >= 1 and env["affinity"]
    assert d["model"]["sha256"] == m["model_sha256"]
    assert d["model"]["inputs"] == {"x": {"shape": [1, 32], "dtype": "float32"}}


def test_measurement_follows_the_work(small, big):
    """The harness measures the model, not itself: ~400x the FLOPs is far slower."""
    a = bench(small, settings=Settings(runs=50, warmup=3)).measurement["latency_ms"]["p50"]
    b = bench(big, settings=Settings(runs=20, warmup=3)).measurement["latency_ms"]["p50"]
    assert b > 5 * a


def test_inputs_file_and_shapes(small, tmp_path):
    np.savez(tmp_path / "in.npz", x=np.ones((4, 32), np.float32))
    rep = bench(small, settings=Settings(runs=20), inputs=tmp_path / "in.npz")
    assert rep.model["inputs"]["x"]["shape"] == [4, 32]
    assert rep.settings["inputs"] == "file in.npz"
    rep = bench(small, settings=Settings(runs=20, shapes={"x": (8, 32)}))
    assert rep.measurement["inputs"]["x"]["shape"] == [8, 32]
    np.savez(tmp_path / "bad.npz", x=np.ones((4, 31), np.float32))
    with pytest.raises(Exception) as e:
        bench(small, settings=Settings(runs=5), inputs=tmp_path / "bad.npz")
    assert "31" in str(e.value) or "dimension" in str(e.value).lower()


def test_cli_budget_exit_codes_and_json(small):
    r = CliRunner().invoke(cli, ["bench", str(small), "--runs", "30", "--budget-ms", "10000",
                                 "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["budget"]["verdict"] == "meets" and d["budget"]["percentile"] == "p99"
    r = CliRunner().invoke(cli, ["bench", str(small), "--runs", "30", "--budget-ms", "0.000001",
                                 "--percentile", "p50"])
    assert r.exit_code == 1
    assert "BREACH" in r.stdout and "measured" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["--predict"], "--predict needs --target"),
    (["--target", "rpi4"], "add --predict"),
    (["--target", "nope", "--predict"], "unknown target 'nope'"),
    (["--runs", "0"], "--runs must be >= 1"),
    (["--budget-ms", "-1"], "--budget-ms must be > 0"),
    (["--key", "k"], "apply to --ssh or --device"),
    (["--ssh", "user@127.0.0.1:1"], "--ssh needs --key"),
])
def test_cli_usage_errors(small, args, needle):
    r = CliRunner().invoke(cli, ["bench", str(small), *args])
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output


def test_bad_models(tmp_path, small):
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(small.read_bytes()[:60])
    text = tmp_path / "notes.onnx"
    text.write_text("not a model\n")
    for bad in (trunc, text, tmp_path / "missing.onnx"):
        r = CliRunner().invoke(cli, ["bench", str(bad)])
        assert r.exit_code == 2, (bad, r.output)
        assert r.output.count("\n") <= 3 and "Traceback" not in r.output


def test_runner_is_standalone():
    """The runner is copied to devices alone: it must not import edgeops."""
    src = Path(bench_runner.__file__).read_text()
    assert "edgeops." not in src.replace("edgeops.bench-run", "").replace("edgeops.bench", "")
    assert "from ." not in src and "import edgeops" not in src


# ----------------------------------------------------------------------------- profiles

def test_shipped_profiles_are_complete_and_consistent():
    names = targets.names()
    for want in ("rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "phone-big-core",
                 "x86-laptop", "host"):
        assert want in names
    for f in REPO_TARGETS.glob("*.toml"):
        raw = tomllib.loads(f.read_text())
        assert raw["name"] == f.stem
        c = raw["cpu"]
        if raw["kind"] == "device":
            assert raw["sources"] and all(s.startswith("http") for s in raw["sources"])
            assert raw["calibrated"] is False
        assert c["peak_gflops_fp32"] == pytest.approx(c["cores"] * c["freq_ghz"] * c["fp32_flops_per_cycle"], rel=0.01)
        assert c["peak_gops_int8"] == pytest.approx(c["cores"] * c["freq_ghz"] * c["int8_ops_per_cycle"], rel=0.01)
        targets.load(f.stem)                                  # validates the schema
    assert targets.load("rpi4").data["cpu"]["features"] == ["asimd"]     # A72: no dot-product
    assert "asimddp" in targets.load("rpi5").data["cpu"]["features"]


def test_host_profile_is_detected():
    h = targets.load("host").data
    assert h["cpu"]["cores"] == len(__import__("os").sched_getaffinity(0))
    assert h["cpu"]["isa"] in ("x86_64", "arm64")
    assert h["memory"]["ram_gb"] > 0.5


def test_profile_validation_and_save_roundtrip(tmp_path, home):
    bad = tmp_path / "bad.toml"
    text = (REPO_TARGETS / "rpi4.toml").read_text().replace("bandwidth_gbs", "bandwith_gbs")
    bad.write_text(text)
    with pytest.raises(UsageError, match="memory.bandwidth_gbs"):
        targets.load(bad)
    bad.write_text("name = [")
    with pytest.raises(UsageError, match="not a valid TOML"):
        targets.load(bad)
    p = targets.load("rpi4")
    dst = targets.save_calibrated(p, {"conv": 0.5}, {"n_models": 3, "rel_err_loo": [0.1, -0.2],
                                                      "where": 'device "x"'})
    assert dst.parent == home / "targets"
    again = targets.load("rpi4")
    assert again.calibrated and again.origin.startswith("calibrated")
    assert again.data["efficiency"]["conv"] == 0.5 and again.data["calibration"]["rel_err_loo"] == [0.1, -0.2]
    assert not tomllib.loads((REPO_TARGETS / "rpi4.toml").read_text())["calibrated"]   # shipped untouched


def test_cli_targets_list_show(home):
    r = CliRunner().invoke(cli, ["targets", "list", "--json"])
    assert r.exit_code == 0
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert rows["rpi4"]["isa"] == "arm64" and rows["x86-laptop"]["isa"] == "x86_64"
    r = CliRunner().invoke(cli, ["targets", "show", "jetson-nano"])
    assert r.exit_code == 0 and "Cortex-A57" in r.stdout and "http" in r.stdout
    r = CliRunner().invoke(cli, ["targets", "show", "nope"])
    assert r.exit_code == 2 and "known targets" in r.output


# ----------------------------------------------------------------------------- predicted

def test_prediction_is_labelled_and_separate(big, home):
    r = CliRunner().invoke(cli, ["bench", str(big), "--target", "rpi4", "--predict", "--json",
                                 "--budget-ms", "100000", "--percentile", "p50"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert set(d) == REPORT_KEYS
    assert d["mode"] == "predicted" and d["measurement"] is None and d["environment"] is None
    p = d["prediction"]
    assert p["label"] == "predicted" and not p["calibrated"]
    lo, hi = p["interval_ms"]
    assert lo < p["p50_ms"] < hi and hi / lo >= 3          # uncalibrated: wide
    assert p["fits"] is True and d["budget"]["verdict"] == "meets"
    assert d["budget"]["basis"].startswith("predicted")
    r = CliRunner().invoke(cli, ["bench", str(big), "--target", "rpi4", "--predict"])
    assert "PREDICTED" in r.stdout and "uncalibrated" in r.stdout
    r = CliRunner().invoke(cli, ["bench", str(big), "--target", "rpi4", "--predict",
                                 "--budget-ms", "0.0001"])
    assert r.exit_code == 1 and "BREACH" in r.stdout


@pytest.mark.slow
def test_calibrate_host_locally(big, home):
    """The real suite on this machine: the saved profile is calibrated, and its predictions
    carry the fit's own (narrower) interval."""
    r = CliRunner().invoke(cli, ["targets", "calibrate", "rpi4", "--local"])
    assert r.exit_code == 2 and "another machine" in r.output
    r = CliRunner().invoke(cli, ["targets", "calibrate", "host", "--local", "--seconds", "0.3",
                                 "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert len(rep["suite"]) <= 22 and Path(rep["path"]).is_file()
    cal = rep["calibration"]
    assert cal["n_models"] == len(rep["suite"])
    assert all(math.isfinite(e) for e in cal["rel_err_loo"])
    assert cal["median_abs_in_sample"] < cal["median_abs_prior"]
    prof = targets.load("host")
    assert prof.calibrated
    p = bench(big, target="host", predict=True).prediction
    lo, hi = p["interval_ms"]
    assert p["calibrated"] and lo < p["p50_ms"] < hi and hi / lo < 4


def test_mean_calibrated_profile_predicts_a_mean(big, home):
    """A profile calibrated on means (e.g. a CPU-quota'd container) never reports a p50."""
    p = targets.load("rpi4")
    targets.save_calibrated(p, {}, {"statistic": "mean", "n_models": 20, "p90_abs_loo": 0.2,
                                    "median_abs_loo": 0.1, "threads": 1})
    d = bench(big, target="rpi4", predict=True, budget_ms=1e6, percentile="p99").to_dict()
    pred = d["prediction"]
    assert pred["statistic"] == "mean" and "p50_ms" not in pred and pred["mean_ms"] > 0
    assert d["budget"]["basis"] == "predicted mean and its interval"
    assert any("estimates the mean only" in w for w in d["warnings"])
