"""Standalone latency runner: one ONNX model, onnxruntime's CPU provider, phases and statistics.

It runs the same way on this machine (a child process of `edgeops bench`) and on a device
(copied over SSH and started with the device's own python). It imports only the standard
library, numpy and onnxruntime, and nothing from edgeops, so it can be copied as one file.
Python 3.8+.

    python bench_runner.py MODEL [--inputs FEEDS.npz] [--threads N] [--runs N | --min-seconds S]
                           [--warmup N] [--cv-threshold 0.1]

Prints one JSON document on stdout (schema "edgeops.bench-run/1"); errors are one line on
stderr, exit 2 for bad input, 3 when numpy or onnxruntime is missing.

Phases: session creation, first inference, warm-up (excluded from the statistics), steady state.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import sys
import time

SCHEMA = "edgeops.bench-run/1"
RUNNER_VERSION = 1
MIN_STEADY_RUNS = 10
MIN_CPU_WINDOW_S = 0.25


def _read(path, default=None):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def _num(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- environment

def _cpuinfo():
    model, hardware, physical = None, None, set()
    phys_id = "0"
    text = _read("/proc/cpuinfo", "") or ""
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key, val = key.strip().lower(), val.strip()
        if key == "model name" and model is None:
            model = val
        elif key in ("hardware", "model") and val and hardware is None:
            hardware = val
        elif key == "physical id":
            phys_id = val
        elif key == "core id":
            physical.add((phys_id, val))
    if model is None:
        # ARM /proc/cpuinfo has no model name on many kernels: the board and CPU part instead
        part = None
        for line in text.splitlines():
            if line.lower().startswith("cpu part"):
                part = line.split(":", 1)[1].strip()
                break
        model = hardware or (f"ARM CPU part {part}" if part else platform.processor() or None)
    board = _read("/proc/device-tree/model")
    return model, (len(physical) or None), (board.rstrip("\x00") if board else None)


def _cgroup_cpu_quota():
    """CPU quota of this process's cgroup in cores (0.25 = a quarter of one core), or None."""
    text = _read("/proc/self/cgroup", "") or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        ctrls, path = parts[1].split(","), parts[2]
        if parts[1] == "":            # cgroup v2
            raw = _read(f"/sys/fs/cgroup{path}/cpu.max")
            if raw and not raw.startswith("max"):
                q, p = raw.split()[:2]
                return round(int(q) / int(p), 4)
        elif "cpu" in ctrls:          # cgroup v1
            for base in ("/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"):
                q = _num(_read(f"{base}{path}/cpu.cfs_quota_us"))
                p = _num(_read(f"{base}{path}/cpu.cfs_period_us"))
                if q is not None and p:
                    return round(q / p, 4) if q > 0 else None
    return None


def _freq(cpus):
    out = {}
    governors, cur, mx = set(), [], []
    for c in cpus:
        base = f"/sys/devices/system/cpu/cpu{c}/cpufreq"
        g = _read(f"{base}/scaling_governor")
        if g:
            governors.add(g)
        v = _num(_read(f"{base}/scaling_cur_freq"))
        if v:
            cur.append(v / 1000.0)
        v = _num(_read(f"{base}/cpuinfo_max_freq"))
        if v:
            mx.append(v / 1000.0)
    if not cur:                       # VMs: no cpufreq, but /proc/cpuinfo has "cpu MHz"
        for line in (_read("/proc/cpuinfo", "") or "").splitlines():
            if line.lower().startswith("cpu mhz"):
                v = _num(line.split(":", 1)[1])
                if v:
                    cur.append(v)
    out["governor"] = ",".join(sorted(governors)) if governors else None
    out["freq_mhz"] = round(sum(cur) / len(cur), 1) if cur else None
    out["max_freq_mhz"] = round(max(mx), 1) if mx else None
    return out


def _thermal_c():
    for i in range(4):
        v = _num(_read(f"/sys/class/thermal/thermal_zone{i}/temp"))
        if v is not None and v > 0:
            return round(v / 1000.0, 1)
    return None


def _meminfo_mb(key):
    for line in (_read("/proc/meminfo", "") or "").splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024.0, 1)
    return None


def environment(threads, ort=None, np=None):
    """Facts that decide whether two latency numbers can be compared."""
    model, physical, board = _cpuinfo()
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = list(range(os.cpu_count() or 1))
    env = {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "numpy": getattr(np, "__version__", None),
        "onnxruntime": getattr(ort, "__version__", None),
        "cpu_model": model,
        "board": board,
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "affinity": affinity,
        "cpu_quota_cores": _cgroup_cpu_quota(),
        "threads": threads,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "thermal_c": _thermal_c(),
        "mem_total_mb": _meminfo_mb("MemTotal"),
        "mem_available_mb": _meminfo_mb("MemAvailable"),
    }
    env.update(_freq(affinity))
    return env


def _peak_rss_mb():
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return round(peak / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0), 1)


def _rss_mb():
    statm = _read("/proc/self/statm")
    if not statm:
        return None
    return round(int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


# ----------------------------------------------------------------------------- statistics

def summarize(samples_ms, np, cv_threshold=0.10, seed=0):
    """Statistics of steady-state latencies (milliseconds), with a bootstrap 95 % CI of the
    median and the noise verdict."""
    a = np.asarray(samples_ms, dtype=np.float64)
    n = int(a.size)
    p50, p90, p95, p99, p999 = (float(x) for x in np.percentile(a, [50, 90, 95, 99, 99.9]))
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if n > 1 else 0.0
    # bootstrap of the median: resample with replacement, bounded work (B * n <= 4e7)
    rng = np.random.default_rng(seed)
    B = int(min(2000, max(200, 4e7 // max(n, 1))))
    meds = []
    chunk = max(1, int(2e6 // max(n, 1)))
    done = 0
    while done < B:
        k = min(chunk, B - done)
        meds.append(np.median(a[rng.integers(0, n, size=(k, n))], axis=1))
        done += k
    meds = np.concatenate(meds)
    lo, hi = (float(x) for x in np.percentile(meds, [2.5, 97.5]))
    q1, q3 = (float(x) for x in np.percentile(a, [25, 75]))
    cv = std / mean if mean > 0 else 0.0
    # drift: the last quarter against the first (thermal throttling, a neighbour starting)
    q = max(n // 4, 1)
    drift = float(np.median(a[-q:]) / np.median(a[:q])) if n >= 8 else 1.0
    reasons = []
    if cv > cv_threshold:
        reasons.append(f"CV {cv:.1%} > {cv_threshold:.0%}")
    if abs(drift - 1.0) > 0.10:
        reasons.append(f"drift: last quarter median is {drift:.2f}x the first")
    return {
        "latency_ms": {"min": float(a.min()), "mean": mean, "std": std, "p50": p50, "p90": p90,
                       "p95": p95, "p99": p99, "p99.9": p999, "max": float(a.max())},
        "p50_ci95_ms": [lo, hi],
        "cv": cv,
        "iqr_over_median": (q3 - q1) / p50 if p50 > 0 else 0.0,
        "runs": n,
        "tail_note": (None if n >= 1000 else
                      f"p99.9 from {n} runs is close to the maximum; use >= 1000 runs for tails"),
        "noise": {"noisy": bool(reasons), "cv_threshold": cv_threshold, "drift": drift,
                  "reasons": reasons},
        "bootstrap_resamples": B,
    }


# ----------------------------------------------------------------------------- measurement

def _session(ort, path, threads):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
           "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
           "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def random_feeds(sess, np, seed=0):
    """Deterministic inputs from the session's signature; dynamic dims become 1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        dt = _DTYPES.get(i.type)
        if dt is None:
            raise ValueError(f"input {i.name!r} has type {i.type}; pass --inputs")
        if dt.startswith("int") or dt.startswith("uint"):
            feeds[i.name] = rng.integers(0, 2, size=shape).astype(dt)
        elif dt == "bool":
            feeds[i.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(dt)
    return feeds


def run(model_path, feeds=None, threads=1, runs=None, min_seconds=3.0, warmup=10,
        cv_threshold=0.10, progress=None):
    import numpy as np
    import onnxruntime as ort

    with open(model_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    sess = _session(ort, model_path, threads)
    create_ms = 1e3 * (time.perf_counter() - t0)
    if feeds is None:
        feeds = random_feeds(sess, np)
    want = {i.name for i in sess.get_inputs()}
    missing = want - set(feeds)
    if missing:
        raise ValueError(f"inputs file lacks {sorted(missing)} (model inputs: {sorted(want)})")
    feeds = {k: v for k, v in feeds.items() if k in want}
    env = environment(threads, ort, np)

    t0 = time.perf_counter()
    sess.run(None, feeds)
    first_ms = 1e3 * (time.perf_counter() - t0)
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        warm.append(1e3 * (time.perf_counter() - t0))

    samples = []
    cpu0, wall0 = time.process_time(), time.perf_counter()   # all threads, ns resolution
    last_report = wall0
    limit = runs if runs else 10**7
    while len(samples) < limit:
        t0 = time.perf_counter()
        sess.run(None, feeds)
        t1 = time.perf_counter()
        samples.append(1e3 * (t1 - t0))
        if not runs:
            took = t1 - wall0
            # at least min_seconds and MIN_STEADY_RUNS; a very slow model stops at 3 runs
            # once it has used 10x min_seconds
            if (took >= min_seconds and len(samples) >= MIN_STEADY_RUNS) or \
                    (took >= 10 * min_seconds and len(samples) >= 3):
                break
        if progress and t1 - last_report >= 1.0:
            progress(len(samples), t1 - wall0)
            last_report = t1
    wall = time.perf_counter() - wall0
    cpu_s = time.process_time() - cpu0

    out = {
        "schema": SCHEMA,
        "runner_version": RUNNER_VERSION,
        "model_sha256": sha,
        "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()},
        "phases": {
            "session_create_ms": create_ms,
            "first_inference_ms": first_ms,
            "warmup_runs": len(warm),
            "warmup_mean_ms": (sum(warm) / len(warm)) if warm else None,
            "steady_seconds": wall,
        },
        "throughput_ips": len(samples) / wall if wall > 0 else None,
        # per-thread CPU time is only brought up to date at scheduler ticks (~4 ms), so a
        # share over a very short window is meaningless
        "cpu_percent": 100.0 * cpu_s / wall if wall >= MIN_CPU_WINDOW_S else None,
        "rss_before_session_mb": rss0,
        "peak_rss_mb": _peak_rss_mb(),
        "environment": env,
    }
    out.update(summarize(samples, np, cv_threshold))
    return out


def _load_npz(path, np):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def main(argv=None):
    ap = argparse.ArgumentParser(description="edgeops latency runner (one ONNX model)")
    ap.add_argument("model")
    ap.add_argument("--inputs", help=".npz keyed by input name (default: random, seed 0)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int)
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--cv-threshold", type=float, default=0.10)
    ap.add_argument("--progress", action="store_true", help="progress lines on stderr")
    a = ap.parse_args(argv)
    try:
        import numpy as np
        __import__("onnxruntime")
    except ImportError as exc:
        print(f"edgeops-runner: missing on this machine: {exc.name} "
              f"(python {platform.python_version()} at {sys.executable})", file=sys.stderr)
        return 3
    if not os.path.isfile(a.model):
        print(f"edgeops-runner: no such model file: {a.model}", file=sys.stderr)
        return 2
    try:
        feeds = _load_npz(a.inputs, np) if a.inputs else None
    except Exception as exc:  # noqa: BLE001 - report any unreadable inputs file in one line
        print(f"edgeops-runner: cannot read inputs {a.inputs}: {exc}", file=sys.stderr)
        return 2

    def progress(n, s):
        print(f"@progress {n} {s:.2f}", file=sys.stderr, flush=True)

    try:
        out = run(a.model, feeds, threads=a.threads, runs=a.runs, min_seconds=a.min_seconds,
                  warmup=a.warmup, cv_threshold=a.cv_threshold,
                  progress=progress if a.progress else None)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are many pages; one line
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
        print(f"edgeops-runner: {type(exc).__name__}: {msg}", file=sys.stderr)
        return 2
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
