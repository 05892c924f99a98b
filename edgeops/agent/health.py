"""The health check a verified bundle carries: reference inputs must give the expected outputs
within the manifest's tolerances, and latency must meet its SLO.

Runs on the device (numpy + onnxruntime, nothing else from edgeops) on a folder that
`verifier.verify_bundle(..., extract_to=DIR)` filled, with the manifest that verification
returned (never a manifest read from the folder). The comparison is the one edgeops.verify
uses: |candidate - expected| <= atol + rtol * |expected| elementwise; non-float outputs must
match exactly. Not covered: slots, switching, rollback (the fleet agent).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

PAYLOAD = "payload/"


def _local(folder: Path, name: str) -> Path:
    return folder.joinpath(*name[len(PAYLOAD):].split("/"))


def compare(expected: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> dict:
    if got.shape != expected.shape:
        return {"passed": False, "reason": f"shape {list(got.shape)} != expected {list(expected.shape)}"}
    if expected.dtype.kind != "f":
        same = int(np.sum(got == expected))
        return {"passed": same == expected.size, "agreement": same / max(expected.size, 1)}
    e, g = expected.astype(np.float64), got.astype(np.float64)
    diff = np.abs(g - e)
    bad = int(np.sum(~(diff <= atol + rtol * np.abs(e))))     # NaN counts as a violation
    return {"passed": bad == 0, "violations": bad,
            "max_abs": float(np.nanmax(diff)) if diff.size else 0.0}


def run(folder: str | Path, manifest: dict, threads: int = 1, runs: int = 30,
        check_slo: bool = True) -> dict:
    """Load the model, run the reference inputs, compare, then time `runs` inferences."""
    import onnxruntime as ort

    folder = Path(folder)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(_local(folder, manifest["model"])), so, providers=["CPUExecutionProvider"])
    health = manifest.get("health") or {}
    feeds = {n: np.load(_local(folder, r["file"]), allow_pickle=False) for n, r in health.get("inputs", {}).items()}
    names = list(health.get("expected", {}))
    outs = dict(zip(names, sess.run(names, feeds)))
    report = {"outputs": {}, "passed": True}
    for n, ref in health.get("expected", {}).items():
        exp = np.load(_local(folder, ref["file"]), allow_pickle=False)
        r = compare(exp, np.asarray(outs[n]), ref.get("atol", 0.0), ref.get("rtol", 0.0))
        report["outputs"][n] = {**r, "atol": ref.get("atol"), "rtol": ref.get("rtol")}
        report["passed"] &= r["passed"]
    times = []
    for _ in range(max(runs, 1)):
        t = time.perf_counter()
        sess.run(names, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    pct = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99}
    lat = {k: float(np.percentile(times, q * 100)) for k, q in pct.items()}
    report["latency_ms"] = {**lat, "runs": len(times), "threads": threads}
    slo = manifest.get("slo")
    if check_slo and slo and slo.get("latency_ms"):
        p = slo.get("percentile", "p99")
        got = lat.get(p, lat["p99"])
        report["slo"] = {"percentile": p, "limit_ms": slo["latency_ms"], "measured_ms": got,
                         "passed": got <= slo["latency_ms"]}
        report["passed"] &= report["slo"]["passed"]
    return report
