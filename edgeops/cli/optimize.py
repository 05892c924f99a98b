"""`edgeops optimize`: quantization behind an accuracy budget and a speed gate."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import cli
from .commands import _err, _esc, _human_size, _json_print, _out, json_option, shape_option
from ..errors import EXIT_OK, EXIT_VERIFY, UsageError


class _RichProgress:
    """Progress bars on stderr for calibration and evaluation; stage lines and warnings."""

    def __init__(self, quiet: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.err = _err()
        self.quiet = quiet
        self._bar = None
        self._cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn())
        self._Progress = Progress

    def say(self, msg: str) -> None:
        if not self.quiet:
            self.err.print(_esc(msg))

    def warn(self, msg: str) -> None:
        # warnings are printed even with --json (they go to stderr)
        self.err.print(f"[bold yellow]warning[/]: {_esc(msg)}")

    def task(self, desc: str, total: int):
        if self.quiet or not self.err.is_terminal:
            return lambda: None
        self._bar = self._Progress(*self._cols, console=self.err, transient=True)
        self._bar.start()
        tid = self._bar.add_task(desc, total=total)
        bar = self._bar
        return lambda: bar.advance(tid)

    def done(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "dst", required=True, type=click.Path(path_type=Path),
              help="Output ONNX model. A result that fails a gate goes to OUT.rejected.onnx instead.")
@click.option("--quantize", "mode", type=click.Choice(["dynamic", "static", "fp16", "auto"]),
              help="static: int8 QDQ with calibration; dynamic: int8 weights, activations at run "
                   "time; fp16: half-precision weights; auto: try all, keep the fastest within budget.")
@click.option("--calibration", metavar="DATA",
              help="Calibration data (.npz keyed by input name, or a folder of .npy); "
                   "'random' calibrates on generated inputs (not advised).")
@click.option("--eval", "eval_data", type=click.Path(path_type=Path), metavar="DATA",
              help="Evaluation data (same layout); default: the calibration data.")
@click.option("--labels", metavar="KEY", help="Array in the --eval data holding the labels.")
@click.option("--metric", type=click.Choice(["auto", "accuracy", "agreement", "cosine"]),
              default="auto", show_default=True,
              help="accuracy needs --labels; agreement/cosine compare with the fp32 model.")
@click.option("--max-drop", default=None, metavar="PCT",
              help="Accuracy budget: largest allowed metric drop, e.g. 0.5% (points) or 0.005. "
                   "--quantize: default 1%; --prune/--distill: checked only when given.")
@click.option("--calib-method", type=click.Choice(["auto", "minmax", "entropy", "percentile"]),
              default="auto", show_default=True, help="Calibration; auto tries all three.")
@click.option("--target", metavar="PROFILE",
              help="Take CPU features from a target profile (targets/NAME.toml or a file) "
                   "instead of this machine.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="onnxruntime intra-op threads for evaluation and timing.")
@click.option("--min-seconds", "measure_seconds", type=float, default=3.0, show_default=True,
              help="Speed gate: time every model for at least this long (interleaved, >= 50 "
                   "rounds unless a slow model reaches 10x this first).")
@click.option("--require-speedup", is_flag=True,
              help="Exit 1 unless the result measures faster than fp32 (>= 1.05x p50).")
@click.option("--op-types", metavar="OPS", help="Comma-separated op types for dynamic mode "
              "(default from the CPU: MatMul,Gemm,... and Conv only on ARM).")
@click.option("--exclude", metavar="NODES", help="Comma-separated node names to keep in float.")
@click.option("--fp32-io/--fp16-io", "keep_io_types", default=True, show_default=True,
              help="fp16: keep fp32 inputs and outputs.")
@click.option("--keep-opset", is_flag=True,
              help="Never raise the model's opset (by default opsets below 13 go to 13 when the "
                   "result verifies: per-channel weights need it). Weights are per-tensor then.")
@click.option("--prune", "ratio", type=float, metavar="RATIO",
              help="Prune this fraction of channels/neurons (structured) or weights (unstructured).")
@click.option("--structured/--unstructured", default=True, show_default=True,
              help="Structured removes whole channels (faster); unstructured only zeroes weights.")
@click.option("--importance", type=click.Choice(["l1", "l2"]), default="l1", show_default=True,
              help="Channel importance: L1 or L2 norm of the weights.")
@click.option("--keep", multiple=True, metavar="NAME",
              help="Never prune this layer (ONNX node name of a Conv/Gemm/MatMul; repeatable).")
@click.option("--distill", is_flag=True,
              help="Train the student on the teacher's (SRC's) outputs over --data.")
@click.option("--data", "distill_data", type=click.Path(path_type=Path), metavar="DATA",
              help="Distillation inputs (unlabeled; .npz keyed by input name or a folder of .npy).")
@click.option("--student", default="pruned", show_default=True, metavar="SPEC",
              help="pruned (needs --prune), width:X (a copy keeping X of the channels), or a "
                   "TorchScript FILE.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--temperature", type=float, default=4.0, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@shape_option
@json_option
def optimize(src, dst, mode, calibration, eval_data, labels, metric, max_drop, calib_method,
             target, threads, measure_seconds, require_speedup, op_types, exclude, keep_io_types,
             keep_opset, ratio,
             structured, importance, keep, distill, distill_data, student, epochs, lr,
             temperature, batch_size, seed, shapes, as_json):
    """Quantize, prune or distill SRC, each result checked and measured.

    --quantize: int8/fp16 inside an accuracy budget (--max-drop); over budget, the nodes
    that inject the most error stay float. Exit 1 when the budget cannot be met or
    --require-speedup finds no speedup (the best attempt goes to OUT.rejected.onnx).

    --prune / --distill: structured pruning (channels really removed, dependencies kept
    consistent) and distillation from SRC as teacher; `--prune 0.5 --distill --data D`
    runs both. The result can then go through --quantize.
    """
    from ..optimize.quantize import quantize
    from ..optimize.gates import parse_drop
    from ..verify import parse_shapes

    if mode is not None and (ratio is not None or distill):
        raise UsageError("--quantize and --prune/--distill are separate steps: prune or "
                         "distill first, then quantize the result")
    if mode is None and ratio is None and not distill:
        raise UsageError("choose an optimization: --quantize {dynamic,static,fp16,auto}, "
                         "--prune RATIO, or --distill")
    prog = _RichProgress(quiet=as_json)
    if mode is None:
        from ..optimize.prune import run

        _refuse_for_prune(calibration=calibration, calib_method=calib_method, target=target,
                          op_types=op_types, exclude=exclude, keep_io_types=keep_io_types,
                          keep_opset=keep_opset)
        rep = run(src, dst, ratio=ratio, structured=structured, importance=importance,
                  keep=list(keep), distill=distill, data=distill_data, student=student,
                  epochs=epochs, lr=lr, temperature=temperature, batch_size=batch_size,
                  seed=seed, eval_data=eval_data, labels=labels, metric=metric,
                  threads=threads, shapes=parse_shapes(shapes),
                  max_drop=parse_drop(max_drop) if max_drop is not None else None,
                  require_speedup=require_speedup, measure_seconds=measure_seconds, progress=prog)
        if as_json:
            _json_print(rep.to_dict())
        else:
            _render_prune(rep)
        sys.exit(EXIT_OK if rep.passed else EXIT_VERIFY)
    _refuse_for_quantize(ratio=ratio, structured=structured, importance=importance, keep=keep,
                         distill_data=distill_data, student=student, epochs=epochs, lr=lr,
                         temperature=temperature, batch_size=batch_size, seed=seed)
    report = quantize(
        src, dst, mode, calibration=calibration, eval_data=eval_data, labels=labels,
        metric=metric, max_drop=parse_drop(max_drop if max_drop is not None else "1%"),
        calib_method=calib_method, target=target,
        threads=threads, require_speedup=require_speedup,
        op_types=_csv(op_types), exclude=_csv(exclude), keep_io_types=keep_io_types,
        shapes=parse_shapes(shapes), keep_opset=keep_opset, measure_seconds=measure_seconds,
        progress=prog)
    if as_json:
        _json_print(report.to_dict())
    else:
        _render(report)
    sys.exit(EXIT_OK if report.passed else EXIT_VERIFY)


def _refuse_for_prune(**given) -> None:
    """Options of --quantize that --prune/--distill would otherwise silently ignore."""
    defaults = {"calibration": None, "calib_method": "auto", "target": None, "op_types": None,
                "exclude": None, "keep_io_types": True, "keep_opset": False}
    used = [k for k, v in given.items() if v != defaults[k]]
    if used:
        flags = ", ".join("--" + k.replace("_", "-").replace("keep-io-types", "fp16-io") for k in used)
        raise UsageError(f"{flags}: only for --quantize; --prune/--distill do not use "
                         f"{'it' if len(used) == 1 else 'them'}")


def _refuse_for_quantize(**given) -> None:
    """Options of --prune/--distill that --quantize would otherwise silently ignore."""
    defaults = {"ratio": None, "structured": True, "importance": "l1", "keep": (),
                "distill_data": None, "student": "pruned", "epochs": 10, "lr": 1e-3,
                "temperature": 4.0, "batch_size": 64, "seed": 0}
    used = [k for k, v in given.items() if v != defaults[k] and not (k == "keep" and not v)]
    if used:
        names = {"structured": "unstructured", "distill_data": "data", "batch_size": "batch-size"}
        flags = ", ".join("--" + names.get(k, k) for k in used)
        raise UsageError(f"{flags}: only for --prune/--distill; --quantize does not use "
                         f"{'it' if len(used) == 1 else 'them'}")


def _outcome(out, r, verified: str) -> None:
    """The last lines of a quantize or prune report: what was written, or why not."""
    if r.passed:
        out.print(f"[green]ok[/]: wrote {_esc(r.output)}{verified}")
    else:
        out.print(f"[bold red]FAILED[/]: {_esc(r.failure)}")
        out.print(f"best attempt (do not ship): {_esc(r.rejected_output)}")
    out.print(f"report: {_esc(r.report_path)}")


def _names(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _render(r) -> None:
    from rich.table import Table

    out = _out()
    if not out.is_terminal:
        out.width = max(out.width, 120)
    unit = {"accuracy": "accuracy", "agreement": "agree", "cosine": "cosine"}[r.metric]
    t = Table(title=f"quantize {_esc(r.source)} ({r.mode}); {r.threads} thread(s), "
                    f"eval: {_esc(r.eval_data)} ({r.eval_samples} samples)")
    for col in ("variant", "size", "x size", "p50 ms", "speedup", unit, "drop", "fallback",
                "budget", "speed"):
        t.add_column(col, justify="left" if col in ("variant", "budget", "speed") else "right",
                     no_wrap=True)
    t.add_row("fp32" + (" *" if r.chosen == "fp32" else ""), _human_size(r.fp32["size"]), "1.00",
              f"{r.fp32['p50_ms']:.3f}", "1.00x", _pct(r.metric_fp32), "", "", "", "baseline")
    for v in r.variants:
        if v.error:
            t.add_row(v.name, "", "", "", "", "", "", "", "[red]failed[/]", "(below)")
            continue
        budget = "[green]ok[/]" if v.within_budget else "[red]OVER[/]"
        speed = {"faster": "[green]faster[/]", "not faster": "[yellow]NOT FASTER[/]",
                 "SLOWER": "[bold red]SLOWER[/]"}.get(v.verdict, "")
        mark = " *" if v.name == r.chosen else ""
        t.add_row(f"{v.name}{mark}", _human_size(v.size), f"{v.size / r.fp32['size']:.2f}",
                  f"{v.p50_ms:.3f}", f"{v.speedup:.2f}x", _pct(v.metric), _pct(v.drop),
                  str(len(v.fallback_nodes)), budget, speed)
    out.print(t)
    for v in r.variants:
        if v.error:
            out.print(f"[red]{v.name} failed[/]: {_esc(v.error)}")
    ch = r.variant(r.chosen)
    out.print(f"budget: max drop {_pct(r.max_drop)} of {r.metric}; calibration: "
              f"{_esc(r.calibration or 'none')}")
    for what, d in (("calibration data", r.calibration_layout), ("eval data", r.eval_layout)):
        if d:
            out.print(f"{what}: {_esc(d)}")
    out.print(f"cpu: {r.cpu['arch']} {' '.join(r.cpu['features'])} ({_esc(r.cpu['source'])})")
    for why in r.settings["reasons"]:
        out.print(f"  - {_esc(why)}")
    shown = ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                      for k, v in ch.settings.items() if not isinstance(v, dict))
    out.print(f"chosen: {ch.name} ({_esc(shown)})")
    repaired = sorted({x["node"] for x in ch.repaired})
    accuracy = [n for n in ch.fallback_nodes if n not in repaired and n not in ch.speed_float]
    if accuracy:
        out.print(f"kept float for accuracy ({len(accuracy)}): {_esc(_names(accuracy))}")
    if ch.speed_float:
        out.print(f"kept float for speed ({len(ch.speed_float)} nodes of layers slower in int8 "
                  f"on this CPU): {_esc(_names(ch.speed_float))}")
    if repaired:
        out.print(f"[yellow]kept float because the quantized form fails in onnxruntime "
                  f"({len(repaired)})[/]: {_esc(_names(repaired))} -- "
                  f"{_esc(ch.repaired[0]['reason'][:160])}")
    for v in r.variants:
        if v.speed_reason and v.verdict != "faster":
            out.print(f"{v.name} measured: {_esc(v.speed_reason)}")
    w = ch.weights or {}
    if w.get("float_weight_tensors"):
        out.print(f"[yellow]{w['float_weight_tensors']} weight tensor(s), "
                  f"{w['float_compute_params']:,} params, stayed float[/] (largest: "
                  f"{_esc(w['float_weights'][0]['name'])} in {w['float_weights'][0]['op']})")
    for msg in r.warnings:
        if "NOT FASTER" in msg or "SLOWER" in msg or msg.startswith("auto:"):
            out.print(f"[bold yellow]{_esc(msg.split(' -- measured:')[0])}[/]")
    _outcome(out, r, "")


def _render_prune(r) -> None:
    from rich.table import Table

    out = _out()
    if not out.is_terminal:
        out.width = max(out.width, 120)
    kind = ("structured" if r.structured else "unstructured") + f" pruning {r.ratio:g}"
    if r.distill:
        kind = (kind + " + " if r.distill["student"] == "pruned" else "") + \
            f"distillation (student: {r.distill['student']})"
    t = Table(title=f"{_esc(r.source)}: {_esc(kind)}; {r.threads} thread(s)")
    unit = r.metric or "metric"
    for col in ("model", "params", "FLOPs", "size", "gzip", "p50 ms", "speedup", unit):
        t.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)

    def row(name, st, speed):
        t.add_row(name, f"{st.params:,}", _flops(st.flops),
                  _human_size(st.size), _human_size(st.gzip_size),
                  f"{st.p50_ms:.3f}" if st.p50_ms else "-", speed,
                  "-" if st.metric is None else f"{100 * st.metric:.2f}%")

    row("original", r.before, "1.00x")
    if r.distill:
        s0 = r.distill["student_before"]
        t.add_row("student, before distillation", f"{s0['params']:,}", "", _human_size(s0["size"]),
                  "", f"{s0['p50_ms']:.3f}", f"{r.before.p50_ms / s0['p50_ms']:.2f}x",
                  "-" if s0["metric"] is None else f"{100 * s0['metric']:.2f}%")
    row("result" + (" (distilled)" if r.distill else ""), r.after, f"{r.speedup:.2f}x")
    out.print(t)
    changed = [c for c in r.layers if c.before != c.after]
    if changed:
        out.print("layers: " + ", ".join(f"{_esc(c.name)} {c.before}->{c.after}" for c in changed[:12])
                  + (f" (+{len(changed) - 12} more)" if len(changed) > 12 else ""))
    if r.kept_layers:
        out.print(f"never pruned: {_esc(', '.join(r.kept_layers))}")
    if r.distill:
        d = r.distill
        out.print(f"distillation: {d['loss']} loss, T={d['temperature']:g}, lr={d['lr']:g}, "
                  f"{d['epochs_run']}/{d['epochs']} epochs (best {d['best_epoch']}"
                  f"{', early stop' if d['early_stopped'] else ''}), seed {d['seed']}; "
                  f"{_esc(d['eval'])}: {100 * d['eval_before']:.2f}% -> {100 * d['eval_after']:.2f}%")
    for n in r.notes:
        out.print(f"note: {_esc(n)}")
    for w in r.warnings:
        out.print(f"[bold yellow]{_esc(w)}[/]")
    if r.max_drop is not None:
        out.print(f"budget: max drop {_pct(r.max_drop)} of {r.metric}")
    _outcome(out, r, " (verified: runs, same signature)")


def _flops(n: int | None) -> str:
    if n is None:
        return "?"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return str(n)
