"""`edgeops bench`: measure here, measure on a device, or predict from a profile.

Measuring runs edgeops/agent/bench_runner.py in a fresh python process: here with this
python, on a device with the device's python (remote.py). The same file produces the numbers
in both places, and a fresh process makes session creation, first inference and peak RSS
the model's own rather than edgeops' (which has imported rich, onnx, ...).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import EXIT_ENV, EdgeopsError, UsageError, first_line
from .report import PERCENTILES, BenchReport, apply_budget

RUNNER = Path(__file__).resolve().parents[1] / "agent" / "bench_runner.py"


class RunnerError(EdgeopsError):
    """The runner could not measure (bad model or inputs: exit 2; missing runtime: exit 3)."""


@dataclass
class Settings:
    threads: int = 1
    runs: int | None = None
    min_seconds: float = 3.0
    warmup: int = 10
    cv_threshold: float = 0.10
    inputs: str = "random (seed 0)"
    shapes: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {self.threads}")
        if self.runs is not None and self.runs < 1:
            raise UsageError(f"--runs must be >= 1, got {self.runs}")
        if self.min_seconds <= 0:
            raise UsageError(f"--min-seconds must be > 0, got {self.min_seconds}")
        if self.warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {self.warmup}")
        if not 0 < self.cv_threshold < 10:
            raise UsageError(f"--cv-threshold must be a fraction such as 0.1, got {self.cv_threshold}")

    def runner_args(self) -> list[str]:
        args = ["--threads", str(self.threads), "--warmup", str(self.warmup),
                "--cv-threshold", str(self.cv_threshold)]
        if self.runs:
            args += ["--runs", str(self.runs)]
        else:
            args += ["--min-seconds", str(self.min_seconds)]
        return args

    def timeout(self) -> float:
        """Generous wall-clock bound for one runner (slow devices, slow models)."""
        return 300.0 + (30 * self.min_seconds if not self.runs else 0) + (self.runs or 0) * 2.0

    def to_dict(self) -> dict:
        return {"threads": self.threads, "runs": self.runs,
                "min_seconds": None if self.runs else self.min_seconds, "warmup": self.warmup,
                "cv_threshold": self.cv_threshold, "inputs": self.inputs,
                "shapes": {k: list(v) for k, v in self.shapes.items()}}


# ----------------------------------------------------------------------------- model + inputs

def check_model(path: str | Path):
    """The model must be an ONNX file onnx can load; returns (ModelProto, Signature)."""
    from ..formats import onnx as onnx_fmt

    model = onnx_fmt.require(
        path, "edgeops bench runs ONNX models (onnxruntime)",
        "Core ML models cannot be run on this OS (no Core ML runtime outside macOS/iOS), so "
        "they cannot be benchmarked here",
        "benchmark the ONNX model it came from, or run on a Mac")
    return model, onnx_fmt.signature_of(model)


def model_info(path: Path, model, signature, feeds: dict[str, np.ndarray]) -> dict:
    from ..formats.base import sha256_path
    from ..formats.onnx import total_size

    return {"path": str(path), "sha256": sha256_path(path), "size_bytes": total_size(path),
            "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                         default=None),
            "nodes": len(model.graph.node),
            "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()},
            "outputs": [o.name for o in signature.outputs]}


def make_feeds(signature, inputs: str | Path | None, shapes: dict | None) -> tuple[dict, str]:
    from ..optimize.gates import fixed_batch
    from ..verify import load_inputs, make_inputs

    if inputs is not None:
        feeds = load_inputs(inputs, signature)
        return feeds, f"file {Path(inputs).name}"
    feeds = make_inputs(signature, shapes=shapes or {}, batch=fixed_batch(signature) or 1, seed=0)
    return feeds, "random (seed 0)"


def write_feeds(feeds: dict[str, np.ndarray], path: Path) -> Path:
    np.savez(path, **feeds)
    return path


# ----------------------------------------------------------------------------- local

def parse_runner(rc: int, stdout: str, stderr: str, where: str) -> dict:
    """The runner's JSON, or one clear error from its stderr."""
    if rc == 0:
        try:
            return json.loads(stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RunnerError(f"{where}: the benchmark runner printed no report "
                              f"({first_line(Exception(stderr or stdout or 'no output'))})") from None
    from ..agent.ort import describe

    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("@progress")]
    msg = describe(Exception((lines[-1] if lines else f"exit code {rc}")
                             .removeprefix("edgeops-runner: ")))
    err = RunnerError(f"{where}: {msg[:400]}")
    if rc == 3:
        err.exit_code = EXIT_ENV
    elif rc < 0 or rc > 3:
        err.message = f"{where}: the benchmark runner died (exit {rc}): {msg[:300]}"
        err.exit_code = EXIT_ENV
    raise err


def run_local(model: Path, feeds_path: Path, s: Settings,
              progress: Callable[[int, float], None] | None = None) -> dict:
    cmd = [sys.executable, str(RUNNER), str(model), "--inputs", str(feeds_path),
           "--progress", *s.runner_args()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines: list[str] = []
    deadline = time.monotonic() + s.timeout()
    try:
        for line in proc.stderr:           # progress lines while it runs
            if line.startswith("@progress") and progress:
                _, n, secs = line.split()
                progress(int(n), float(secs))
            else:
                err_lines.append(line)
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, s.timeout())
        out = proc.stdout.read()
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RunnerError(f"the benchmark did not finish within {s.timeout():.0f} s",
                          hint="use --runs or a smaller --min-seconds") from None
    return parse_runner(rc, out, "".join(err_lines), "local")


# ----------------------------------------------------------------------------- entry point

def bench(model: str | Path, *, settings: Settings | None = None, inputs: str | Path | None = None,
          budget_ms: float | None = None, percentile: str = "p99", target: str | None = None,
          predict: bool = False, device=None, accept_new_host_key: bool = False,
          progress: Callable[[int, float], None] | None = None) -> BenchReport:
    """Measure MODEL here, on `device` (anything with .name, .python and .ssh_target(): an
    inventory Device or an ad-hoc --ssh one), or predict it on `target` (predict=True).
    `progress(runs, seconds)` is called during a local measurement. Budget breaches are in
    report.budget, not raised."""
    t0 = time.perf_counter()
    s = settings or Settings()
    s.check()
    if percentile not in PERCENTILES:
        raise UsageError(f"--percentile must be one of {', '.join(PERCENTILES)}, got {percentile!r}")
    if budget_ms is not None and not budget_ms > 0:
        raise UsageError(f"--budget-ms must be > 0, got {budget_ms}")
    if predict and not target:
        raise UsageError("--predict needs --target NAME (edgeops targets list)")
    if predict and device is not None:
        raise UsageError("--predict and --device are exclusive: a prediction runs nothing")
    if target and not predict:
        raise UsageError("--target names the profile to predict with; add --predict",
                         hint="to measure on a real device use --device NAME")
    model = Path(model)
    proto, sig = check_model(model)
    feeds, how = make_feeds(sig, inputs, s.shapes)
    s.inputs = how
    info = model_info(model, proto, sig, feeds)

    if predict:
        from .. import targets
        from . import estimate

        prof = targets.load(target)
        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        analysis = estimate.analyze(proto, shapes)
        blind = estimate.unknown_compute(analysis)
        if blind:
            shown = ", ".join(blind[:5]) + (f" and {len(blind) - 5} more" if len(blind) > 5 else "")
            raise UsageError(f"cannot predict {Path(model).name}: the shapes of {len(blind)} compute "
                             f"node(s) stay unknown ({shown}) -- counting them as free would "
                             "give a confident wrong number",
                             hint="give every dynamic input a concrete --shape (or --inputs); "
                                  "the notes of `edgeops bench --predict --json` say which "
                                  "resolution step failed")
        pred = estimate.predict(analysis, prof.data, threads=s.threads).to_dict()
        rep = BenchReport(mode="predicted", where="target", model=info,
                          settings=s.to_dict(), prediction=pred, target=prof.summary())
        cal_threads = (prof.data.get("calibration") or {}).get("threads")
        if prof.calibrated and cal_threads and int(cal_threads) != s.threads:
            rep.warnings.append(f"{prof.name} was calibrated at {cal_threads} thread(s); at "
                                f"{s.threads} the scaling uses the profile's `parallel` prior, "
                                "which calibration did not fit (calibrate with --threads "
                                f"{s.threads} for a fitted answer)")
        if not prof.calibrated:
            rep.warnings.append(f"target {prof.name!r} is not calibrated: the efficiency factors "
                                "are priors from public specs, so the interval is wide "
                                f"(edgeops targets calibrate {prof.name} ...)")
    else:
        with tempfile.TemporaryDirectory(prefix="edgeops-bench-") as tmp:
            fp = write_feeds(feeds, Path(tmp) / "inputs.npz")
            if device is None:
                try:
                    run = run_local(model, fp, s, progress=progress)
                except RunnerError:
                    from ..formats.onnx import load_session

                    load_session(model)     # a model onnxruntime refuses: say why, in one line
                    raise
                where, dev = "local", None
            else:
                from .remote import run_remote

                run, dev = run_remote(device, model, fp, s, accept_new_host_key=accept_new_host_key)
                where = "device"
        if run["model_sha256"] != info["sha256"]:
            raise RunnerError(f"{where}: the model measured is not the model given "
                              "(sha256 differs after the copy)")
        env = run.pop("environment")
        rep = BenchReport(mode="measured", where=where, model=info, settings=s.to_dict(),
                          measurement=run, environment=env, device=dev)
        if run["noise"]["noisy"]:
            rep.warnings.append("noisy measurement (" + "; ".join(run["noise"]["reasons"]) +
                                "): treat the percentiles with care, or re-run on a quiet machine")
        if env.get("governor") not in (None, "performance"):
            rep.warnings.append(f"CPU governor is {env['governor']!r}: the clock may change "
                                "during the run (use 'performance' for reproducible numbers)")
        if env.get("cpu_quota_cores") is not None:
            rep.warnings.append(f"the process runs under a CPU quota of "
                                f"{env['cpu_quota_cores']:g} core(s)")
        if s.threads > len(env.get("affinity") or [1]):
            rep.warnings.append(f"{s.threads} threads on {len(env['affinity'])} usable cores")
    if budget_ms is not None:
        apply_budget(rep, budget_ms, percentile)
    rep.seconds = time.perf_counter() - t0
    return rep
