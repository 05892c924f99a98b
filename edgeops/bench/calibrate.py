"""`edgeops targets calibrate`: run the fixed suite on the real machine, fit the profile's
efficiency factors, save the calibrated profile under $EDGEOPS_HOME/targets."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path
from typing import Callable

from .. import targets
from ..errors import UsageError
from ..paths import home
from .measure import Settings, run_local, write_feeds

MAX_SUITE = 22


def _profile(name: str, base: str | None, device) -> targets.Profile:
    known = targets.names()
    if name in known:
        if base:
            raise UsageError(f"target {name!r} exists already; --base only creates new profiles")
        prof = targets.load(name)
    else:
        if not base:
            raise UsageError(f"unknown target {name!r}",
                             hint="to create a profile for a new device, start from a similar "
                                  f"one: --base {known[0] if known else 'host'}")
        src = targets.load(base)
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in src.data.items()}
        data["name"] = name
        data["title"] = f"{name} (from {src.name}: {src.data['title']})"
        data["kind"] = "device" if device is not None else src.data["kind"]
        data["sources"] = list(src.data["sources"])
        data.pop("calibration", None)
        prof = targets.Profile(name=name, data=data, path=src.path, origin=f"new, from {src.name}")
    kind = prof.data["kind"]
    if device is None and kind != "host":
        raise UsageError(f"{name!r} describes another machine ({prof.data['title']}); timings "
                         "taken here would calibrate it wrongly",
                         hint="calibrate it on the device (--device NAME), or calibrate host --local")
    if device is not None and kind == "host":
        raise UsageError(f"{name!r} is this machine; calibrate it with --local",
                         hint=f"for a device, create its own profile: edgeops targets calibrate "
                              f"NEWNAME --device {device.name} --base host")
    return prof


def calibrate(name: str, *, device=None, base: str | None = None, threads: int = 1,
              seconds: float = 1.0, rounds: int = 3, statistic: str = "p50",
              accept_new_host_key: bool = False,
              progress: Callable[[int, int, str], None] | None = None) -> dict:
    from . import estimate, suite

    prof = _profile(name, base, device)
    if statistic not in ("p50", "mean"):
        raise UsageError(f"--statistic is p50 or mean, got {statistic!r}")
    if rounds < 1:
        raise UsageError(f"--rounds must be >= 1, got {rounds}")
    # each model is timed in `rounds` short rounds, round-robin over the suite, and its
    # least-disturbed round (the lowest round median) is fitted: interference from other
    # work only ever adds time, so on a shared machine the lowest round is the closest to
    # the machine's own speed, and a neighbour's burst spoils one round instead of the fit
    s = Settings(threads=threads, min_seconds=seconds / rounds, warmup=10)
    s.check()
    models = suite.build_suite(home() / "cache" / "calibration-suite")
    if len(models) > MAX_SUITE:
        raise AssertionError(f"the calibration suite has {len(models)} models (max {MAX_SUITE})")
    with tempfile.TemporaryDirectory(prefix="edgeops-calib-") as tmp:
        jobs, shapes = [], []
        for m in models:
            feeds = suite.suite_feeds(m.path)
            shapes.append({k: tuple(v.shape) for k, v in feeds.items()})
            jobs.append((Path(m.path), write_feeds(feeds, Path(tmp) / f"{m.name}.npz")))
        all_jobs = jobs * rounds
        n = len(all_jobs)
        if device is None:
            runs = []
            for i, (mp, fp) in enumerate(all_jobs):
                if progress:
                    progress(i + 1, n, mp.name)
                runs.append(run_local(mp, fp, s))
            where, record = "this machine", None
        else:
            from .remote import run_remote_many

            runs, record = run_remote_many(device, all_jobs, s, accept_new_host_key=accept_new_host_key,
                                           progress=progress)
            where = f"device {device.name}"
    per_model = [[r["latency_ms"][statistic] for r in runs[k::len(jobs)]] for k in range(len(jobs))]
    p50 = [min(v) for v in per_model]
    runs = runs[:len(jobs)]
    analyses = [estimate.analyze(str(m.path), sh) for m, sh in zip(models, shapes)]
    fitted = estimate.fit(analyses, p50, prof.data, threads=threads)
    env = runs[0]["environment"]
    cal = dict(fitted["calibration"])
    cal.update({
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "where": where,
        "cpu_model": str(env.get("cpu_model")),
        "logical_cores": int(env.get("logical_cores") or 0),
        "cpu_quota_cores": float(env.get("cpu_quota_cores") or 0.0),
        "onnxruntime": str(env.get("onnxruntime")),
        "seconds_per_model": float(seconds),
        "rounds": int(rounds),
        "statistic": statistic,
        "round_spread": [float(round(max(v) / min(v) - 1, 4)) for v in per_model],
        "noisy_models": [m.name for m, r in zip(models, runs) if r["noise"]["noisy"]],
    })
    if device is not None and name not in prof.data["sources"]:
        prof.data["sources"] = list(prof.data["sources"]) + [
            f"calibrated on device {device.name} ({record['host']}:{record['port']})"]
    path = targets.save_calibrated(prof, fitted["efficiency"], cal)
    return {"name": name, "where": where, "path": str(path), "device": record,
            "efficiency": fitted["efficiency"], "calibration": cal,
            "suite": [{"name": m.name, f"measured_{statistic}_ms": v, "rounds_ms": rr,
                       "noisy": r["noise"]["noisy"]}
                      for m, v, rr, r in zip(models, p50, per_model, runs)]}
