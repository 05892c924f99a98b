"""The health check a verified bundle carries: reference inputs must give the expected outputs
within the manifest's tolerances (edgeops' one comparison, `compare.py`), and latency must
meet its SLO.

Runs on the device (numpy + onnxruntime, nothing else from edgeops) on a folder that
`verifier.verify_bundle(..., extract_to=DIR)` filled, with the manifest that verification
returned (never a manifest read from the folder). Not covered: slots, switching, rollback (the fleet agent).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from .compare import compare_arrays
from .ort import session

PAYLOAD = "payload/"


def _local(folder: Path, name: str) -> Path:
    return folder.joinpath(*name[len(PAYLOAD):].split("/"))


def compare(expected: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> dict:
    """One reference output against what the model gave: edgeops' one comparison rule."""
    p = compare_arrays(expected, got, atol, rtol)
    r = {"passed": p.passed, "violations": p.violations}
    if p.max_abs is not None:
        r["max_abs"] = p.max_abs
    if p.agreement is not None:
        r["agreement"] = p.agreement
    if p.note:
        r["note" if p.passed else "reason"] = p.note
    return r


class HealthError(Exception):
    """The health section or its files cannot be used (the check fails, with this reason)."""


def _num(x, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        raise HealthError(f"{what} {x!r} is not a finite number >= 0")
    return float(x)


def run(folder: str | Path, manifest: dict, threads: int = 1, runs: int = 30,
        check_slo: bool = True) -> dict:
    """Load the model, run the reference inputs, compare, then time `runs` inferences.
    Never raises for a bad bundle: anything unusable fails the check with a reason."""
    try:
        return _run(Path(folder), manifest, threads, runs, check_slo)
    except HealthError as exc:
        return {"passed": False, "error": str(exc), "outputs": {}}
    except Exception as exc:  # onnxruntime / numpy refusing the model or the vectors
        return {"passed": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                "outputs": {}}


def _run(folder: Path, manifest: dict, threads: int, runs: int, check_slo: bool) -> dict:
    health = manifest.get("health")
    if not isinstance(health, dict) or not isinstance(health.get("inputs"), dict) \
            or not isinstance(health.get("expected"), dict):
        raise HealthError("the bundle has no health section (reference inputs and expected outputs)")
    if not health["expected"]:
        raise HealthError("the bundle lists no expected outputs: nothing would be checked")
    sess = session(_local(folder, manifest["model"]), threads)
    want_in = {i.name for i in sess.get_inputs()}
    have_out = {o.name for o in sess.get_outputs()}
    if set(health["inputs"]) != want_in:
        raise HealthError(f"reference inputs {sorted(health['inputs'])} do not match the model's {sorted(want_in)}")
    if not set(health["expected"]) <= have_out:
        raise HealthError(f"expected outputs {sorted(set(health['expected']) - have_out)} are not model outputs")
    # allow_pickle=False: a reference file can never run code, even one a trusted key signed
    feeds = {n: np.load(_local(folder, r["file"]), allow_pickle=False) for n, r in health["inputs"].items()}
    names = list(health["expected"])
    outs = dict(zip(names, sess.run(names, feeds)))
    report = {"outputs": {}, "passed": True}
    for n, ref in health["expected"].items():
        exp = np.load(_local(folder, ref["file"]), allow_pickle=False)
        atol, rtol = _num(ref.get("atol", 0.0), f"{n} atol"), _num(ref.get("rtol", 0.0), f"{n} rtol")
        r = compare(exp, np.asarray(outs[n]), atol, rtol)
        report["outputs"][n] = {**r, "atol": atol, "rtol": rtol}
        report["passed"] &= r["passed"]
    times = []
    for _ in range(max(runs, 1)):
        t = time.perf_counter()
        sess.run(names, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    pct = {"p50": 50, "p90": 90, "p95": 95, "p99": 99}
    lat = {k: float(np.percentile(times, q)) for k, q in pct.items()}
    report["latency_ms"] = {**lat, "runs": len(times), "threads": threads}
    slo = manifest.get("slo")
    if check_slo and slo is not None:
        if not isinstance(slo, dict) or slo.get("percentile", "p99") not in pct:
            raise HealthError(f"the SLO {slo!r} is malformed")
        limit = slo.get("latency_ms")
        if limit is not None:
            limit = _num(limit, "SLO latency_ms")
            p = slo.get("percentile", "p99")
            report["slo"] = {"percentile": p, "limit_ms": limit, "measured_ms": lat[p], "passed": lat[p] <= limit}
            report["passed"] &= report["slo"]["passed"]
    return report
