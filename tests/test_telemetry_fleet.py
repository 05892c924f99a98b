"""Telemetry across the fleet, for real: collection over SSH from real sshd devices with the
collector SIGKILLed at every point of its read/store/commit/ack cycle; push mode through a real
mosquitto with the ingest killed between its commit and its PUBACK; the Prometheus export scraped
by a real Prometheus and read back through its query API; and a rollout halted during its bake by
a latency regression that only shows under real load on CPU-quota'd devices."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from edgeops.fleet import deploy as D
from edgeops.fleet.inventory import Inventory
from edgeops.samples import load_model
from edgeops.telemetry import analysis as A
from edgeops.telemetry.collect import KILL_POINTS
from edgeops.telemetry.store import Store

sys.path.insert(0, str(Path(__file__).parent))
from test_agent import _agent, _device, world  # noqa: E402,F401
from testbed import free_port  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "edgeops", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _remote_agent(name: str, *args, timeout: float = 300) -> dict:
    link = D.link_for(Inventory().get(name))
    try:
        code, doc = link.agent(*args, timeout=timeout)
        return {**doc, "_exit": code}
    finally:
        link.close()


@pytest.fixture(scope="module")
def pair(testbed, world):
    devs = {}
    try:
        for n in ("t0", "t1"):
            devs[n] = testbed.add_device(n)
            D.enrol(n, devs[n].spec, testbed.key_path, target="host", host_key=devs[n].host_key,
                    python=devs[n].python, labels={"site": "lab"})
            assert D.deploy(Inventory().get(n), world["bundles"]["1.0.0"], health_runs=3).ok
        yield devs
    finally:
        for d in devs.values():
            testbed.stop_device(d)


@pytest.mark.ssh
@pytest.mark.parametrize("point", KILL_POINTS)
def test_collect_is_exactly_once_when_the_collector_is_killed(pair, tmp_path, point):
    # real traffic on the device: ~15 flushed windows + profile + health + install events
    r = _remote_agent("t0", "infer", "clf", "--random", "400", "--interval-ms", "2", "--flush", "0.05")
    assert r["ok"] and r["requests"] == 400
    before = _remote_agent("t0", "telemetry", "stats")
    want = set(range(before["acked"] + 1, before["produced"] + 1))
    assert len(want) >= 10, before
    env = {"EDGEOPS_TELEMETRY_URL": "sqlite://" + str(tmp_path / "t.db")}
    killed = _cli("telemetry", "collect", "--devices", "t0", "--batch", "4", "--json",
                  env={**env, "EDGEOPS_COLLECT_KILL_AT": f"{point}:2"})
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    again = _cli("telemetry", "collect", "--devices", "t0", "--batch", "4", "--json", env=env)
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)["devices"][0]
    store = Store(env["EDGEOPS_TELEMETRY_URL"])
    rows = store.records(devices=["t0"])
    seqs = [x["seq"] for x in rows]
    assert len(seqs) == len(set(seqs))                      # no duplicate
    assert set(seqs) == want, (sorted(want - set(seqs)), sorted(set(seqs) - want))    # no loss
    assert _remote_agent("t0", "telemetry", "stats")["pending"] == 0    # the device freed what was stored
    # killed after its commit, before the ack: the rerun starts after the stored cursor (the batch is
    # not sent again) and its ack frees it on the device; were it sent again, the key ignores it
    assert doc["duplicates"] == 0
    again = Store(env["EDGEOPS_TELEMETRY_URL"]).insert("t0", rows[0]["spool"], rows[:5], via="test")
    assert again == {"inserted": 0, "duplicates": 5}
    counted = sum(x["body"]["count"] for x in rows if x["kind"] == "window")
    assert counted == 400


@pytest.mark.ssh
def test_collect_cli_over_the_fleet_and_show(pair, tmp_path):
    env = {"EDGEOPS_TELEMETRY_URL": "sqlite://" + str(tmp_path / "t.db")}
    for n, shift in (("t0", "0"), ("t1", "2")):           # t1 is fed shifted inputs
        assert _remote_agent(n, "infer", "clf", "--random", "4000", "--shift", shift, "--flush", "0.5")["ok"]
    r = _cli("telemetry", "collect", "--all", env=env)
    assert r.returncode == 0, r.stderr
    assert "record(s) from 2/2 device(s)" in r.stdout
    r = _cli("telemetry", "show", "--model", "clf", "--since", "1h", "--json", env=env)
    rows = {x["device"]: x for x in json.loads(r.stdout)["rows"]}
    assert rows["t1"]["psi_in"] > 0.25 and any("drift: input:x" in a for a in rows["t1"]["alerts"])
    assert rows["t0"]["psi_in"] < 0.25 and not any("drift" in a for a in rows["t0"]["alerts"])
    assert rows["t0"]["count"] >= 4000 and rows["t0"]["p99_ms"] > 0
    r = _cli("telemetry", "show", "--since", "1h", env=env)
    assert r.returncode == 0 and "t1" in r.stdout and "drift" in r.stdout
    # bad input: one line, exit 2
    r = _cli("telemetry", "show", "--since", "yesterday", env=env)
    assert r.returncode == 2 and r.stderr.count("\n") <= 2 and "--since" in r.stderr
    # an unreachable device (a copy of t1's record on a closed port): the others are collected, exit 3
    import dataclasses

    inv = Inventory()
    gone = dataclasses.replace(inv.get("t1"), name="gone", port=free_port())
    inv.add(gone)
    try:
        r = _cli("telemetry", "collect", "--devices", "t0,gone", "--json", env=env)
        assert r.returncode == 3, r.stderr
        res = {d["device"]: d for d in json.loads(r.stdout)["devices"]}
        assert res["t0"]["ok"] and not res["gone"]["ok"] and res["gone"]["error"].startswith("UNREACHABLE")
    finally:
        inv.remove("gone")


# ------------------------------------------------------------------------------ MQTT
@pytest.fixture()
def mosquitto(tmp_path):
    if not os.path.exists(MOSQUITTO):
        if os.environ.get("CI"):
            pytest.fail("mosquitto is not installed (./dev installs it as root)")
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    data = tmp_path / "mq"
    data.mkdir()
    os.chmod(data, 0o777)
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {data}/\nmax_queued_messages 100000\nmax_inflight_messages 0\n"
                    "max_connections -1\n")
    p = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    import socket

    deadline = time.time() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert p.poll() is None and time.time() < deadline, p.stdout.read()
            time.sleep(0.05)
    try:
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def test_mqtt_push_is_stored_exactly_once_across_an_ingest_crash(world, tmp_path, mosquitto):
    """The device publishes while the ingest is down (the broker keeps it for the ingest's
    persistent session); the ingest is SIGKILLed after a commit and before its PUBACKs; the
    broker redelivers; the store holds every record once."""
    env = {"EDGEOPS_TELEMETRY_URL": "sqlite://" + str(tmp_path / "t.db")}
    # the ingest's session exists before the device publishes (as in production: it runs first)
    r = _cli("telemetry", "ingest", "--mqtt", mosquitto, "--for", "1", "--json", env=env)
    assert r.returncode == 0, r.stderr
    root = _device(tmp_path, world)
    _agent(root, "install", world["bundles"]["1.0.0"], "--runs", "3", code=0)
    _agent(root, "infer", "clf", "--random", "1500", "--interval-ms", "1", "--flush", "0.05", code=0)
    produced = _agent(root, "telemetry", "stats")["produced"]
    # the ingest is down: the broker takes every batch, but nothing is acknowledged by the controller,
    # so the device keeps everything (exit 1 says so)
    pushed = _agent(root, "telemetry", "push", "--mqtt", mosquitto)
    assert pushed["_exit"] == 1 and pushed["records"] == produced and pushed["pending"] == produced, pushed
    killed = _cli("telemetry", "ingest", "--mqtt", mosquitto, "--idle", "5", env={**env, "EDGEOPS_COLLECT_KILL_AT": "commit"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    got = _cli("telemetry", "ingest", "--mqtt", mosquitto, "--idle", "3", "--json", env=env)
    assert got.returncode == 0, got.stderr
    doc = json.loads(got.stdout)
    assert doc["duplicates"] >= 1                 # the unacknowledged message came again, and was ignored
    # the device comes back: the acknowledgements the broker kept for it delete what was stored
    again = _agent(root, "telemetry", "push", "--mqtt", mosquitto, code=0)
    assert again["acknowledged"] == produced and again["pending"] == 0 and again["records"] == 0, again
    store = Store(env["EDGEOPS_TELEMETRY_URL"])
    seqs = sorted(x["seq"] for x in store.records(devices=["d1"]))
    assert seqs == list(range(1, produced + 1))
    assert sum(x["body"]["count"] for x in store.records("window")) == 1500
    # a broker that is not there: one line, exit 3 (device and controller side)
    dead = f"mqtt://127.0.0.1:{free_port()}"
    r = _agent(root, "telemetry", "push", "--mqtt", dead)
    assert r["_exit"] == 3 and "cannot reach the MQTT broker" in r["error"]
    r = _cli("telemetry", "ingest", "--mqtt", dead, "--for", "1", env=env)
    assert r.returncode == 3 and "cannot reach the MQTT broker" in r.stderr


# ------------------------------------------------------------------------------ Prometheus
def test_prometheus_scrapes_the_export_and_answers_queries(world, tmp_path):
    if not os.path.exists(PROMETHEUS):
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed (./dev installs it as root)")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    from prometheus_client.parser import text_string_to_metric_families

    from edgeops.telemetry.collect import pull
    from test_telemetry import LocalLink

    env = {"EDGEOPS_TELEMETRY_URL": "sqlite://" + str(tmp_path / "t.db")}
    root = _device(tmp_path, world)
    _agent(root, "install", world["bundles"]["1.0.0"], "--runs", "3", code=0)
    _agent(root, "infer", "clf", "--random", "700", "--flush", "0.2", code=0)
    pull(LocalLink(root), Store(env["EDGEOPS_TELEMETRY_URL"]), "d1")
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "edgeops", "telemetry", "serve", "--port", str(port)],
                           env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    prom = None
    try:
        text = _get_retry(f"http://127.0.0.1:{port}/metrics", srv)
        fams = {f.name: f for f in text_string_to_metric_families(text)}    # prometheus' own parser
        req = {tuple(sorted(s.labels.items())): s.value for s in fams["edgeops_requests"].samples
               if s.name == "edgeops_requests_total"}
        assert req == {(("device", "d1"), ("model", "clf"), ("version", "1.0.0")): 700.0}
        inf = [s for s in fams["edgeops_latency_seconds"].samples if s.labels.get("le") == "+Inf"]
        assert inf[0].value == 700.0
        assert any(s.labels["tensor"] == "input:x" for s in fams["edgeops_drift_psi"].samples)
        assert fams["edgeops_device_memory_available_bytes"].samples[0].value > 0
        # a real Prometheus scrapes it and answers through its query API
        pport = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: edgeops\n"
                       f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
        prom = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'pdata'}",
                                 f"--web.listen-address=127.0.0.1:{pport}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        q = 'edgeops_requests_total{model="clf",version="1.0.0",device="d1"}'
        while True:
            try:
                res = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{pport}/api/v1/query?"
                                                        + urllib.parse.urlencode({"query": q}), timeout=3).read())
                if res["data"]["result"]:
                    break
            except OSError:
                pass
            assert time.time() < deadline and prom.poll() is None, "Prometheus never scraped the export"
            time.sleep(0.5)
        assert float(res["data"]["result"][0]["value"][1]) == 700.0
        p99 = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{pport}/api/v1/query?" + urllib.parse.urlencode(
            {"query": "histogram_quantile(0.99, sum by (le) (edgeops_latency_seconds_bucket))"}), timeout=3).read())
        val = float(p99["data"]["result"][0]["value"][1])
        assert 0 < val < 1.0
    finally:
        for p in (prom, srv):
            if p is not None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()


def _get_retry(url: str, proc, timeout: float = 30) -> str:
    deadline = time.time() + timeout
    while True:
        try:
            return urllib.request.urlopen(url, timeout=3).read().decode()
        except OSError:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else url
            time.sleep(0.1)


# ------------------------------------------------------------------------------ the bake gate
SLO_MS = 45.0


@pytest.fixture(scope="module")
def gated(testbed, world):
    """g0, g1: 25 % of a core; h0: unrestricted. All run load 1.0.0 (light) under app traffic."""
    from edgeops.bundle import build as b
    from edgeops.registry import open_registry

    base = world["base"]
    reg = open_registry()
    reg.add(load_model(base / "light.onnx", 16, 0), "load", version="1.0.0")
    reg.add(load_model(base / "heavy.onnx", 1024, 1), "load", version="2.0.0")
    v1 = b.build("load:1.0.0", "host", [world["signer"]], base / "load-1.bundle").path
    v2 = b.build("load:2.0.0", "host", [world["signer"]], base / "load-2.bundle", slo_ms=SLO_MS).path
    devs = {}
    try:
        for n, quota in (("g0", 0.25), ("g1", 0.25), ("h0", None)):
            devs[n] = testbed.add_device(n, cpu_quota=quota)
            D.enrol(n, devs[n].spec, testbed.key_path, target="host", host_key=devs[n].host_key,
                    python=devs[n].python)
            assert D.deploy(Inventory().get(n), v1, health_runs=3).ok
        yield {"devices": devs, "v1": v1, "v2": v2}
    finally:
        for d in devs.values():
            testbed.stop_device(d)


class _Traffic:
    """The app on each device: 8 request streams, one request per 40 ms each, through the runtime
    (light for 1.0.0, 2.4 ms of CPU per request for 2.0.0), until stopped."""

    def __init__(self, names, seconds: float):
        self.results, self.threads = {}, []
        for n in names:
            t = threading.Thread(target=self._run, args=(n, seconds), daemon=True)
            t.start()
            self.threads.append(t)

    def _run(self, name, seconds):
        dev = Inventory().get(name)
        link = D.link_for(dev)
        try:
            self.results[name] = link.agent("infer", "load", "--random", "100000000", "--for", str(seconds),
                                            "--concurrency", "8", "--interval-ms", "40", "--pool", "8",
                                            "--flush", "1", timeout=seconds + 120)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.results[name] = exc
        finally:
            link.close()

    def join(self):
        for t in self.threads:
            t.join(timeout=300)


@pytest.mark.ssh
def test_rollout_halts_in_bake_on_a_latency_regression_under_load(gated, tmp_path, monkeypatch):
    from edgeops.fleet import rollout as R
    from edgeops.fleet.journal import Journal

    monkeypatch.setenv("EDGEOPS_TELEMETRY_URL", "sqlite://" + str(tmp_path / "t.db"))
    inv = Inventory()
    devs = [inv.get(n) for n in ("g0", "g1", "h0")]
    traffic = _Traffic(["g0", "g1", "h0"], 75)
    time.sleep(3)
    j = Journal()
    opts = R.Options(waves="2,100%", canary=False, parallel=2, bake=30, gate_every=4, health_runs=30,
                     max_failures="1", gate_min_requests=40)
    rid = R.start(devs, {"host": gated["v2"]}, opts, j)
    said = []
    t0 = time.time()
    res = R.run(rid, j, progress=said.append)
    took = time.time() - t0
    traffic.join()
    states = {d["device"]: d["state"] for d in res["devices"]}
    print("devices:", [(d["device"], d["state"], d["reason"], (d["message"] or "")[:200]) for d in res["devices"]])
    assert res["state"] == "halted", (res, said)
    assert res["halted_reason"].startswith("bake gate: LATENCY on g"), res["halted_reason"]
    assert states == {"g0": "succeeded", "g1": "succeeded", "h0": "skipped"}      # nobody started after it
    # the install's own health check passed the SLO on the quota'd devices (single requests) ...
    for n in ("g0", "g1"):
        st = D.status(inv.get(n))["models"]["load"]
        assert st["version"] == "2.0.0" and st["health"]["latency_ms"]["p99"] <= SLO_MS, st["health"]
    # ... only the app's real load pushed its p99 over, seen in the telemetry, device by device
    store = Store()
    row = {r["device"]: r for r in A.summarize(store, model="load") if r["version"] == "2.0.0"}
    assert row["g0"]["p99_ms"] > SLO_MS or row["g1"]["p99_ms"] > SLO_MS, row
    print("figures:", {n: (D.status(inv.get(n))["models"]["load"]["health"]["latency_ms"], row[n]["p99_ms"],
                           row[n]["count"]) for n in ("g0", "g1")}, res["halted_reason"], f"{took:.0f}s")
    assert any("bake gate" in m for m in said), said
    assert took < 30 + 120, took          # halted during the bake, by an in-bake check or its final one
    for n, r in traffic.results.items():
        assert not isinstance(r, Exception) and r[1]["errors"] == 0, (n, r)
