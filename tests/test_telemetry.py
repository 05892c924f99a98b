"""The on-device runtime and its telemetry, run as the device runs it: the agent package copied
alone (edgeops import-blocked) and driven through its JSON command line in real processes, on
real signed bundles. The spool is real SQLite, killed with real SIGKILLs; the KServe server is
spoken to over real HTTP. (Over SSH and MQTT, and Prometheus: test_telemetry_fleet.py.)"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgeops.agent import profile as P
from edgeops.agent import spool as SP
from edgeops.agent import install as I
from edgeops.agent import verifier as v
from edgeops.bundle import build as b
from edgeops.telemetry import analysis as A
from edgeops.telemetry.collect import pull
from edgeops.telemetry.store import Store

sys.path.insert(0, str(Path(__file__).parent))
from test_agent import BLOCK, _agent, _device, world  # noqa: E402,F401
from testbed import free_port  # noqa: E402


class LocalLink:
    """transport.DeviceLink for a device folder on this machine (the agent in its own process)."""

    def __init__(self, root: Path):
        self.root = root

    def agent(self, *args, timeout: float = 600):
        d = _agent(self.root, *args)
        return d.pop("_exit"), d

    def close(self):
        pass


def _popen(root: Path, *argv) -> subprocess.Popen:
    pkg_parent = root / "agent" / "versions" / I.AGENT_VERSION
    return subprocess.Popen([sys.executable, "-I", "-c", BLOCK.format(pkg_parent=str(pkg_parent),
                                                                       argv=[str(a) for a in argv])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _store(tmp_path) -> Store:
    return Store("sqlite://" + str(tmp_path / "telemetry.db"))


def _manifest(path) -> dict:
    return v.peek(path)[1]["signed"]


def test_bundle_carries_a_reference_profile(world, tmp_path):
    m = _manifest(world["bundles"]["1.0.0"])
    prof = m["telemetry"]["profile"]
    x, y = prof["inputs"]["x"], prof["outputs"]["y"]
    assert x["mode"] == "element" and x["features"] == 16 and all(len(e) == 9 for e in x["edges"])
    assert y["mode"] == "argmax" and y["classes"] == 8            # softmax rows: a class distribution
    assert abs(sum(y["ref"][0]) - 1) < 1e-9 and m["telemetry"]["samples"] == 1000
    assert "generated" in m["telemetry"]["source"]
    # from calibration data: the profile follows it (inputs centred at 5 -> edges around 5)
    data = tmp_path / "calib.npz"
    np.savez(data, x=(np.random.default_rng(1).standard_normal((300, 16)) + 5).astype(np.float32))
    out = b.build("clf:1.0.0", "host", [world["signer"]], tmp_path / "p.bundle", profile_data=data,
                  counter=900).manifest["telemetry"]
    assert out["samples"] == 300 and "calib.npz" in out["source"]
    assert 4 < np.median(out["profile"]["inputs"]["x"]["edges"][0]) < 6


def test_profile_psi_and_histogram_are_sound():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2000, 3, 8, 8)).astype(np.float32)    # image-like: channel means
    prof = P.build(ref)
    assert prof["mode"] == "channel" and prof["features"] == 3
    same = P.bin_counts(P.reduce(rng.standard_normal((2000, 3, 8, 8)), prof), prof)
    moved = P.bin_counts(P.reduce(rng.standard_normal((2000, 3, 8, 8)) + 0.3, prof), prof)
    assert P.tensor_psi(prof, same)["psi"] < 0.1 < 0.25 < P.tensor_psi(prof, moved)["psi"]
    # histograms merge by addition and give quantiles within one bucket (+-6 %)
    lat = rng.lognormal(np.log(2e-3), 0.3, 5000)
    h1, h2 = {}, {}
    for i, s in enumerate(lat):
        d = h1 if i % 2 else h2
        d[P.bucket(s)] = d.get(P.bucket(s), 0) + 1
    merged = P.merge_hist(dict(h1), h2)
    for q in (0.5, 0.99):
        assert abs(P.quantile(merged, q) / np.quantile(lat, q) - 1) < 0.07
    # a constant feature drifts either way; a point mass (ReLU zeros) has a bin of its own
    const = P.build(np.full((500, 1), 3.0))
    assert P.tensor_psi(const, P.bin_counts(np.full((500, 1), 3.5), const))["psi"] > 0.25
    relu = P.build(np.maximum(rng.standard_normal((4000, 1)), 0))
    moved = np.maximum(rng.standard_normal((4000, 1)), 0)
    moved[moved == 0] = 1e-3                                         # zeros became tiny positives
    assert P.tensor_psi(relu, P.bin_counts(moved, relu))["psi"] > 0.25
    # NaN and inf are errors, not a bin
    assert sum(P.bin_counts(np.array([[np.nan], [np.inf], [0.5]]), relu)[0]) == 1


def test_infer_records_counts_latency_and_drift(world, tmp_path):
    root = _device(tmp_path, world)
    assert _agent(root, "install", world["bundles"]["1.0.0"], "--runs", "3", code=0)["ok"]
    r = _agent(root, "infer", "clf", "--random", "4000", "--flush", "0.2", code=0)
    assert r["requests"] == 4000 and r["errors"] == 0 and r["versions"] == {"1.0.0": 4000}
    store = _store(tmp_path)
    got = pull(LocalLink(root), store, "d1")
    assert got.inserted >= 3 and got.pending == 0            # acknowledged: the device spool is empty
    kinds = {x["kind"] for x in store.records()}
    assert {"window", "profile", "health", "event"} <= kinds
    ev = [x["body"] for x in store.records("event")]
    assert {"event": "installed", "slot": "a", "version": "1.0.0"} in ev
    h = store.records("health")[-1]["body"]
    assert h["mem_available"] > 0 and h["disk_free"] > 0 and h["agent"]["models"] == {"clf": "1.0.0"}
    assert "temperature_c" in h                                # {} where the machine has no thermal zone
    row, = A.summarize(store)
    assert row["count"] == 4000 and row["error_rate"] == 0 and 0 < row["p50_ms"] <= row["p99_ms"]
    assert row["drift"]["input:x"]["n"] >= 200       # drift is computed on (a sample of) the requests
    assert row["psi_in"] < 0.25 and row["psi_out"] < 0.25 and not row["alerts"]
    # the same device fed shifted inputs: an input drift alert, from its own windows
    since = time.time()
    _agent(root, "infer", "clf", "--random", "4000", "--shift", "1.5", "--flush", "0.2", code=0)
    pull(LocalLink(root), store, "d1")
    row, = A.summarize(store, since=since)
    assert row["count"] == 4000 and row["psi_in"] > 0.25
    assert any(a.startswith("drift: input:x") for a in row["alerts"])


def test_runtime_follows_a_switch_without_a_failed_request(world, tmp_path):
    root = _device(tmp_path, world)
    B = world["bundles"]
    _agent(root, "install", B["1.0.0"], "--runs", "3", code=0)
    app = _popen(root, "infer", "clf", "--random", "10000000", "--for", "25", "--interval-ms", "1",
                 "--concurrency", "2", "--flush", "0.3")
    try:
        time.sleep(2)
        for ver in ("1.1.0", "1.2.0"):
            _agent(root, "install", B[ver], "--runs", "3", code=0)
            time.sleep(1.5)
        assert _agent(root, "rollback", "clf", code=0)["ok"]
        time.sleep(1.5)
        app.send_signal(signal.SIGTERM)
        out, err = app.communicate(timeout=60)
    finally:
        app.kill()
    assert "Traceback" not in err, err
    r = json.loads(out.strip().splitlines()[-1])
    assert r["errors"] == 0 and r["requests"] > 500
    assert set(r["versions"]) == {"1.0.0", "1.1.0", "1.2.0"} and r["reloads"] == 3
    store = _store(tmp_path)
    pull(LocalLink(root), store, "d1")
    per_version = {}
    for x in store.records("window"):
        per_version[x["version"]] = per_version.get(x["version"], 0) + x["body"]["count"]
    assert per_version == r["versions"]                           # every request recorded once, under its version
    switched = [x["body"] for x in store.records("event") if x["body"].get("event") == "runtime switched"]
    assert [(e["from"], e["to"]) for e in switched] == [("1.0.0", "1.1.0"), ("1.1.0", "1.2.0"), ("1.2.0", "1.1.0")]


def _log_model(path: Path) -> Path:
    g = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "log",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    import onnx

    onnx.save(m, str(path))
    return path


def test_errors_are_recorded_and_the_kserve_server_answers(world, tmp_path):
    from edgeops.registry import open_registry

    open_registry().add(_log_model(tmp_path / "log.onnx"), "logm", version="1.0.0")
    bundle = b.build("logm:1.0.0", "host", [world["signer"]], tmp_path / "logm.bundle",
                     inputs=_npz(tmp_path / "ok.npz", x=np.full((1, 4), 2.0, np.float32))).path
    root = _device(tmp_path, world)
    _agent(root, "install", bundle, "--runs", "3", code=0)
    _agent(root, "install", world["bundles"]["1.0.0"], "--runs", "3", code=0)
    # the profile came from one sample (x = 2, std 0): random inputs are N(2, 1), and log() of a
    # negative value is NaN: 1 - (1 - 0.0228)^4 = 8.8 % of the requests
    r = _agent(root, "infer", "logm", "--random", "400", "--flush", "0.2", code=0)
    assert r["errors"] == 0        # a NaN output is returned to the app; the runtime records it
    port = free_port()
    srv = _popen(root, "serve", "clf", "--port", port, "--flush", "0.2")
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                ready = json.loads(urllib.request.urlopen(base + "/v2/health/ready", timeout=2).read())
                break
            except OSError:
                assert time.time() < deadline and srv.poll() is None, srv.stderr.read() if srv.poll() is not None else "timeout"
                time.sleep(0.1)
        assert ready == {"ready": True, "name": "clf", "version": "1.0.0"}
        meta = json.loads(urllib.request.urlopen(base + "/v2/models/clf").read())
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
        x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
        code, doc = _post(base + "/v2/models/clf/infer", {"id": "r1", "inputs": [
            {"name": "x", "shape": [2, 16], "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert code == 200 and doc["model_version"] == "1.0.0" and doc["id"] == "r1"
        sess = ort.InferenceSession(str(root / "models/clf/current/model.onnx"), providers=["CPUExecutionProvider"])
        want = sess.run(None, {"x": x})[0]
        out, = doc["outputs"]
        assert out["name"] == "y" and out["shape"] == [2, 8] and out["datatype"] == "FP32"
        np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(2, 8), want, rtol=1e-6)
        # refusals: a wrong shape (recorded as a shape error), a bad datatype, another model
        code, doc = _post(base + "/v2/models/clf/infer", {"inputs": [
            {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]})
        assert code == 400 and "x" in doc["error"]
        code, doc = _post(base + "/v2/models/clf/infer", {"inputs": [{"name": "x", "shape": [1], "datatype": "STR", "data": [1]}]})
        assert code == 400 and "datatype" in doc["error"]
        code, doc = _post(base + "/v2/models/other/infer", {"inputs": []})
        assert code == 404
        for _ in range(20):
            assert _post(base + "/v2/models/clf/versions/1.0.0/infer", {"inputs": [
                {"name": "x", "shape": [1, 16], "datatype": "FP32", "data": x[0].tolist()}]})[0] == 200
    finally:
        srv.send_signal(signal.SIGTERM)
        out, err = srv.communicate(timeout=30)
    assert srv.returncode == 0 and json.loads(out.strip().splitlines()[-1])["ok"], err
    store = _store(tmp_path)
    pull(LocalLink(root), store, "d1")
    rows = {(r["model"], r["version"]): r for r in A.summarize(store)}
    clf = rows[("clf", "1.0.0")]
    assert clf["count"] == 22 and clf["errors"] == {"shape": 1}
    logm = rows[("logm", "1.0.0")]
    assert logm["count"] == 400 and 0.03 < logm["errors"]["nonfinite"] / 400 < 0.2
    assert any(a.startswith("errors:") for a in logm["alerts"])
    # the server is bound to localhost only
    assert srv.args and "--host" not in srv.args[-1]


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _post(url: str, doc: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


WRITER = """
import sys, time
sys.path.insert(0, {pkg_parent!r})
from devagent.spool import Spool
sp = Spool({path!r})
i = 0
while True:
    seqs = sp.append([("window", "m", "1", time.time(), {{"i": i + k, "pad": "x" * 200}}) for k in range(5)])
    i += 5
    sys.stdout.write(f"{{seqs[-1]}}\\n")
    sys.stdout.flush()
"""


def test_spool_survives_sigkill_in_a_write_loop(world, tmp_path):
    root = _device(tmp_path, world)
    path = root / "telemetry" / "spool.db"
    pkg_parent = root / "agent" / "versions" / I.AGENT_VERSION
    acked_before = 0
    for round_ in range(3):
        p = subprocess.Popen([sys.executable, "-I", "-c", WRITER.format(pkg_parent=str(pkg_parent), path=str(path))],
                             stdout=subprocess.PIPE, text=True)
        time.sleep(1.0 + 0.37 * round_)
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate(timeout=30)
        committed = [int(x) for x in out.split()]
        assert committed, "the writer committed nothing"
        db = sqlite3.connect(str(path))
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        seqs = [r[0] for r in db.execute("SELECT seq FROM records ORDER BY seq")]
        db.close()
        # every committed record is there; the sequence has no gap (the killed transaction left nothing)
        assert seqs == list(range(acked_before + 1, seqs[-1] + 1))
        assert seqs[-1] >= committed[-1] and seqs[-1] - committed[-1] <= 5
        # acknowledge part of it, as a collector would: later seqs continue, never reused
        sp = SP.Spool(path)
        acked_before = seqs[len(seqs) // 2]
        sp.ack(acked_before, sp.id)
        assert sp.stats()["produced"] == seqs[-1]
        sp.close()


def test_spool_cap_drops_raw_samples_first_and_aggregates_last(tmp_path):
    sp = SP.Spool(tmp_path / "s.db", cap_bytes=20_000)
    big = "s" * 1000
    sp.append([("sample", "m", "1", time.time(), {"raw": big}) for _ in range(8)])
    sp.append([("health", None, None, time.time(), {"h": "h" * 500}) for _ in range(4)])
    sp.append([("window", "m", "1", time.time(), {"w": "w" * 1000}) for _ in range(6)])
    assert sp.stats()["dropped"] == {}
    sp.append([("window", "m", "1", time.time(), {"w": "w" * 1000}) for _ in range(6)])   # over the cap
    st = sp.stats()
    assert st["bytes"] <= 20_000
    assert st["dropped"].get("sample", 0) >= 1 and "window" not in st["dropped"] and "health" not in st["dropped"]
    sp.append([("window", "m", "1", time.time(), {"w": "w" * 1000}) for _ in range(14)])
    st = sp.stats()
    assert st["dropped"]["sample"] == 8 and st["dropped"]["health"] == 4 and st["dropped"]["window"] >= 1
    kinds = [r["kind"] for r in sp.read(0, 1000)["records"]]
    assert set(kinds) == {"window"} and st["bytes"] <= 20_000
    # the oldest windows went first: what is left is the newest
    seqs = [r["seq"] for r in sp.read(0, 1000)["records"]]
    assert seqs == list(range(seqs[0], st["produced"] + 1))
    # an ack for another spool (re-created since) is refused
    with pytest.raises(SP.SpoolError):
        sp.ack(10, "not-this-spool")
    sp.close()
    # the cap belongs to the spool: another writer (the agent's install events) keeps it
    again = SP.Spool(tmp_path / "s.db")
    assert again.cap == 20_000
    again.append([("event", "m", "1", time.time(), {"e": "e" * 5000}) for _ in range(3)])
    assert again.stats()["bytes"] <= 20_000
    again.close()


def test_bake_gate_judges_each_device_against_its_own_previous_version(world, tmp_path):
    """The gate's drift criterion, paired: a retrained model (other weights) moves the output
    distribution on the device; the same weights re-released do not; a device without requests of
    the new version is NO_TELEMETRY at the end of the bake (never passed on no data)."""
    from edgeops.registry import open_registry
    from test_bundle import _model

    import onnx

    m = onnx.load(str(_model(tmp_path / "same.onnx", seed=0)))
    m.doc_string = "re-released"            # 1.0.0's weights, another file (the registry dedups by content)
    onnx.save(m, str(tmp_path / "same.onnx"))
    open_registry().add(tmp_path / "same.onnx", "clf", version="1.0.1")
    same = b.build("clf:1.0.1", "host", [world["signer"]], tmp_path / "same.bundle").path
    store = _store(tmp_path)
    installed = {}
    for dev, new in (("d1", world["bundles"]["1.1.0"]), ("d2", same)):
        root = _device(tmp_path / dev, world)
        _agent(root, "install", world["bundles"]["1.0.0"], "--runs", "3", code=0)
        _agent(root, "infer", "clf", "--random", "6000", "--flush", "0.3", code=0)
        installed[dev] = time.time()
        _agent(root, "install", new, "--runs", "3", code=0)
        _agent(root, "infer", "clf", "--random", "6000", "--seed", "7", "--flush", "0.3", code=0)
        pull(LocalLink(root), store, dev)
    gate = A.Gate(max_drift=0.25, min_requests=100)
    r1 = A.judge(store, gate, "clf", "1.1.0", {"d1": {"since": installed["d1"], "previous": "1.0.0"}}, final=True)
    r2 = A.judge(store, gate, "clf", "1.0.1", {"d2": {"since": installed["d2"], "previous": "1.0.0"}}, final=True)
    assert r1["checked"]["d1"]["drift_basis"] == "1.0.0 on this device"      # paired, bin for bin
    assert [(d, why) for d, why, _ in r1["breach"]] == [("d1", "DRIFT")], r1
    assert r2["breach"] == [] and r2["checked"]["d2"]["psi_out"] < 0.1, r2
    # no requests of the new version on a device: pending during the bake, a breach at its end
    ghost = {"d1": {"since": time.time() + 3600, "previous": "1.0.0"}}
    assert A.judge(store, gate, "clf", "1.1.0", ghost, final=False)["pending"] == ["d1"]
    assert A.judge(store, gate, "clf", "1.1.0", ghost, final=True)["breach"][0][1] == "NO_TELEMETRY"


def test_runtime_killed_mid_traffic_leaves_a_consistent_spool(world, tmp_path):
    """SIGKILL the runtime while it serves and flushes every 20 ms: the spool passes SQLite's
    integrity check, its sequence has no gap, and what it holds never exceeds what was served
    (only the unflushed tail of the last 20 ms is lost)."""
    root = _device(tmp_path, world)
    _agent(root, "install", world["bundles"]["1.0.0"], "--runs", "3", code=0)
    for round_ in range(3):
        app = _popen(root, "infer", "clf", "--random", "100000000", "--flush", "0.02", "--concurrency", "2")
        time.sleep(1.5 + 0.3 * round_)
        app.send_signal(signal.SIGKILL)
        app.communicate(timeout=30)
        db = sqlite3.connect(str(root / "telemetry" / "spool.db"))
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        seqs = [r[0] for r in db.execute("SELECT seq FROM records ORDER BY seq")]
        db.close()
        assert seqs and seqs == list(range(seqs[0], seqs[-1] + 1))
    doc = _agent(root, "telemetry", "read", "--limit", "100000", code=0)
    windows = [json.loads(r["body"]) for r in doc["records"] if r["kind"] == "window"]
    assert len(windows) >= 30 and all(w["count"] > 0 for w in windows)


def test_raw_inputs_are_kept_only_when_asked_and_within_their_cap(world, tmp_path):
    root = _device(tmp_path, world)
    _agent(root, "install", world["bundles"]["1.0.0"], "--runs", "3", code=0)
    _agent(root, "infer", "clf", "--random", "300", "--flush", "0.1", code=0)
    doc = _agent(root, "telemetry", "read", "--limit", "10000", code=0)
    assert not [r for r in doc["records"] if r["kind"] == "sample"]          # privacy: nothing by default
    _agent(root, "infer", "clf", "--random", "300", "--capture", "1", "--capture-bytes", "3000", "--flush", "60", code=0)
    doc = _agent(root, "telemetry", "read", "--limit", "10000", code=0)
    samples = [json.loads(r["body"]) for r in doc["records"] if r["kind"] == "sample"]
    assert samples and sum(s["bytes"] for s in samples) <= 3000              # one flush: within the cap
    import base64
    import io

    got = np.load(io.BytesIO(base64.b64decode(samples[0]["npz_b64"])))
    assert got["x"].shape == (1, 16) and got["x"].dtype == np.float32       # the request's own input
