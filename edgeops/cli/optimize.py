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
@click.option("--max-drop", default="1%", show_default=True, metavar="PCT",
              help="Accuracy budget: largest allowed metric drop, e.g. 0.5% (points) or 0.005.")
@click.option("--calib-method", type=click.Choice(["auto", "minmax", "entropy", "percentile"]),
              default="auto", show_default=True, help="Calibration; auto tries all three.")
@click.option("--target", metavar="PROFILE",
              help="Take CPU features from a target profile (targets/NAME.toml or a file) "
                   "instead of this machine.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="onnxruntime intra-op threads for evaluation and timing.")
@click.option("--require-speedup", is_flag=True,
              help="Exit 1 unless the result measures faster than fp32 (>= 1.05x p50).")
@click.option("--op-types", metavar="OPS", help="Comma-separated op types for dynamic mode "
              "(default from the CPU: MatMul,Gemm,... and Conv only on ARM).")
@click.option("--exclude", metavar="NODES", help="Comma-separated node names to keep in float.")
@click.option("--fp32-io/--fp16-io", "keep_io_types", default=True, show_default=True,
              help="fp16: keep fp32 inputs and outputs.")
@shape_option
@json_option
def optimize(src, dst, mode, calibration, eval_data, labels, metric, max_drop, calib_method,
             target, threads, require_speedup, op_types, exclude, keep_io_types, shapes, as_json):
    """Quantize SRC (ONNX) inside an accuracy budget, and call it faster only if it is.

    Over budget, the nodes that inject the most error are kept in float until the budget
    holds; the report lists them. Exit 1 when the budget cannot be met or --require-speedup
    finds no speedup; the best attempt is then written to OUT.rejected.onnx.
    """
    from ..optimize.quantize import quantize
    from ..optimize.gates import parse_drop
    from ..verify import parse_shapes

    if mode is None:
        raise UsageError("choose an optimization: --quantize {dynamic,static,fp16,auto}")
    prog = _RichProgress(quiet=as_json)
    report = quantize(
        src, dst, mode, calibration=calibration, eval_data=eval_data, labels=labels,
        metric=metric, max_drop=parse_drop(max_drop), calib_method=calib_method, target=target,
        threads=threads, require_speedup=require_speedup,
        op_types=_csv(op_types), exclude=_csv(exclude), keep_io_types=keep_io_types,
        shapes=parse_shapes(shapes), progress=prog)
    if as_json:
        _json_print(report.to_dict())
    else:
        _render(report)
    sys.exit(EXIT_OK if report.passed else EXIT_VERIFY)


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
    t.add_row("fp32", _human_size(r.fp32["size"]), "1.00", f"{r.fp32['p50_ms']:.3f}", "1.00x",
              _pct(r.metric_fp32), "", "", "", "baseline")
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
    out.print(f"cpu: {r.cpu['arch']} {' '.join(r.cpu['features'])} ({_esc(r.cpu['source'])})")
    for why in r.settings["reasons"]:
        out.print(f"  - {_esc(why)}")
    shown = ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                      for k, v in ch.settings.items() if not isinstance(v, dict))
    out.print(f"chosen: {ch.name} ({_esc(shown)})")
    if ch.fallback_nodes:
        out.print(f"kept in float ({len(ch.fallback_nodes)}): {_esc(', '.join(ch.fallback_nodes))}")
    w = ch.weights or {}
    if w.get("float_weight_tensors"):
        out.print(f"[yellow]{w['float_weight_tensors']} weight tensor(s), "
                  f"{w['float_compute_params']:,} params, stayed float[/] (largest: "
                  f"{_esc(w['float_weights'][0]['name'])} in {w['float_weights'][0]['op']})")
    for msg in r.warnings:
        if "NOT FASTER" in msg or "SLOWER" in msg:
            out.print(f"[bold yellow]{_esc(msg)}[/]")
    if r.passed:
        out.print(f"[green]ok[/]: wrote {_esc(r.output)}")
    else:
        out.print(f"[bold red]FAILED[/]: {_esc(r.failure)}")
        out.print(f"best attempt (do not ship): {_esc(r.rejected_output)}")
    out.print(f"report: {_esc(r.report_path)}")
