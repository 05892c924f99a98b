"""`edgeops telemetry collect|ingest|show|serve`."""

from __future__ import annotations

import time

import click

from . import cli
from .commands import _err, _esc, _json_print, _out, json_option
from ..errors import EXIT_ENV, UsageError


@cli.group()
def telemetry():
    """Device telemetry: collect it (SSH pull or MQTT push), look at it, export it to Prometheus."""


def _store():
    from ..telemetry.store import Store

    return Store()


@telemetry.command("collect")
@click.option("--devices", "selector", metavar="SEL", help="Names (d1,d2) or labels (site=lab).")
@click.option("--all", "everything", is_flag=True, help="Every enrolled device.")
@click.option("--parallel", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option("--batch", type=click.IntRange(1, 100000), default=5000, show_default=True,
              help="Records per round trip (each round is stored, then acknowledged).")
@json_option
def telemetry_collect(selector, everything, parallel, batch, as_json):
    """Pull every device's spooled telemetry over SSH, exactly once (stored, then acknowledged).
    Exit 0 all devices collected, 3 some could not be reached (the rest were collected)."""
    from ..telemetry.collect import collect
    from .rollout import _devices

    devs = _devices(selector, everything)
    store = _store()
    t = time.monotonic()
    res = collect(devs, store, parallel=parallel, batch=batch)
    wall = time.monotonic() - t
    failed = [r for r in res if not r.ok]
    if as_json:
        _json_print({"devices": [r.to_dict() for r in res], "seconds": wall, "store": store.url})
    else:
        o = _out()
        for r in res:
            if r.ok:
                o.print(f"{_esc(r.device)}: {r.inserted} record(s) stored"
                        + (f", {r.duplicates} already stored" if r.duplicates else "")
                        + (f"; spool dropped {r.dropped}" if any(r.dropped.values()) else ""))
            else:
                o.print(f"[red]{_esc(r.device)}: {_esc(r.error)}[/]")
        o.print(f"{sum(r.inserted for r in res)} record(s) from {len(res) - len(failed)}/{len(res)} device(s) "
                f"in {wall:.1f}s into {_esc(store.url)}")
    if failed:
        raise SystemExit(EXIT_ENV)


@telemetry.command("ingest")
@click.option("--mqtt", "url", required=True, metavar="URL", help="mqtt://HOST[:PORT] of the broker.")
@click.option("--client-id", default="edgeops-ingest", show_default=True,
              help="Persistent session name: messages published while ingest was down are delivered on return.")
@click.option("--for", "seconds", type=float, help="Stop after this many seconds (default: until Ctrl-C).")
@click.option("--idle", type=float, help="Stop after this many seconds without a message.")
@json_option
def telemetry_ingest(url, client_id, seconds, idle, as_json):
    """Store what devices publish over MQTT (push mode), acknowledging each message after its commit."""
    from ..telemetry.collect import ingest

    say = (lambda m: None) if as_json else (lambda m: _err().print(f"[dim]{_esc(m)}[/]"))
    store = _store()
    if not as_json:
        _err().print(f"[dim]ingesting edgeops/telemetry/+ from {_esc(url)} into {_esc(store.url)}[/]")
    res = ingest(url, store, client_id=client_id, seconds=seconds, idle=idle, progress=say)
    if as_json:
        _json_print(res.to_dict())
    else:
        _out().print(f"{res.inserted} record(s) stored from {res.messages} message(s) in {res.seconds:.1f}s"
                     + (f"; {res.duplicates} redelivered, already stored" if res.duplicates else "")
                     + (f"; {res.rejected} rejected" if res.rejected else ""))


@telemetry.command("show")
@click.option("--model", help="Only this model name.")
@click.option("--device", "selector", metavar="SEL", help="Device names (d1,d2).")
@click.option("--since", help="Only windows from the last 30m, 1h, 2d ...")
@json_option
def telemetry_show(model, selector, since, as_json):
    """Per model version and device: requests, p50/p99, error rate, PSI against the reference profile,
    alerts. Exit 0 (alerts are data, not failures)."""
    from ..telemetry import analysis as A

    devices = [x for x in selector.split(",") if x] if selector else None
    store = _store()
    rows = A.summarize(store, model=model, devices=devices, since=A.parse_since(since))
    if as_json:
        _json_print({"rows": rows, "devices": store.devices()})
        return
    if not rows:
        _out().print("no telemetry stored for that selection (edgeops telemetry collect --all)")
        return
    from rich.table import Table

    o = _out()
    f = lambda x, n=2: "-" if x is None else f"{x:.{n}f}"  # noqa: E731
    for model in sorted({r["model"] for r in rows}):
        t = Table("version", "device", "requests", "p50 ms", "p99 ms", "err", "PSI in", "PSI out", "alerts",
                  box=None, title=f"[bold]{_esc(model)}[/]", title_justify="left")
        for r in (x for x in rows if x["model"] == model):
            t.add_row(_esc(r["version"]), _esc(r["device"]), str(r["count"]), f(r["p50_ms"], 3), f(r["p99_ms"], 3),
                      f"{r['error_rate'] * 100:.1f} %", f(r["psi_in"]), f(r["psi_out"]),
                      f"[red]{len(r['alerts'])}[/]" if r["alerts"] else "0")
        o.print(t)
    for r in rows:
        for a in r["alerts"]:
            o.print(f"[red]alert[/] {_esc(r['device'])} {_esc(r['model'])}:{_esc(r['version'])}: {_esc(a)}")


@telemetry.command("serve")
@click.option("--port", type=click.IntRange(1, 65535), default=9464, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (localhost by default).")
@click.option("--window", type=float, default=900, show_default=True, help="Seconds of windows the PSI gauges cover.")
@click.option("--for", "seconds", type=float, help="Stop after this many seconds (default: until Ctrl-C).")
def telemetry_serve(port, host, window, seconds):
    """Expose the telemetry store on /metrics in the Prometheus text format."""
    import threading

    from ..telemetry.export import make_server

    try:
        srv = make_server(_store(), host, port, window)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    _err().print(f"[dim]serving http://{host}:{srv.server_address[1]}/metrics[/]")
    if seconds:
        threading.Timer(seconds, srv.shutdown).start()
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
