"""`edgeops rollout start|status|list|pause|resume|abort|rollback`."""

from __future__ import annotations

import time
from pathlib import Path

import click

from . import cli
from .commands import _err, _esc, _json_print, _out, json_option
from ..errors import EXIT_OK, EXIT_VERIFY, UsageError


@cli.group()
def rollout():
    """Roll a model out to many devices in waves, with an abort rule and a journal."""


def _journal():
    from ..fleet.journal import Journal

    return Journal()


def _exit_for(state: str) -> None:
    raise SystemExit(EXIT_OK if state == "completed" else EXIT_VERIFY)


def _devices(selector, everything):
    from ..fleet import plan as P
    from ..fleet.inventory import Inventory
    from ..fleet.rollout import member

    enrolled = [d for d in Inventory().list() if d.agent_root]
    if not enrolled:
        raise UsageError("no enrolled devices", hint="edgeops devices enrol NAME --ssh ... --target T")
    if (selector is None) == (not everything):
        raise UsageError("give --devices SEL or --all (one of them)")
    names, labels = P.parse_selector(selector) if selector else ([], {})
    chosen = {m.name for m in P.select([member(d) for d in enrolled], names, labels, everything)}
    return [d for d in enrolled if d.name in chosen]


@rollout.command("start")
@click.argument("ref", required=False, metavar="NAME:VERSION")
@click.option("--bundle", "bundle_paths", multiple=True, type=click.Path(path_type=Path),
              help="Bundle file(s), one per target (instead of NAME:VERSION).")
@click.option("--devices", "selector", metavar="SEL", help="Names (d1,d2) or labels (site=lab,hw=rpi4).")
@click.option("--all", "everything", is_flag=True, help="Every enrolled device.")
@click.option("--key", "keys_", multiple=True, help="Signing key(s) to build the bundles with (NAME:VERSION).")
@click.option("--waves", help="Cumulative percentages or counts after the canary, e.g. 10%,50%,100%.")
@click.option("--no-canary", is_flag=True, help="No canary wave (one device per hardware class) first.")
@click.option("--parallel", type=int, default=4, show_default=True, help="Devices in flight at once.")
@click.option("--max-failures", default="10%", show_default=True, help="Per failure type: a percentage or a count.")
@click.option("--min-devices", type=int, default=1, show_default=True, help="Finished devices before the rule applies.")
@click.option("--retries", type=int, default=1, show_default=True, help="Retries for UNREACHABLE/TRANSFER/TIMEOUT.")
@click.option("--rate", help="Device starts per minute (N/min), doubling after every N successes.")
@click.option("--bake", type=float, default=0.0, show_default=True,
              help="Seconds between waves; with a gate (the bundle's SLO, --max-error-rate, --max-drift) the "
                   "wave's telemetry is collected and judged during it.")
@click.option("--max-error-rate", type=float, help="Bake gate: halt when a device's error rate exceeds this share (0.01).")
@click.option("--max-drift", type=float,
              help="Bake gate: halt when a device's output PSI against its previous version exceeds this (0.25).")
@click.option("--gate-min-requests", type=int, default=50, show_default=True,
              help="Requests of the new version each device needs before the gate can pass it.")
@click.option("--gate-every", type=float, default=10.0, show_default=True, help="Seconds between checks during a bake.")
@click.option("--no-gate", is_flag=True, help="Bake is a plain wait: no telemetry gate (not even the bundle's SLO).")
@click.option("--timeout", type=float, default=900, show_default=True, help="Per-device install timeout (s).")
@click.option("--on-halt", type=click.Choice(["pause", "rollback"]), default="pause", show_default=True)
@click.option("--runs", type=int, default=30, show_default=True, help="Timed runs of each device's health check.")
@click.option("--dry-run", is_flag=True, help="Print the plan; touch nothing.")
@json_option
def rollout_start(ref, bundle_paths, selector, everything, keys_, waves, no_canary, parallel, max_failures,
                  min_devices, retries, rate, bake, max_error_rate, max_drift, gate_min_requests, gate_every,
                  no_gate, timeout, on_halt, runs, dry_run, as_json):
    """Start a rollout. Exit 0 every device installed, 1 halted or some devices failed, 3 environment."""
    from ..agent import verifier as v
    from ..fleet import rollout as R

    devs = _devices(selector, everything)
    opts = R.Options(waves=waves, canary=not no_canary, parallel=parallel, max_failures=max_failures,
                     min_devices=min_devices, retries=retries, rate=rate, bake=bake, timeout=timeout,
                     on_halt=on_halt, health_runs=runs, max_error_rate=max_error_rate, max_drift=max_drift,
                     gate=not no_gate, gate_min_requests=gate_min_requests, gate_every=gate_every)
    opts.check()
    if (ref is None) == (not bundle_paths):
        raise UsageError("give NAME:VERSION or --bundle FILE ... (one of them)")
    say = (lambda m: None) if as_json else (lambda m: _err().print(f"[dim]{_esc(m)}[/]"))
    bundles: dict[str, Path] = {}
    if bundle_paths:
        for p in bundle_paths:
            try:
                t = v.peek(p)[1]["signed"].get("target")
            except (v.Refused, OSError) as exc:
                raise UsageError(f"{p}: not a readable bundle: {exc}") from None
            if t in bundles:
                raise UsageError(f"two bundles for target {t}")
            bundles[t] = p
    else:
        from .bundle import _signers
        from ..bundle import build as b

        if not keys_:
            raise UsageError("building bundles needs --key (the signing key(s))")
        from ..paths import home

        folder = home() / "rollout-bundles"
        folder.mkdir(parents=True, exist_ok=True)
        signers = _signers(keys_)
        for t in sorted({d.target for d in devs}):
            out = folder / f"{ref.replace(':', '-')}-{t}-{int(time.time())}.bundle"
            say(f"building {ref} for target {t}")
            bundles[t] = b.build(ref, t, signers, out, progress=say).path
    if dry_run:
        waves_, info = R.make_plan(devs, bundles, opts)
        gate_by_target = R.gates({b_["target"]: b_ for b_ in info}, opts)
        plan = {"waves": [{"wave": w.index, "name": w.name, "devices": [m.name for m in w.devices]} for w in waves_],
                "bundles": info, "options": vars(opts), "gates": {t: g.text() for t, g in gate_by_target.items()}}
        if as_json:
            _json_print(plan)
        else:
            from rich.table import Table

            t = Table("wave", "devices", "targets")
            for w in waves_:
                t.add_row(w.name, ", ".join(m.name for m in w.devices), ", ".join(sorted({m.target for m in w.devices})))
            _out().print(t)
            for b_ in info:
                _out().print(f"bundle for {b_['target']}: {b_['name']}:{b_['version']} ({b_['size']} bytes)")
            _out().print(f"abort: --max-failures {max_failures} per type after {min_devices} device(s); "
                         f"retries {retries}; parallel {parallel}; on halt: {on_halt}.")
            for t, g in sorted(gate_by_target.items()):
                _out().print(f"bake gate for {t} ({bake:g}s after each wave): {_esc(g.text())}")
            if bake and not gate_by_target:
                _out().print(f"bake: a {bake:g}s wait after each wave, no telemetry gate"
                             + (" (--no-gate)" if no_gate else " (the bundle has no SLO; no --max-error-rate/--max-drift)"))
            _out().print("Nothing was touched.")
        return
    j = _journal()
    rid = R.start(devs, bundles, opts, j)
    say(f"rollout {rid}: {len(devs)} device(s)")
    res = R.run(rid, j, progress=say)
    _show(res, as_json)
    _exit_for(res["state"])


def _show(res: dict, as_json: bool) -> None:
    if as_json:
        _json_print(res)
        return
    o = _out()
    color = "green" if res["state"] == "completed" else "red"
    o.print(f"rollout [bold]{res['id']}[/] [{color}]{res['state']}[/]"
            + (f": {_esc(res['halted_reason'])}" if res.get("halted_reason") else ""))
    for t, b in res["bundles"].items():
        o.print(f"  bundle {t}: {_esc(b['name'])}:{b['version']} ({b['size'] / 2**20:.1f} MiB)")
    for w in res["waves"]:
        o.print(f"  wave {w['wave']}: {w['devices']} device(s) " +
                ", ".join(f"{k} {v}" for k, v in sorted(w["states"].items())))
    if res["failures"]:
        o.print("  failures by type: " + ", ".join(f"{k} {v}" for k, v in sorted(res["failures"].items())))
    o.print(f"  bytes sent: {res['bytes_sent'] / 2**20:.2f} MiB")
    from rich.table import Table

    t = Table("device", "wave", "state", "tries", "reason", "MiB", box=None)
    for d in res["devices"]:
        t.add_row(d["device"], str(d["wave"]), d["state"], str(d["attempts"]), _esc(d["reason"] or ""),
                  f"{d['bytes_sent'] / 2**20:.2f}")
    o.print(t)


@rollout.command("status")
@click.argument("rid", required=False, metavar="ID")
@click.option("--watch", is_flag=True, help="Refresh every second until the rollout stops.")
@json_option
def rollout_status(rid, watch, as_json):
    """A rollout's waves, devices, bytes and failures by type (from the journal)."""
    from ..fleet import rollout as R

    j = _journal()
    rid = rid or j.latest()
    if rid is None:
        raise UsageError("no rollouts yet", hint="edgeops rollout start ...")
    if watch and not as_json:
        from rich.live import Live
        from rich.text import Text

        with Live(Text(""), refresh_per_second=2, console=_out()) as live:
            while True:
                res = R.summary(j.get(rid))
                live.update(Text(_text(res)))
                if res["state"] != "running":
                    break
                time.sleep(1)
        return
    _show(R.summary(j.get(rid)), as_json)


def _text(res: dict) -> str:
    lines = [f"rollout {res['id']} {res['state']}"]
    for w in res["waves"]:
        lines.append(f"  wave {w['wave']}: " + ", ".join(f"{k} {v}" for k, v in sorted(w["states"].items())))
    if res["failures"]:
        lines.append("  failures: " + ", ".join(f"{k} {v}" for k, v in sorted(res["failures"].items())))
    return "\n".join(lines)


@rollout.command("list")
@json_option
def rollout_list(as_json):
    """Every rollout in the journal, with its id."""
    rows = _journal().list()
    if as_json:
        _json_print(rows)
        return
    for r in rows:
        _out().print(f"{r['id']}  {r['state']:<12} " + ", ".join(f"{k} {v}" for k, v in sorted(r["devices"].items())))


@rollout.command("pause")
@click.argument("rid", metavar="ID")
def rollout_pause(rid):
    """Ask the running controller to start no more devices (in-flight ones finish)."""
    from ..fleet import rollout as R

    R.request(rid, _journal(), "pause")
    _out().print(f"pause requested for {rid}")


@rollout.command("abort")
@click.argument("rid", metavar="ID")
def rollout_abort(rid):
    """Stop for good: no more devices start; those in flight finish."""
    from ..fleet import rollout as R

    R.request(rid, _journal(), "abort")
    _out().print(f"abort requested for {rid}")


@rollout.command("resume")
@click.argument("rid", metavar="ID")
@json_option
def rollout_resume(rid, as_json):
    """Continue a paused, halted or interrupted rollout (a killed controller included)."""
    from ..fleet import rollout as R

    say = (lambda m: None) if as_json else (lambda m: _err().print(f"[dim]{_esc(m)}[/]"))
    res = R.run(rid, _journal(), progress=say)
    _show(res, as_json)
    _exit_for(res["state"])


@rollout.command("rollback")
@click.argument("rid", metavar="ID")
@json_option
def rollout_rollback(rid, as_json):
    """Return every device this rollout changed to its previous version."""
    from ..fleet import rollout as R

    j = _journal()
    say = (lambda m: None) if as_json else (lambda m: _err().print(f"[dim]{_esc(m)}[/]"))
    results = R.rollback(rid, j, progress=say)
    if as_json:
        _json_print(results)
    else:
        for d, m in results.items():
            _out().print(f"{_esc(d)}: {_esc(m)}")
