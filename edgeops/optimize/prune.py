"""`edgeops optimize --prune`: structured pruning that removes channels (and so compute),
and magnitude pruning that only zeroes weights (and says so).

The model is taken to torch (ONNX -> onnx2torch, whose Conv/Linear are real torch layers;
other sources are converted to ONNX first, verified), pruned with torch-pruning's DepGraph
(which keeps every coupled tensor consistent: BatchNorm, the next layer's inputs, residual
adds, concatenations), exported back to ONNX at the source's opset (<= 17) and signature,
and checked: it runs, keeps input/output names, dtypes and shapes. Output layers (those
feeding a graph output) and `--keep` layers are never pruned.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConversionError, EdgeopsError, UsageError, first_line
from ..extras import require
from . import gates
from .distill import distill_module

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# ----------------------------------------------------------------------------- torch side

@dataclass
class TorchModel:
    """An ONNX model taken to torch, with what is needed to bring it back."""
    module: object
    onnx_path: Path                      # the ONNX the module came from (the reference)
    source_format: str                   # the format the user gave (before any conversion)
    signature: object
    feeds: dict[str, np.ndarray]         # generated inputs, batch 1 (or the fixed batch)
    opset: int
    output_layers: list[str]             # module names that feed graph outputs
    notes: list[str] = field(default_factory=list)

    @property
    def example(self) -> tuple:
        """The feeds as torch tensors, in input order."""
        torch = require("torch")
        return tuple(torch.from_numpy(self.feeds[s.name]) for s in self.signature.inputs)


def tensors(out) -> list:
    """A module's outputs (tensor, tuple, list or dict) as a flat list in export order."""
    from ..formats import torch as torch_fmt

    return [t for _, t in torch_fmt.flatten_outputs(out)]


def parity_problem(tm: "TorchModel", module, onnx_path: Path) -> str | None:
    """Why `module` and an ONNX file disagree on the generated inputs (exact shapes, then
    verify.compare at atol 1e-4 / rtol 1e-3), or None when they agree."""
    torch = require("torch")
    from ..verify import compare

    names = [s.name for s in tm.signature.outputs]
    with torch.no_grad():
        got = [t.detach().numpy() for t in tensors(module(*tm.example))]
    ref = gates.session(onnx_path, 1).run(None, tm.feeds)
    for name, r, g in zip(names, ref, got):
        if r.shape != g.shape:
            return f"output {name!r} has shape {list(g.shape)}, the ONNX model {list(r.shape)}"
    parity = compare(dict(zip(names, ref)), dict(zip(names, got)), atol=1e-4, rtol=1e-3)
    return None if parity.passed else parity.reason


def _module_name(node_name: str) -> str:
    return node_name.lstrip("/")


MULTI_INPUT = {"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Concat", "Where"}


def _output_layers(model) -> list[str]:
    """Compute nodes whose output channels reach a graph output: walking back from each
    output through every other op (data inputs only: the first input of Reshape, Resize,
    Slice...; all inputs of element-wise and Concat ops)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    found, seen = [], set()
    stack = [o.name for o in model.graph.output]
    while stack:
        t = stack.pop()
        n = producers.get(t)
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        if n.op_type in COMPUTE_OPS:
            found.append(_module_name(n.name))
        elif n.op_type in MULTI_INPUT:
            stack.extend(i for i in n.input if i and i not in inits)
        elif n.input:
            stack.append(n.input[0])
    return found


def to_torch(src: Path, workdir: Path, shapes: dict | None, say) -> TorchModel:
    """Any source edgeops can turn into ONNX -> a torch module via onnx2torch."""
    import onnx

    from .. import formats
    from ..convert import convert
    from ..convert.torch import onnx_to_module
    from ..formats import onnx as onnx_fmt
    from ..verify import make_inputs

    require("torch", what="pruning and distillation")
    info = formats.detect(src)
    notes = []
    if info.family in ("sklearn", "coreml"):
        what = "scikit-learn models have no channels to prune or layers to train here" \
            if info.family == "sklearn" else "Core ML models cannot be run or trained on Linux"
        raise UsageError(f"{src}: {info.description}: {what}",
                         hint="prune/distill the source network (ONNX, PyTorch, Keras)")
    if info.id != "onnx":
        say(f"converting {info.description} to ONNX first (verified)")
        onnx_path = workdir / "source.onnx"
        convert(src, onnx_path, to="onnx", shapes=shapes or {})
        notes.append(f"source converted to ONNX ({info.description}) and verified")
    else:
        onnx_path = Path(src)
    model = onnx_fmt.load(onnx_path)
    sig = onnx_fmt.signature_of(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    module = onnx_to_module(onnx.load(str(onnx_path)))
    feeds = make_inputs(sig, shapes=shapes, batch=gates.fixed_batch(sig) or 1, seed=0)
    tm = TorchModel(module, onnx_path, info.id, sig, feeds, min(opset, 17),
                    _output_layers(model), notes)
    # the torch module must be the ONNX model before anything is pruned
    problem = parity_problem(tm, module, onnx_path)
    if problem:
        raise ConversionError(f"onnx2torch's module does not reproduce the ONNX model: {problem}")
    return tm


def export_onnx(tm: TorchModel, module, dst: Path) -> None:
    """Export with the source's input/output names, dynamic dims and opset."""
    torch = require("torch")
    from ..formats import onnx as onnx_fmt

    sig = tm.signature
    dyn = {}
    for s in list(sig.inputs) + list(sig.outputs):
        if s.shape:
            d = {i: str(x) for i, x in enumerate(s.shape) if not isinstance(x, int)}
            if d:
                dyn[s.name] = d
    module.eval()
    try:
        with torch.no_grad(), _quiet_torch():
            torch.onnx.export(module, tm.example, str(dst),
                              input_names=[s.name for s in sig.inputs],
                              output_names=[s.name for s in sig.outputs],
                              dynamic_axes=dyn or None, opset_version=tm.opset, dynamo=False)
    except Exception as exc:  # noqa: BLE001
        raise ConversionError(f"exporting the pruned model to ONNX failed: {first_line(exc)}") from exc
    onnx_fmt.load(dst)


def _quiet_torch():
    from ..formats import torch as torch_fmt

    return torch_fmt.quiet()


def check_signature(ref_path: Path, new_path: Path, feeds: dict[str, np.ndarray]) -> None:
    """The optimized model runs and keeps names, dtypes and output shapes."""
    from ..formats import onnx as onnx_fmt

    a, b = onnx_fmt.signature(ref_path), onnx_fmt.signature(new_path)
    for x, y in zip(list(a.inputs) + list(a.outputs), list(b.inputs) + list(b.outputs)):
        if x.name != y.name or x.dtype != y.dtype or (x.shape and y.shape and len(x.shape) != len(y.shape)):
            raise ConversionError(f"the optimized model changed its signature: {x} -> {y}")
    if len(a.inputs) != len(b.inputs) or len(a.outputs) != len(b.outputs):
        raise ConversionError("the optimized model changed its number of inputs/outputs")
    ra = gates.session(ref_path, 1).run(None, feeds)
    rb = gates.session(new_path, 1).run(None, feeds)
    for x, y, spec in zip(ra, rb, a.outputs):
        if x.shape != y.shape:
            raise ConversionError(f"output {spec.name!r} changed shape: {list(x.shape)} -> {list(y.shape)}")


# ----------------------------------------------------------------------------- pruning

@dataclass
class ModelStats:
    params: int
    flops: int | None
    size: int
    gzip_size: int
    p50_ms: float | None = None
    metric: float | None = None


@dataclass
class LayerChange:
    name: str
    kind: str
    before: int
    after: int


@dataclass
class PruneReport:
    source: str
    output: str | None
    ratio: float
    structured: bool
    importance: str
    kept_layers: list[str]
    before: ModelStats
    after: ModelStats
    layers: list[LayerChange]
    metric: str | None
    eval_data: str | None
    threads: int
    speedup: float | None = None
    verdict: str | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    distill: dict | None = None
    report_path: str | None = None
    seconds: float = 0.0
    # the gates: a --max-drop budget and --require-speedup, as --quantize applies them
    passed: bool = True
    failure: str | None = None
    max_drop: float | None = None
    require_speedup: bool = False
    rejected_output: str | None = None

    def to_dict(self) -> dict:
        return {"schema_version": 1, **asdict(self)}


def _layers(module) -> dict[str, tuple[str, int]]:
    torch = require("torch")
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Conv3d)):
            out[name] = ("Conv", m.out_channels)
        elif isinstance(m, torch.nn.Linear):
            out[name] = ("Linear", m.out_features)
    return out


def prune_module(tm: TorchModel, ratio: float, structured: bool, importance: str,
                 keep: list[str]) -> tuple[object, list[str]]:
    """Prune a deep copy of tm.module; returns it and the names of the protected layers."""
    import copy

    torch = require("torch")
    module = copy.deepcopy(tm.module)
    named = dict(module.named_modules())
    protect = list(dict.fromkeys(tm.output_layers + [_module_name(k) for k in keep]))
    missing = [k for k in protect if k not in named]
    if missing:
        raise UsageError(f"--keep: no layer named {', '.join(map(repr, missing))}",
                         hint="use ONNX node names of Conv/Gemm/MatMul nodes, e.g. /conv1/Conv")
    if structured:
        tp = require("torch_pruning", "torch", "structured pruning")
        imp = tp.importance.MagnitudeImportance(p=1 if importance == "l1" else 2)
        chans = [v for v in _layers(module).values()]
        round_to = 8 if chans and min(c for _, c in chans) >= 16 else None
        try:
            pruner = tp.pruner.MetaPruner(module, tm.example, importance=imp,
                                          pruning_ratio=ratio, round_to=round_to,
                                          ignored_layers=[named[k] for k in protect])
            pruner.step()
        except EdgeopsError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(f"torch-pruning could not prune this graph: {first_line(exc)}") from exc
    else:
        import torch.nn.utils.prune as prune_util
        for name, m in module.named_modules():
            if name in protect or not isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d,
                                                     torch.nn.Conv3d, torch.nn.Linear)):
                continue
            prune_util.l1_unstructured(m, "weight", amount=ratio)
            prune_util.remove(m, "weight")
    return module.eval(), protect


def stats_of(path: Path, shapes: dict | None) -> ModelStats:
    import onnx

    from ..formats import onnx as onnx_fmt
    from .flops import model_flops

    model = onnx.load(str(path))
    raw = path.read_bytes()
    return ModelStats(params=onnx_fmt.count_params(model.graph)["total"],
                      flops=model_flops(model, shapes),
                      size=onnx_fmt.total_size(path), gzip_size=len(gzip.compress(raw, 6)))


def evaluate(paths: dict[str, Path], data: gates.Dataset, metric: str, ref_path: Path,
             threads: int) -> tuple[str, dict[str, float]]:
    """Metric of each model on the eval data; agreement/cosine are against `ref_path`."""
    def run(p):
        s = gates.session(p, threads)
        return gates.collect_outputs(lambda f: s.run(None, f), data)

    ref = run(ref_path)
    name = gates.pick_metric(metric, data, ref)
    return name, {k: gates.score(name, ref if p == ref_path else run(p), ref, data.labels)
                  for k, p in paths.items()}


def _student(tm: TorchModel, spec: str, importance: str, keep: list[str]):
    """--student width:X (a structurally pruned copy keeping X of the channels) or FILE
    (a TorchScript module). Returns (module, protected layers, ratio or None)."""
    torch = require("torch")
    if spec.startswith("width:"):
        try:
            width = float(spec.split(":", 1)[1])
        except ValueError:
            width = -1
        if not 0 < width < 1:
            raise UsageError(f"--student {spec}: width must be between 0 and 1, e.g. width:0.5")
        module, protect = prune_module(tm, 1 - width, True, importance, keep)
        return module, protect, 1 - width
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"--student {spec}: expected pruned, width:X or a TorchScript file")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"--student {spec}: not a loadable TorchScript file ({first_line(exc)})") from None
    with torch.no_grad():
        try:
            outs = tensors(module(*tm.example))
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"--student {spec}: does not run on the teacher's inputs "
                             f"({first_line(exc)})") from None
    ref = gates.session(tm.onnx_path, 1).run(None, tm.feeds)
    if [tuple(o.shape) for o in outs] != [r.shape for r in ref]:
        raise UsageError(f"--student {spec}: output shapes {[list(o.shape) for o in outs]} differ "
                         f"from the teacher's {[list(r.shape) for r in ref]}")
    return module, [], None


def prune(src, dst, ratio: float, **kw) -> PruneReport:
    """Structured (default) or unstructured pruning; `distill=True` recovers accuracy."""
    return run(src, dst, ratio=ratio, **kw)


def distill(src, dst, *, data, student: str = "width:0.5", **kw) -> PruneReport:
    """Distill SRC (the teacher) into a student; see distill.py."""
    return run(src, dst, ratio=None, distill=True, data=data, student=student, **kw)


def run(src: str | Path, dst: str | Path, *, ratio: float | None = None, structured: bool = True,
        importance: str = "l1", keep: list[str] | None = None, distill: bool = False,
        data: str | Path | None = None, student: str = "pruned", epochs: int = 10,
        lr: float = 1e-3, temperature: float = 4.0, batch_size: int = 64, seed: int = 0,
        eval_data: str | Path | None = None, labels: str | None = None, metric: str = "auto",
        threads: int = 1, shapes: dict | None = None, measure_seconds: float = 3.0,
        max_drop: float | None = None, require_speedup: bool = False,
        progress=None) -> PruneReport:
    """Prune and/or distill SRC into DST (.onnx), verified, with a report and lineage.
    MAX_DROP (a fraction) and REQUIRE_SPEEDUP gate the result exactly as quantize does: a
    breach writes DST.rejected.onnx instead of DST and the report says why (passed False)."""
    from .. import lineage
    from ..formats.base import sha256_path
    from .quantize import Progress

    t0 = time.perf_counter()
    prog = progress or Progress()
    src, dst = Path(src), Path(dst)
    if ratio is not None and not 0 < ratio < 1:
        raise UsageError(f"--prune {ratio}: the ratio must be between 0 and 1 (e.g. 0.5)")
    if importance not in ("l1", "l2"):
        raise UsageError(f"--importance {importance}: choose l1 or l2")
    if dst.suffix.lower() != ".onnx":
        raise UsageError(f"-o {dst}: the output of --prune/--distill is an ONNX model (.onnx)")
    if dst.resolve() == src.resolve():
        raise UsageError("-o must differ from the source model; the source is never overwritten")
    if labels and not eval_data:
        raise UsageError("--labels names an array in the --eval data; pass --eval DATA too")
    if distill:
        if data is None:
            raise UsageError("--distill needs --data DATA: inputs to run the teacher on "
                             "(unlabeled .npz keyed by input name, or a folder of .npy)")
        if student == "pruned" and ratio is None:
            raise UsageError("--student pruned needs --prune RATIO (or use --student width:X or FILE)")
        if student != "pruned" and ratio is not None:
            raise UsageError(f"--prune with --student {student}: give one way to make the student")
        if not structured and student == "pruned":
            raise UsageError("distilling an unstructured-pruned student would refill its zeros; "
                             "use --structured")
    elif ratio is None:
        raise UsageError("choose an optimization: --prune RATIO and/or --distill")
    elif data is not None:
        raise UsageError("--data is the distillation data; add --distill, or use --eval for evaluation")
    work = Path(tempfile.mkdtemp(prefix="edgeops-prune-"))
    try:
        prog.say("taking the model to torch (onnx2torch)")
        tm = to_torch(src, work, shapes, prog.say)
        ev = gates.load_dataset(eval_data, tm.signature, labels) if eval_data else None
        dset = gates.load_dataset(data, tm.signature) if distill else None
        gate_warning = None
        if max_drop is not None and ev is None:
            # the budget needs a metric: as --quantize does, the optimistic or generated data
            if dset is not None:
                ev = dset
                gate_warning = "no --eval data: the budget is checked on the --data the student was distilled on (optimistic)"
            else:
                ev = gates.random_dataset(tm.signature, n=64, seed=1, shapes=shapes)
                gate_warning = ("no --eval data: the budget is checked as agreement with the "
                                "original on RANDOM inputs; real-data accuracy is unknown")
        before_layers = _layers(tm.module)
        if ratio is not None:
            prog.say(f"{'structured' if structured else 'unstructured'} pruning, ratio {ratio}")
            module, protect = prune_module(tm, ratio, structured, importance, keep or [])
        else:
            module, protect, ratio_w = _student(tm, student, importance, keep or [])
        after_layers = _layers(module)
        stage_path = work / "student0.onnx"
        export_onnx(tm, module, stage_path)
        check_signature(tm.onnx_path, stage_path, tm.feeds)
        layers = [LayerChange(n, k, c, after_layers[n][1]) for n, (k, c) in before_layers.items()
                  if n in after_layers]
        distill_report, final = None, stage_path
        if distill:
            distill_report, final = distill_module(
                tm, module, student_label=student, work=work, data=dset,
                eval_set=ev, prog=prog, epochs=epochs, lr=lr, temperature=temperature,
                batch_size=batch_size, seed=seed, threads=threads)
        before, after = stats_of(tm.onnx_path, shapes), stats_of(final, shapes)
        models = {"before": tm.onnx_path, "after": final}
        if distill:
            models["student0"] = stage_path
        metric_name = None
        if ev is not None:
            metric_name, scores = evaluate(models, ev, metric, tm.onnx_path, threads)
            before.metric, after.metric = scores["before"], scores["after"]
        prog.say(f"timing original and result interleaved ({threads} thread{'s' * (threads > 1)})")
        speed = gates.measure_interleaved(models, tm.feeds, threads=threads, seconds=measure_seconds)
        before.p50_ms = speed.timings["before"].p50_ms
        after.p50_ms = speed.timings["after"].p50_ms
        speedup = speed.speedup("after")
        if distill_report is not None:
            s0 = stats_of(stage_path, shapes)
            distill_report["teacher"] = {"metric": before.metric, "size": before.size,
                                         "p50_ms": before.p50_ms, "params": before.params}
            distill_report["student_before"] = {
                "metric": scores["student0"] if ev is not None else None, "size": s0.size,
                "p50_ms": speed.timings["student0"].p50_ms, "params": s0.params}
            distill_report["student_after"] = {"metric": after.metric, "size": after.size,
                                               "p50_ms": after.p50_ms, "params": after.params}
        eff_ratio = ratio if ratio is not None else (ratio_w or 0.0)
        report = PruneReport(
            source=str(src), output=None, ratio=eff_ratio, structured=structured,
            importance=importance, kept_layers=protect, before=before, after=after,
            layers=layers, metric=metric_name, eval_data=ev.source if ev else None,
            threads=threads, speedup=speedup, verdict=gates.verdict(speedup), notes=tm.notes,
            distill=distill_report)
        if not structured:
            report.warnings.append(
                "unstructured pruning only zeroes weights: onnxruntime on a CPU runs zeros at "
                f"full cost, so latency does not drop ({speedup:.2f}x measured); the gain is the "
                f"compressed size ({before.gzip_size:,} -> {after.gzip_size:,} bytes gzipped)")
        elif report.verdict != "faster":
            report.warnings.append(f"the result is {report.verdict.upper()} than the original "
                                   f"({speedup:.2f}x)")
        if ev is None:
            report.warnings.append("no --eval data: accuracy after this change is unknown")
        if gate_warning:
            report.warnings.append(gate_warning)
        report.max_drop, report.require_speedup = max_drop, require_speedup
        if max_drop is not None and before.metric - after.metric > max_drop + 1e-12:
            report.failure = (f"accuracy budget not met: {metric_name} {before.metric:.4f} -> "
                              f"{after.metric:.4f} drops {100 * (before.metric - after.metric):.2f} "
                              f"points, budget {100 * max_drop:.2f}")
        elif require_speedup and report.verdict != "faster":
            report.failure = (f"--require-speedup: the result is {report.verdict} than the "
                              f"original ({speedup:.2f}x; needs >= {gates.FASTER_THRESHOLD:.2f}x)")
        report.passed = report.failure is None
        target = dst if report.passed else dst.with_name(dst.stem + ".rejected.onnx")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(final, target)
        step = "optimize." + "+".join((["prune"] if ratio is not None else []) + (["distill"] if distill else []))
        rec = lineage.make_record(
            step, src, sha256_path(src), tm.source_format,
            {"prune": {"ratio": eff_ratio, "structured": structured, "importance": importance,
                       "kept_layers": protect, "params": [before.params, after.params],
                       "flops": [before.flops, after.flops],
                       "p50_ms": [before.p50_ms, after.p50_ms], "speedup": speedup,
                       "metric": metric_name, "metric_before": before.metric,
                       "metric_after": after.metric, "max_drop": max_drop,
                       "passed": report.passed},
             **({"distill": {k: v for k, v in distill_report.items() if k != "history"}}
                if distill_report else {})},
            parent=lineage.read_onnx_lineage(tm.onnx_path))
        lineage.write_onnx_lineage(target, rec)
        if report.passed:
            report.output = str(target)
        else:
            report.rejected_output = str(target)
        gates.write_report(report, dst, t0)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)
