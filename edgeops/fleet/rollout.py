"""Fleet rollout: the plan (plan.py) executed device by device with `deploy` (deploy.py), in
parallel, with every transition journaled (journal.py) before it is acted on.

A controller killed at any moment is resumed with `resume`: devices the journal shows as done
are not touched; devices it shows in flight are asked for their real state (the agent finishes
or undoes a transaction a crash left; a device that already runs the bundle counts as
succeeded, since its agent answers "already installed" to a second install anyway); the rest
start as planned. On a halt (the abort rule), no device starts after the breach is known; those
in flight finish their transaction (never killed mid-switch); `--on-halt rollback` then returns
every device this rollout changed to its previous version.

The transport is whatever `link_for` returns (SSH today); this module never touches sockets.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..errors import EdgeopsError, UsageError
from ..formats.base import sha256_path
from . import deploy as D
from . import plan as P
from .inventory import Device, Inventory
from .journal import Journal


@dataclass
class Options:
    waves: str | None = None
    canary: bool = True
    parallel: int = 4
    max_failures: str = "10%"
    min_devices: int = 1
    retries: int = 1
    rate: str | None = None
    ramp: float = 2.0
    bake: float = 0.0
    timeout: float = 900.0
    on_halt: str = "pause"
    health_runs: int = 30
    delta: bool = True
    # the telemetry gate of each bake (telemetry/analysis.py): the bundle's SLO, and these
    max_error_rate: float | None = None
    max_drift: float | None = None
    gate: bool = True
    gate_min_requests: int = 50
    gate_every: float = 10.0

    def check(self) -> None:
        if self.on_halt not in ("pause", "rollback"):
            raise UsageError("--on-halt is pause or rollback")
        if self.parallel < 1 or self.retries < 0 or self.min_devices < 1 or self.timeout <= 0 or self.bake < 0:
            raise UsageError("--parallel, --min-devices >= 1; --retries, --bake >= 0; --timeout > 0")
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            raise UsageError("--max-error-rate is a share in [0, 1] (0.01 = 1 %)")
        if self.max_drift is not None and not self.max_drift > 0:
            raise UsageError("--max-drift is a PSI > 0 (0.25 = drifted)")
        if self.gate_min_requests < 1 or self.gate_every <= 0:
            raise UsageError("--gate-min-requests >= 1, --gate-every > 0")
        if (self.max_error_rate is not None or self.max_drift is not None) and not self.bake:
            raise UsageError("--max-error-rate/--max-drift are judged during --bake; give --bake SECONDS")
        P.Threshold.parse(self.max_failures)
        P.Rate.parse(self.rate, self.ramp)
        P.parse_waves(self.waves)


def member(d: Device) -> P.Member:
    return P.Member(d.name, d.target, tuple(sorted((d.labels or {}).items())), d.runtime or d.arch)


def classify(exc: BaseException) -> tuple[str, str]:
    """A controller-side failure as a rollout failure type."""
    from .ssh import AuthFailed, CommandTimeout, DeviceUnreachable, HostKeyMismatch, HostKeyUnknown, LinkLost, RemoteError

    msg = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    if isinstance(exc, (DeviceUnreachable, AuthFailed, HostKeyMismatch, HostKeyUnknown)):
        return "UNREACHABLE", msg
    if isinstance(exc, CommandTimeout):
        return "TIMEOUT", msg
    if isinstance(exc, (LinkLost, RemoteError)):
        return "TRANSFER", msg
    if isinstance(exc, D.AgentMismatch):
        return "PREFLIGHT", msg
    if isinstance(exc, EdgeopsError):
        return "PREFLIGHT", msg
    return "UNREACHABLE", f"{type(exc).__name__}: {msg}"


def _bundle_info(target: str, path: Path) -> dict:
    from ..agent import verifier as v

    try:
        signed = v.peek(path)[1]["signed"]
    except (v.Refused, OSError) as exc:
        raise UsageError(f"{path}: not a readable bundle: {exc}") from None
    if signed.get("target") != target:
        raise UsageError(f"{path} is for target {signed.get('target')!r}, not {target!r}")
    return {"target": target, "path": str(Path(path).resolve()), "sha256": sha256_path(path),
            "manifest_sha256": v.manifest_sha256(signed), "name": signed["name"],
            "version": signed["version"], "size": Path(path).stat().st_size}


def make_plan(devices: list[Device], bundles: dict[str, Path], opts: Options) -> tuple[list[P.Wave], list[dict]]:
    opts.check()
    members = [member(d) for d in devices]
    missing = sorted({m.target for m in members} - set(bundles))
    if missing:
        raise UsageError(f"no bundle for target(s) {', '.join(missing)} of the selected devices",
                         hint="give one --bundle per target, or NAME:VERSION with --key to build them")
    info = [_bundle_info(t, p) for t, p in sorted(bundles.items())]     # each file hashed once
    names = {b["name"] for b in info}
    if len(names) != 1:
        raise UsageError(f"the bundles are of different models ({', '.join(sorted(names))}): one rollout, one model")
    waves = P.make_waves(members, P.parse_waves(opts.waves), canary=opts.canary)
    return waves, [b for b in info if b["target"] in {m.target for m in members}]


def start(devices: list[Device], bundles: dict[str, Path], opts: Options, journal: Journal) -> str:
    waves, info = make_plan(devices, bundles, opts)
    return journal.create(asdict(opts), info, [[(m.name, m.target) for m in w.devices] for w in waves])


def gates(bundles: dict, opts: Options) -> dict:
    """target -> the telemetry gate its bake applies (analysis.Gate), for targets where one is on:
    the bundle's SLO (its percentile), --max-error-rate, --max-drift. Empty: bake is a plain wait."""
    from ..agent import verifier as v
    from ..telemetry.analysis import Gate

    if not opts.bake or not opts.gate:
        return {}
    out = {}
    for t, b in bundles.items():
        slo = v.peek(Path(b["path"]))[1]["signed"].get("slo") or {}
        g = Gate(slo_ms=slo.get("latency_ms"), percentile=slo.get("percentile", "p99"),
                 max_error_rate=opts.max_error_rate, max_drift=opts.max_drift, min_requests=opts.gate_min_requests)
        if g.active():
            out[t] = g
    return out


def _judge(rid: str, r: dict, wave: int, s: P.Scheduler, gate_by_target: dict, journal: Journal, inv: Inventory,
           *, final: bool, say) -> str | None:
    """Collect telemetry from WAVE's installed devices and judge the new version on each; the
    halt reason on a breach. Journaled either way."""
    from ..telemetry import analysis as A
    from ..telemetry.collect import collect
    from ..telemetry.store import Store

    rows = {d["device"]: d for d in r["devices"]}
    names = [n for n, run in s.runs.items() if run.wave == wave and run.state == "succeeded"
             and rows[n]["target"] in gate_by_target]
    if not names:
        return None
    store = Store()
    pulled = collect([inv.get(n) for n in names], store, parallel=8)
    verdict = {"breach": [], "pending": [], "checked": {}}
    fresh = journal.get(rid)
    info = {d["device"]: {"since": d["started"], "previous": d["previous_version"]} for d in fresh["devices"]}
    for t, g in gate_by_target.items():
        group = {n: info[n] for n in names if rows[n]["target"] == t}
        if not group:
            continue
        b = r["bundles"][t]
        res = A.judge(store, g, b["name"], b["version"], group, final=final)
        verdict["breach"] += res["breach"]
        verdict["pending"] += res["pending"]
        verdict["checked"].update(res["checked"])
    unreachable = {p.device: p.error for p in pulled if not p.ok}
    if final:       # stale data never passes a gate: a device whose telemetry could not be read now fails it
        for dev, err in sorted(unreachable.items()):
            verdict["breach"].append((dev, "NO_TELEMETRY", f"telemetry could not be collected at the end of the bake ({err})"))
    journal.rollout(rid, event="gate" + (" final" if final else ""),
                    detail={"wave": wave, "breach": verdict["breach"], "pending": verdict["pending"],
                            "checked": verdict["checked"], "collect_failed": unreachable})
    if verdict["breach"]:
        dev, reason, msg = verdict["breach"][0]
        more = f" (+{len(verdict['breach']) - 1} more)" if len(verdict["breach"]) > 1 else ""
        return f"bake gate: {reason} on {dev}: {msg}{more}"
    if final:
        say(f"bake gate passed for wave {wave}: " + ", ".join(
            f"{n} {x.get('requests')} req" + (f" p99 {x['p99_ms']:.2f} ms" if x.get("p99_ms") else "")
            for n, x in sorted(verdict["checked"].items())))
    return None


def _scheduler(r: dict, opts: Options, gated: bool = False) -> P.Scheduler:
    by_wave: dict[int, list[P.Member]] = {}
    for d in r["devices"]:
        by_wave.setdefault(d["wave"], []).append(P.Member(d["device"], d["target"]))
    waves = [P.Wave(i, f"wave {i}", by_wave[i]) for i in sorted(by_wave)]
    s = P.Scheduler(waves, parallel=opts.parallel, rule=P.AbortRule(P.Threshold.parse(opts.max_failures),
                                                                     opts.min_devices),
                    retries=opts.retries, rate=P.Rate.parse(opts.rate, opts.ramp), bake=opts.bake, gated=gated)
    for d in r["devices"]:
        run = s.runs[d["device"]]
        run.attempts = d["attempts"]
        if d["state"] in ("succeeded", "failed", "skipped", "rolled-back"):
            run.state = "succeeded" if d["state"] == "rolled-back" else d["state"]
            run.reason = d["reason"]
    return s


def _in_flight_truth(r: dict, journal: Journal, inv: Inventory, say) -> None:
    """Devices the journal shows running were in flight when the controller died: ask each one."""
    for d in r["devices"]:
        if d["state"] != "running":
            continue
        bundle = r["bundles"][d["target"]]
        try:
            st = D.status(inv.get(d["device"]))
        except Exception as exc:  # noqa: BLE001 - unknown for now: it is retried as planned
            journal.device(r["id"], d["device"], state="pending", event="resume: unreachable",
                           detail={"error": classify(exc)[1]})
            d["state"] = "pending"
            continue
        have = (st.get("models") or {}).get(bundle["name"]) or {}
        if have.get("manifest_sha256") == bundle["manifest_sha256"] and have.get("consistent"):
            journal.device(r["id"], d["device"], state="succeeded", finished=time.time(),
                           event="resume: already installed", detail={"recovered": st.get("recovered")})
            d["state"] = "succeeded"
            say(f"{d['device']}: already runs {bundle['name']}:{bundle['version']} (finished before the controller stopped)")
        else:
            journal.device(r["id"], d["device"], state="pending", event="resume: not installed",
                           detail={"recovered": st.get("recovered"), "running": have.get("version")})
            d["state"] = "pending"
            say(f"{d['device']}: was in flight, not installed: it starts again")


def run(rid: str, journal: Journal, *, progress: Callable[[str], None] = lambda m: None,
        inventory: Inventory | None = None) -> dict:
    """Execute (or resume) rollout RID to its end, a halt, a pause or an abort."""
    inv = inventory or Inventory()
    r = journal.get(rid)
    if r["state"] in ("completed", "aborted", "rolled-back"):
        raise UsageError(f"rollout {rid} is {r['state']}: nothing to resume")
    opts = Options(**r["params"])
    journal.rollout(rid, state="running", control=None, halted_reason=None, event="run")
    _in_flight_truth(r, journal, inv, progress)
    gate_by_target = gates(r["bundles"], opts)
    s = _scheduler(r, opts, gated=bool(gate_by_target))
    last_check = 0.0
    if gate_by_target:
        for t, g in sorted(gate_by_target.items()):
            progress(f"bake gate ({t}): {g.text()}")
    devices = {d["device"]: d for d in r["devices"]}
    pool = cf.ThreadPoolExecutor(max_workers=opts.parallel, thread_name_prefix="rollout")
    futures: dict[cf.Future, str] = {}
    stop = None

    def work(name: str):
        dev = inv.get(name)
        b = r["bundles"][devices[name]["target"]]
        return D.deploy(dev, Path(b["path"]), timeout=opts.timeout, health_runs=opts.health_runs, delta=opts.delta)

    try:
        while True:
            ctl = journal.store.execute("SELECT control FROM rollouts WHERE id = ?", (rid,)).fetchone()[0]
            if ctl in ("pause", "abort") and stop is None:
                stop = ctl
                s.halt(f"{ctl} requested")
            now = time.time()
            nxt = None if stop else s.next(now)
            if isinstance(nxt, P.GateCheck) or (isinstance(nxt, float) and gate_by_target and s.baking() is not None
                                               and now - last_check >= opts.gate_every):
                final = isinstance(nxt, P.GateCheck)
                wave = nxt.wave if final else s.baking()
                last_check = now
                why = _judge(rid, r, wave, s, gate_by_target, journal, inv, final=final, say=progress)
                if why:
                    s.halt(why)
                    journal.rollout(rid, state="halted", halted_reason=why, event="halt",
                                    detail={"reason": why, "known_at": time.time()})
                    progress(f"HALT: {why}; no other device starts")
                    stop = "halt"
                elif final:
                    s.clear(wave)
                continue
            if isinstance(nxt, P.DeviceRun):
                name = nxt.member.name
                # journaled before the device is touched
                journal.device(rid, name, state="running", attempts=nxt.attempts, started=now,
                               event=f"start (attempt {nxt.attempts})")
                progress(f"{name}: deploying (wave {nxt.wave}, attempt {nxt.attempts})")
                futures[pool.submit(work, name)] = name
                continue
            if s.done() and not futures:
                break
            timeout = 0.5
            if isinstance(nxt, float):
                timeout = max(0.01, min(timeout, nxt - now))
            if not futures:
                time.sleep(timeout)
                continue
            done, _ = cf.wait(futures, timeout=timeout, return_when=cf.FIRST_COMPLETED)
            for f in done:
                name = futures.pop(f)
                try:
                    out = f.result()
                    ok, reason, msg = out.ok, out.reason, out.message
                    extra = {"bytes_sent": out.bytes_sent,
                             "previous_version": (out.agent or {}).get("previous")}
                except Exception as exc:  # noqa: BLE001 - a device failure, typed for the abort rule
                    ok = False
                    reason, msg = classify(exc)
                    extra = {}
                verdict = s.complete(name, ok, reason, msg)
                state = {"retry": "pending"}.get(verdict, verdict)
                journal.device(rid, name, state=state, reason=None if ok else reason, message=msg[:500],
                               finished=time.time(), event=f"{verdict}" + ("" if ok else f" {reason}"), **extra)
                progress(f"{name}: {verdict}" + ("" if ok else f" ({reason}: {msg[:120]})"))
                if s.halted and not stop:
                    journal.rollout(rid, state="halted", halted_reason=s.halted, event="halt",
                                    detail={"reason": s.halted, "known_at": time.time()})
                    progress(f"HALT: {s.halted}; devices in flight finish, no other device starts")
                    stop = "halt"
    finally:
        pool.shutdown(wait=True)
    skipped = s.skip_pending() if (s.halted or stop) else []
    for name in skipped:
        journal.device(rid, name, state="skipped" if stop != "pause" else "pending",
                       event="not started (" + (stop or "halt") + ")")
    failed = [n for n, x in s.runs.items() if x.state == "failed"]
    if stop == "pause":
        state = "paused"
    elif stop == "abort":
        state = "aborted"
    elif s.halted:
        state = "halted"
    else:
        state = "completed" if not failed else "failed"
    journal.rollout(rid, state=state, event=state, detail={"failed": failed})
    if state == "halted" and opts.on_halt == "rollback":
        progress("--on-halt rollback: returning every device this rollout changed to its previous version")
        rollback(rid, journal, progress=progress, inventory=inv)
        state = "rolled-back"
    return summary(journal.get(rid)) | {"state": state}


def rollback(rid: str, journal: Journal, *, progress=lambda m: None, inventory: Inventory | None = None) -> dict:
    """Every device this rollout installed goes back to its previous version (checked there)."""
    inv = inventory or Inventory()
    r = journal.get(rid)
    results = {}
    for d in r["devices"]:
        if d["state"] != "succeeded":
            continue
        b = r["bundles"][d["target"]]
        if not d["previous_version"]:
            results[d["device"]] = "no previous version (first install): left on the new one"
            journal.device(rid, d["device"], event="rollback impossible", detail={"why": results[d["device"]]})
            continue
        journal.device(rid, d["device"], event="rollback start")
        try:
            out = D.rollback(inv.get(d["device"]), b["name"])
            ok, msg = out.ok, out.message
        except Exception as exc:  # noqa: BLE001
            ok, msg = False, classify(exc)[1]
        journal.device(rid, d["device"], state="rolled-back" if ok else d["state"], event="rollback " + ("ok" if ok else "failed"),
                       detail={"message": msg})
        results[d["device"]] = msg
        progress(f"{d['device']}: {msg}")
    journal.rollout(rid, state="rolled-back", event="rolled-back", detail=results)
    return results


def request(rid: str, journal: Journal, what: str) -> None:
    """pause / abort: the running controller sees it before starting the next device."""
    r = journal.get(rid)
    if r["state"] not in ("running",):
        if what == "abort" and r["state"] in ("paused", "halted", "failed"):
            journal.rollout(rid, state="aborted", control="abort", event="abort")
            return
        raise UsageError(f"rollout {rid} is {r['state']}, not running")
    journal.rollout(rid, control=what, event=f"{what} requested")


def summary(r: dict) -> dict:
    waves: dict[int, dict] = {}
    failures: dict[str, int] = {}
    for d in r["devices"]:
        w = waves.setdefault(d["wave"], {"wave": d["wave"], "devices": 0, "states": {}})
        w["devices"] += 1
        w["states"][d["state"]] = w["states"].get(d["state"], 0) + 1
        if d["state"] == "failed" and d["reason"]:
            failures[d["reason"]] = failures.get(d["reason"], 0) + 1
    return {"id": r["id"], "state": r["state"], "halted_reason": r["halted_reason"],
            "bundles": {t: {k: b[k] for k in ("name", "version", "size", "sha256")} for t, b in r["bundles"].items()},
            "waves": [waves[k] for k in sorted(waves)], "failures": failures,
            "bytes_sent": sum(d["bytes_sent"] for d in r["devices"]),
            "devices": [{k: d[k] for k in ("device", "wave", "target", "state", "attempts", "reason", "message",
                                           "bytes_sent", "started", "finished", "previous_version")}
                        for d in r["devices"]]}
