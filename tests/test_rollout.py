"""Fleet rollouts on real sshd devices (tests/testbed.py): 12 devices plus 2 held to 25 % of a
core. Faults: a link cut mid-transfer (retried), devices that cannot meet the SLO (the rollout
halts; no device starts after the breach; --on-halt rollback), the controller SIGKILLed
mid-wave (resume finishes, nobody installed twice), an unreachable device. After each test
every device has a working current model and `rollout status` equals what the devices say."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgeops.fleet import deploy as D
from edgeops.fleet import rollout as R
from edgeops.fleet.inventory import Inventory
from edgeops.fleet.journal import Journal

sys.path.insert(0, str(Path(__file__).parent))
from test_agent import world  # noqa: E402,F401
from test_deploy import CHECK, _big_model, _build, _cli  # noqa: E402

FAST = [f"f{i:02d}" for i in range(12)]
SLOW = ["s00", "s01"]


@pytest.fixture(scope="module")
def fleet(testbed, world):
    devs = {}
    try:
        for n in FAST:
            devs[n] = testbed.add_device(n)
            D.enrol(n, devs[n].spec, testbed.key_path, target="host", host_key=devs[n].host_key,
                    python=devs[n].python, labels={"site": "lab", "hw": "fast"})
        for n in SLOW:
            devs[n] = testbed.add_device(n, cpu_quota=0.25)
            D.enrol(n, devs[n].spec, testbed.key_path, target="host", host_key=devs[n].host_key,
                    python=devs[n].python, labels={"site": "lab", "hw": "slow"})
        # everyone starts on clf 1.0.0
        base = world["bundles"]["1.0.0"]
        for n in devs:
            assert D.deploy(Inventory().get(n), base, health_runs=3).ok
        yield devs
    finally:
        for d in devs.values():
            testbed.stop_device(d)


def _check_fleet(rid: str | None, names, model: str = "clf") -> dict:
    """Every device runs a working current model (checked by its own python), and the
    journal's view equals the devices' own."""
    seen = {}
    for n in names:
        dev = Inventory().get(n)
        st = D.status(dev)
        assert st["transaction"] is None
        m = st["models"][model]
        assert m["consistent"] and m["exists"], (n, m)
        from edgeops.fleet.ssh import connect

        with connect(dev.ssh_target()) as conn:
            r = conn.run([dev.python, "-c", CHECK, f"{dev.agent_root}/models/{model}/current"], timeout=120)
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert got["ok"], (n, got)
        seen[n] = m["version"]
    if rid:
        r = Journal().get(rid)
        want = r["bundles"]["host"]["version"]
        for d in r["devices"]:
            if d["device"] in seen:
                if d["state"] == "succeeded":
                    assert seen[d["device"]] == want, (d, seen[d["device"]])
                elif d["state"] in ("failed", "skipped", "rolled-back", "pending"):
                    assert seen[d["device"]] != want, (d, seen[d["device"]])
    return seen


def test_dry_run_touches_nothing(fleet, world):
    r = _cli("rollout", "start", "--bundle", world["bundles"]["1.1.0"], "--all", "--waves", "50%,100%", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "canary" in r.stdout and "Nothing was touched" in r.stdout
    r = _cli("rollout", "start", "--bundle", world["bundles"]["1.1.0"], "--all", "--waves", "1%,100%", "--dry-run")
    assert r.returncode == 2 and "has no devices" in r.stderr
    assert _check_fleet(None, fleet)["f00"] == "1.0.0"


def test_cut_link_is_retried_and_an_unreachable_device_is_reported(testbed, fleet, world):
    bundle = _build(world, _big_model(world["base"] / "r2.onnx", 1800, seed=31), "clf", "2.0.0")
    victim = fleet["f03"]
    part = victim.home / ".edgeops" / "agent-root" / "incoming"
    cut = threading.Event()

    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not cut.is_set():
            for p in part.glob("*.part") if part.is_dir() else []:
                try:
                    if p.stat().st_size > 2 << 20:
                        cut.set()
                        testbed.cut_sessions(victim)
                        return
                except OSError:
                    pass
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    gone = fleet["f11"]
    testbed.stop_device(gone)              # unreachable for the whole rollout
    try:
        j = Journal()
        devs = [Inventory().get(n) for n in FAST]
        opts = R.Options(waves="50%,100%", canary=False, parallel=4, max_failures="50%", retries=2,
                         timeout=120, health_runs=3)
        rid = R.start(devs, {"host": bundle}, opts, j)
        res = R.run(rid, j)
        assert cut.is_set()
        by = {d["device"]: d for d in res["devices"]}
        assert by["f03"]["state"] == "succeeded" and by["f03"]["attempts"] >= 2, by["f03"]
        assert by["f11"]["state"] == "failed" and by["f11"]["reason"] == "UNREACHABLE" and by["f11"]["attempts"] == 3
        assert res["state"] == "failed" and res["failures"] == {"UNREACHABLE": 1}
        assert all(by[n]["state"] == "succeeded" for n in FAST if n != "f11")
        # the retry resumed the cut upload: f03 was sent less than twice the bundle
        assert by["f03"]["bytes_sent"] < bundle.stat().st_size
        _check_fleet(rid, [n for n in FAST if n != "f11"])
        r = _cli("rollout", "status", rid, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["failures"] == {"UNREACHABLE": 1}
    finally:
        fleet["f11"] = testbed.add_device("f11")
        d = fleet["f11"]
        D.enrol("f11", d.spec, testbed.key_path, target="host", host_key=d.host_key, python=d.python,
                labels={"site": "lab", "hw": "fast"}, replace=True)
        assert D.deploy(Inventory().get("f11"), bundle, health_runs=3).ok


def test_slo_breach_halts_and_rolls_back(fleet, world):
    """Slow devices come first in the order; the SLO is 3x this machine's p50: the two 25 %
    devices fail SLO, the second failure breaches --max-failures 1, the rollout halts: nobody
    starts after the breach is known, and --on-halt rollback returns the changed devices."""
    import numpy as np
    import onnxruntime as ort

    path = _big_model(world["base"] / "slo.onnx", 1024, seed=41, depth=6)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = np.zeros((4, 1024), np.float32)
    t = []
    for _ in range(20):
        t0 = time.perf_counter()
        s.run(None, {"x": x})
        t.append((time.perf_counter() - t0) * 1e3)
    # a 25 % quota makes every run at least 4x longer: 3.5x this machine's median separates them
    bundle = _build(world, path, "clf", "3.0.0", slo_ms=3.5 * float(np.median(t)))
    j = Journal()
    before = _check_fleet(None, FAST + SLOW)
    # the slow devices start first; fast ones keep starting while the slow health checks run
    devs = [Inventory().get(n) for n in SLOW + FAST]
    opts = R.Options(waves=None, canary=False, parallel=3, max_failures="1", min_devices=1, retries=0,
                     timeout=300, on_halt="rollback", health_runs=10)
    rid = R.start(devs, {"host": bundle}, opts, j)
    res = R.run(rid, j)
    assert res["state"] == "rolled-back", res
    by = {d["device"]: d for d in res["devices"]}
    assert by["s00"]["reason"] == "SLO" and by["s01"]["reason"] == "SLO", by
    assert any(d["state"] == "skipped" for d in res["devices"])
    halt = [e for e in j.events(rid) if e["event"] == "halt"][0]
    starts = [e["at"] for e in j.events(rid) if e["event"].startswith("start")]
    assert starts and all(at < halt["at"] for at in starts)           # nobody started after the breach
    assert any(d["state"] == "rolled-back" for d in res["devices"])   # fast ones had installed meanwhile
    after = _check_fleet(rid, FAST + SLOW)
    assert after == before                   # every device on its previous version


def test_controller_sigkill_mid_wave_then_resume(fleet, world):
    bundle = _build(world, _big_model(world["base"] / "r4.onnx", 600, seed=51), "clf", "4.0.0")
    env = {**os.environ}
    p = subprocess.Popen([sys.executable, "-m", "edgeops", "rollout", "start", "--bundle", str(bundle),
                          "--devices", ",".join(FAST), "--no-canary", "--waves", "4,100%", "--parallel", "2",
                          "--runs", "3", "--max-failures", "50%"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    j = Journal()
    deadline = time.monotonic() + 120
    rid = None
    while time.monotonic() < deadline:
        rid = j.latest()
        if rid and j.get(rid)["bundles"]["host"]["version"] == "4.0.0":
            done = [d for d in j.get(rid)["devices"] if d["state"] == "succeeded"]
            running = [d for d in j.get(rid)["devices"] if d["state"] == "running"]
            if len(done) >= 3 and running:
                break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    r = j.get(rid)
    assert r["state"] == "running"            # the journal was left mid-rollout
    r = _cli("rollout", "resume", rid, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["state"] == "completed" and all(d["state"] == "succeeded" for d in res["devices"])
    _check_fleet(rid, FAST)
    # nobody installed twice: each device's agent committed 4.0.0 exactly once
    for n in FAST:
        st = D.status(Inventory().get(n))
        installs = [e for e in st["events"] if e.get("event") == "installed" and e.get("version") == "4.0.0"]
        assert len(installs) == 1, (n, installs)


def test_pause_then_resume(fleet, world):
    """`rollout pause` stops new starts (in-flight devices finish), `resume` finishes the rest,
    and a finished rollout cannot be resumed again."""
    bundle = _build(world, _big_model(world["base"] / "r5.onnx", 600, seed=61), "clf", "5.0.0")
    p = subprocess.Popen([sys.executable, "-m", "edgeops", "rollout", "start", "--bundle", str(bundle),
                          "--devices", ",".join(FAST), "--no-canary", "--parallel", "1", "--runs", "3"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    j = Journal()
    rid = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rid = j.latest()
        if rid and j.get(rid)["bundles"]["host"]["version"] == "5.0.0" and \
                any(d["state"] == "succeeded" for d in j.get(rid)["devices"]):
            break
        time.sleep(0.02)
    r = _cli("rollout", "pause", rid)
    assert r.returncode == 0, r.stderr
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1, err
    st = j.get(rid)
    assert st["state"] == "paused"
    done = [d["device"] for d in st["devices"] if d["state"] == "succeeded"]
    assert 0 < len(done) < len(FAST) and all(d["state"] in ("succeeded", "pending") for d in st["devices"])
    _check_fleet(rid, FAST)
    r = _cli("rollout", "resume", rid, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "completed"
    _check_fleet(rid, FAST)
    r = _cli("rollout", "resume", rid)
    assert r.returncode == 2 and "nothing to resume" in r.stderr
    r = _cli("rollout", "list", "--json")
    assert rid in [x["id"] for x in json.loads(r.stdout)]
