"""`edgeops rollout` across N real sshd devices on loopback (tests/testbed.py; root needed),
next to a plain parallel SFTP of the same bytes to the same devices in the same run (what an
Ansible `copy` task amounts to), in one run.

    sudo python benchmarks/rollout.py [--devices 50] [--mb 50] [--parallel 8] [--json]

Rows:
  sftp x N       paramiko SFTP put of the bundle to every device, PARALLEL at a time (no checks)
  rollout 1 wave every device in one wave: upload, verify, health check, switch, commit
  rollout 4 waves canary + 10%,50%,100% (the next version, so it installs again)
  halt           a version no device can run within its SLO, --max-failures 2: seconds from the
                 completion that breached the rule to the journal's halt, and devices started
                 after it (must be 0)
  shaped         --shaped devices (default 8) in network namespaces behind 1 MB/s tbf links, a
                 --shaped-mb bundle: rollout vs parallel SFTP over the same links (no added
                 delay: netem is not in this kernel)
Each row: wall time, aggregate MB/s of bundle bytes delivered, controller CPU seconds and
peak RSS (this process: the controller runs in-process).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from _fleet import fleet_world  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model(path: Path, mb: float, seed: int) -> Path:
    n = int((mb * (1 << 20) / 4 / 2) ** 0.5)
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32), f"w{i}")
             for i in range(2)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("MatMul", ["h", "w1"], ["y"])]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def shaped(a, bed, work: Path, signer, rows: dict) -> None:
    """SHAPED devices each behind its own network namespace, the link shaped to 1 MB/s with tbf
    on both ends (TESTBED.md: netem is not in this kernel, so no added delay): the rollout should
    be link-bound, i.e. close to a plain parallel SFTP over the same links."""
    import contextlib
    import subprocess

    from edgeops.bundle import build as b
    from edgeops.fleet import deploy as D
    from edgeops.fleet import rollout as R
    from edgeops.fleet.inventory import Inventory
    from edgeops.fleet.journal import Journal
    from edgeops.fleet.ssh import connect
    from edgeops.registry import open_registry

    reg = open_registry()
    reg.add(model(work / "s1.onnx", a.shaped_mb, 11), "shaped", version="1.0.0")
    bundle = b.build("shaped:1.0.0", "host", [signer], work / "shaped.bundle").path
    size = bundle.stat().st_size
    names = [f"n{i:02d}" for i in range(a.shaped)]
    with contextlib.ExitStack() as stack:
        for n in names:
            dev = bed.add_device(n)
            link = stack.enter_context(bed.netns_link(dev))
            for cmd in (["tc", "qdisc", "replace", "dev", link.veth, "root", "tbf", "rate", "8mbit", "burst", "32kbit",
                         "latency", "400ms"],
                        ["ip", "netns", "exec", link.ns, "tc", "qdisc", "replace", "dev", link.peer, "root", "tbf",
                         "rate", "8mbit", "burst", "32kbit", "latency", "400ms"]):
                subprocess.run(cmd, check=True, capture_output=True)
            D.enrol(n, f"{dev.user}@{link.host}:{link.port}", bed.key_path, target="host", host_key=dev.host_key,
                    python=dev.python, labels={"fleet": "shaped"})
        inv = Inventory()

        def put(n):
            with connect(inv.get(n).ssh_target()) as conn:
                conn._sftp_client("bench").put(str(bundle), "plain.bundle")
                conn.run(["rm", "-f", "plain.bundle"])

        log(f"shaped: parallel SFTP to {a.shaped} devices at 1 MB/s")
        c0, t0 = cpu(), time.perf_counter()
        with cf.ThreadPoolExecutor(a.shaped) as pool:
            list(pool.map(put, names))
        s = time.perf_counter() - t0
        rows["shaped sftp"] = {"seconds": s, "MB/s": a.shaped * size / 2**20 / s, "cpu_s": cpu() - c0}
        log("shaped: rollout")
        j = Journal()
        opts = R.Options(parallel=a.shaped, health_runs=5, timeout=600, retries=0, delta=False, canary=False)
        c0, t0 = cpu(), time.perf_counter()
        rid = R.start([inv.get(n) for n in names], {"host": bundle}, opts, j)
        res = R.run(rid, j)
        s = time.perf_counter() - t0
        ok = sum(1 for d in res["devices"] if d["state"] == "succeeded")
        rows["shaped rollout"] = {"seconds": s, "MB/s": ok * size / 2**20 / s, "cpu_s": cpu() - c0,
                                  "state": res["state"], "installed": ok, "id": rid}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--shaped", type=int, default=8, help="devices behind 1 MB/s links (0: skip)")
    ap.add_argument("--shaped-mb", type=float, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows = {}
    with fleet_world("rollout") as (bed, work, signer):
        from edgeops.bundle import build as b
        from edgeops.fleet import deploy as D
        from edgeops.fleet import rollout as R
        from edgeops.fleet.inventory import Inventory
        from edgeops.fleet.journal import Journal
        from edgeops.fleet.ssh import connect
        from edgeops.registry import open_registry

        reg = open_registry()
        log(f"building three {a.mb:.0f} MB models and bundles")
        for i, ver in enumerate(("1.0.0", "1.1.0", "1.2.0")):
            reg.add(model(work / f"m{i}.onnx", a.mb, i), "m", version=ver)
        bundles = {v: b.build(f"m:{v}", "host", [signer], work / f"{v}.bundle").path for v in ("1.0.0", "1.1.0")}
        bundles["1.2.0"] = b.build("m:1.2.0", "host", [signer], work / "1.2.0.bundle", slo_ms=1e-6).path
        size = bundles["1.0.0"].stat().st_size
        log(f"starting {a.devices} sshd devices and enrolling them")
        names = [f"d{i:03d}" for i in range(a.devices)]
        devs = {}
        for n in names:
            devs[n] = bed.add_device(n)
            D.enrol(n, devs[n].spec, bed.key_path, target="host", host_key=devs[n].host_key,
                    python=devs[n].python, labels={"fleet": "bench"})
        inv = Inventory()

        # ---- baseline: plain parallel SFTP of the same bytes
        log("baseline: parallel SFTP")

        def put(n):
            with connect(inv.get(n).ssh_target()) as conn:
                conn._sftp_client("bench").put(str(bundles["1.0.0"]), "plain.bundle")
                conn.run(["rm", "-f", "plain.bundle"])

        c0, t0 = cpu(), time.perf_counter()
        with cf.ThreadPoolExecutor(a.parallel) as pool:
            list(pool.map(put, names))
        s = time.perf_counter() - t0
        rows["sftp x N"] = {"seconds": s, "MB/s": a.devices * size / 2**20 / s, "cpu_s": cpu() - c0}

        j = Journal()

        def roll(label, ver, **kw):
            log(f"rollout: {label}")
            opts = R.Options(parallel=a.parallel, health_runs=5, timeout=600, retries=0, delta=False, **kw)
            c0, t0 = cpu(), time.perf_counter()
            rid = R.start([inv.get(n) for n in names], {"host": bundles[ver]}, opts, j)
            res = R.run(rid, j)
            s = time.perf_counter() - t0
            ok = sum(1 for d in res["devices"] if d["state"] == "succeeded")
            rows[label] = {"seconds": s, "MB/s": ok * size / 2**20 / s, "cpu_s": cpu() - c0, "state": res["state"],
                           "installed": ok, "id": rid}
            return rid, res

        roll("rollout 1 wave", "1.0.0", waves=None, canary=False)
        roll("rollout 4 waves", "1.1.0", waves="10%,50%,100%", canary=True)
        rid, res = roll("halt", "1.2.0", waves=None, canary=False, max_failures="2", min_devices=1)
        ev = j.events(rid)
        halt = next(e for e in ev if e["event"] == "halt")
        fails = [e for e in ev if e["event"].startswith("failed")]
        breach = fails[2]["at"] if len(fails) >= 3 else None
        starts_after = sum(1 for e in ev if e["event"].startswith("start") and e["at"] > halt["at"])
        rows["halt"].update({"breach_to_halt_s": (halt["at"] - breach) if breach else None,
                             "started_after_halt": starts_after,
                             "started": sum(1 for e in ev if e["event"].startswith("start"))})
        if a.shaped:
            shaped(a, bed, work, signer, rows)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    if a.json:
        print(json.dumps({"rows": rows, "peak_rss_mb": peak_rss, "bundle_bytes": size}, indent=1, default=str))
        return 0
    print(f"\nrollout to {a.devices} real sshd devices on loopback, bundle {size / 2**20:.1f} MB, "
          f"parallel {a.parallel}, 2 cores shared by controller and devices")
    print(f"{'row':<18}{'wall s':>8}{'MB/s':>8}{'ctl CPU s':>10}  note")
    for k, r in rows.items():
        note = ""
        if "installed" in r:
            note = f"{r['installed']}/{a.devices} installed, {r['state']}"
        if "breach_to_halt_s" in r:
            note += (f"; breach -> halt {r['breach_to_halt_s'] * 1e3:.1f} ms, {r['started']} started, "
                     f"{r['started_after_halt']} after the halt")
        print(f"{k:<18}{r['seconds']:>8.1f}{r['MB/s']:>8.1f}{r['cpu_s']:>10.1f}  {note}")
    print(f"controller peak RSS {peak_rss:.0f} MB (whole benchmark process)")
    one, base = rows["rollout 1 wave"], rows["sftp x N"]
    print("\ntargets")
    checks = [("rollout >= 90 % of plain parallel SFTP throughput", one["MB/s"] >= 0.9 * base["MB/s"],
               f"{one['MB/s']:.1f} vs {base['MB/s']:.1f} MB/s ({100 * one['MB/s'] / base['MB/s']:.0f} %)"),
              ("halt within the in-flight batch (no start after the halt)", rows["halt"]["started_after_halt"] == 0,
               f"{rows['halt']['started_after_halt']} started after")]
    if "shaped rollout" in rows:
        sr, sb = rows["shaped rollout"], rows["shaped sftp"]
        checks.append(("1 MB/s links: rollout >= 90 % of parallel SFTP (link-bound)", sr["MB/s"] >= 0.9 * sb["MB/s"],
                       f"{sr['MB/s']:.2f} vs {sb['MB/s']:.2f} MB/s ({100 * sr['MB/s'] / sb['MB/s']:.0f} %)"))
    for t, ok, v in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {t}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
