"""The install transaction, run on the device (the agent package's rule: standard library,
numpy, onnxruntime, cryptography; nothing else from edgeops).

    preflight -> verify (+ extract into the idle slot) -> stage -> health -> switch -> postcheck -> commit

Every step is written to the state file before it is acted on. A failure at any step leaves,
or puts back, the previous model as current and reports a typed reason:

    PREFLIGHT  the device cannot take the bundle (space, ISA, runtime, not enrolled, busy)
    VERIFY     signatures, hashes, target, expiry, or rollback against THIS device's state
    HEALTH     the reference inputs do not give the reference outputs on this device
    SLO        the latency measured on this device misses the bundle's SLO
    SWITCH     the model at the stable path does not load or answer after the switch
    TIMEOUT    the transaction ran past its deadline (checked between steps)

Crash recovery (`Agent.recover`, run first by every agent command): a transaction found in the
state file was interrupted. Up to and including postcheck it is rolled back (current is put
back on the previous slot; the new slot is emptied); at commit, the post-switch check had
passed, so the commit is completed. Either way exactly one working model is current once a
first install committed.

Mender's ArtifactCommit and RAUC's mark-good are the anchors: nothing is committed before the
model was checked where it will run. Neither checks a model's outputs or latency; this does.
The transaction does not care how the bundle arrived (SSH upload today, an HTTP pull later):
it takes a path.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import state as S
from . import verifier as v
from .slots import MANIFEST, MODEL_LINK, Layout

AGENT_VERSION = "0.1.0"
PROTOCOL = 1            # what the host must understand to talk to this agent (status/install JSON)

STEPS = ("preflight", "verify", "stage", "health", "switch", "postcheck", "commit")
REASONS = ("PREFLIGHT", "VERIFY", "HEALTH", "SLO", "SWITCH", "TIMEOUT")
# fault injection for the crash tests: SIGKILL this process right after recording STEP
FAULT_ENV = "EDGEOPS_AGENT_KILL_AT"


class InstallFailed(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


@dataclass
class Step:
    step: str
    ok: bool
    seconds: float
    detail: str = ""

    def to_dict(self) -> dict:
        return {"step": self.step, "ok": self.ok, "seconds": round(self.seconds, 4), "detail": self.detail}


@dataclass
class InstallResult:
    bundle: str
    ok: bool = False
    name: str | None = None
    version: str | None = None
    reason: str | None = None          # one of REASONS when not ok
    message: str = ""
    steps: list[Step] = field(default_factory=list)
    slot: str | None = None
    previous: str | None = None        # the version current before (None on a first install)
    already_installed: bool = False
    rolled_back: bool = False          # the switch had happened and was undone
    health: dict | None = None
    verify: dict | None = None

    def require(self) -> "InstallResult":
        if not self.ok:
            raise InstallFailed(self.reason or "VERIFY", self.message)
        return self

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "ok": self.ok, "name": self.name, "version": self.version,
                "reason": self.reason, "message": self.message, "steps": [s.to_dict() for s in self.steps],
                "slot": self.slot, "previous": self.previous, "already_installed": self.already_installed,
                "rolled_back": self.rolled_back, "health": self.health, "verify": self.verify}


def machine_isa(machine: str | None = None) -> str:
    m = (machine or platform.machine()).lower()
    return {"aarch64": "arm64", "arm64": "arm64", "x86_64": "x86_64", "amd64": "x86_64",
            "armv7l": "arm", "armv6l": "arm"}.get(m, m)


def _version_tuple(text: str) -> tuple:
    out = []
    for part in str(text).split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def runtime_info() -> dict:
    import numpy
    import onnxruntime

    return {"python": platform.python_version(), "numpy": numpy.__version__,
            "onnxruntime": onnxruntime.__version__, "machine": platform.machine(), "isa": machine_isa()}


def preflight_problems(manifest: dict, bundle_bytes: int, free_bytes: int, target: str | None,
                       runtime: dict) -> list[str]:
    """What stops this device from taking a bundle with MANIFEST (unverified at this point: the
    verifier re-checks everything that matters for security)."""
    problems = []
    payload = sum(int(f.get("size", 0)) for n, f in (manifest.get("files") or {}).items()
                  if isinstance(f, dict) and n.startswith(v.PAYLOAD_DIR))
    need = payload + bundle_bytes // 10 + (1 << 20)     # the extracted payload plus headroom
    if free_bytes < need:
        problems.append(f"{free_bytes / 2**20:.1f} MiB free, the payload needs {need / 2**20:.1f} MiB "
                        "(the bundle is kept until the install ends)")
    if target is not None and manifest.get("target") != target:
        problems.append(f"bundle is for target {manifest.get('target')!r}, this device is {target!r}")
    rt = manifest.get("runtime") or {}
    isa = rt.get("isa")
    if isa and isa != runtime["isa"]:
        problems.append(f"bundle is built for ISA {isa}, this device is {runtime['isa']} ({runtime['machine']})")
    need_ort = rt.get("min_version")
    if need_ort and _version_tuple(runtime["onnxruntime"]) < _version_tuple(need_ort):
        problems.append(f"the model needs onnxruntime >= {need_ort} (opset {rt.get('opset')}), "
                        f"this device has {runtime['onnxruntime']}")
    for d in rt.get("domains") or []:
        if d not in ("ai.onnx.ml", "com.microsoft"):
            problems.append(f"the model uses operator domain {d!r}, which onnxruntime does not ship")
    return problems


def health_verdict(hr: dict) -> tuple[str, str] | None:
    """(reason, message) for a failed health report (health.run), None when it passed. The host's
    `bundle verify --health` uses this too, so host and device name a failure the same way."""
    if hr.get("passed"):
        return None
    if hr.get("error"):
        return "HEALTH", hr["error"]
    bad = [n for n, o in hr.get("outputs", {}).items() if not o["passed"]]
    if bad:
        o = hr["outputs"][bad[0]]
        detail = (f"max abs {o['max_abs']:.3g} > atol {o['atol']:.3g}" if "max_abs" in o
                  else o.get("reason", "mismatch"))
        return "HEALTH", f"reference output {bad[0]!r} differs on this device: {detail}"
    s = hr.get("slo") or {}
    return "SLO", (f"{s.get('percentile')} latency {s.get('measured_ms', float('nan')):.3f} ms on this device "
                   f"exceeds the SLO {s.get('limit_ms')} ms")


class Agent:
    """One device's agent: ROOT is its folder (slots.Layout)."""

    def __init__(self, root: str | Path, *, now=None):
        self.layout = Layout(root)
        self.now = now

    # ------------------------------------------------------------------ basics
    def device(self) -> dict:
        try:
            d = json.loads(self.layout.device_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise S.StateError(f"{self.layout.device_file}: unreadable ({exc})") from None
        return d if isinstance(d, dict) else {}

    def load(self) -> dict:
        return S.load(self.layout.root, AGENT_VERSION)

    def save(self, st: dict) -> None:
        st["agent"] = AGENT_VERSION
        S.save(self.layout.root, st)

    def _lock(self):
        self.layout.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.layout.lock_file), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InstallFailed("PREFLIGHT", "another install or rollback is running on this device") from None
        return fd

    @staticmethod
    def _unlock(fd) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _event(self, st: dict, name: str | None, what: str, **detail) -> None:
        """An install event: into the state file's recent events and the telemetry spool (where a
        collector picks it up with the rest; a spool that cannot be written never fails the install)."""
        from .spool import record_event

        S.event(st, name, what, **detail)
        record_event(self.layout.root, name, detail.get("version"), {"event": what, **detail})

    def _record(self, st: dict, txn: dict, step: str) -> None:
        """Write STEP to the state file before doing it; the crash tests stop here."""
        txn["step"] = step
        st["transaction"] = txn
        self.save(st)
        if os.environ.get(FAULT_ENV) == step:
            os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------------ install
    def install(self, bundle: str | Path, *, timeout: float | None = None, threads: int = 1,
                health_runs: int = 30, allow_same_version: bool = False) -> InstallResult:
        res = InstallResult(str(bundle))
        deadline = time.monotonic() + timeout if timeout else None
        return self._under_lock(res, lambda: self._install(Path(bundle), res, deadline, threads, health_runs,
                                                           allow_same_version))

    def _under_lock(self, res: InstallResult, work) -> InstallResult:
        """Run WORK holding the device lock, after recovering a crashed transaction; a busy
        device is a PREFLIGHT refusal in RES."""
        try:
            fd = self._lock()
        except InstallFailed as exc:
            res.reason, res.message = exc.reason, exc.message
            return res
        try:
            self._recover_locked()
            return work()
        finally:
            self._unlock(fd)

    def _install(self, bundle: Path, res: InstallResult, deadline, threads, health_runs,
                 allow_same_version) -> InstallResult:
        L = self.layout
        st = self.load()
        txn = None
        step_t = time.monotonic()

        def done(step: str, detail: str = "") -> None:
            nonlocal step_t
            t = time.monotonic()
            res.steps.append(Step(step, True, t - step_t, detail))
            step_t = t
            if deadline is not None and t > deadline and step != "commit":
                raise InstallFailed("TIMEOUT", f"the install ran past its deadline after {step}")

        def fail(step: str, reason: str, message: str) -> None:
            res.steps.append(Step(step, False, time.monotonic() - step_t, message))
            raise InstallFailed(reason, message)

        try:
            # ---- preflight (on the unverified manifest: estimates and early refusals only)
            dev = self.device()
            if not dev.get("target"):
                fail("preflight", "PREFLIGHT", f"this device is not enrolled ({L.device_file} has no target)")
            try:
                entries, env = v.peek(bundle)
            except (v.Refused, OSError) as exc:
                fail("preflight", "VERIFY", f"not a readable bundle: {exc}")
            peeked = env["signed"]
            name = peeked.get("name")
            # one path component (it names the model's folder), before anything is trusted
            if not isinstance(name, str) or len(name) > 128 or not v.NAME_OK.fullmatch(name):
                fail("preflight", "VERIFY", f"the bundle's model name {name!r} is not a valid name")
            res.name, res.version = name, peeked.get("version")
            sha = v.manifest_sha256(peeked)
            model = st["models"].get(name)
            cur = L.current_slot(name)
            if model and model.get("manifest_sha256") == sha and cur == model.get("slot"):
                res.ok, res.already_installed, res.slot = True, True, cur
                res.message = f"{name}:{res.version} is already installed (slot {cur})"
                done("preflight", "already installed")
                return res
            free = L.free_bytes()
            problems = preflight_problems(peeked, bundle.stat().st_size, free, dev["target"], runtime_info())
            if problems:
                fail("preflight", "PREFLIGHT", "; ".join(problems))
            slot = L.other(cur)
            res.slot, res.previous = slot, (model or {}).get("version")
            txn = {"id": uuid.uuid4().hex[:12], "kind": "install", "name": name, "version": res.version,
                   "bundle": str(bundle), "manifest_sha256": sha, "slot": slot, "previous_slot": cur,
                   "started": S.now_text()}
            done("preflight", f"{free / 2**20:.0f} MiB free, target {dev['target']}, "
                              f"isa {machine_isa()}")

            # ---- verify, extracting into the idle slot in the same read (the bytes hashed are
            # the bytes installed); the idle slot held the version before the current one
            self._record(st, txn, "verify")
            if model and model.get("previous"):
                model["previous"] = None           # its slot is about to be overwritten
                self.save(st)
            L.model_dir(name).mkdir(parents=True, exist_ok=True)
            L.clear_slot(name, slot)
            trusted = v.load_trust(L.trust)
            # anti-rollback per model name: the highest counter this device committed for NAME
            # (a multi-model device must take a bundle of B built before the last one of A)
            installed = v.Installed((model or {}).get("counter"), (model or {}).get("version"), name)
            vr = v.verify_bundle(bundle, trusted, target=dev["target"], installed=installed, now=self.now,
                                 allow_same_version=allow_same_version, extract_to=L.slot(name, slot))
            res.verify = {k: x for k, x in vr.to_dict().items() if k != "manifest"}
            if not vr.ok:
                fail("verify", "VERIFY", "; ".join(f"{f.code}: {f.message}" for f in vr.failures))
            manifest = vr.manifest
            txn["counter"] = manifest["counter"]
            done("verify", ", ".join(vr.checked))

            # ---- stage: the stable model link and the verified manifest inside the slot; root
            # updates parked beside the transaction, to be kept only at commit
            self._record(st, txn, "stage")
            model_rel = manifest["model"][len(v.PAYLOAD_DIR):]
            L.finish_stage(name, slot, model_rel, v.canonical(manifest))
            park = self._txn_dir(txn)
            park.mkdir(parents=True, exist_ok=True)
            for i, data in enumerate(vr.root_updates):
                S.write_atomic(park / f"{i:04d}.root.json", data)
            done("stage", f"slot {slot}")

            # ---- health on this device
            self._record(st, txn, "health")
            from . import health

            slo_threads = (manifest.get("slo") or {}).get("threads") or threads
            hr = health.run(L.slot(name, slot), manifest, threads=slo_threads, runs=health_runs)
            res.health = hr
            verdict = health_verdict(hr)
            if verdict:
                fail("health", *verdict)
            lat = hr.get("latency_ms", {})
            done("health", f"references match; p50 {lat.get('p50', 0):.3f} ms, p99 {lat.get('p99', 0):.3f} ms"
                 + (f" (SLO {hr['slo']['limit_ms']} ms)" if "slo" in hr else ""))

            # ---- switch
            self._record(st, txn, "switch")
            L.switch(name, slot)
            done("switch", f"current -> {slot}")

            # ---- postcheck: what the app will load, through the stable path
            self._record(st, txn, "postcheck")
            problem = self._postcheck(name, manifest)
            if problem:
                fail("postcheck", "SWITCH", problem)
            done("postcheck", f"{L.stable_model_path(name)} loads and answers")

            # ---- commit
            self._record(st, txn, "commit")
            self._commit(st, txn, hr)
            done("commit", f"{name}:{res.version} counter {manifest['counter']}")
            res.ok = True
            self._warm_chunks()
            res.message = f"{name}:{res.version} installed in slot {slot}"
            return res
        except InstallFailed as exc:
            res.reason, res.message = exc.reason, exc.message
            if txn is not None:
                res.rolled_back = self._undo(st, txn, f"{exc.reason}: {exc.message}")
            else:
                self._event(st, res.name, "refused", reason=exc.reason, message=exc.message)
                self.save(st)
            return res

    def _warm_chunks(self) -> None:
        """After a commit: index the chunks of what this device now holds, in a detached
        process, so the install answers at once and the next delta listing is a file read
        (best effort: a listing recomputes whatever the cache lacks)."""
        import subprocess
        import sys

        pkg = Path(__file__).resolve().parent
        env = {**os.environ, "PYTHONPATH": str(pkg.parent)}
        try:
            subprocess.Popen([sys.executable, "-m", pkg.name, "--root", str(self.layout.root), "chunks"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, env=env, cwd="/")
        except OSError:  # an optimisation must never fail an installed model
            pass

    def _txn_dir(self, txn: dict) -> Path:
        return self.layout.incoming / f"txn-{txn['id']}"

    def _postcheck(self, name: str, manifest: dict) -> str | None:
        from . import health

        link = self.layout.current_link(name)
        if not self.layout.stable_model_path(name).exists():
            return f"{self.layout.stable_model_path(name)} does not exist after the switch"
        hr = health.run(link, manifest, runs=1, check_slo=False)
        if not hr.get("passed"):
            return "the model at the stable path " + (hr.get("error") or "gives other outputs than in the health check")
        return None

    def _commit(self, st: dict, txn: dict, health_report: dict | None) -> None:
        """The model becomes the installed one; a newer trust root it carried is kept now."""
        L = self.layout
        park = self._txn_dir(txn)
        if park.is_dir():
            for p in sorted(park.glob("*.root.json")):
                v.save_trust(L.trust, p.read_bytes())
        name = txn["name"]
        old = st["models"].get(name)
        entry = {"slot": txn["slot"], "version": txn["version"], "counter": txn.get("counter"),
                 "manifest_sha256": txn["manifest_sha256"], "installed_at": S.now_text(),
                 "health": _health_summary(health_report), "previous": None}
        if old and txn.get("previous_slot"):
            entry["previous"] = {k: old.get(k) for k in ("slot", "version", "counter", "manifest_sha256")}
            entry["previous"]["slot"] = txn["previous_slot"]
        if txn.get("kind") == "rollback":
            entry["counter"] = txn["keep_counter"]      # the high-water mark stays
        st["models"][name] = entry
        st["transaction"] = None
        self._event(st, name, "installed" if txn.get("kind") != "rollback" else "rolled back",
                version=txn["version"], slot=txn["slot"])
        self.save(st)
        shutil.rmtree(park, ignore_errors=True)

    def _undo(self, st: dict, txn: dict, why: str) -> bool:
        """Put the previous model back as current (idempotent: a crash here is undone again).
        Returns whether a switch had to be reverted."""
        L = self.layout
        name, prev = txn["name"], txn.get("previous_slot")
        switched = L.current_slot(name) == txn["slot"] and txn["slot"] != prev
        if switched:
            if prev is not None:
                L.switch(name, prev)
            else:
                L.remove_current(name)
        if txn.get("kind") != "rollback" and L.current_slot(name) != txn["slot"]:
            L.clear_slot(name, txn["slot"])
        shutil.rmtree(self._txn_dir(txn), ignore_errors=True)
        st["transaction"] = None
        self._event(st, name, "rolled back" if switched else "not installed", version=txn.get("version"),
                step=txn.get("step"), why=why[:500])
        self.save(st)
        return switched

    # ------------------------------------------------------------------ recovery
    def recover(self) -> list[str]:
        fd = self._lock()
        try:
            return self._recover_locked()
        finally:
            self._unlock(fd)

    def _recover_locked(self) -> list[str]:
        st = self.load()
        txn = st.get("transaction")
        if not txn:
            return []
        step = txn.get("step")
        if step == "commit":
            # the post-switch check had passed: finish what the killed agent was committing
            # (its health figures died with it: none are recorded rather than the old model's)
            self._commit(st, txn, None)
            return [f"{txn['name']}: completed the commit of {txn.get('version')} interrupted by a crash"]
        self._undo(st, txn, f"interrupted at step {step} (agent or device stopped)")
        return [f"{txn['name']}: rolled back the {txn.get('kind', 'install')} of {txn.get('version')} "
                f"interrupted at step {step}"]

    # ------------------------------------------------------------------ rollback
    def rollback(self, name: str, *, threads: int = 1) -> InstallResult:
        """Make the version kept in the idle slot current again, after checking it here."""
        res = InstallResult(f"rollback:{name}", name=name)
        return self._under_lock(res, lambda: self._rollback(name, res, threads))

    def _rollback(self, name: str, res: InstallResult, threads: int) -> InstallResult:
        st = self.load()
        model = st["models"].get(name)
        prev = (model or {}).get("previous")
        L = self.layout
        t0 = time.monotonic()
        if not model:
            res.reason, res.message = "PREFLIGHT", f"no model named {name!r} is installed"
            return res
        if not prev or not (L.slot(name, prev["slot"]) / MANIFEST).is_file():
            res.reason, res.message = "PREFLIGHT", f"{name} has no previous version kept on this device"
            return res
        manifest = json.loads((L.slot(name, prev["slot"]) / MANIFEST).read_bytes())
        from . import health

        hr = health.run(L.slot(name, prev["slot"]), manifest, threads=threads, runs=5, check_slo=False)
        if not hr.get("passed"):
            res.reason = "HEALTH"
            res.message = (f"the previous version {prev['version']} no longer passes its health check: "
                           + (hr.get("error") or "reference outputs differ"))
            return res
        res.steps.append(Step("health", True, time.monotonic() - t0, f"{prev['version']} references match"))
        txn = {"id": uuid.uuid4().hex[:12], "kind": "rollback", "name": name, "version": prev["version"],
               "manifest_sha256": prev.get("manifest_sha256"), "slot": prev["slot"],
               "previous_slot": model["slot"], "started": S.now_text(),
               # the high-water mark stays: the version rolled back from is not accepted
               # again; the fix for it is a newer bundle
               "keep_counter": model.get("counter")}
        self._record(st, txn, "switch")
        L.switch(name, prev["slot"])
        self._record(st, txn, "postcheck")
        problem = self._postcheck(name, manifest)
        if problem:
            res.reason, res.message = "SWITCH", problem
            res.rolled_back = self._undo(st, txn, problem)
            return res
        self._record(st, txn, "commit")
        self._commit(st, txn, hr)
        res.steps.append(Step("switch", True, time.monotonic() - t0, f"current -> {prev['slot']}"))
        res.ok, res.version, res.slot, res.previous = True, prev["version"], prev["slot"], model["version"]
        res.message = f"{name} rolled back from {model['version']} to {prev['version']} (slot {prev['slot']})"
        return res

    # ------------------------------------------------------------------ status and gc
    def status(self, runtime: bool = True) -> dict:
        """What this device runs. RUNTIME=False skips importing onnxruntime for its version (a
        deploy asks before every upload; the install imports it anyway)."""
        st = self.load()
        L = self.layout
        models = {}
        for name, m in sorted(st["models"].items()):
            on_disk = L.current_slot(name)
            models[name] = {**m, "slot_on_disk": on_disk, "consistent": on_disk == m.get("slot"),
                            "path": str(L.stable_model_path(name)),
                            "exists": L.stable_model_path(name).exists()}
        return {"agent": AGENT_VERSION, "protocol": PROTOCOL, "schema": S.SCHEMA, "root": str(L.root),
                "device": self.device(), "runtime": runtime_info() if runtime else None,
                "free_bytes": L.free_bytes(),
                "models": models, "transaction": st.get("transaction"),
                "events": st.get("events", [])[-20:]}

    @property
    def chunk_cache(self) -> Path:
        return self.layout.root / "chunks-cache.json"

    def delta_sources(self) -> list[Path]:
        """Files this device holds that a delta may reuse chunks of: every slot's payload and
        the bundles in incoming/ (never a partial upload)."""
        L = self.layout
        out = []
        for name in L.names():
            for slot in ("a", "b"):
                d = L.slot(name, slot)
                if d.is_dir():
                    out += sorted(p for p in d.rglob("*") if p.is_file() and not p.is_symlink())
        if L.incoming.is_dir():
            out += sorted(p for p in L.incoming.glob("*.bundle") if p.is_file() and not p.is_symlink())
        return out

    def gc(self) -> dict:
        """Remove what no model needs: received bundles, stale partial uploads and transaction
        folders, slots of models that were never committed."""
        fd = self._lock()
        try:
            self._recover_locked()
            st = self.load()
            L = self.layout
            freed, removed = 0, []
            if L.incoming.is_dir():
                for p in L.incoming.iterdir():
                    freed += _size(p)
                    removed.append(p.name)
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            for name in L.names():
                m = st["models"].get(name)
                keep = {m["slot"], (m.get("previous") or {}).get("slot")} if m else set()
                for s in ("a", "b"):
                    for p in (L.slot(name, s), L.slot(name, s).with_name(s + ".partial")):
                        if p.exists() and (s not in keep or p.name.endswith(".partial")):
                            freed += _size(p)
                            removed.append(str(p.relative_to(L.root)))
                            shutil.rmtree(p)
                if not m and not L.current_slot(name):
                    shutil.rmtree(L.model_dir(name), ignore_errors=True)
            return {"freed_bytes": freed, "removed": removed}
        finally:
            self._unlock(fd)


def _size(p: Path) -> int:
    if p.is_symlink() or p.is_file():
        return p.lstat().st_size
    return sum(f.lstat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def _health_summary(hr: dict | None) -> dict | None:
    if not hr:
        return None
    out = {"passed": bool(hr.get("passed")), "at": S.now_text()}
    if hr.get("latency_ms"):
        out["latency_ms"] = {k: hr["latency_ms"][k] for k in ("p50", "p99") if k in hr["latency_ms"]}
    if hr.get("slo"):
        out["slo"] = hr["slo"]
    return out
