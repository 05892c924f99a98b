"""`edgeops deploy` to one real sshd device (tests/testbed.py: its own unix user, host key and
sshd on loopback), next to what a user would otherwise do, in one run.

    sudo python benchmarks/deploy.py [--mb 50] [--json]       (root: the test bed creates a user)

Model: three float32 MatMul layers of about MB/3 each. Rows, all on the same device:
  scp            `scp` of the bundle file (OpenSSH client), the glue-script baseline
  sftp           paramiko SFTP put of the same file (no resume, no check)
  deploy v1      edgeops deploy of the first version: every step timed (connect, upload,
                 verify, stage, health, switch, postcheck, commit); MB/s of the upload
  re-signed      the same model, same version, a newer counter (--allow-same-version): a delta
                 should move about the manifest
  last layer     v2 with only its last layer retrained: delta bytes against the bytes that changed
                 (target <= 1.1x + chunk overhead)
  unrelated      a model with nothing in common: delta is skipped, whole transfer; timed with and
                 without delta (target: no slower)
"""

from __future__ import annotations

import argparse
import json
import subprocess
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


def model(path: Path, mb: float, seed: int, weights=None) -> tuple[Path, list]:
    n = int((mb * (1 << 20) / 4 / 3) ** 0.5)
    rng = np.random.default_rng(seed)
    ws = weights or [(rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32) for _ in range(3)]
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]), helper.make_node("MatMul", ["h0", "w1"], ["h1"]),
             helper.make_node("MatMul", ["h1", "w2"], ["y"])]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path, ws


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows = {}
    with fleet_world("deploy") as (bed, work, signer):
        from edgeops.bundle import build as b
        from edgeops.fleet import deploy as D
        from edgeops.fleet.inventory import Inventory
        from edgeops.fleet.ssh import connect
        from edgeops.registry import open_registry

        reg = open_registry()
        log(f"building models of {a.mb:.0f} MB")
        p1, ws = model(work / "v1.onnx", a.mb, 0)
        w2 = [ws[0], ws[1], ws[2] + np.float32(0.01)]
        p2, _ = model(work / "v2.onnx", a.mb, 0, w2)
        p3, _ = model(work / "v3.onnx", a.mb, 1)
        reg.add(p1, "m", version="1.0.0")
        reg.add(p2, "m", version="1.1.0")
        reg.add(p3, "other", version="1.0.0")
        for i in (1, 2):
            reg.add(model(work / f"o{i}.onnx", a.mb, 10 + i)[0], "other", version=f"1.{i}.0")
            reg.add(model(work / f"b{i}.onnx", a.mb, 20 + i)[0], "m", version=f"1.{i + 1}.{i}")
        bundles = {"v1": b.build("m:1.0.0", "host", [signer], work / "v1.bundle").path,
                   "resigned": b.build("m:1.0.0", "host", [signer], work / "v1b.bundle").path,
                   "v2": b.build("m:1.1.0", "host", [signer], work / "v2.bundle").path,
                   "other": b.build("other:1.0.0", "host", [signer], work / "o.bundle").path,
                   **{f"other{i + 1}": b.build(f"other:1.{i}.0", "host", [signer], work / f"o{i}.bundle").path
                      for i in (1, 2)},
                   **{f"v1-{i}": b.build(f"m:1.{i + 1}.{i}", "host", [signer], work / f"v1-{i}.bundle").path
                      for i in (1, 2)}}
        size = bundles["v1"].stat().st_size
        changed = ws[2].nbytes
        dev = bed.add_device("bench1")
        D.enrol("bench1", dev.spec, bed.key_path, target="host", host_key=dev.host_key, python=dev.python)
        rec = Inventory().get("bench1")

        # ---- baselines: the same bytes, the same device
        t = time.perf_counter()
        r = subprocess.run(["scp", "-q", "-i", bed.key_path, "-P", str(dev.port), "-o", "StrictHostKeyChecking=no",
                            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", str(bundles["v1"]),
                            f"{dev.user}@{dev.host}:scp.bundle"], capture_output=True, text=True)
        scp_s = time.perf_counter() - t
        rows["scp"] = {"seconds": scp_s, "bytes": size, "MB/s": size / 2**20 / scp_s, "ok": r.returncode == 0}
        with connect(rec.ssh_target()) as conn:
            sftp = conn._sftp_client("bench")
            t = time.perf_counter()
            sftp.put(str(bundles["v1"]), "sftp.bundle")
            s = time.perf_counter() - t
            rows["sftp"] = {"seconds": s, "bytes": size, "MB/s": size / 2**20 / s, "ok": True}
            conn.run(["rm", "-f", "scp.bundle", "sftp.bundle"])

        def run(label, bundle, **kw):
            log(f"deploy {label}")
            t = time.perf_counter()
            out = D.deploy(rec, bundle, health_runs=5, **kw)
            s = time.perf_counter() - t
            up = next(x for x in out.steps if x["step"] == "upload")
            rows[label] = {"seconds": s, "bytes": bundle.stat().st_size, "sent": out.bytes_sent, "ok": out.ok,
                           "reason": out.reason, "upload_s": up["seconds"],
                           "MB/s": out.bytes_sent / 2**20 / up["seconds"] if up["seconds"] else None,
                           "steps": {x["step"]: x["seconds"] for x in out.steps}, "delta": out.delta}
            return out

        run("deploy v1", bundles["v1"])
        run("re-signed", bundles["resigned"], allow_same_version=True)
        run("last layer", bundles["v2"])
        rows["last layer"]["changed"] = changed
        # the unrelated model on two devices in the same state (v1 installed, its chunks indexed
        # after the commit), one with delta, one without, alternating order over 3 rounds
        recs = []
        for n in ("bench2", "bench3"):
            d = bed.add_device(n)
            D.enrol(n, d.spec, bed.key_path, target="host", host_key=d.host_key, python=d.python)
            recs.append(Inventory().get(n))
        times = {True: [], False: []}
        for i, other in enumerate(("other", "other2", "other3")):
            for r in recs:
                assert D.deploy(r, bundles["v1"] if i == 0 else bundles[f"v1-{i}"], health_runs=5).ok
            time.sleep(3)          # the post-commit chunk indexing finishes (deploys are not back to back)
            for use_delta, r in (((True, recs[0]), (False, recs[1])) if i % 2 == 0 else
                                 ((False, recs[1]), (True, recs[0]))):
                t = time.perf_counter()
                out = D.deploy(r, bundles[other], health_runs=5, delta=use_delta)
                assert out.ok, out.to_dict()
                times[use_delta].append(time.perf_counter() - t)
        for use_delta, label in ((True, "unrelated (delta on)"), (False, "unrelated (delta off)")):
            rows[label] = {"seconds": float(np.median(times[use_delta])), "bytes": bundles["other"].stat().st_size,
                           "sent": bundles["other"].stat().st_size, "ok": True, "delta": None,
                           "note": "median of 3: " + ", ".join(f"{x:.2f}" for x in times[use_delta])}

    if a.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    mb = lambda x: f"{x / 2**20:.2f}"  # noqa: E731
    print(f"\ndeploy to one real sshd device on loopback, bundle {mb(size)} MB")
    print(f"{'row':<24}{'ok':>4}{'wall s':>9}{'MB sent':>10}{'MB/s':>8}  note")
    for k, r in rows.items():
        note = ""
        if r.get("delta"):
            d = r["delta"]
            note = f"delta {d['reused']}/{d['chunks']} chunks reused"
        if "changed" in r:
            note += f"; changed {mb(r['changed'])} MB -> sent/changed {r['sent'] / r['changed']:.3f}x"
        if r.get("reason"):
            note += f" reason {r['reason']}"
        if r.get("note"):
            note += r["note"]
        rate = f"{r['MB/s']:.1f}" if r.get("MB/s") else "-"
        print(f"{k:<24}{'yes' if r['ok'] else 'NO':>4}{r['seconds']:>9.2f}{mb(r.get('sent', r['bytes'])):>10}"
              f"{rate:>8}  {note}")
    print("\nsteps of `deploy v1` (seconds)")
    for k, s in rows["deploy v1"]["steps"].items():
        print(f"  {k:<18}{s:>8.3f}")
    ll, rs = rows["last layer"], rows["re-signed"]
    on, off = rows["unrelated (delta on)"], rows["unrelated (delta off)"]
    print("\ntargets")
    checks = [
        ("re-signed bundle moves about the manifest (< 1 % of the bundle)", rs["sent"] < 0.01 * rs["bytes"],
         f"{rs['sent']} bytes of {rs['bytes']}"),
        ("last layer changed: sent <= 1.1x changed + chunk overhead (2 x 256 KiB)",
         ll["sent"] <= 1.1 * ll["changed"] + 2 * (256 << 10), f"{ll['sent'] / ll['changed']:.3f}x"),
        ("unrelated model: no slower with delta on than off (within 10 %)", on["seconds"] <= 1.1 * off["seconds"],
         f"{on['seconds']:.2f} s vs {off['seconds']:.2f} s"),
        ("deploy upload MB/s within 2x of plain SFTP", rows["deploy v1"]["MB/s"] >= 0.5 * rows["sftp"]["MB/s"],
         f"{rows['deploy v1']['MB/s']:.1f} vs {rows['sftp']['MB/s']:.1f} MB/s"),
    ]
    for t, ok, v in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {t}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
