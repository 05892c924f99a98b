"""`edgeops keys`, `edgeops trust`, `edgeops bundle`: signing keys, trust roots, signed bundles.

Parse, call edgeops.bundle, render. Passphrases come from $EDGEOPS_KEY_PASSPHRASE or a
hidden prompt (the library never prompts). A refused bundle exits 1 with every reason.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import click

from . import cli
from .commands import _err, _esc, _human_size, _json_print, _out, inputs_option, json_option, shape_option
from ..errors import EXIT_VERIFY, UsageError

PASS_ENV = "EDGEOPS_KEY_PASSPHRASE"


def _passphrase(ref, confirm: bool = False) -> str | None:
    if os.environ.get(PASS_ENV):
        return os.environ[PASS_ENV]
    if not sys.stdin.isatty():
        raise UsageError(f"key {ref} needs a passphrase and there is no terminal to ask for it",
                         hint=f"set {PASS_ENV}")
    return click.prompt(f"passphrase for key {ref}", hide_input=True, confirmation_prompt=confirm,
                        err=True)


def _signers(refs) -> list:
    from ..bundle import keys

    out = []
    for ref in refs:
        out.append(keys.load_signing(ref, _passphrase(ref) if keys.is_encrypted(ref) else None))
    return out


def _publics(refs) -> list:
    from ..bundle import keys

    return [keys.load_public(r) for r in refs]


def _expiry(text: str):
    from datetime import datetime, timezone

    from ..bundle.build import parse_duration

    return datetime.now(timezone.utc).replace(microsecond=0) + parse_duration(text)


# ----------------------------------------------------------------------------- keys

@cli.group()
def keys():
    """Ed25519 signing keys ($EDGEOPS_HOME/keys; key id = sha256 of the public key)."""


@keys.command("generate")
@click.argument("name")
@click.option("--passphrase", is_flag=True, help=f"Encrypt the private key (prompt, or ${PASS_ENV}).")
@json_option
def keys_generate(name, passphrase, as_json):
    """Create NAME.key (private, mode 0600) and NAME.pub."""
    from ..bundle import keys as k

    pw = _passphrase(name, confirm=True) if passphrase else None
    pub = k.generate(name, passphrase=pw)
    if as_json:
        _json_print({**pub.to_dict(), "path": str(k.keys_dir() / f"{name}.key"), "encrypted": bool(pw)})
    else:
        _out().print(f"key [bold]{_esc(name)}[/] {pub.keyid}\n  private {_esc(k.keys_dir() / (name + '.key'))} "
                     f"(0600{', encrypted' if pw else ''})\n  public  {_esc(k.keys_dir() / (name + '.pub'))}")


@keys.command("list")
@json_option
def keys_list(as_json):
    """The keys in $EDGEOPS_HOME/keys."""
    from rich.table import Table

    from ..bundle import keys as k

    rows = k.list_keys()
    if as_json:
        _json_print(rows)
        return
    if not rows:
        _err().print(f"no keys in {_esc(k.keys_dir())} (edgeops keys generate NAME)")
        return
    t = Table("name", "key id (sha256 of public key)", "private", box=None)
    for r in rows:
        priv = "-" if not r["private"] else f"{r['mode']}{' encrypted' if r['encrypted'] else ''}"
        t.add_row(_esc(r["name"]), r["keyid"], priv)
    _out().print(t)


# ----------------------------------------------------------------------------- trust

def _trust_dir(folder):
    from ..bundle import trust

    return Path(folder) if folder else trust.default_dir()


def _print_root(d: dict, folder, as_json) -> None:
    if as_json:
        _json_print({"folder": str(folder), **d})
        return
    out = _out()
    out.print(f"trust root [bold]v{d['version']}[/] in {_esc(folder)}, expires {d['expires']}")
    for role, r in d["roles"].items():
        keys_ = ", ".join(f"{_esc(k['name'] or '?')} {k['keyid'][:16]}" for k in r["keys"])
        out.print(f"  {role:<6} {r['threshold']} of {len(r['keys'])}: {keys_}")


@cli.group()
def trust():
    """Trust roots: which keys may sign bundles (and the next root), with thresholds."""


@trust.command("init")
@click.argument("folder", required=False, type=click.Path(path_type=Path))
@click.option("--key", "keys_", multiple=True, required=True, help="Bundle-signing key (repeatable).")
@click.option("--threshold", type=int, default=1, show_default=True, help="Bundle signatures a device requires.")
@click.option("--root-key", multiple=True, help="Key that signs root rotations (default: the --key keys).")
@click.option("--root-threshold", type=int, default=1, show_default=True)
@click.option("--expires", default="365d", show_default=True, help="Root lifetime (devices refuse an expired root).")
@json_option
def trust_init(folder, keys_, threshold, root_key, root_threshold, expires, as_json):
    """Create a trust root in FOLDER (default $EDGEOPS_HOME/trust)."""
    from ..bundle import trust as t

    folder = _trust_dir(folder)
    root = t.init(folder, _signers(root_key or keys_), _publics(keys_), threshold, root_threshold, _expiry(expires))
    _print_root(t.describe(root), folder, as_json)


@trust.command("rotate")
@click.argument("folder", required=False, type=click.Path(path_type=Path))
@click.option("--old-key", multiple=True, required=True, help="Current root key that signs the rotation (repeatable).")
@click.option("--key", "keys_", multiple=True, required=True, help="Bundle-signing key of the new root.")
@click.option("--threshold", type=int, default=1, show_default=True)
@click.option("--root-key", multiple=True, help="Root key of the new root (default: the --key keys).")
@click.option("--root-threshold", type=int, default=1, show_default=True)
@click.option("--expires", default="365d", show_default=True)
@json_option
def trust_rotate(folder, old_key, keys_, threshold, root_key, root_threshold, expires, as_json):
    """Write root version N+1, signed by the old root keys and the new ones."""
    from ..bundle import trust as t

    folder = _trust_dir(folder)
    root = t.rotate(folder, _signers(old_key), _signers(root_key or keys_), _publics(keys_), threshold,
                    root_threshold, _expiry(expires))
    _print_root(t.describe(root), folder, as_json)


@trust.command("update")
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("root_file", type=click.Path(path_type=Path))
@json_option
def trust_update(folder, root_file, as_json):
    """Accept ROOT_FILE as the next root of FOLDER, only if the trusted root's keys signed it."""
    from ..bundle import trust as t

    root = t.apply(folder, t.read_root_file(root_file))
    _print_root(t.describe(root), folder, as_json)


@trust.command("show")
@click.argument("folder", required=False, type=click.Path(path_type=Path))
@json_option
def trust_show(folder, as_json):
    """The root in force in FOLDER."""
    from ..bundle import trust as t

    folder = _trust_dir(folder)
    _print_root(t.describe(t.load(folder)), folder, as_json)


# ----------------------------------------------------------------------------- bundle

@cli.group()
def bundle():
    """Signed bundles: a registry version + manifest + health-check vectors, for one target."""


@bundle.command("build")
@click.argument("ref", metavar="NAME:VERSION")
@click.option("--target", required=True, help="Target profile (edgeops targets list).")
@click.option("--key", "keys_", multiple=True, required=True, help="Signing key name or path (repeatable).")
@click.option("--threshold", type=int, help="Require at least this many distinct --key signatures.")
@click.option("--expires", default="90d", show_default=True, help="Lifetime: devices refuse it afterwards.")
@click.option("--slo-ms", type=float, help="Latency SLO the health check enforces.")
@click.option("--slo-percentile", type=click.Choice(["p50", "p90", "p95", "p99"]), default="p99", show_default=True)
@click.option("--trust", "trust_dir", type=click.Path(path_type=Path),
              help="Trust folder to check the signatures against and embed (default $EDGEOPS_HOME/trust).")
@click.option("--counter", type=click.IntRange(1, 2**53 - 1),
              help="Bundle counter (default: the registry's next one; one sequence for all models).")
@inputs_option
@shape_option
@click.option("--atol", type=float, help="Health-check absolute tolerance (default: per dtype).")
@click.option("--rtol", type=float, help="Health-check relative tolerance (default: per dtype).")
@click.option("--allow-failed-lineage", is_flag=True,
              help="Bundle a model whose lineage records a failed parity or accuracy check.")
@click.option("--profile-data", type=click.Path(path_type=Path, exists=True),
              help="Calibration/eval data (.npz or folder, axis 0 = samples) for the drift reference profile "
                   "(default: --inputs, else generated inputs).")
@click.option("--profile-samples", type=click.IntRange(1, 100000), default=1000, show_default=True,
              help="Samples the reference profile is built from (at most 10 s of inference, then >= 64).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path))
@json_option
def bundle_build(ref, target, keys_, threshold, expires, slo_ms, slo_percentile, trust_dir, counter, inputs,
                 shapes, atol, rtol, allow_failed_lineage, profile_data, profile_samples, out, as_json):
    """Build a signed bundle of NAME:VERSION for TARGET, then verify it as a device would."""
    import math

    from ..bundle.build import build, parse_duration
    from ..verify import parse_shapes

    for opt, val in (("--atol", atol), ("--rtol", rtol)):
        if val is not None and not (math.isfinite(val) and val >= 0):
            raise UsageError(f"{opt} must be a finite number >= 0")
    if slo_ms is not None and not (math.isfinite(slo_ms) and slo_ms > 0):
        raise UsageError("--slo-ms must be a finite number > 0")
    if trust_dir is not None and not (trust_dir / "root.json").is_file():
        raise UsageError(f"{trust_dir}: no root.json trust root", hint=f"edgeops trust init {trust_dir} --key NAME")
    res = build(ref, target, _signers(keys_), out, threshold=threshold, expires=parse_duration(expires),
                slo_ms=slo_ms, slo_percentile=slo_percentile, trust_dir=trust_dir, counter=counter,
                inputs=inputs, shapes=parse_shapes(shapes), atol=atol, rtol=rtol,
                allow_failed_lineage=allow_failed_lineage, profile_data=profile_data,
                profile_samples=profile_samples,
                progress=lambda m: None if as_json else _err().print(f"[dim]{_esc(m)}[/]"))
    if as_json:
        _json_print(res.to_dict())
        return
    m = res.manifest
    o = _out()
    o.print(f"bundle [bold]{_esc(res.path)}[/] {_human_size(res.size)} sha256 {res.sha256[:16]}…")
    o.print(f"  {_esc(m['name'])}:{m['version']} counter {m['counter']} target {_esc(m['target'])}, "
            f"expires {m['expires']}")
    o.print(f"  signed by {len(res.signed_by)} key(s)" +
            (f", verified against trust root v{res.root_version}" if res.root_version else ""))
    o.print(f"  health: {len(m['health']['inputs'])} input(s), {len(m['health']['expected'])} expected output(s)"
            + (f", SLO {m['slo']['percentile']} <= {m['slo']['latency_ms']} ms" if m["slo"] else ""))
    t = m.get("telemetry") or {}
    if t.get("profile"):
        o.print(f"  drift profile: {len(t['profile']['inputs'])} input(s), {len(t['profile']['outputs'])} output(s) "
                f"from {_esc(t['source'])}")
    for w in res.warnings:
        _err().print(f"[yellow]warning:[/] {_esc(w)}")


@bundle.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--trust", "trust_dir", type=click.Path(path_type=Path),
              help="Trust folder with root.json (default $EDGEOPS_HOME/trust).")
@click.option("--target", help="This device's target: refuse bundles for another.")
@click.option("--installed-version", metavar="[NAME:]X.Y.Z",
              help="Refuse a version not newer than this (with NAME: only for the same model).")
@click.option("--installed-counter", type=click.IntRange(0, 2**53 - 1), metavar="N",
              help="Refuse a bundle counter not above this.")
@click.option("--allow-same-version", is_flag=True,
              help="Accept the installed version again if its counter is newer (a re-signed bundle).")
@click.option("--health", is_flag=True, help="Also run the health check here (reference outputs, SLO).")
@click.option("--update-trust", is_flag=True, help="Save a newer trust root the bundle carries (after it verifies).")
@json_option
def bundle_verify(path, trust_dir, target, installed_version, installed_counter, allow_same_version, health,
                  update_trust, as_json):
    """Verify PATH exactly as a device does before installing it. Exit 1 if refused."""
    from ..agent import verifier as v
    from ..bundle import build as b

    _regular(path)
    installed_name = None
    if installed_version is not None:
        if ":" in installed_version:
            from ..registry import RegistryError
            from ..registry.store import check_name

            installed_name, installed_version = installed_version.rsplit(":", 1)
            try:
                check_name(installed_name)       # the registry's own rule for model names
            except RegistryError:
                raise UsageError(f"--installed-version: {installed_name!r} is not a model name") from None
        try:
            v.semver(installed_version, "--installed-version")
        except v.Refused as exc:
            raise UsageError(str(exc)) from None
    installed = (v.Installed(installed_counter, installed_version, installed_name)
                 if installed_version is not None or installed_counter is not None else None)
    folder = _trust_dir(trust_dir)
    work = Path(tempfile.mkdtemp(prefix="edgeops-verify-")) if health else None
    try:
        res = b.verify(path, folder, target=target, installed=installed, allow_same_version=allow_same_version,
                       extract_to=work / "payload" if work else None)
        report = res.to_dict()
        report.pop("manifest")
        if res.ok and health:
            from ..agent import health as h

            from ..agent.install import health_verdict

            report["health"] = h.run(work / "payload", res.manifest)
            verdict = health_verdict(report["health"])     # the device's own naming (HEALTH / SLO)
            if verdict:
                report["reason"], report["message"] = verdict
        elif not res.ok:
            report["reason"] = "VERIFY"
        ok = res.ok and report.get("health", {}).get("passed", True)
        # a newer root is kept only when the device would install: verified AND healthy
        if ok and update_trust and res.root_updates:
            for data in res.root_updates:
                v.save_trust(folder, data)
        notes = []
        if target is None:
            notes.append("target not checked (pass --target)")
        if installed is None:
            notes.append("rollback not checked (pass --installed-version / --installed-counter)")
        report["not_checked"] = notes
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
    if as_json:
        _json_print({**report, "ok": ok})
    else:
        _render_verify(res, report)
    if not ok:
        raise SystemExit(EXIT_VERIFY)


def _render_verify(res, report) -> None:
    if not res.ok:
        err = _err()
        err.print(f"[bold red]REFUSED[/] {_esc(res.path)}")
        for f in res.failures:
            err.print(f"  [red]{f.code}[/]: {_esc(f.message)}")
        return
    m, o = res.manifest, _out()
    o.print(f"[bold green]VERIFIED[/] {_esc(res.path)}: {_esc(m['name'])}:{m['version']} counter {m['counter']} "
            f"target {_esc(m['target'])}")
    o.print(f"  checked: {', '.join(res.checked)}")
    o.print(f"  signed by {', '.join(k[:16] for k in res.signed_by)} (trust root v{res.root_version}"
            f"{', updated' if res.root_updates else ''})")
    for n in report["not_checked"]:
        o.print(f"  [yellow]not checked:[/] {n}")
    hr = report.get("health")
    if hr and hr.get("error"):
        _err().print(f"  health check [bold red]FAILED[/]: {_esc(hr['error'])}")
    elif hr:
        status = "[green]PASSED[/]" if hr["passed"] else "[bold red]FAILED[/]"
        o.print(f"  health check {status}: latency p50 {hr['latency_ms']['p50']:.3f} ms, "
                f"p99 {hr['latency_ms']['p99']:.3f} ms")
        for n, r in hr["outputs"].items():
            detail = (f"max abs {r['max_abs']:.2e} (atol {r['atol']:.1e}, rtol {r['rtol']:.1e})"
                      if "max_abs" in r else r.get("reason") or f"agreement {100 * r.get('agreement', 0):.1f}%")
            o.print(f"    {_esc(n)}: {'ok' if r['passed'] else 'MISMATCH'} {_esc(detail)}")
        if "slo" in hr:
            s = hr["slo"]
            o.print(f"    SLO {s['percentile']} {s['measured_ms']:.3f} ms <= {s['limit_ms']} ms: "
                    f"{'ok' if s['passed'] else 'BREACHED'}")
    if report.get("reason"):
        _out().print(f"  a device would refuse it: {report['reason']}: {_esc(report['message'])}")


@bundle.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@json_option
def bundle_inspect(path, as_json):
    """Show what a bundle claims, WITHOUT verifying it (use `bundle verify` for that)."""
    from ..bundle.build import inspect

    _regular(path)
    d = inspect(path)
    if as_json:
        _json_print(d)
        return
    try:
        _render_inspect(d)
    except (TypeError, AttributeError, KeyError, ValueError) as exc:
        raise UsageError(f"{path}: the manifest is malformed ({type(exc).__name__}: {exc})",
                         hint="edgeops bundle inspect --json shows it as it is") from None


def _regular(path: Path) -> None:
    if not path.exists():
        raise UsageError(f"{path}: no such bundle")
    if not path.is_file():
        raise UsageError(f"{path}: not a regular file")


def _render_inspect(d: dict) -> None:
    m, o = d["manifest"], _out()
    o.print(f"[bold]{_esc(m.get('name'))}:{_esc(m.get('version'))}[/] counter {m.get('counter')} "
            f"target {_esc(m.get('target'))} (UNVERIFIED: run bundle verify)")
    o.print(f"  created {m.get('created')}, expires {m.get('expires')}, {len(d['signatures'])} signature(s)")
    rt = m.get("runtime") or {}
    o.print(f"  runtime: {rt.get('engine')} >= {rt.get('min_version')} (opset {rt.get('opset')}, "
            f"built with {rt.get('built_with')}), isa {rt.get('isa')}")
    if m.get("slo"):
        o.print(f"  SLO: {m['slo']['percentile']} <= {m['slo']['latency_ms']} ms")
    for p in m.get("parity") or []:
        if p.get("from"):
            detail = f"{p.get('from')} -> {p.get('to')}, max abs {p.get('max_abs')}"
        else:
            detail = ", ".join(f"{k} {v}" for k, v in p.items() if k not in ("step", "status"))
        o.print(f"  check: {_esc(p.get('step'))} {p.get('status')} ({_esc(detail)})")
    from rich.table import Table

    t = Table("entry", "size", "sha256 (manifest)", box=None)
    files = m.get("files") or {}
    for e in d["entries"]:
        t.add_row(_esc(e["name"]), _human_size(e["size"]), (files.get(e["name"]) or {}).get("sha256", "")[:16])
    o.print(t)
