"""Telemetry's costs, each next to the plain tool a user would otherwise use, in one run.

    python benchmarks/telemetry.py [--sections overhead,ingest,collect,mqtt] [--devices 50] [--json]

  overhead   a ~1 ms CNN: p50 of a bare onnxruntime `session.run` loop vs the same requests through
             the device runtime with telemetry (histogram, error checks, drift features, flush
             thread) and without; interleaved rounds, same inputs, 1 thread each. Target <= 3 %.
  ingest     aggregated window records (real bodies from the runtime) into the telemetry store
             (INSERT OR IGNORE on the (device, spool, seq) key + cursor, one transaction per 5,000)
             vs a plain sqlite3 `executemany` of the same rows into a keyless table. Target >= 200k/s.
  collect    N real sshd devices (root; tests/testbed.py) each holding the spool of 2,000 requests:
             `telemetry collect` (read, store, ack; 8 at a time) vs SFTP-copying every spool.db (what
             a cron + scp script does: no ack, no dedup). Wall time, bytes per record and per request.
  mqtt       one device's spool pushed through a real mosquitto (QoS 1, persistent sessions) into the
             store by `ingest`, end to end, vs raw paho QoS 1 publish -> subscribe of the same payloads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cnn(path: Path, width: int = 32) -> Path:
    """1x3x64x64 -> conv3x3(3->W) -> relu -> conv3x3(W->W) -> relu -> global pool -> gemm(10): ~1 ms."""
    rng = np.random.default_rng(0)
    t = lambda a, n: numpy_helper.from_array(a.astype(np.float32), n)  # noqa: E731
    inits = [t(rng.standard_normal((width, 3, 3, 3)) * 0.2, "w1"), t(rng.standard_normal((width, width, 3, 3)) * 0.06, "w2"),
             t(rng.standard_normal((width, 10)) * 0.2, "w3")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w3"], ["z"]), helper.make_node("Softmax", ["z"], ["y"], axis=-1)]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def _home_with_key(work: Path):
    from datetime import datetime, timedelta, timezone

    from edgeops.bundle import keys, trust

    os.environ["EDGEOPS_HOME"] = str(work / "home")
    keys.generate("release")
    signer = keys.load_signing("release")
    trust.init(trust.default_dir(), [signer], [signer.public_key], 1, 1, datetime.now(timezone.utc) + timedelta(days=30))
    return signer


def _local_device(work: Path, bundle: Path, name: str = "bench") -> Path:
    """An agent folder on this machine with BUNDLE installed (the agent's own install)."""
    from edgeops.agent import __main__ as agent_cli
    from edgeops.bundle import trust

    root = work / name
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        assert agent_cli.main(["--root", str(root), "init", "--name", name, "--target", "host", "--trust",
                               str(trust.default_dir() / "root.json")]) == 0
        assert agent_cli.main(["--root", str(root), "install", str(bundle), "--runs", "3"]) == 0
    return root


# ------------------------------------------------------------------------------------------ overhead
def overhead(work: Path, rounds: int = 7, per_round: int = 1500) -> dict:
    from edgeops.agent import ort as eort
    from edgeops.agent.runtime import Runtime
    from edgeops.bundle import build as b
    from edgeops.registry import open_registry

    signer = _home_with_key(work)
    open_registry().add(cnn(work / "cnn.onnx"), "cnn", version="1.0.0")
    bundle = b.build("cnn:1.0.0", "host", [signer], work / "cnn.bundle").path
    root = _local_device(work, bundle)
    rng = np.random.default_rng(1)
    inputs = [{"x": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)} for _ in range(64)]
    bare = eort.session(root / "models/cnn/current/model.onnx", 1)
    with_t = Runtime(root, "cnn", flush_s=1.0)
    nodrift = Runtime(root, "cnn", flush_s=1.0, drift=False)
    without = Runtime(root, "cnn", telemetry=False)
    variants = {"bare onnxruntime session.run": lambda f: bare.run(None, f),
                "edgeops runtime, telemetry on": with_t.run,
                "edgeops runtime, telemetry without drift": nodrift.run,
                "edgeops runtime, telemetry off": without.run}
    times = {k: [] for k in variants}
    fns = list(variants.items())
    for fn in variants.values():          # warm-up
        for f in inputs[:20]:
            fn(f)
    # interleaved request by request (A, B, C, A, B, C ...): clock and load drift hit all three alike
    for r in range(rounds):
        log(f"overhead: round {r + 1}/{rounds}")
        for i in range(per_round):
            f = inputs[i % len(inputs)]
            for k, fn in (fns if i % 2 else fns[::-1]):
                t = time.perf_counter()
                fn(f)
                times[k].append(time.perf_counter() - t)
    for rt in (with_t, nodrift, without):
        rt.close()
    base = statistics.median(times["bare onnxruntime session.run"])
    rows = []
    for k, ts in times.items():
        p50 = statistics.median(ts)
        rows.append({"variant": k, "requests": len(ts), "p50_ms": p50 * 1e3, "mean_ms": statistics.fmean(ts) * 1e3,
                     "p99_ms": float(np.percentile(ts, 99)) * 1e3, "overhead_p50_pct": (p50 / base - 1) * 100})
    from edgeops.agent.spool import Spool, default_path

    sp = Spool(default_path(root))
    st = sp.stats()
    sp.close()
    return {"rows": rows, "spool_records": st["produced"], "target_pct": 3.0,
            "met": rows[1]["overhead_p50_pct"] <= 3.0}


# ------------------------------------------------------------------------------------------ ingest
def _window_bodies(work: Path, n: int = 50) -> list[dict]:
    """Real window bodies: the clf test model's runtime, flushed every few requests."""
    from edgeops.agent.runtime import Runtime
    from edgeops.agent.spool import Spool, default_path
    from edgeops.bundle import build as b
    from edgeops.registry import open_registry
    from test_bundle import _model

    signer = _home_with_key(work) if not (work / "home").exists() else __import__(
        "edgeops.bundle.keys", fromlist=["x"]).load_signing("release")
    open_registry().add(_model(work / "clf.onnx", seed=0), "clf", version="1.0.0")
    bundle = b.build("clf:1.0.0", "host", [signer], work / "clf.bundle").path
    root = _local_device(work, bundle, "ingest")
    rt = Runtime(root, "clf", flush_s=3600)
    rng = np.random.default_rng(0)
    for _ in range(n):
        for _ in range(20):
            rt.run({"x": rng.standard_normal((1, 16)).astype(np.float32)})
        rt.flush()
    rt.close()
    sp = Spool(default_path(root))
    bodies = [r["body"] for r in sp.read(0, 10_000)["records"] if r["kind"] == "window"]
    sp.close()
    return bodies


def ingest(work: Path, total: int = 200_000, batch: int = 5000) -> dict:
    import sqlite3

    from edgeops.telemetry.store import Store

    bodies = _window_bodies(work)
    texts = [json.dumps(b, separators=(",", ":")) for b in bodies]
    recs = [{"seq": i + 1, "boot": "b", "kind": "window", "model": "clf", "version": "1.0.0", "t": 1e9 + i,
             "body": texts[i % len(texts)]} for i in range(total)]
    st = Store("sqlite://" + str(work / "ingest.db"))
    t = time.perf_counter()
    for i in range(0, total, batch):
        st.insert(f"dev{(i // batch) % 50:02d}", "spool", recs[i:i + batch], via="bench")
    store_s = time.perf_counter() - t
    # again: every record a duplicate (a redelivery) -- ignored at what rate
    t = time.perf_counter()
    dup = 0
    for i in range(0, total, batch):
        dup += st.insert(f"dev{(i // batch) % 50:02d}", "spool", recs[i:i + batch], via="bench")["duplicates"]
    dup_s = time.perf_counter() - t
    assert dup == total and st.count() == total
    db = sqlite3.connect(str(work / "plain.db"), isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE records (device TEXT, spool TEXT, seq INTEGER, boot TEXT, kind TEXT, model TEXT, "
               "version TEXT, t REAL, body TEXT, received REAL, via TEXT)")
    rows = [(f"dev{(i // batch) % 50:02d}", "spool", r["seq"], r["boot"], r["kind"], r["model"], r["version"], r["t"],
             r["body"], time.time(), "bench") for i, r in enumerate(recs)]
    t = time.perf_counter()
    for i in range(0, total, batch):
        db.execute("BEGIN")
        db.executemany("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows[i:i + batch])
        db.execute("COMMIT")
    plain_s = time.perf_counter() - t
    avg = sum(len(x) for x in texts) / len(texts)
    return {"records": total, "body_bytes_avg": avg, "requests_per_record": 20,
            "rows": [{"what": "telemetry store (unique key + cursor, 5,000/transaction)", "seconds": store_s,
                      "records_per_s": total / store_s},
                     {"what": "same records again (all duplicates, ignored)", "seconds": dup_s, "records_per_s": total / dup_s},
                     {"what": "plain sqlite3 executemany, no key", "seconds": plain_s, "records_per_s": total / plain_s}],
            "target_per_s": 200_000, "met": total / store_s >= 200_000}


# ------------------------------------------------------------------------------------------ collect
def collect_fleet(n: int, requests: int = 2000) -> dict:
    import concurrent.futures as cf

    from _fleet import fleet_world

    from edgeops.bundle import build as b
    from edgeops.fleet import deploy as D
    from edgeops.fleet.inventory import Inventory
    from edgeops.fleet.ssh import connect
    from edgeops.registry import open_registry
    from edgeops.telemetry.collect import collect
    from edgeops.telemetry.store import Store
    from test_bundle import _model

    with fleet_world("telemetry") as (bed, work, signer):
        open_registry().add(_model(work / "clf.onnx", seed=0), "clf", version="1.0.0")
        bundle = b.build("clf:1.0.0", "host", [signer], work / "clf.bundle").path
        names = [f"d{i:02d}" for i in range(n)]
        log(f"collect: starting and enrolling {n} devices")

        def setup(name):
            dev = bed.add_device(name)
            D.enrol(name, dev.spec, bed.key_path, target="host", host_key=dev.host_key, python=dev.python)
            assert D.deploy(Inventory().get(name), bundle, health_runs=3).ok
            link = D.link_for(Inventory().get(name))
            try:
                code, doc = link.agent("infer", "clf", "--random", str(requests), "--interval-ms", "0.5", "--flush", "0.25")
                assert code == 0, doc
            finally:
                link.close()

        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(setup, names))
        devs = [Inventory().get(x) for x in names]
        # baseline: copy every spool file (cron + scp: no acknowledgement, no dedup, no schema)
        t = time.perf_counter()
        copied = 0

        def fetch(dev):
            with connect(dev.ssh_target()) as conn:
                out = work / "copies" / dev.name
                out.mkdir(parents=True, exist_ok=True)
                total = 0
                for f in ("spool.db", "spool.db-wal"):
                    try:
                        conn.get(f"{dev.agent_root}/telemetry/{f}", out / f)
                        total += (out / f).stat().st_size
                    except Exception:  # noqa: BLE001 - no WAL file: nothing to copy
                        pass
                return total

        with cf.ThreadPoolExecutor(8) as pool:
            copied = sum(pool.map(fetch, devs))
        sftp_s = time.perf_counter() - t
        store = Store("sqlite://" + str(work / "t.db"))
        log("collect: telemetry collect --all")
        t = time.perf_counter()
        res = collect(devs, store, parallel=8)
        collect_s = time.perf_counter() - t
        assert all(r.ok for r in res), [r.error for r in res if not r.ok]
        recs = sum(r.inserted for r in res)
        nbytes = sum(r.bytes for r in res)
        reqs = sum(x["body"]["count"] for x in store.records("window"))
        t = time.perf_counter()
        again = collect(devs, store, parallel=8)      # nothing new: the cost of a poll
        poll_s = time.perf_counter() - t
        return {"devices": n, "requests": reqs, "records": recs,
                "rows": [{"what": "edgeops telemetry collect (read, store, ack), 8 at a time", "seconds": collect_s,
                          "bytes": nbytes, "bytes_per_record": nbytes / recs, "bytes_per_request": nbytes / reqs},
                         {"what": "SFTP copy of every spool.db, 8 at a time (no ack, no dedup)", "seconds": sftp_s,
                          "bytes": copied, "bytes_per_record": copied / recs, "bytes_per_request": copied / reqs},
                         {"what": "collect again, nothing new (a poll)", "seconds": poll_s,
                          "bytes": sum(r.bytes for r in again)}]}


# ------------------------------------------------------------------------------------------ mqtt
def _mosquitto(work: Path):
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(exe):
        raise SystemExit("mqtt: mosquitto is not installed (apt-get install mosquitto)")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    (work / "mq").mkdir()
    os.chmod(work / "mq", 0o777)
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {work / 'mq'}/\nmax_queued_messages 100000\nmax_inflight_messages 0\n")
    p = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    return p, f"mqtt://127.0.0.1:{port}"


def mqtt(work: Path, records: int = 20_000) -> dict:
    from edgeops.agent.push import connect, push
    from edgeops.agent.spool import Spool
    from edgeops.telemetry.collect import ingest
    from edgeops.telemetry.store import Store

    bodies = _window_bodies(work)
    broker, url = _mosquitto(work)
    try:
        sp = Spool(work / "dev" / "telemetry" / "spool.db", device="mq0")
        for i in range(0, records, 1000):
            sp.append([("window", "clf", "1.0.0", time.time(), bodies[(i + k) % len(bodies)]) for k in range(1000)])
        store = Store("sqlite://" + str(work / "mq.db"))
        ingest(url, store, seconds=0.5)          # the ingest's persistent session exists
        out = {}
        th = threading.Thread(target=lambda: out.update(r=ingest(url, store, idle=3.0)), daemon=True)
        th.start()
        time.sleep(0.5)
        t = time.perf_counter()
        pushed = push(sp, url)
        while store.count() < records and time.perf_counter() - t < 300:
            time.sleep(0.01)
        e2e = time.perf_counter() - t
        th.join()
        assert store.count() == records, (store.count(), records)
        # baseline: the same payloads, raw paho QoS 1 publish -> a plain subscriber (nothing stored)
        payloads = []
        sp2 = Spool(work / "dev2" / "telemetry" / "spool.db", device="mq1")
        for i in range(0, records, 1000):
            sp2.append([("window", "clf", "1.0.0", time.time(), bodies[(i + k) % len(bodies)]) for k in range(1000)])
        after = 0
        while True:
            d = sp2.read(after, 500)
            if not d["records"]:
                break
            payloads.append(json.dumps({"device": "mq1", "spool": d["spool"], "records": d["records"]}))
            after = d["last"]
        got = []
        sub = connect(url, "bench-sub", clean=True, on_message=lambda c, u, m: got.append(1))
        sub.subscribe("bench/raw", qos=1)
        time.sleep(0.3)
        pub = connect(url, "bench-pub", clean=True)
        t = time.perf_counter()
        infos = [pub.publish("bench/raw", p, qos=1) for p in payloads]
        for i in infos:
            i.wait_for_publish(60)
        while len(got) < len(payloads) and time.perf_counter() - t < 120:
            time.sleep(0.005)
        raw = time.perf_counter() - t
        for c in (sub, pub):
            c.loop_stop()
            c.disconnect()
        return {"records": records, "messages": pushed["batches"], "payload_bytes": pushed["bytes"],
                "rows": [{"what": "device spool -> push (QoS 1) -> mosquitto -> ingest -> store (deleted on its ack)",
                          "seconds": e2e, "records_per_s": records / e2e},
                         {"what": "raw paho QoS 1 publish -> subscriber, same payloads, nothing stored",
                          "seconds": raw, "records_per_s": records / raw}]}
    finally:
        broker.terminate()
        broker.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="overhead,ingest,collect,mqtt")
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = {}
    for sec in args.sections.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"edgeops-bench-tele-{sec}-"))
        try:
            log(f"== {sec}")
            if sec == "overhead":
                out[sec] = overhead(work)
            elif sec == "ingest":
                out[sec] = ingest(work)
            elif sec == "collect":
                if os.geteuid() != 0:
                    log("collect: needs root (real sshd devices); skipped")
                    continue
                out[sec] = collect_fleet(args.devices)
            elif sec == "mqtt":
                out[sec] = mqtt(work)
            else:
                raise SystemExit(f"unknown section {sec}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    if "overhead" in out:
        o = out["overhead"]
        print("Runtime overhead on a ~1 ms CNN (1 thread, interleaved rounds, same inputs):")
        for r in o["rows"]:
            print(f"  {r['variant']:40s} p50 {r['p50_ms']:.3f} ms  mean {r['mean_ms']:.3f}  p99 {r['p99_ms']:.3f}  "
                  f"overhead p50 {r['overhead_p50_pct']:+.1f} %  ({r['requests']} requests)")
        print(f"  target <= 3 % of p50 with telemetry on: {'met' if o['met'] else 'MISSED'}")
    if "ingest" in out:
        o = out["ingest"]
        print(f"Ingest of {o['records']} aggregated window records (avg body {o['body_bytes_avg']:.0f} B, "
              f"{o['requests_per_record']} requests each):")
        for r in o["rows"]:
            print(f"  {r['what']:58s} {r['records_per_s'] / 1e3:7.0f}k records/s ({r['seconds']:.2f} s)")
        print(f"  target >= 200k records/s: {'met' if o['met'] else 'MISSED'}")
    if "collect" in out:
        o = out["collect"]
        print(f"Collection from {o['devices']} real sshd devices ({o['requests']} requests, {o['records']} records):")
        for r in o["rows"]:
            extra = (f", {r['bytes_per_record']:.0f} B/record, {r['bytes_per_request']:.1f} B/request"
                     if "bytes_per_record" in r else "")
            print(f"  {r['what']:62s} {r['seconds']:6.2f} s, {r['bytes'] / 1e6:.2f} MB{extra}")
    if "mqtt" in out:
        o = out["mqtt"]
        print(f"MQTT end to end, {o['records']} records in {o['messages']} messages ({o['payload_bytes'] / 1e6:.1f} MB):")
        for r in o["rows"]:
            print(f"  {r['what']:84s} {r['records_per_s'] / 1e3:6.1f}k records/s ({r['seconds']:.2f} s)")


if __name__ == "__main__":
    main()
