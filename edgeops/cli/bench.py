"""`edgeops bench`, `edgeops targets ...`, `edgeops devices ...`."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import click

from . import cli
from .commands import _err, _esc, _human_size, _json_print, _out, json_option, shape_option
from ..bench.report import PERCENTILES
from ..errors import EXIT_OK, EXIT_VERIFY, UsageError



def _ms(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def _device_options(f):
    f = click.option("--accept-new-host-key", is_flag=True,
                     help="Trust the host key the device presents if none is pinned (TOFU). "
                          "Only with --ssh; inventory devices have pinned keys.")(f)
    f = click.option("--known-hosts", type=click.Path(path_type=Path),
                     help="known_hosts file for --ssh (default ~/.ssh/known_hosts).")(f)
    f = click.option("--python", "device_python", metavar="PATH",
                     help="Python on the device (default: the inventory's, else python3).")(f)
    f = click.option("--key", type=click.Path(path_type=Path),
                     help="Private key for --ssh (key-only auth).")(f)
    f = click.option("--ssh", "ssh_spec", metavar="USER@HOST[:PORT]",
                     help="An ad-hoc device (not in the inventory).")(f)
    f = click.option("--device", "device_name", metavar="NAME",
                     help="A device from the inventory (edgeops devices add).")(f)
    return f


def _resolve_device(device_name, ssh_spec, key, device_python, known_hosts):
    """An inventory Device, an ad-hoc one from --ssh, or None (this machine)."""
    if device_name and ssh_spec:
        raise UsageError("--device and --ssh are exclusive")
    if not device_name and not ssh_spec:
        if key or device_python or known_hosts:
            raise UsageError("--key/--python/--known-hosts apply to --ssh or --device")
        return None
    from ..fleet.inventory import Inventory
    from ..fleet.ssh import SSHTarget

    if device_name:
        dev = Inventory().get(device_name)
        if device_python:
            dev.python = device_python
        return dev
    if key is None:
        raise UsageError("--ssh needs --key (key-only authentication)")
    t = SSHTarget.parse(ssh_spec, str(key),
                        known_hosts=str(known_hosts or Path.home() / ".ssh" / "known_hosts"))
    return _AdHocDevice(name=t.label, target=t, python=device_python or "python3")


@dataclass
class _AdHocDevice:
    """A device given by --ssh: host key from known_hosts, or accepted when asked."""
    name: str
    target: object
    python: str

    def ssh_target(self):
        return self.target


class _Spinner:
    """A status line on stderr while a measurement runs (TTY only)."""

    def __init__(self, quiet: bool, what: str):
        self.err = _err()
        self.on = not quiet and self.err.is_terminal
        self.what = what
        self.status = None

    def __enter__(self):
        if self.on:
            self.status = self.err.status(self.what)
            self.status.__enter__()
        return self

    def update(self, n: int, secs: float) -> None:
        if self.status is not None:
            self.status.update(f"{self.what}: {n} runs, {secs:.1f} s")

    def __exit__(self, *exc):
        if self.status is not None:
            self.status.__exit__(*exc)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--threads", type=int, default=1, show_default=True,
              help="onnxruntime intra-op threads.")
@click.option("--runs", type=int, help="Exactly N steady-state runs (default: time-based).")
@click.option("--min-seconds", type=float, default=3.0, show_default=True,
              help="Steady state lasts at least this long (and >= 10 runs).")
@click.option("--warmup", type=int, default=10, show_default=True,
              help="Warm-up runs after the first inference, excluded from the statistics.")
@click.option("--inputs", type=click.Path(exists=True, path_type=Path), metavar="DATA",
              help="Inputs (.npz keyed by input name, or a folder of NAME.npy); default random.")
@shape_option
@click.option("--budget-ms", type=float, metavar="MS", help="Latency budget: a breach exits 1.")
@click.option("--percentile", type=click.Choice(PERCENTILES), default="p99", show_default=True,
              help="Statistic the budget applies to.")
@click.option("--cv-threshold", type=float, default=0.10, show_default=True,
              help="Flag the run as noisy above this coefficient of variation.")
@click.option("--target", metavar="NAME", help="Device profile to predict with (with --predict).")
@click.option("--predict", is_flag=True,
              help="Predict the latency on --target from its profile instead of measuring.")
@_device_options
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Also write the JSON report to this file.")
@json_option
def bench(model, threads, runs, min_seconds, warmup, inputs, shapes, budget_ms, percentile,
          cv_threshold, target, predict, device_name, ssh_spec, key, device_python, known_hosts,
          accept_new_host_key, report_path, as_json):
    """Latency of an ONNX MODEL: measured here, measured on a device over SSH (--device /
    --ssh), or predicted for a target profile (--target NAME --predict).

    Phases: session creation, first inference, warm-up (excluded), steady state. Statistics:
    min, mean, std, p50 (bootstrap 95 % CI), p90, p95, p99, p99.9, CV, throughput, peak RSS,
    CPU %. Exit 1 when --budget-ms is breached (a predicted breach: the whole predicted
    interval is over the budget); 3 when the device is unreachable or lacks onnxruntime.
    """
    import json

    from ..bench.measure import Settings, bench as run_bench
    from ..verify import parse_shapes

    dev = _resolve_device(device_name, ssh_spec, key, device_python, known_hosts)
    s = Settings(threads=threads, runs=runs, min_seconds=min_seconds, warmup=warmup,
                 cv_threshold=cv_threshold, shapes=parse_shapes(shapes))
    where = f"on {dev.name}" if dev else "here"
    what = f"predicting on {target}" if predict else f"measuring {model.name} {where}"
    with _Spinner(as_json, what) as sp:
        rep = run_bench(model, settings=s, inputs=inputs, budget_ms=budget_ms,
                        percentile=percentile, target=target, predict=predict, device=dev,
                        accept_new_host_key=accept_new_host_key, progress=sp.update)
    d = rep.to_dict()
    if report_path:
        report_path.write_text(json.dumps(d, indent=2, default=str))
    if as_json:
        _json_print(d)
    else:
        render(d)
    err = _err()
    for w in rep.warnings:
        err.print(f"[bold yellow]warning[/]: {_esc(w)}")
    sys.exit(EXIT_VERIFY if rep.breached else EXIT_OK)


def render(d: dict) -> None:
    from rich.table import Table

    out = _out()
    m = d["model"]
    head = f"[bold]{_esc(Path(m['path']).name)}[/] ({_human_size(m['size_bytes'])}, {m['nodes']} nodes)"
    if d["mode"] == "predicted":
        _render_prediction(out, d, head)
    else:
        where = "this machine" if d["where"] == "local" else f"device {d['device']['name']}"
        out.print(f"{head}: [bold]measured[/] on {_esc(where)}, "
                  f"threads {d['settings']['threads']}, inputs {_esc(d['settings']['inputs'])}")
        r = d["measurement"]
        ph = r["phases"]
        out.print(f"phases: session create {_ms(ph['session_create_ms'])} ms, first inference "
                  f"{_ms(ph['first_inference_ms'])} ms, warm-up {ph['warmup_runs']} runs (mean "
                  f"{_ms(ph['warmup_mean_ms'])} ms, excluded), steady state {r['runs']} runs in "
                  f"{ph['steady_seconds']:.1f} s")
        lat = r["latency_ms"]
        lo, hi = r["p50_ci95_ms"]
        t = Table(title="steady-state latency, measured", title_justify="left")
        t.add_column("statistic")
        t.add_column("ms", justify="right")
        for k in ("min", "mean", "std", "p50", "p90", "p95", "p99", "p99.9", "max"):
            v = _ms(lat[k])
            if k == "p50":
                v = f"[bold]{v}[/]  (95% CI {_ms(lo)}-{_ms(hi)})"
            t.add_row(k, v)
        out.print(t)
        noise = r["noise"]
        flag = "[bold yellow]NOISY[/]" if noise["noisy"] else "stable"
        out.print(f"CV {r['cv']:.1%} ({flag}), throughput {r['throughput_ips']:,.1f}/s, "
                  f"peak RSS {r['peak_rss_mb']} MB, CPU "
                  + (f"{r['cpu_percent']:.0f} %" if r["cpu_percent"] is not None
                     else "- (steady state too short to measure)"))
        if r.get("tail_note"):
            out.print(f"[dim]{_esc(r['tail_note'])}[/]")
        e = d["environment"]
        quota = f", quota {e['cpu_quota_cores']:g} core" if e.get("cpu_quota_cores") else ""
        freq = f", {e['freq_mhz']:.0f} MHz" if e.get("freq_mhz") else ""
        gov = f", governor {e['governor']}" if e.get("governor") else ""
        out.print(f"[dim]{_esc(e['cpu_model'])} ({e['arch']}), {e['logical_cores']} cores, "
                  f"affinity {e['affinity']}{freq}{gov}{quota}; onnxruntime {e['onnxruntime']}, "
                  f"python {e['python']}, host {_esc(e['hostname'])}[/]")
    b = d["budget"]
    if b:
        style = {"BREACH": "bold red", "meets": "bold green"}.get(b["verdict"], "bold yellow")
        out.print(f"budget {b['ms']:g} ms on {b['percentile']}: [{style}]{b['verdict']}[/] "
                  f"({b['basis']}: {_ms(b['value_ms'])} ms)")


def _render_prediction(out, d: dict, head: str) -> None:
    from rich.table import Table

    from ..bench.report import predicted_value

    p, tg = d["prediction"], d["target"]
    lo, hi = p["interval_ms"]
    cal = "calibrated" if p.get("calibrated") else "[yellow]uncalibrated[/]"
    out.print(f"{head}: [bold magenta]PREDICTED[/] for target [bold]{_esc(tg['name'])}[/] "
              f"({_esc(tg['title'])}; {cal}), threads {d['settings']['threads']}")
    stat, value = predicted_value(p)
    out.print(f"predicted {stat} [bold]{_ms(value)} ms[/] (predicted interval "
              f"{_ms(lo)}-{_ms(hi)} ms; {_esc(p.get('basis', ''))})")
    per = p.get("by_class_ms") or {}
    if per:
        t = Table(title="predicted time per op class", title_justify="left")
        t.add_column("class")
        t.add_column("predicted ms", justify="right")
        rows = [(k, v) for k, v in per.items() if v > 0]
        if p.get("overhead_ms"):
            rows.append(("per-node + per-run overhead", p["overhead_ms"]))
        for k, v in sorted(rows, key=lambda kv: -kv[1]):
            t.add_row(k, _ms(v))
        out.print(t)
    if p.get("fits") is not None:
        fits = "[green]fits[/]" if p["fits"] else "[bold red]DOES NOT FIT[/]"
        out.print(f"memory (predicted): weights {p['weights_mb']:.1f} MB + peak activations "
                  f"{p['peak_activation_mb']:.1f} MB vs RAM {p['ram_mb']:,.0f} MB: {fits}")
    if p.get("unseen_classes"):
        out.print(f"[yellow]op classes the calibration never saw: {', '.join(p['unseen_classes'])}[/]")


# ----------------------------------------------------------------------------- targets

@cli.group()
def targets():
    """Device profiles (targets/*.toml; calibrated copies in $EDGEOPS_HOME/targets)."""


@targets.command("list")
@json_option
def targets_list(as_json):
    """Known target profiles."""
    from rich.table import Table

    from .. import targets as tg

    rows = [tg.load(n).summary() for n in tg.names()]
    if as_json:
        _json_print(rows)
        return
    t = Table()
    for c in ("name", "cpu", "isa", "GFLOP/s", "RAM GB", "calibrated"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], _esc(f"{r['cores']}x {r['core']} @ {r['freq_ghz']:g} GHz"), r["isa"],
                  f"{r['peak_gflops_fp32']:g}", f"{r['ram_gb']:g}",
                  "yes" if r["calibrated"] else "no")
    _out().print(t)


@targets.command("show")
@click.argument("name")
@json_option
def targets_show(name, as_json):
    """One profile: facts, sources, efficiency factors, calibration."""
    from .. import targets as tg

    p = tg.load(name)
    if as_json:
        _json_print({**p.data, "path": str(p.path), "origin": p.origin})
        return
    out = _out()
    d = p.data
    out.print(f"[bold]{_esc(d['name'])}[/]: {_esc(d['title'])}  [dim]({_esc(p.origin)}: {p.path})[/]")
    for table in ("cpu", "memory", "power", "runtime", "efficiency", "calibration", "detected"):
        if table in d:
            out.print(f"[bold]\\[{table}][/]")
            for k, v in d[table].items():
                out.print(f"  {k} = {_esc(v)}")
    out.print("[bold]sources[/]")
    for s in d["sources"]:
        out.print(f"  {_esc(s)}")
    if not p.calibrated:
        out.print("[yellow]not calibrated: the efficiency factors are priors, predictions carry "
                  "a wide interval[/]")


@targets.command("calibrate")
@click.argument("name")
@click.option("--local", is_flag=True, help="Calibrate on this machine (the host profile).")
@_device_options
@click.option("--base", metavar="PROFILE",
              help="Create NAME from this profile's facts when NAME does not exist yet.")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--seconds", type=float, default=1.0, show_default=True,
              help="Steady-state seconds per suite model (split over the rounds).")
@click.option("--statistic", type=click.Choice(["p50", "mean"]), default="p50", show_default=True,
              help="What to fit and then predict. mean suits machines whose latency is "
                   "bimodal, e.g. under a CPU quota (containers), where the median of short "
                   "runs does not slow down but the mean does.")
@click.option("--rounds", type=int, default=3, show_default=True,
              help="Time each model in this many round-robin rounds; the least-disturbed "
                   "round's p50 is fitted.")
@json_option
def targets_calibrate(name, local, device_name, ssh_spec, key, device_python, known_hosts,
                      accept_new_host_key, base, threads, seconds, statistic, rounds, as_json):
    """Run the fixed suite (<= 22 small models) on the real machine, fit NAME's efficiency
    factors, and save the calibrated profile to $EDGEOPS_HOME/targets/NAME.toml."""
    from ..bench.calibrate import calibrate

    dev = _resolve_device(device_name, ssh_spec, key, device_python, known_hosts)
    if local == (dev is not None):
        raise UsageError("say where to calibrate: --local or --device NAME (or --ssh)")
    err = _err()
    quiet = as_json or not err.is_terminal

    def progress(i, n, label):
        if not quiet:
            err.print(f"[dim][{i}/{n}] {_esc(label)}[/]")

    rep = calibrate(name, device=dev, base=base, threads=threads, seconds=seconds, rounds=rounds,
                    statistic=statistic,
                    accept_new_host_key=accept_new_host_key, progress=progress)
    if as_json:
        _json_print(rep)
        return
    out = _out()
    c = rep["calibration"]
    out.print(f"calibrated [bold]{_esc(name)}[/] on {_esc(rep['where'])}: {c['n_models']} suite "
              f"models; error of the fit (leave-one-out): median {c['median_abs_loo']:.1%}, "
              f"90th percentile {c['p90_abs_loo']:.1%} (priors before: median "
              f"{c['median_abs_prior']:.1%})")
    eff = rep["efficiency"]
    out.print("efficiency: " + ", ".join(f"{k} {v:.3g}" for k, v in eff.items()))
    out.print(f"saved {_esc(rep['path'])}")


# ----------------------------------------------------------------------------- devices

@cli.group()
def devices():
    """The device inventory: SSH address, key and pinned host key per device."""


@devices.command("add")
@click.argument("name")
@click.option("--ssh", "ssh_spec", required=True, metavar="USER@HOST[:PORT]")
@click.option("--key", required=True, type=click.Path(path_type=Path), help="Private key (key-only auth).")
@click.option("--host-key", metavar="LINE", help="The device's public host key to pin "
              "('ssh-ed25519 AAAA...', from its /etc/ssh/ssh_host_ed25519_key.pub).")
@click.option("--accept-new-host-key", is_flag=True,
              help="Pin whatever key the device presents now (trust on first use).")
@click.option("--python", "device_python", default="python3", show_default=True,
              help="Python with numpy + onnxruntime on the device.")
@click.option("--replace", is_flag=True, help="Overwrite an existing device of that name.")
@json_option
def devices_add(name, ssh_spec, key, host_key, accept_new_host_key, device_python, replace, as_json):
    """Enrol a device: pin its host key and check that key-only login works."""
    from ..fleet.inventory import enrol

    dev = enrol(name, ssh_spec, str(key), accept_new_host_key=accept_new_host_key,
                host_key=host_key, python=device_python, replace=replace)
    if as_json:
        _json_print(dev.to_dict())
    else:
        _out().print(f"enrolled [bold]{_esc(dev.name)}[/] {_esc(dev.user)}@{_esc(dev.host)}:{dev.port}, "
                     f"host key pinned: {_esc(dev.host_key.split()[0])} {_esc(_fingerprint(dev.host_key))}")


def _fingerprint(line: str) -> str:
    """SHA256 fingerprint of a pinned host key, "?" when there is none or it is unreadable."""
    from ..fleet.ssh import fingerprint

    try:
        return fingerprint(line)
    except UsageError:
        return "?"


@devices.command("list")
@json_option
def devices_list(as_json):
    """Enrolled devices."""
    from rich.table import Table

    from ..fleet.inventory import Inventory

    devs = Inventory().list()
    if as_json:
        _json_print([d.to_dict() for d in devs])
        return
    t = Table()
    for c in ("name", "address", "python", "host key"):
        t.add_column(c)
    for d in devs:
        t.add_row(d.name, f"{d.user}@{d.host}:{d.port}", d.python, _fingerprint(d.host_key or ""))
    _out().print(t)


@devices.command("remove")
@click.argument("name")
def devices_remove(name):
    """Forget a device (its pinned host key too)."""
    from ..fleet.inventory import Inventory

    Inventory().remove(name)
    _out().print(f"removed {_esc(name)}")


@devices.command("check")
@click.argument("name")
@json_option
def devices_check(name, as_json):
    """Connect (pinned host key, key auth) and check python, numpy and onnxruntime there."""
    from ..bench.remote import preflight
    from ..fleet.inventory import Inventory
    from ..fleet.ssh import connect

    dev = Inventory().get(name)
    where = f"device {dev.name}"
    with connect(dev.ssh_target()) as conn:
        v = preflight(conn, dev.python, where)
    if as_json:
        _json_print({"name": dev.name, "ok": True, **v})
    else:
        _out().print(f"{_esc(dev.name)}: ok, python {v['python']}, numpy {v['numpy']}, "
                     f"onnxruntime {v['onnxruntime']}, {v['arch']}")
