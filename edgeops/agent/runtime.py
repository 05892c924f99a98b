"""The runtime an app uses on the device: the current model of a name, run with onnxruntime, with
telemetry recorded for the version that answered. numpy + onnxruntime + standard library (the
agent package's rule).

    rt = Runtime(ROOT, "kws")            # ROOT: the agent's folder on the device
    outputs = rt.run({"input": x})       # a list, like InferenceSession.run(None, feeds)
    rt.close()                           # flushes what is still in memory

A switch to the other slot (an install or a rollback) is picked up without a restart and without
a failed request: a watcher thread notices the `current` link (or the manifest in it) changed,
loads the new model beside the old one, then swaps a single reference. Requests already running
finish on the model they started with, and are recorded under that model's version.

What a request costs on top of `session.run`: two clock reads, a finiteness check (one sum) and a
shape check of the outputs, one tuple appended to a deque (no lock), and, for as many requests as
fit in 0.5 % of the time spent in the model plus 5 us per request, one feature reduction per tensor
(a channel mean or a small copy): a cheap model with big inputs gets its drift from a sample of its
requests (each window's `n` says how many). Histogram buckets, binning, device health and every
spool write happen in the flush thread, so inference never waits on the disk. Raw inputs are never
recorded unless `capture` (a sampling probability) is set, and then within `capture_bytes`.

Errors recorded per window: `exception` (the model raised), `shape` (inputs or outputs of the
wrong shape), `nonfinite` (NaN or inf in a float output). The request still raises, or returns
the non-finite output: the runtime records, the app decides.
"""

from __future__ import annotations

import base64
import collections
import io
import json
import math
import os
import random
import threading
import time
from pathlib import Path

import numpy as np

from . import profile as P
from .ort import describe, session
from .slots import MANIFEST, MODEL_LINK, Layout
from .spool import Spool, SpoolError, default_path, device_health

MAX_DRIFT_ROWS = 200_000      # feature rows kept per window and tensor before sampling stops
DRIFT_BUDGET = 0.005          # drift features take at most this share of the time spent in the model
DRIFT_FLOOR = 5e-6            # ... plus this much per request (tiny models: a sample of their requests)
SMALL_OUTPUT = 1024           # outputs up to this many values are checked for NaN/inf without numpy


class NoModel(Exception):
    """No current model of that name on this device."""


class _Model:
    """One loaded version: the session and what telemetry needs to know about it."""

    def __init__(self, layout: Layout, name: str, threads: int):
        try:
            # the link is read once; every path below is the slot's own, so a switch landing
            # meanwhile cannot pair one version's session with another's manifest
            self.key = _key(layout, name)
            self.slot = self.key[0]
            folder = layout.slot(name, self.slot)
            doc = json.loads((folder / MANIFEST).read_text())
            self.manifest = doc.get("signed", doc)
        except (OSError, ValueError, KeyError) as exc:
            raise NoModel(f"no current model {name!r} under {layout.models} ({exc})") from None
        self.name, self.version = name, self.manifest["version"]
        self.session = session(folder / MODEL_LINK, threads)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        prof = ((self.manifest.get("telemetry") or {}).get("profile")) or {}
        # copies: binning caches its edge matrix in the profile dict, never in the manifest's
        self.in_prof = {k: dict(p) for k, p in (prof.get("inputs") or {}).items() if k in self.inputs}
        self.out_prof = {k: dict(p) for k, p in (prof.get("outputs") or {}).items() if k in self.outputs}
        # expected per-sample output shapes (axis 0 is the batch) from the health references
        exp = (self.manifest.get("health") or {}).get("expected") or {}
        self.out_shape = {n: tuple(e["shape"][1:]) for n, e in exp.items() if len(e.get("shape", [])) >= 1}
        outs = self.session.get_outputs()
        # (index, float64?) of float outputs: a float64 sum can overflow on large finite values
        self.float_out = [(i, o.type == "tensor(double)") for i, o in enumerate(outs)
                          if o.type in ("tensor(float)", "tensor(float16)", "tensor(double)")]
        # the version in the other slot (the one this replaced, or the one a rollback left): outputs
        # are also binned with ITS reference bins, so the rollout's gate compares the two versions
        # on this device bin for bin (features reduced the same way only)
        self.prev_version, self.prev_out_prof = None, {}
        try:
            other = layout.slot(name, Layout.other(self.slot)) / MANIFEST
            doc = json.loads(other.read_text())
            prev = doc.get("signed", doc)
            pprof = (((prev.get("telemetry") or {}).get("profile")) or {}).get("outputs") or {}
            if prev.get("version") != self.version:
                self.prev_version = prev.get("version")
                self.prev_out_prof = {k: dict(p) for k, p in pprof.items() if k in self.out_prof
                                      and (p.get("mode"), p.get("features"), p.get("per_sample"), p.get("classes"))
                                      == tuple(self.out_prof[k].get(x) for x in ("mode", "features", "per_sample", "classes"))}
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.shape_checks = [(i, self.out_shape[o.name]) for i, o in enumerate(outs) if o.name in self.out_shape]


def _key(layout: Layout, name: str) -> tuple:
    """What identifies the installed model of NAME: the current slot and its manifest file (a slot
    re-staged between two looks has a new manifest inode even if the link names the same slot)."""
    slot = os.readlink(layout.current_link(name))
    st = os.stat(layout.slot(name, slot) / MANIFEST)
    return slot, st.st_ino, st.st_mtime_ns


class _Window:
    __slots__ = ("t0", "count", "errors", "lat", "ins", "outs", "first_error", "rows")

    def __init__(self):
        self.t0 = time.time()
        self.count = 0
        self.errors: dict[str, int] = {}
        self.lat: dict[int, int] = {}
        self.ins: dict[str, list] = {}
        self.outs: dict[str, list] = {}
        self.first_error: str | None = None
        self.rows = 0


class Runtime:
    def __init__(self, root: str | Path, name: str, *, threads: int = 1, flush_s: float = 10.0,
                 health_s: float = 60.0, watch_s: float = 0.25, cap_bytes: int | None = None,
                 capture: float = 0.0, capture_bytes: int = 0, drift: bool = True, telemetry: bool = True):
        if capture and not capture_bytes:
            raise ValueError("capture needs capture_bytes (a cap on the raw inputs kept)")
        self.layout = Layout(root)
        self.name, self.threads = name, threads
        self.flush_s, self.health_s, self.watch_s = flush_s, health_s, watch_s
        self.capture, self.capture_bytes, self.drift = float(capture), int(capture_bytes), drift
        self.model = _Model(self.layout, name, threads)
        self._known = {self.model.version: self.model}     # versions with windows still in memory
        self.spool = None
        self.telemetry_error: str | None = None
        self._lost: dict[str, int] = {}
        if telemetry:
            try:
                self.spool = Spool(default_path(root), cap_bytes=cap_bytes)
            except SpoolError as exc:     # serving goes on; the app and the device's stderr hear why
                self.telemetry_error = str(exc)
                import sys

                sys.stderr.write(f"edgeops runtime: telemetry is OFF for {name}: {exc}\n")
        self._lock = threading.Lock()          # raw captures only
        self._pending: collections.deque = collections.deque()
        self._window_start = time.time()
        self._captured: list[tuple[str, float, dict]] = []
        self._captured_bytes = 0
        self._events: collections.deque = collections.deque()     # from the watcher thread
        self._stop = threading.Event()
        self._last_health = 0.0
        self._profiled: set[str] = set()     # versions whose profile record is in the spool
        self._model_time = self._drift_time = 0.0
        self._requests = 0
        self.reloads = 0
        self._threads = [threading.Thread(target=self._watch, name="edgeops-watch", daemon=True)]
        if self.spool is not None:
            self._threads.append(threading.Thread(target=self._flusher, name="edgeops-flush", daemon=True))
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ serving
    @property
    def version(self) -> str:
        return self.model.version

    def run(self, feeds: dict, names: list[str] | None = None) -> list:
        return self.infer(feeds, names)[0]

    def infer(self, feeds: dict, names: list[str] | None = None) -> tuple[list, str]:
        """Like run, and the version that answered (a switch may land between two requests)."""
        m = self.model                          # one version for the whole request
        t0 = time.perf_counter()
        try:
            outs = m.session.run(names, feeds)
        except Exception as exc:
            msg = describe(exc)
            kind = "shape" if any(s in msg.lower() for s in ("dimension", "rank", "shape")) else "exception"
            self._error(m, kind, msg)
            try:
                exc.edgeops_version = m.version
            except AttributeError:
                pass
            raise
        dt = time.perf_counter() - t0
        if self.spool is not None:
            self._record(m, dt, feeds, names, outs)
        return outs, m.version

    def _record(self, m: _Model, dt: float, feeds: dict, names, outs) -> None:
        """The request's share of the work: checks, and one tuple onto a deque (append is atomic:
        no lock). The flush thread turns the tuples into windows."""
        err = None
        if names is None:                       # all outputs, in the model's order: checks precomputed
            for i, is64 in m.float_out:
                o = outs[i]
                # any NaN or inf makes the float64 sum non-finite (a sum of float32/16 values cannot
                # overflow float64). Small outputs are summed in Python: right after a run, the first
                # numpy reduction costs ~15 us (caches evicted by the model), tolist ~3 us.
                if is64:
                    bad = not bool(np.isfinite(o).all())
                else:
                    bad = not math.isfinite(sum(o.ravel().tolist()) if o.size <= SMALL_OUTPUT
                                            else float(o.sum(dtype=np.float64)))
                if bad:
                    err = "nonfinite"
            for i, want in m.shape_checks:
                if outs[i].shape[1:] != want:
                    err = err or "shape"
        else:
            for name, o in zip(names, outs):
                if isinstance(o, np.ndarray):
                    if o.dtype.kind == "f" and not bool(np.isfinite(o).all()):
                        err = "nonfinite"
                    want = m.out_shape.get(name)
                    if want is not None and o.shape[1:] != want:
                        err = err or "shape"
        onames = names or m.outputs
        ins = outs_f = None
        self._model_time += dt
        self._requests += 1
        if self.drift and self._drift_time <= DRIFT_BUDGET * self._model_time + DRIFT_FLOOR * self._requests:
            t = time.perf_counter()
            try:
                ins = [(k, P.reduce(feeds[k], p)) for k, p in m.in_prof.items() if k in feeds]
                outs_f = [(k, P.reduce(o, m.out_prof[k])) for k, o in zip(onames, outs) if k in m.out_prof]
            except (ValueError, TypeError, IndexError):     # an empty batch, a scalar where a tensor was profiled
                ins = outs_f = None
            self._drift_time += time.perf_counter() - t
        self._pending.append((m.version, dt, err, ins, outs_f, None))
        if self.capture and random.random() < self.capture:
            with self._lock:
                self._capture(m, feeds)

    def _capture(self, m: _Model, feeds: dict) -> None:
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in feeds.items()})
        data = buf.getvalue()
        if self._captured_bytes + len(data) > self.capture_bytes:
            return
        self._captured_bytes += len(data)
        self._captured.append((m.version, time.time(), {"npz_b64": base64.b64encode(data).decode(),
                                                         "bytes": len(data)}))

    def _error(self, m: _Model, kind: str, msg: str) -> None:
        if self.spool is not None:
            self._pending.append((m.version, None, kind, None, None, msg[:300]))

    def _drain(self) -> dict[str, _Window]:
        """What requests left on the deque since the last flush, as one window per version."""
        windows: dict[str, _Window] = {}
        q = self._pending
        for _ in range(len(q)):             # only what is there now: later requests wait for the next flush
            version, dt, err, ins, outs_f, msg = q.popleft()
            w = windows.get(version)
            if w is None:
                w = windows[version] = _Window()
                w.t0 = self._window_start
            w.count += 1
            if dt is not None:
                b = P.bucket(dt)
                w.lat[b] = w.lat.get(b, 0) + 1
            if err:
                w.errors[err] = w.errors.get(err, 0) + 1
                w.first_error = w.first_error or msg or f"{err} in an output"
            if ins is not None and w.rows < MAX_DRIFT_ROWS:
                w.rows += 1
                for k, x in ins:
                    w.ins.setdefault(k, []).append(x)
                for k, x in outs_f:
                    w.outs.setdefault(k, []).append(x)
        return windows

    # ------------------------------------------------------------------ background
    def _watch(self) -> None:
        failed = None
        while not self._stop.wait(self.watch_s):
            try:
                key = _key(self.layout, self.name)
            except (OSError, ValueError):     # mid-switch, no model, a link to no slot:
                continue                        # keep serving the loaded one
            if key == self.model.key or key == failed:
                continue
            old = self.model
            try:
                new = _Model(self.layout, self.name, self.threads)
            except Exception as exc:  # noqa: BLE001 - keep serving the old model, say why (once per switch)
                failed = key
                self._events.append(("event", old.version, {"event": "reload failed", "error": str(exc)[:300]}))
                continue
            self._known = {old.version: old, new.version: new}
            self.model = new
            self.reloads += 1
            self._events.append(("event", new.version, {"event": "runtime switched", "from": old.version,
                                                        "to": new.version, "slot": new.slot}))

    def _flusher(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception as exc:  # noqa: BLE001 - the flush thread must outlive one bad window
                import sys

                sys.stderr.write(f"edgeops runtime: flush failed ({type(exc).__name__}: {exc})\n")

    def flush(self) -> list[int]:
        """Write what is in memory to the spool (the flush thread does this every flush_s)."""
        if self.spool is None:
            return []
        with self._lock:
            captured, self._captured, self._captured_bytes = self._captured, [], 0
        now = time.time()
        windows = self._drain()
        self._window_start = now
        events = [self._events.popleft() for _ in range(len(self._events))]
        rows = []
        for version, w in windows.items():
            m = self._known.get(version)
            body = {"t0": w.t0, "t1": now, "count": w.count, "errors": w.errors, "lat": w.lat}
            if w.first_error:
                body["first_error"] = w.first_error
            if m is not None:
                body["inputs"] = _binned(w.ins, m.in_prof)
                body["outputs"] = _binned(w.outs, m.out_prof)
                if m.prev_out_prof:
                    body["outputs_prev"] = {"version": m.prev_version, "outputs": _binned(w.outs, m.prev_out_prof)}
            rows.append(("window", self.name, version, now, body))
        for version, t, body in captured:
            rows.append(("sample", self.name, version, t, body))
        for kind, version, body in events:
            rows.append((kind, self.name, version, now, body))
        new_profiles = []
        for version, m in list(self._known.items()):
            tele = m.manifest.get("telemetry") or {}
            if version not in self._profiled and tele.get("profile"):
                # what the host needs to read this version's windows: the reference bins and the SLO
                rows.append(("profile", self.name, version, now, {"profile": tele["profile"], "source": tele.get("source"),
                                                                  "slo": m.manifest.get("slo")}))
                new_profiles.append(version)
        if now - self._last_health >= self.health_s:
            self._last_health = now
            rows.append(("health", None, None, now, device_health(self.layout.root, self.spool)))
        try:
            seqs = self.spool.append(rows, lost=self._lost)
            self._lost = {}
            self._profiled.update(new_profiles)
            return seqs
        except Exception as exc:  # noqa: BLE001 - a full disk must not stop inference
            import sys

            for r in rows:          # counted, and reported as dropped by the next write that succeeds
                self._lost[r[0]] = self._lost.get(r[0], 0) + 1
            sys.stderr.write(f"edgeops runtime: telemetry not written ({exc}); {len(rows)} record(s) lost\n")
            return []

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)         # a flush in progress finishes before the last one starts
        # an older window recorded while a switch happened keeps its own model's profile
        self.flush()
        if self.spool is not None:
            self.spool.close()


def _binned(feats: dict[str, list], profs: dict) -> dict:
    out = {}
    for k, rows in feats.items():
        rows = [r for r in rows if r is not None and len(r)]
        if not rows or k not in profs:
            continue
        try:
            x = np.concatenate(rows, axis=0)
            out[k] = {"n": int(x.shape[0]), "counts": P.bin_counts(x, profs[k])}
        except ValueError:      # rows of another shape (a version re-released with another profile)
            continue
    return out


def random_inputs(manifest: dict, rng: np.random.Generator, shift: float = 0.0) -> dict:
    """Inputs shaped like the bundle's reference inputs, drawn like its profile data: floats
    normal with the profile's mean and std (+ SHIFT standard deviations), integers 0..9 (ones for
    masks), bools random."""
    prof = (((manifest.get("telemetry") or {}).get("profile")) or {}).get("inputs") or {}
    feeds = {}
    for name, ref in (manifest.get("health") or {}).get("inputs", {}).items():
        shape, dt = tuple(ref["shape"]), np.dtype(ref["dtype"])
        p = prof.get(name) or {}
        if dt.kind == "f":
            mean, std = float(p.get("mean", 0.0)), float(p.get("std", 1.0)) or 1.0
            feeds[name] = (rng.standard_normal(shape) * std + mean + shift * std).astype(dt)
        elif dt.kind in "iu":
            feeds[name] = np.ones(shape, dt) if "mask" in name.lower() else (rng.integers(0, 10, shape) + int(shift)).astype(dt)
        elif dt.kind == "b":
            feeds[name] = rng.random(shape) < 0.5
        else:
            raise ValueError(f"cannot generate inputs of dtype {dt} for {name!r}")
    return feeds
