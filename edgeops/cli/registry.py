"""`edgeops registry add | list | show | compare | promote | remove | attach`.

Each command opens the registry (edgeops.registry), calls one method and renders a rich
table, or JSON with --json. Storage, identity, retention and history rules live in
edgeops.registry.store; nothing here decides anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from . import cli
from .commands import _err, _esc, _human_size, _json_print, _lineage_lines, _out, json_option
from ..errors import UsageError


def _open():
    from ..registry import open_registry

    return open_registry()


def _ref(ref: str, need_version: bool = False) -> tuple[str, str | None]:
    from ..registry import parse_ref

    name, version = parse_ref(ref)
    if need_version and version is None:
        raise UsageError(f"{ref!r}: name the version, e.g. {name}:1.0.0",
                         hint=f"`edgeops registry list {name}` shows the versions")
    return name, version


def _kv(pairs, what: str) -> dict:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise UsageError(f"{what} {p!r}: use KEY=VALUE")
        out[k] = v
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@cli.group()
def registry():
    """Versioned models: lineage, metrics, bench results, stages and history.

    Metadata lives in SQLite ($EDGEOPS_REGISTRY_URL, default $EDGEOPS_HOME/registry.db),
    files in a content-addressed store ($EDGEOPS_BLOBS_URL, default $EDGEOPS_HOME/blobs).
    REF is NAME:X.Y.Z, or NAME for its newest live version.
    """


@registry.command("add")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Model name (letters, digits, . _ -).")
@click.option("--version", "version", default="auto", show_default=True, metavar="X.Y.Z|auto",
              help="Explicit version, or auto: the latest patch + 1 (first 0.1.0).")
@click.option("--metric", "metrics", multiple=True, metavar="KEY=VALUE",
              help="A numeric metric (repeatable), e.g. accuracy=0.98.")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="A tag or KEY=VALUE (repeatable).")
@click.option("--data", "data", multiple=True, type=click.Path(path_type=Path), metavar="FILE",
              help="Data the model was trained or evaluated on: its sha256 is recorded (repeatable).")
@click.option("--trust-pickle", is_flag=True,
              help="Register a pickle that reaches globals outside the allow-list (it runs code "
                   "when loaded); the choice is recorded with the version.")
@json_option
def add(model, name, version, metrics, tags, data, trust_pickle, as_json):
    """Register MODEL (a file or folder) under NAME, with its files, lineage, code version
    and environment. The same content added again under NAME changes nothing. Pickles go
    through the same allow-list check as loading them."""
    with _open() as reg:
        res = reg.add(model, name, version=version, metrics=_kv(metrics, "--metric"),
                      tags=list(tags), data=list(data), trust_pickle=trust_pickle)
    if as_json:
        _json_print(res.to_dict())
        return
    r = res.record
    if not res.created:
        _out().print(f"{_esc(r.ref)} already holds this model (sha256 {r.sha256[:12]}...): "
                     "nothing added")
        return
    from ..registry.lineage import label

    _out().print(f"[green]added[/] [bold]{_esc(r.ref)}[/]: {_esc(r.format)}, "
                 f"{_human_size(r.size)} in {len(r.files)} file(s), sha256 {r.sha256[:12]}..., "
                 f"stage {r.stage}")
    if r.lineage:
        _out().print(f"  lineage {_esc(label(r.lineage))}")
    if trust_pickle and r.format == "sklearn":
        _out().print("  [yellow]pickle trusted (--trust-pickle): the allow-list check was waived; "
                     "recorded with the version[/]")


@registry.command("list")
@click.argument("name", required=False)
@click.option("--all", "show_all", is_flag=True, help="Include removed versions (tombstones).")
@json_option
def list_(name, show_all, as_json):
    """Models with their latest version, or the versions of NAME."""
    from rich.table import Table

    with _open() as reg:
        recs = reg.versions(name, include_removed=show_all)
        if name and not recs:
            reg.get(name)  # the error that lists what exists
    if name:
        if as_json:
            _json_print([r.to_dict() for r in recs])
            return
        t = Table(title=name, title_justify="left")
        for c in ("version", "stage", "format", "size", "sha256", "created", "creator", "metrics"):
            t.add_column(c)
        for r in reversed(recs):
            t.add_row(r.version, "[dim]removed[/]" if r.removed else r.stage, r.format,
                      _human_size(r.size), r.sha256[:12], r.created, _esc(r.creator),
                      _esc(", ".join(f"{k}={_fmt(v)}" for k, v in r.metrics.items())))
        _out().print(t)
        return
    groups: dict[str, list] = {}
    for r in recs:
        groups.setdefault(r.name, []).append(r)
    rows = []
    for n, rs in groups.items():
        live = [r for r in rs if not r.removed]
        last = (live or rs)[-1]
        rows.append({"name": n, "latest": last.version, "stage": last.stage,
                     "versions": len(live), "removed": len(rs) - len(live),
                     "created": last.created})
    if as_json:
        _json_print(rows)
        return
    if not rows:
        _err().print("the registry is empty: add a model with `edgeops registry add MODEL "
                     "--name NAME`")
        return
    t = Table()
    for c in ("name", "latest", "stage", "versions", "created"):
        t.add_column(c)
    for row in rows:
        count = str(row["versions"]) + (f" (+{row['removed']} removed)" if row["removed"] else "")
        t.add_row(_esc(row["name"]), row["latest"], row["stage"], count, row["created"])
    _out().print(t)


@registry.command("show")
@click.argument("ref")
@json_option
def show(ref, as_json):
    """A version: lineage, metrics, bench results, parity, stage, files, history, and the
    registry versions it came from (upstream) or that were made from it (downstream)."""
    with _open() as reg:
        d = reg.show(*_ref(ref))
    if as_json:
        _json_print(d)
        return
    _render_show(d)


def _render_show(d: dict) -> None:
    from rich.table import Table

    from ..registry.store import bench_latency

    out = _out()
    r = d["record"]
    out.print(f"[bold]{_esc(r['ref'])}[/]  stage [bold]{r['stage']}[/]")
    if r["removed"]:
        out.print(f"  [yellow]removed on {r['removed_at']}: its files are gone; the record "
                  "and history remain[/]")
    out.print(f"  format   {_esc(r['format'])}, {_human_size(r['size'])}, main file "
              f"{_esc(r['main_file'])}")
    out.print(f"  sha256   {r['sha256']}")
    out.print(f"  created  {r['created']} by {_esc(r['creator'])}")
    cv = r["code_version"]
    if cv:
        out.print(f"  code     {_esc(cv['repo'])} @ {cv['git_sha'][:12]}"
                  + (" (dirty)" if cv.get("dirty") else ""))
    env = r["environment"]
    out.print(f"  env      python {env.get('python')}, edgeops {env.get('edgeops')}, "
              f"{_esc(env.get('platform'))}")
    for label, items in (("tags", r["tags"]), ("metrics", [f"{k}={_fmt(v)}" for k, v in
                                                            r["metrics"].items()]),
                         ("data", [f"{x['name']} ({x['sha256'][:12]}...)" for x in r["data"]])):
        if items:
            out.print(f"  {label:<8} {_esc(', '.join(items))}")
    if d["lineage_steps"]:
        out.print("[bold]lineage[/]")
        lines = _lineage_lines(r["lineage"])[::-1]
        for i, s in enumerate(d["lineage_steps"]):
            src = s["source"]
            link = f"  [cyan]= {', '.join(s['registry'])}[/]" if s["registry"] else ""
            if i == 0:
                out.print(f"  {_esc(src.get('name'))} ({_esc(src.get('format'))}, "
                          f"{str(src.get('sha256'))[:12]}){link}")
            elif link:
                out.print(f"  {'   ' * i}{link.strip()}")
            text = lines[i] if i < len(lines) else s["step"]
            out.print(f"  {'   ' * i}└─ {_esc(text)}")
        out.print(f"  {'   ' * len(d['lineage_steps'])}= this version")
    for what in ("upstream", "downstream"):
        if d[what]:
            out.print(f"  {what:<10} " + ", ".join(
                x["ref"] + (" (removed)" if x["removed"] else f" ({x['stage']})") for x in d[what]))
    bench = [a for a in d["attachments"] if a["kind"] == "bench"]
    if bench:
        t = Table(title="bench", title_justify="left")
        for c in ("target", "mode", "latency", "attached"):
            t.add_column(c)
        for a in bench:
            lat = ", ".join(f"{k} {v:.3f}" for k, v in bench_latency(a["data"]).items())
            t.add_row(_esc(a["key"]), a["data"].get("mode", "?"), lat, a["created"])
        out.print(t)
    for a in d["attachments"]:
        if a["kind"] == "parity":
            p = a["data"]
            out.print(f"  parity ({_esc(a['key'])}): {_esc(' -> '.join(p.get('route', [])))} "
                      f"{_esc(p.get('status', '?'))}")
        elif a["kind"] != "bench":
            out.print(f"  {_esc(a['kind'])} ({_esc(a['key'] or '-')}) attached {a['created']}")
    if d["bundles"]:
        out.print("  bundles  " + ", ".join(f"#{b['counter']} {b['target']} {_esc(b['path'])}"
                                           for b in d["bundles"]))
    t = Table(title="files" + (" (gone)" if r["removed"] else ""), title_justify="left")
    for c in ("path", "size", "sha256"):
        t.add_column(c)
    for p, f in r["files"].items():
        t.add_row(_esc(p), _human_size(f["size"]), f["sha256"][:12])
    out.print(t)
    t = Table(title="history", title_justify="left")
    for c in ("at", "action", "actor", "details"):
        t.add_column(c)
    for e in d["events"]:
        det = ", ".join(f"{k}={v}" for k, v in e["details"].items() if k != "sha256")
        t.add_row(e["at"], e["action"], _esc(e["actor"]), _esc(det))
    out.print(t)


@registry.command("compare")
@click.argument("ref_a")
@click.argument("ref_b")
@json_option
def compare(ref_a, ref_b, as_json):
    """Side by side: metrics, size, latency per target, stage, format, sha256, lineage.
    The two versions may belong to different names."""
    from rich.table import Table

    with _open() as reg:
        d = reg.compare(_ref(ref_a), _ref(ref_b))
    if as_json:
        _json_print(d)
        return
    t = Table()
    for c in ("", d["a"], d["b"], "delta"):
        t.add_column(_esc(c))
    for row in d["rows"]:
        a, b, delta = row["a"], row["b"], row["delta"]
        if row["key"] == "size":
            a, b = _human_size(a), _human_size(b)
            delta = None if delta is None else f"{'+' if delta >= 0 else '-'}{_human_size(abs(delta))}"
        elif row["key"] == "sha256":
            a, b = (x[:12] if x else x for x in (a, b))
        elif isinstance(delta, float) and row["a"]:
            delta = f"{delta:+.4g} ({delta / row['a']:+.1%})"
        elif delta is not None:
            delta = f"{delta:+.4g}"
        t.add_row(_esc(row["key"]), _esc(_fmt(a)), _esc(_fmt(b)), _esc(_fmt(delta)))
    _out().print(t)


@registry.command("promote")
@click.argument("ref")
@click.option("--stage", required=True,
              type=click.Choice(["dev", "staging", "production", "archived"]))
def promote(ref, stage):
    """Set a version's stage. Other versions keep theirs: several may be in production."""
    with _open() as reg:
        r = reg.promote(*_ref(ref, need_version=True), stage)
    _out().print(f"{_esc(r.ref)} is now [bold]{r.stage}[/]")


@registry.command("remove")
@click.argument("ref")
@click.option("--keep", type=click.IntRange(min=0), metavar="K",
              help="Retention for NAME: remove all but the K newest live versions "
                   "(staging and production ones are never removed this way).")
@click.option("--force", is_flag=True, help="Also remove a version in production.")
@json_option
def remove(ref, keep, force, as_json):
    """Remove NAME:VERSION (or old versions of NAME with --keep K). Blobs no live version
    needs are deleted; the record stays as a tombstone with its history."""
    name, version = _ref(ref, need_version=keep is None)
    with _open() as reg:
        if keep is not None:
            if version is not None:
                raise UsageError("--keep applies to a NAME, not NAME:VERSION")
            res = reg.retain(name, keep)
        else:
            res = reg.remove(name, version, force=force)
    if as_json:
        _json_print(res.to_dict())
        return
    out = _out()
    if res.removed:
        out.print(f"removed {_esc(', '.join(res.removed))}: freed "
                  f"{_human_size(res.freed_bytes)} ({res.blobs_deleted} blob(s))")
    else:
        out.print("nothing to remove")
    if res.kept:
        out.print(f"kept (staging/production): {_esc(', '.join(res.kept))}")


@registry.command("attach")
@click.argument("ref")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(["bench", "parity", "telemetry", "evaluation"]),
              help="What the document is (a bench or convert report is recognised).")
@click.option("--key", metavar="TARGET",
              help="Key, e.g. the target (default for a bench report: its device or target).")
@json_option
def attach(ref, file, kind, key, as_json):
    """Attach a JSON document to a version, e.g. `edgeops bench MODEL --report FILE`'s report."""
    try:
        data = json.loads(file.read_text())
    except OSError as e:
        raise UsageError(f"{file}: {e.strerror}") from None
    except ValueError as e:
        raise UsageError(f"{file}: not JSON ({e})") from None
    with _open() as reg:
        res = reg.attach(*_ref(ref, need_version=True), kind, data, key=key)
    if as_json:
        _json_print(res)
    else:
        _out().print(f"attached {res['kind']} ({_esc(res['key'] or '-')}) to {_esc(res['ref'])}")
