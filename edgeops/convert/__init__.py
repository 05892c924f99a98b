"""Format exchange: the converter graph, the planner, and `convert`, which verifies every hop.

The graph's edges are declared as data in `edges.py`; this module finds the shortest
route (`plan`), runs each converter, checks each hop's outputs against its input with
`edgeops.verify`, checks the whole chain end to end, and writes lineage into the result.

Not covered here: the converters themselves (one module per family beside this one),
optimisation (edgeops.optimize).
"""

from __future__ import annotations

import heapq
import importlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import extras
from .. import formats as fmts
from .. import verify as V
from ..errors import (ConversionError, EdgeopsError, MissingExtraError, NotExecutableError,
                      UsageError, first_line)
from ..formats.base import LoadOptions, path_size, sha256_path
from .context import ConvertContext
from .edges import EDGES, Edge

__all__ = ["ConvertContext", "ConvertReport", "Edge", "HopReport", "convert", "edges",
           "plan", "resolve", "suffix_for"]

REPORT_SUFFIX = ".edgeops.json"


def _index(edge_list: tuple[Edge, ...]) -> dict[tuple[str, str], Edge]:
    out: dict[tuple[str, str], Edge] = {}
    for e in edge_list:
        if e.key in out:
            raise RuntimeError(f"converter {e.source} -> {e.target} registered twice")
        out[e.key] = e
    return out


_EDGES = _index(EDGES)


def edges() -> list[Edge]:
    return list(_EDGES.values())


def resolve(edge: Edge) -> Callable:
    mod, _, fn = edge.func.partition(":")
    return getattr(importlib.import_module(mod), fn)


def edge_available(edge: Edge) -> bool:
    return all(extras.available(x) for x in edge.extras)


# ----------------------------------------------------------------------------- planner

def _shortest(src: str, dst: str, usable: Callable[[Edge], bool]) -> list[Edge] | None:
    """Cheapest route by summed edge cost (Dijkstra); ties go to fewer hops, then to the
    alphabetically first route, so plans are deterministic."""
    if src == dst:
        return []
    best: dict[str, tuple[float, int]] = {src: (0.0, 0)}
    heap: list[tuple[float, int, list[str], str, tuple[Edge, ...]]] = [(0.0, 0, [], src, ())]
    while heap:
        cost, hops, _keys, node, path = heapq.heappop(heap)
        if node == dst:
            return list(path)
        if best.get(node, (float("inf"), 0)) < (cost, hops):
            continue
        for e in _EDGES.values():
            if e.source != node or not usable(e):
                continue
            c = (cost + e.cost, hops + 1)
            if c < best.get(e.target, (float("inf"), 0)):
                best[e.target] = c
                heapq.heappush(heap, (*c, [*_keys, e.target], e.target, (*path, e)))
    return None


def plan(src: str, dst: str, via: tuple[str, ...] | list[str] = ()) -> list[Edge]:
    """Shortest chain of converters from src to dst, through `via` formats in order.

    Prefers routes whose extras are installed; when only a route needing a missing
    extra exists, raises MissingExtraError naming it.
    """
    for f in (src, dst, *via):
        fmts.get_format(f)
    if src == dst and not via:
        raise UsageError(f"the source is already {dst}", hint="pick another --to format")
    stops = [src, *via, dst]
    route: list[Edge] = []
    for a, b in zip(stops, stops[1:]):
        leg = _shortest(a, b, edge_available)
        if leg is None:
            any_leg = _shortest(a, b, lambda e: True)
            if any_leg is not None:
                for e in any_leg:
                    for x in e.extras:
                        if not extras.available(x):
                            raise MissingExtraError(
                                x, extras.missing_modules(x)[0], f"{e.source} -> {e.target}")
            reachable = sorted({e.target for e in _EDGES.values() if e.source == a})
            hint = (f"from {a} edgeops converts to: {', '.join(reachable)}" if reachable
                    else f"{a} is an end format: nothing converts from it")
            raise ConversionError(f"no conversion route from {a} to {b}", hint=hint)
        route += leg
    return route


# ----------------------------------------------------------------------------- reports

@dataclass
class HopReport:
    source: str
    target: str
    tool: str
    path: str
    seconds: float
    parity: V.ParityReport
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parity"] = self.parity.to_dict()
        return d


@dataclass
class ConvertReport:
    source: str
    source_format: str
    source_sha256: str
    output: str
    target_format: str
    route: list[str]
    hops: list[HopReport] = field(default_factory=list)
    end_to_end: V.ParityReport | None = None
    status: str = "failed"      # "passed" | "failed" | "not-executed"
    output_sha256: str | None = None
    output_size: int | None = None
    report_path: str | None = None
    message: str = ""
    shapes_checked: list[dict] = field(default_factory=list)   # input shapes the result ran at

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return {
            "schema_version": 1,
            "source": self.source, "source_format": self.source_format,
            "source_sha256": self.source_sha256, "output": self.output,
            "target_format": self.target_format, "route": self.route,
            "status": self.status, "message": self.message,
            "hops": [h.to_dict() for h in self.hops],
            "end_to_end": self.end_to_end.to_dict() if self.end_to_end else None,
            "output_sha256": self.output_sha256, "output_size": self.output_size,
            "report_path": self.report_path, "shapes_checked": self.shapes_checked,
        }


# ----------------------------------------------------------------------------- convert

def suffix_for(fmt_id: str) -> str:
    """The conventional file suffix of a format ("" for directories like SavedModel)."""
    info = fmts.get_format(fmt_id)
    return info.suffixes[0] if info.suffixes else ""


def _runner(path: Path, fmt: str, opts: LoadOptions):
    return fmts.module_for(fmt).runner(path, fmt, opts)


def _hop_parity(dst: Path, fmt: str, opts: LoadOptions, inputs, ref_out, atol, rtol, source,
                tolerances: dict | None = None, literal: bool = False):
    """Verify one hop's output against the hop input's outputs (already computed). LITERAL
    runs the result with its format's reference kernels when it has them (a quantized
    model's literal arithmetic, see verify.source_reference)."""
    try:
        ref_runner = getattr(fmts.module_for(fmt), "reference_runner", None) if literal else None
        cand = ref_runner(dst, fmt, opts) if ref_runner else _runner(dst, fmt, opts)
    except NotExecutableError as exc:
        return V.not_executed(exc.message), None
    try:
        out = cand.run(V.adapt_feeds(inputs, cand.signature))
    except EdgeopsError:
        raise
    except Exception as exc:
        return V.ParityReport("failed", atol, rtol, reason=f"converted model failed to run: {exc}"), None
    rep = V.compare(ref_out, out, atol, rtol, V.batch_size(inputs), source, tolerances)
    return rep, out


def convert(src: str | Path, dst: str | Path, to: str | None = None,
            via: tuple[str, ...] | list[str] = (), *, opset: int | None = None,
            precision: str = "fp32", inputs: str | Path | None = None,
            shapes: dict[str, tuple[int, ...]] | None = None,
            atol: float | None = None, rtol: float | None = None,
            trust_pickle: bool = False, input_names: tuple[str, ...] | None = None,
            output_names: tuple[str, ...] | None = None, keep_intermediate: bool = False,
            options: dict | None = None,
            progress: Callable[[str], None] | None = None) -> ConvertReport:
    """Convert `src` to `dst`, verifying every hop. Returns the report; the report JSON is
    also written beside the output. Raises EdgeopsError for input/environment problems;
    a parity breach is *not* raised -- it is the report's status ("failed")."""
    say = progress or (lambda msg: None)
    src, dst = Path(src), Path(dst)
    if precision not in ("fp32", "fp16"):
        raise UsageError(f"--precision must be fp32 or fp16, not {precision!r}")
    src_info = fmts.detect(src)
    if to:
        dst_info = fmts.get_format(to)
    else:
        dst_info = fmts.format_for_suffix(dst)
        if dst_info is None:
            raise UsageError(f"cannot tell the target format from {dst.name!r}",
                             hint="pass --to onnx|torchscript|mlpackage|mlmodel|...")
    route = plan(src_info.id, dst_info.id, tuple(via))
    if dst.resolve() == src.resolve():
        raise UsageError("the output path is the source path; refusing to overwrite the source")
    dst.parent.mkdir(parents=True, exist_ok=True)

    opts = LoadOptions(trust_pickle=trust_pickle, shapes=dict(shapes or {}),
                       input_names=input_names, output_names=output_names)
    say(f"source: {src} ({src_info.description})")
    src_sha = sha256_path(src)
    ref = _runner(src, src_info.id, opts)
    if inputs is not None:
        feeds = V.load_inputs(inputs, ref.signature)
        input_source = str(inputs)
    else:
        feeds = V.make_inputs(ref.signature, opts.shapes)
        input_source = "generated (seed 0)"
    ref_out = V.run_on(ref, feeds, generated=inputs is None)
    first_out = ref_out

    report = ConvertReport(str(src), src_info.id, src_sha, str(dst), dst_info.id,
                           [route[0].source] + [e.target for e in route])
    say("route: " + " -> ".join(report.route))
    workdir = Path(tempfile.mkdtemp(prefix="edgeops-convert-"))
    hop_src, hop_sig = src, ref.signature
    source_qtol: dict = {}
    try:
        for i, edge in enumerate(route):
            last = i == len(route) - 1
            out_path = dst if last else workdir / f"hop{i + 1}-{edge.target}{suffix_for(edge.target)}"
            _remove(out_path)
            # keyed by this hop's input names (a previous hop may have renamed them)
            hop_feeds = V.adapt_feeds(feeds, hop_sig)
            h_atol = atol if atol is not None else edge.atol
            h_rtol = rtol if rtol is not None else edge.rtol
            quant = None
            if atol is None:            # tolerances the source's own numerics justify
                quant = V.source_reference(edge.source, hop_src, hop_feeds, ref_out, h_atol,
                                           h_rtol, opts)
            qtol = quant.tolerances if quant else {}
            if quant and i == 0:
                source_qtol.update(qtol)
                first_out = quant.outputs   # end to end, too, against the same reference
            hop_ref = quant.outputs if quant else ref_out
            literal = bool(quant and quant.quantized)
            ctx = ConvertContext(edge.source, edge.target, hop_sig, hop_feeds, workdir, opset,
                                 precision, opts, dict(options or {}), qtol)
            say(f"[{i + 1}/{len(route)}] {edge.source} -> {edge.target} ({edge.tool})")
            t0 = time.perf_counter()
            try:
                info = resolve(edge)(hop_src, out_path, ctx) or {}
            except EdgeopsError:
                raise
            except Exception as exc:
                raise ConversionError(
                    f"{edge.tool} failed converting {edge.source} -> {edge.target}: "
                    f"{first_line(exc)}",
                    hint="run with --debug for the converter's traceback") from exc
            seconds = time.perf_counter() - t0
            if quant:
                info["tolerances"] = quant.notes
            parity, out = _hop_parity(out_path, edge.target, opts, feeds, hop_ref,
                                      h_atol, h_rtol, input_source, qtol, literal=literal)
            if parity.status == "failed" and parity.permutation and edge.target == "onnx":
                # the converter wrote the outputs under each other's names: put the names
                # back where the values are, and verify again
                renamed = _repair_output_names(out_path, parity.permutation)
                info["outputs_renamed"] = renamed
                say(f"      outputs were permuted ({parity.reason}); renamed and re-checked")
                parity, out = _hop_parity(out_path, edge.target, opts, feeds, hop_ref,
                                          h_atol, h_rtol, input_source, qtol, literal=literal)
            report.hops.append(HopReport(edge.source, edge.target, edge.tool, str(out_path),
                                         round(seconds, 3), parity, info))
            say(f"      parity: {parity.summary()}")
            if parity.status == "failed":
                report.status = "failed"
                report.message = (f"parity check failed on {edge.source} -> {edge.target}: "
                                  f"{parity.reason}")
                break
            if out is not None:
                ref_out = out
            if not last:
                hop_sig = fmts.module_for(edge.target).signature(out_path, edge.target, opts)
            hop_src = out_path
        else:
            report.status = _final_status(report, first_out, ref_out, atol, rtol, input_source,
                                          source_qtol)
            if report.status == "passed":
                src_ref = ref
                if source_qtol and _quantized_source(report):   # its literal arithmetic
                    src_ref = fmts.module_for(src_info.id).reference_runner(src, src_info.id, opts)
                _check_other_shapes(report, src_ref, feeds, dst, dst_info.id, opts, atol, rtol,
                                    source_qtol, say)
    finally:
        if keep_intermediate:
            for h in report.hops[:-1]:
                p = Path(h.path)
                if p.exists():
                    kept = dst.with_name(f"{dst.name}.{p.name}")
                    _remove(kept)
                    shutil.move(str(p), kept)
                    h.path = str(kept)
        shutil.rmtree(workdir, ignore_errors=True)

    # only an output this run wrote gets lineage (a stale file from an earlier run at the
    # same path, left because an earlier hop failed, is not touched)
    if len(report.hops) == len(route) and dst.exists():
        _write_lineage(report, src, src_info.id)
        report.output_sha256 = sha256_path(dst)
        report.output_size = path_size(dst)
    report_path = dst.with_name(dst.name + REPORT_SUFFIX)
    report.report_path = str(report_path)
    report_path.write_text(json.dumps(report.to_dict(), indent=2, default=_json_default))
    return report


def _final_status(report: ConvertReport, first_out, last_out, atol, rtol, input_source,
                  qtol: dict | None = None) -> str:
    """Status after all hops ran; multi-hop routes also get an end-to-end check of the
    final outputs against the source's, with the hops' tolerances added up."""
    last = report.hops[-1]
    if not last.parity.executed:
        report.message = last.parity.reason
        return "not-executed"
    if len(report.hops) > 1:
        e2e_atol = atol if atol is not None else sum(_edge_of(h).atol for h in report.hops)
        e2e_rtol = rtol if rtol is not None else sum(_edge_of(h).rtol for h in report.hops)
        report.end_to_end = V.compare(first_out, last_out, e2e_atol, e2e_rtol,
                                      last.parity.n_inputs, input_source, qtol)
        if not report.end_to_end.passed:
            report.message = f"end-to-end parity failed: {report.end_to_end.reason}"
            return "failed"
    return "passed"


def _quantized_source(report: ConvertReport) -> bool:
    return any("quantized source" in n for n in (report.hops[0].info or {}).get("tolerances", []))


def _check_other_shapes(report: ConvertReport, ref, feeds, dst: Path, fmt: str, opts: LoadOptions,
                        atol, rtol, qtol: dict, say) -> None:
    """The result is checked against the source at every other shape its signature accepts
    (convert.shapes.alternatives: batch 1 or 3, larger dynamic dims). A shape the source
    itself refuses is noted and skipped; a shape the result claims but gets wrong fails the
    conversion, so nothing is PASSED for shapes that were not run."""
    from dataclasses import replace

    from . import shapes as S

    own = replace(opts, shapes={})         # the result's own declared dims, not the --shape given
    try:
        ref_runner = getattr(fmts.module_for(fmt), "reference_runner", None) \
            if _quantized_source(report) else None
        cand = ref_runner(dst, fmt, own) if ref_runner else _runner(dst, fmt, own)
    except EdgeopsError:
        return                              # not executable here: already reported as such
    res_feeds = V.adapt_feeds(feeds, cand.signature)
    tol_a = atol if atol is not None else sum(_edge_of(h).atol for h in report.hops)
    tol_r = rtol if rtol is not None else sum(_edge_of(h).rtol for h in report.hops)
    checked = [{"what": "as converted", "shapes": {k: list(np.shape(v)) for k, v in res_feeds.items()},
                "result": "passed"}]
    for label, alt in S.alternatives(cand.signature, res_feeds):
        alt_feeds = S.reshape_feeds(res_feeds, alt)
        entry = {"what": label, "shapes": {k: list(v) for k, v in alt.items()}}
        try:
            want = ref.run(V.adapt_feeds(alt_feeds, ref.signature))
        except Exception as exc:  # noqa: BLE001
            entry["result"] = f"skipped: the source fails there ({first_line(exc, 120)})"
            checked.append(entry)
            continue
        try:
            got = cand.run(V.adapt_feeds(alt_feeds, cand.signature))
            rep = V.compare(want, got, tol_a, tol_r, V.batch_size(alt_feeds), "generated", qtol)
            entry["result"] = "passed" if rep.passed else f"FAILED: {rep.reason}"
        except Exception as exc:  # noqa: BLE001
            entry["result"] = f"FAILED: the result does not run ({first_line(exc, 160)})"
        checked.append(entry)
        say(f"      at {label}: {entry['result']}")
        if entry["result"].startswith("FAILED"):
            report.status = "failed"
            report.message = (f"the result declares {label} but gets it wrong: "
                              f"{entry['result'][len('FAILED: '):]}")
    report.shapes_checked = checked


def _repair_output_names(path: Path, permutation: dict[str, str]) -> dict[str, str]:
    """Rename the ONNX graph outputs so each carries the name of the source output whose
    values it holds (PERMUTATION: source name -> the output holding its values now)."""
    import onnx

    from ..normalize import rename_tensor

    model = onnx.load(str(path))
    moves = {cand: want for want, cand in permutation.items() if cand != want}
    for k, (old, _new) in enumerate(moves.items()):       # two phases: names may swap
        rename_tensor(model, old, f"__edgeops_tmp{k}")
    for k, (_old, new) in enumerate(moves.items()):
        rename_tensor(model, f"__edgeops_tmp{k}", new)
    onnx.save(model, str(path))
    return moves


def _edge_of(h: HopReport) -> Edge:
    return _EDGES[(h.source, h.target)]


def _write_lineage(report: ConvertReport, src: Path, src_fmt: str) -> None:
    from .. import lineage

    parent = None
    if src_fmt == "onnx":
        parent = lineage.read_onnx_lineage(src)
    record = lineage.make_record(
        "convert", src, report.source_sha256, src_fmt,
        {"route": report.route, "status": report.status,
         "hops": [{"from": h.source, "to": h.target, "tool": h.tool,
                   "info": h.info, "parity": _parity_summary(h.parity)} for h in report.hops],
         "end_to_end": _parity_summary(report.end_to_end) if report.end_to_end else None,
         "shapes_checked": [{"what": c["what"], "result": c["result"]} for c in report.shapes_checked]},
        parent)
    if report.target_format == "onnx":
        lineage.write_onnx_lineage(report.output, record,
                                   {"edgeops.parity": report.status})
    elif report.target_format in ("mlpackage", "mlmodel"):
        from ..formats import coreml

        setter = getattr(coreml, "set_metadata", None)
        if setter:
            setter(Path(report.output), report.target_format,
                   {"edgeops.lineage": json.dumps(record, sort_keys=True, default=str),
                    "edgeops.parity": report.status})


def _parity_summary(p: V.ParityReport | None) -> dict | None:
    if p is None:
        return None
    return {"status": p.status, "max_abs": p.max_abs, "min_cosine": p.min_cosine,
            "atol": p.atol, "rtol": p.rtol, "n_inputs": p.n_inputs,
            "input_source": p.input_source, "reason": p.reason}


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()



def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)
