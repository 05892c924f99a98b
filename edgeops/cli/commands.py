"""`edgeops convert`, `edgeops inspect`, `edgeops formats`.

Each command parses options, calls one library function, and renders the result as a
rich table (stdout) or JSON (--json). Progress lines go to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import cli
from ..errors import EXIT_OK, EXIT_VERIFY

# ----------------------------------------------------------------------------- helpers


def _out():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _err():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _esc(text) -> str:
    from rich.markup import escape

    return escape(str(text))


def _json_print(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _human_size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_num(x: float | None, spec: str = ".2e") -> str:
    return "-" if x is None else format(x, spec)


shape_option = click.option(
    "--shape", "shapes", multiple=True, metavar="NAME=D1,D2,..",
    help="Concrete shape for an input (repeatable); needed for dynamic dims or TorchScript.")
inputs_option = click.option(
    "--inputs", type=click.Path(exists=True, path_type=Path), metavar="DATA",
    help="Real inputs: .npz keyed by input name, or a folder of NAME.npy files.")
trust_option = click.option(
    "--trust-pickle", is_flag=True,
    help="Load a pickle even if it references code outside the allow-list (only for files you trust).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


# ----------------------------------------------------------------------------- convert

@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "dst", required=True, type=click.Path(path_type=Path),
              help="Output path; its suffix picks the format unless --to is given.")
@click.option("--to", "to", metavar="FORMAT",
              help="Target format: onnx, torchscript, mlpackage, mlmodel ... (see 'edgeops formats').")
@click.option("--via", multiple=True, metavar="FORMAT",
              help="Force the route through this format (repeatable, in order).")
@click.option("--opset", type=int, help="ONNX opset to export (default: the converter's choice, 17 for most).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Core ML compute precision (fp32 keeps parity; fp16 is Core ML's default).")
@shape_option
@inputs_option
@click.option("--atol", type=float, help="Absolute tolerance (default per dtype and converter).")
@click.option("--rtol", type=float, help="Relative tolerance (default per dtype and converter).")
@click.option("--input-names", help="Comma-separated input tensor names (frozen GraphDef).")
@click.option("--output-names", help="Comma-separated output tensor names (frozen GraphDef).")
@trust_option
@click.option("--keep-intermediate", is_flag=True, help="Keep each hop's file beside the output.")
@click.option("--strict", is_flag=True,
              help="Exit 1 when the result could not be executed here (e.g. Core ML on Linux).")
@json_option
def convert(src, dst, to, via, opset, precision, shapes, inputs, atol, rtol, input_names,
            output_names, trust_pickle, keep_intermediate, strict, as_json):
    """Convert SRC to another format, checking every hop numerically.

    The route is planned through the converter graph (ONNX is the hub) and printed with
    each hop's parity. A parity breach exits 1 and leaves the JSON report beside the output.
    """
    from ..convert import convert as do_convert
    from ..verify import parse_shapes

    err = _err()
    progress = None if as_json else (lambda msg: err.print(_esc(msg)))
    report = do_convert(
        src, dst, to=to, via=via, opset=opset, precision=precision, inputs=inputs,
        shapes=parse_shapes(shapes), atol=atol, rtol=rtol, trust_pickle=trust_pickle,
        input_names=_names(input_names), output_names=_names(output_names),
        keep_intermediate=keep_intermediate, progress=progress)
    if as_json:
        _json_print(report.to_dict())
    else:
        _render_convert(report)
    if report.status == "failed" or (strict and report.status != "passed"):
        sys.exit(EXIT_VERIFY)
    sys.exit(EXIT_OK)


def _names(csv: str | None) -> tuple[str, ...] | None:
    return tuple(n.strip() for n in csv.split(",") if n.strip()) if csv else None


def _render_convert(report) -> None:
    from rich.table import Table

    out = _out()
    t = Table(title="route: " + " -> ".join(report.route))
    for col in ("hop", "tool", "seconds", "parity", "max abs", "cosine", "agreement"):
        t.add_column(col)
    for h in report.hops:
        p = h.parity
        agree = [o.top1_agreement for o in p.outputs if o.top1_agreement is not None]
        agree += [o.agreement for o in p.outputs if o.agreement is not None]
        status = {"passed": "[green]passed[/]", "failed": "[red]FAILED[/]",
                  "not-executed": "[yellow]not executed[/]"}[p.status]
        t.add_row(f"{h.source} -> {h.target}", _esc(h.tool), f"{h.seconds:.2f}", status,
                  _fmt_num(p.max_abs), _fmt_num(p.min_cosine, ".6f"),
                  f"{100 * min(agree):.1f}%" if agree else "-")
    if report.end_to_end is not None:
        p = report.end_to_end
        t.add_row("end to end", "", "", "[green]passed[/]" if p.passed else "[red]FAILED[/]",
                  _fmt_num(p.max_abs), _fmt_num(p.min_cosine, ".6f"), "")
    out.print(t)
    for h in report.hops:
        info = h.info or {}
        for step in info.get("normalised") or []:
            out.print(f"  {_esc(h.target)}: normalised: {_esc(step)}")
        for line in info.get("tolerances") or []:
            out.print(f"  {_esc(h.target)}: tolerance: {_esc(line)}")
        if info.get("outputs_renamed"):
            out.print(f"  {_esc(h.target)}: outputs renamed to where their values are: " +
                      _esc(", ".join(f"{a} -> {b}" for a, b in info["outputs_renamed"].items())))
        if info.get("note"):
            out.print(f"  {_esc(h.target)}: [yellow]{_esc(info['note'])}[/]")
    if report.shapes_checked:
        shown = "; ".join(
            f"{c['what']} (" + ", ".join(f"{k} {v}" for k, v in c["shapes"].items()) + f"): {c['result']}"
            for c in report.shapes_checked)
        fixed = len(report.shapes_checked) == 1
        out.print(f"  shapes checked: {_esc(shown)}" +
                  (" (the result declares no other shape)" if fixed else ""))
    if report.status == "passed":
        out.print(f"[green]ok[/]: wrote {_esc(report.output)} ({_human_size(report.output_size)}), "
                  f"parity checked on {report.hops[0].parity.n_inputs} input(s) "
                  f"({_esc(report.hops[0].parity.input_source)})")
    elif report.status == "not-executed":
        out.print(f"[yellow]wrote {_esc(report.output)} but it was NOT VERIFIED[/]: "
                  f"{_esc(report.message)}. The spec was loaded and validated; every earlier hop "
                  "was checked.")
    else:
        out.print(f"[bold red]FAILED[/]: {_esc(report.message)}")
        for h in report.hops:
            for o in h.parity.outputs:
                if not o.passed:
                    out.print(f"  output {_esc(o.name)}: max abs {_fmt_num(o.max_abs)}, "
                              f"{o.violations} element(s) outside atol={h.parity.atol} "
                              f"rtol={h.parity.rtol} {_esc(o.note)}")
    out.print(f"report: {_esc(report.report_path)}")


# ----------------------------------------------------------------------------- inspect

@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@shape_option
@trust_option
@json_option
def inspect(path, shapes, trust_pickle, as_json):
    """Show a model's format, signature, parameter count, opset, size and sha256."""
    from ..inspect import inspect_model
    from ..verify import parse_shapes

    info = inspect_model(path, shapes=parse_shapes(shapes), trust_pickle=trust_pickle)
    if as_json:
        _json_print(info)
        return
    from rich.table import Table

    out = _out()
    out.print(f"[bold]{_esc(path)}[/]")
    out.print(f"  format   {_esc(info['format'])} ({_esc(info['description'])})")
    out.print(f"  size     {_human_size(info['size'])}")
    out.print(f"  sha256   {info['sha256']}")
    if info.get("params") is not None:
        extra = ""
        b = info.get("params_breakdown")
        if b and (b.get("constants") or b.get("subgraphs")):
            extra = (f" (initializers {b['initializers']:,}, Constant nodes {b['constants']:,}, "
                     f"subgraphs {b['subgraphs']:,})")
        out.print(f"  params   {info['params']:,}{extra}")
    if info.get("opset"):
        out.print("  opset    " + ", ".join(f"{k} {v}" for k, v in info["opset"].items()))
    for key in ("producer", "estimator", "model_type", "precision", "keras_version", "nodes"):
        if info.get(key) not in (None, "", {}):
            out.print(f"  {key:<8} {_esc(info[key])}")
    sig = info.get("signature")
    if sig:
        t = Table(show_header=True, box=None, pad_edge=False)
        for col in ("", "name", "dtype", "shape"):
            t.add_column(col)
        for kind in ("inputs", "outputs"):
            for s in sig[kind]:
                shape = "?" if s["shape"] is None else "[" + ", ".join(
                    "?" if d is None else str(d) for d in s["shape"]) + "]"
                t.add_row(kind[:-1], _esc(s["name"]), _esc(s["dtype"]), _esc(shape))
        out.print(t)
    elif info.get("signature_error"):
        out.print(f"  signature: [yellow]{_esc(info['signature_error'])}[/]")
    rt = info.get("runtime")
    if rt:
        style = "yellow" if "CANNOT" in rt else "green"
        out.print(f"  runtime  [{style}]{_esc(rt)}[/]")
    if info.get("lineage"):
        for i, line in enumerate(_lineage_lines(info["lineage"])):
            out.print(f"  {'lineage' if i == 0 else '':<8} {_esc(line)}")


def _lineage_lines(lin, depth: int = 0) -> list[str]:
    """One line per lineage step, newest first, following the parent chain."""
    if not isinstance(lin, dict) or depth > 20:
        return [str(lin)]
    step = lin.get("step", "?")
    src = lin.get("source", {}).get("name", "?") if isinstance(lin.get("source"), dict) else "?"
    if step.startswith("optimize.") and isinstance(lin.get("quantize"), dict):
        q = lin["quantize"]
        line = (f"{step} of {src}: {q.get('variant')} ({q.get('metric')} "
                f"{q.get('metric_fp32', 0):.4f} -> {q.get('metric_quantized', 0):.4f}, "
                f"{q.get('speedup', 0):.2f}x, {'passed' if q.get('passed') else 'FAILED'})")
    elif step.startswith("optimize.") and isinstance(lin.get("prune"), dict):
        p = lin["prune"]
        params = p.get("params") or [0, 0]
        acc = (f", {p.get('metric')} {p['metric_before']:.4f} -> {p['metric_after']:.4f}"
               if p.get("metric_after") is not None else "")
        line = (f"{step} of {src}: ratio {p.get('ratio')}, params {params[0]:,} -> "
                f"{params[1]:,}, {p.get('speedup', 0):.2f}x{acc}")
    else:
        route = " -> ".join(lin.get("route", []))
        line = f"{step} of {src}: {route} (parity {lin.get('status', '?')})"
    parent = lin.get("parent")
    return [line] + (_lineage_lines(parent, depth + 1) if parent else [])


# ----------------------------------------------------------------------------- formats

@cli.command()
@json_option
def formats(as_json):
    """List the formats edgeops reads, the conversion matrix, and which extras are installed."""
    from ..inspect import format_matrix

    m = format_matrix()
    if as_json:
        _json_print(m)
        return
    from rich.table import Table

    out = _out()
    t = Table(title="extras")
    t.add_column("extra")
    t.add_column("installed")
    t.add_column("install")
    for name, ok in m["extras"].items():
        t.add_row(name, "[green]yes[/]" if ok else "[red]no[/]", _esc(f"pip install 'edgeops[{name}]'"))
    out.print(t)
    t = Table(title="conversions (cell: hops on the shortest route; * = needs a missing extra)")
    t.add_column("from \\ to")
    targets = m["targets"]
    for tgt in targets:
        t.add_column(tgt)
    for row in m["matrix"]:
        cells = []
        for tgt in targets:
            c = row["to"].get(tgt)
            if c is None:
                cells.append("-" if tgt != row["from"] else "")
            else:
                cells.append(f"{c['hops']}{'' if c['available'] else '*'}")
        t.add_row(row["from"], *cells)
    out.print(t)
    t = Table(title="recognised and refused")
    t.add_column("format")
    t.add_column("why")
    for f in m["refused"]:
        t.add_row(_esc(f["description"]), _esc(f["refused"]))
    out.print(t)
