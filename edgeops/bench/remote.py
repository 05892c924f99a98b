"""On-device measurement: copy the model, its inputs and the standalone runner to the device
over the fleet SSH transport, run it with the device's own python and onnxruntime, and bring
back the runner's report (same schema as a local run, with the device's environment)."""

from __future__ import annotations

import posixpath
import shlex
from pathlib import Path
from typing import Callable

from ..errors import EXIT_ENV, UsageError
from ..formats.onnx import external_files
from .measure import RUNNER, RunnerError, Settings, parse_runner

PREFLIGHT = ("import sys, platform\n"
             "try:\n"
             "    import numpy, onnxruntime\n"
             "except ImportError as e:\n"
             "    print('MISSING', e.name); sys.exit(0)\n"
             "print('OK', platform.python_version(), numpy.__version__, onnxruntime.__version__,"
             " platform.machine())\n")


class DeviceEnvError(RunnerError):
    """The device lacks python, numpy or onnxruntime."""

    exit_code = EXIT_ENV


def preflight(conn, python: str, where: str) -> dict:
    """Python, numpy and onnxruntime versions on the device, or one clear error."""
    r = conn.run([python, "-c", PREFLIGHT], timeout=60)
    if r.rc == 127 or (r.rc != 0 and "not found" in r.stderr):
        raise DeviceEnvError(f"{where}: no python at {python!r} on the device",
                             hint="install python3 there, or name it: --python /path/to/python3 "
                                  "(edgeops devices add ... --python)")
    if r.rc != 0:
        raise DeviceEnvError(f"{where}: {python} failed on the device: "
                             f"{(r.stderr.strip().splitlines() or ['exit ' + str(r.rc)])[-1][:300]}")
    words = r.stdout.split()
    if words[:1] == ["MISSING"]:
        name = words[1] if len(words) > 1 else "a module"
        raise DeviceEnvError(f"{where}: {name} is not installed for {python} on the device",
                             hint=f"on the device: {python} -m pip install onnxruntime numpy")
    if words[:1] != ["OK"] or len(words) < 5:
        raise DeviceEnvError(f"{where}: unexpected answer from {python}: {r.stdout[:200]!r}")
    return {"python": words[1], "numpy": words[2], "onnxruntime": words[3], "arch": words[4]}


def run_remote(device, model: Path, feeds_path: Path, s: Settings, *,
               accept_new_host_key: bool = False) -> tuple[dict, dict]:
    """(runner report, device record). `device` is an inventory Device."""
    runs, record = run_remote_many(device, [(model, feeds_path)], s,
                                   accept_new_host_key=accept_new_host_key)
    return runs[0], record


def run_remote_many(device, jobs: list[tuple[Path, Path]], s: Settings, *,
                    accept_new_host_key: bool = False,
                    progress: Callable[[int, int, str], None] | None = None
                    ) -> tuple[list[dict], dict]:
    """Measure several (model, inputs) pairs on one device over one connection, one after
    the other, each in its own runner process. Returns the runner reports and the device
    record (address, pinned host key, python/numpy/onnxruntime versions)."""
    from ..fleet.ssh import connect

    target = device.ssh_target()
    where = f"device {device.name} ({target.user}@{target.host}:{target.port})"
    with connect(target, accept_new_host_key=accept_new_host_key) as conn:
        versions = preflight(conn, device.python, where)
        r = conn.run("mktemp -d \"${TMPDIR:-/tmp}/edgeops-bench.XXXXXX\"", timeout=30)
        if r.rc != 0 or not r.stdout.strip():
            raise DeviceEnvError(f"{where}: cannot create a work folder: {r.stderr.strip()[:200]}")
        work = r.stdout.strip()
        runner = posixpath.join(work, "bench_runner.py")
        out = []
        try:
            conn.put(RUNNER, runner)
            sent: dict[tuple[Path, Path], tuple[str, str]] = {}   # each pair is copied once
            for i, (model, feeds_path) in enumerate(jobs):
                if progress:
                    progress(i + 1, len(jobs), model.name)
                if (model, feeds_path) not in sent:
                    sub = posixpath.join(work, str(len(sent)))
                    rmodel = posixpath.join(sub, model.name)
                    conn.put(model, rmodel)                     # put creates the folder
                    for loc in sorted(external_files(model)):   # weights beside the .onnx
                        if posixpath.isabs(loc) or ".." in loc.split("/"):
                            raise UsageError(f"{model}: external data {loc!r} lies outside the "
                                             "model's folder; it is not copied to a device")
                        conn.put(model.parent / loc, posixpath.join(sub, loc))
                    rfeeds = posixpath.join(sub, "inputs.npz")
                    conn.put(feeds_path, rfeeds)
                    sent[(model, feeds_path)] = (rmodel, rfeeds)
                rmodel, rfeeds = sent[(model, feeds_path)]
                res = conn.run([device.python, runner, rmodel, "--inputs", rfeeds,
                                *s.runner_args()], timeout=s.timeout())
                out.append(parse_runner(res.rc, res.stdout, res.stderr, where))
        finally:
            conn.run(f"rm -rf {shlex.quote(work)}", timeout=30)
        record = {"name": device.name, "host": target.host, "port": target.port,
                  "user": target.user, "host_key": conn.host_key, **versions}
    return out, record
