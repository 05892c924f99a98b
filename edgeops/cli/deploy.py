"""`edgeops devices enrol|status`, `edgeops deploy`, `edgeops rollback`: one device at a time
(the fleet rollout runs the same deploy many times)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from . import cli
from .bench import devices
from .commands import _err, _esc, _json_print, _out, json_option
from ..errors import EXIT_OK, EXIT_VERIFY, UsageError


def _labels(items) -> dict:
    out = {}
    for item in items or ():
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UsageError(f"--label {item!r} is not KEY=VALUE")
        out[k] = v
    return out


@devices.command("enrol")
@click.argument("name")
@click.option("--ssh", "ssh_spec", required=True, metavar="USER@HOST[:PORT]")
@click.option("--key", required=True, type=click.Path(path_type=Path), help="Private key (key-only auth).")
@click.option("--host-key", metavar="LINE", help="The device's public host key to pin.")
@click.option("--accept-new-host-key", is_flag=True, help="Pin whatever key the device presents now (TOFU).")
@click.option("--python", "device_python", default="python3", show_default=True,
              help="Python with numpy + onnxruntime on the device.")
@click.option("--target", required=True, help="The device's target profile (targets/NAME.toml).")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="A label for selection (repeatable).")
@click.option("--root", default="~/.edgeops/agent-root", show_default=True,
              help="The agent's folder on the device.")
@click.option("--trust", "trust_dir", type=click.Path(path_type=Path),
              help="Trust folder whose root.json the device will trust (default $EDGEOPS_HOME/trust).")
@click.option("--replace", is_flag=True, help="Re-enrol a device already in the inventory (pushes the agent again).")
@json_option
def devices_enrol(name, ssh_spec, key, host_key, accept_new_host_key, device_python, target, labels, root,
                  trust_dir, replace, as_json):
    """Enrol a device for deployment: pin its host key, push the agent and the trust root."""
    from ..fleet.deploy import enrol

    say = (lambda m: None) if as_json else (lambda m: _err().print(f"[dim]{_esc(m)}[/]"))
    d = enrol(name, ssh_spec, str(key), target=target, host_key=host_key, accept_new_host_key=accept_new_host_key,
              python=device_python, labels=_labels(labels), root=root, trust_dir=trust_dir, replace=replace,
              progress=say)
    if as_json:
        _json_print(d)
        return
    dev, rt = d["device"], d["runtime"]
    _out().print(f"enrolled [bold]{_esc(name)}[/] {_esc(dev['user'])}@{_esc(dev['host'])}:{dev['port']} "
                 f"target {_esc(dev['target'])}, {_esc(rt['arch'])}, python {rt['python']}, "
                 f"onnxruntime {rt['onnxruntime']}, agent {dev['agent_version']} in {_esc(dev['agent_root'])}")
    for n in d["notes"]:
        _out().print(f"  {_esc(n)}")


@devices.command("status")
@click.argument("name", required=False)
@json_option
def devices_status(name, as_json):
    """What each enrolled device runs, read from the device itself."""
    from ..fleet import deploy as D
    from ..fleet.inventory import Inventory

    inv = Inventory()
    devs = [inv.get(name)] if name else [d for d in inv.list() if d.agent_root]
    if not devs:
        raise UsageError("no enrolled devices", hint="edgeops devices enrol NAME --ssh ... --target T")
    rows, failed = [], False
    for d in devs:
        try:
            rows.append({**D.status(d), "name": d.name, "ok": True})
        except Exception as exc:  # noqa: BLE001 - one unreachable device is a row, not the end
            from ..errors import EdgeopsError

            if not isinstance(exc, EdgeopsError) or name:
                raise
            failed = True
            rows.append({"name": d.name, "ok": False, "error": exc.message})
    if as_json:
        _json_print(rows if not name else rows[0])
    else:
        o = _out()
        for r in rows:
            if not r["ok"]:
                o.print(f"[bold]{_esc(r['name'])}[/]: [red]unreachable[/] {_esc(r['error'])}")
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted((r.get("device") or {}).get("labels", {}).items()))
            o.print(f"[bold]{_esc(r['name'])}[/] agent {r['agent']} (protocol {r['protocol']}), "
                    f"target {_esc((r.get('device') or {}).get('target', '?'))}{' ' + _esc(labels) if labels else ''}, "
                    f"{r['runtime']['isa']}, onnxruntime {r['runtime']['onnxruntime']}, "
                    f"{r['free_bytes'] / 2**20:.0f} MiB free")
            if r.get("recovered"):
                o.print(f"  [yellow]recovered:[/] {_esc('; '.join(r['recovered']))}")
            if not r["models"]:
                o.print("  no model installed")
            for mn, m in r["models"].items():
                h = m.get("health") or {}
                lat = h.get("latency_ms") or {}
                o.print(f"  {_esc(mn)}:{m['version']} slot {m['slot']}"
                        f"{'' if m['consistent'] else ' [red](link says ' + str(m['slot_on_disk']) + ')[/]'}, "
                        f"health {'passed' if h.get('passed') else 'not run' if not h else 'FAILED'}"
                        + (f" p50 {lat['p50']:.3f} ms" if 'p50' in lat else "")
                        + (f", previous {m['previous']['version']}" if m.get("previous") else ""))
    if failed:
        raise SystemExit(3)


def _render(out, as_json: bool, verb: str) -> None:
    if as_json:
        _json_print(out.to_dict())
    else:
        o = _out()
        for s in out.steps:
            mark = "ok" if s["ok"] else "[red]FAILED[/]"
            o.print(f"  {s['step']:<18} {s['seconds']:>8.3f} s  {mark} {_esc(s['detail'])}")
        if out.ok:
            o.print(f"[bold green]{verb}[/] on {_esc(out.device)}: {_esc(out.message)}")
        else:
            _err().print(f"[bold red]{out.reason or 'FAILED'}[/] on {_esc(out.device)}: {_esc(out.message)}")
    if not out.ok:
        raise SystemExit(EXIT_VERIFY)
    raise SystemExit(EXIT_OK)


@cli.command("deploy")
@click.argument("ref", required=False, metavar="NAME:VERSION")
@click.option("--bundle", "bundle_path", type=click.Path(path_type=Path), help="A bundle file instead of NAME:VERSION.")
@click.option("--device", "device_name", required=True, help="An enrolled device (edgeops devices enrol).")
@click.option("--key", "keys_", multiple=True, help="Signing key(s) to build the bundle with (NAME:VERSION).")
@click.option("--timeout", type=float, default=900, show_default=True, help="Seconds for the install on the device.")
@click.option("--runs", type=int, default=30, show_default=True, help="Timed runs of the on-device health check.")
@click.option("--no-delta", is_flag=True, help="Send the whole bundle even when the device holds most of its chunks.")
@click.option("--allow-same-version", is_flag=True,
              help="Accept the installed version again when the bundle's counter is newer (a re-signed bundle).")
@json_option
def deploy_cmd(ref, bundle_path, device_name, keys_, timeout, runs, no_delta, allow_same_version, as_json):
    """Install a model on one device: the device verifies, checks health and latency, switches
    slots and commits, or keeps the model it runs. Exit 0 installed, 1 refused or rolled back,
    3 unreachable."""
    from ..fleet import deploy as D
    from ..fleet.inventory import Inventory

    if (ref is None) == (bundle_path is None):
        raise UsageError("give NAME:VERSION or --bundle FILE (one of them)")
    dev = Inventory().get(device_name)
    if not dev.agent_root:
        raise UsageError(f"device {device_name} has no agent", hint=f"edgeops devices enrol {device_name} ...")
    say = (lambda m: None) if as_json else (lambda m: _err().print(f"[dim]{_esc(m)}[/]"))
    work = None
    try:
        if bundle_path is None:
            from .bundle import _signers
            from ..bundle import build as b

            if not keys_:
                raise UsageError("building a bundle needs --key (the signing key(s))")
            work = Path(tempfile.mkdtemp(prefix="edgeops-deploy-"))
            say(f"building a bundle of {ref} for target {dev.target}")
            res = b.build(ref, dev.target, _signers(keys_), work / "deploy.bundle", progress=say)
            bundle_path = res.path
        elif not bundle_path.is_file():
            raise UsageError(f"{bundle_path}: no such bundle")
        out = D.deploy(dev, bundle_path, timeout=timeout, health_runs=runs, delta=not no_delta,
                       allow_same_version=allow_same_version, progress=say)
    finally:
        if work is not None:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    _render(out, as_json, "INSTALLED")


@cli.command("rollback")
@click.argument("name")
@click.option("--device", "device_name", required=True)
@json_option
def rollback_cmd(name, device_name, as_json):
    """Make the previous version of model NAME current again on a device (checked there first)."""
    from ..fleet import deploy as D
    from ..fleet.inventory import Inventory

    out = D.rollback(Inventory().get(device_name), name)
    _render(out, as_json, "ROLLED BACK")
