"""`edgeops optimize --quantize`: int8 (static, dynamic) and fp16 inside an accuracy budget,
called faster only when it measures faster.

Flow for one call:
  1. refuse what cannot be quantized here (non-ONNX sources, models without float weights);
  2. prepare: name nodes, hoist Constant weights, onnxruntime pre-processing (graph.py);
  3. choose int8 settings from the CPU features or a target profile (isa.py);
  4. build each requested variant; evaluate it on the eval set against the fp32 metric;
     over budget -> rank nodes by the error they inject and keep the worst in float,
     doubling then bisecting the fallback set until the budget holds;
  5. time fp32 and every variant interleaved in this process (gates.py);
  6. pick (auto: the fastest within budget), write the model with lineage and a JSON report.
A budget that cannot be met, or `require_speedup` without a speedup, writes the best attempt
beside the output as NAME.rejected.onnx, never to the output path, and the report says why.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


from ..errors import ConversionError, EdgeopsError, UsageError, first_line
from . import gates, graph, isa
from .graph import rank_sensitivity

MODES = ("static", "dynamic", "fp16", "auto")
CALIB_METHODS = ("minmax", "entropy", "percentile")
CALIB_LIMIT = 512          # calibration samples used at most
SENS_LIMIT = 16            # samples used to rank node sensitivity (every tensor is kept)
SENS_BATCH = 4


@contextlib.contextmanager
def _quiet():
    """onnxruntime's calibrators print() progress to stdout and log a warning per call;
    stdout is ours (tables, --json), so both are silenced while it works."""
    import io
    import logging
    import warnings

    prev = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(prev)


# ----------------------------------------------------------------------------- progress

class Progress:
    """Hooks the CLI fills in; the library only calls them."""

    def say(self, msg: str) -> None:
        pass

    def task(self, desc: str, total: int) -> Callable[[], None]:
        return lambda: None

    def done(self) -> None:
        pass

    def warn(self, msg: str) -> None:
        pass


# ----------------------------------------------------------------------------- report

@dataclass
class Attempt:
    fallback: int
    metric: float
    drop: float
    within_budget: bool


@dataclass
class Variant:
    name: str                                  # static | dynamic | fp16
    settings: dict
    path: str | None = None
    metric: float | None = None
    drop: float | None = None
    within_budget: bool = False
    fallback_nodes: list[str] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)
    size: int | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    runs: int | None = None
    speedup: float | None = None
    verdict: str | None = None
    weights: dict | None = None
    error: str | None = None
    # nodes kept float because their quantized form failed to load or run: {node, reason}
    repaired: list[dict] = field(default_factory=list)
    # nodes kept float because their layer measured slower in int8 here, and the measured reason
    speed_float: list[str] = field(default_factory=list)
    speed_reason: str | None = None


@dataclass
class QuantizeReport:
    source: str
    output: str | None
    mode: str
    metric: str
    metric_fp32: float
    max_drop: float
    eval_data: str
    eval_samples: int
    calibration: str | None
    cpu: dict
    settings: dict
    preprocess: list[str]
    threads: int
    fp32: dict
    variants: list[Variant]
    chosen: str | None
    passed: bool
    failure: str | None = None
    warnings: list[str] = field(default_factory=list)
    rejected_output: str | None = None
    report_path: str | None = None
    seconds: float = 0.0
    calibration_layout: str | None = None     # how the data was read (gates.Dataset.description)
    eval_layout: str | None = None

    def variant(self, name: str) -> Variant:
        if name == "fp32":
            return Variant("fp32", {"kept": "the source model, unchanged"}, metric=self.metric_fp32,
                           drop=0.0, within_budget=True, size=self.fp32["size"],
                           p50_ms=self.fp32["p50_ms"], speedup=1.0, verdict="baseline")
        return next(v for v in self.variants if v.name == name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["faster_threshold"] = gates.FASTER_THRESHOLD
        return d


# ----------------------------------------------------------------------------- builders

def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


def _calib_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


class _Reader:
    """onnxruntime CalibrationDataReader over a Dataset, ticking a progress bar."""

    def __init__(self, data: gates.Dataset, limit: int, tick: Callable[[], None]):
        self._it = data.batches(limit, full_only=True)
        self._tick = tick

    def get_next(self):
        b = next(self._it, None)
        if b is not None:
            self._tick()
        return b

    def __iter__(self):
        return self

    def __next__(self):
        b = self.get_next()
        if b is None:
            raise StopIteration
        return b


def build_static(pre: Path, out: Path, s: isa.QuantSettings, method: str, calib: gates.Dataset,
                 cache: Path, exclude: list[str], prog: Progress) -> Path:
    import onnx
    from onnxruntime.quantization import QuantFormat, quantize_static

    reader = None
    if not cache.exists():
        n = min(calib.n, CALIB_LIMIT) // calib.batch
        reader = _Reader(calib, CALIB_LIMIT, prog.task(f"calibrating ({method})", n))
    tmp = out.with_suffix(".main.onnx")
    try:
        with _quiet():
            quantize_static(
                str(pre), str(tmp), reader, quant_format=QuantFormat.QDQ,
                activation_type=_qtype(s.activation_type), weight_type=_qtype(s.weight_type),
                per_channel=s.per_channel, reduce_range=s.reduce_range,
                calibrate_method=_calib_method(method), nodes_to_exclude=list(exclude),
                calibration_cache_path=str(cache),
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    finally:
        prog.done()
    main = onnx.load(str(tmp))
    if any(depth for _, depth in graph.all_graphs(main.graph)):
        # the QDQ quantizer does not enter If/Loop bodies; their float MatMul/Gemm/Conv
        # weights are stored int8 with a DequantizeLinear (weight-only: smaller, float math)
        graph.weight_only_int8(main, s.per_channel)
        onnx.save(main, str(out))
        tmp.unlink()
    else:
        tmp.replace(out)
    return out


def _with_ort_splits(names: list[str]) -> list[str]:
    """onnxruntime's dynamic quantizer rewrites Gemm as MatMul (+Add, +Transpose) named
    NAME_MatMul / NAME_Add / NAME_Transpose before it applies exclusions, so an excluded
    Gemm is excluded under those names too."""
    return [x for n in names for x in (n, f"{n}_MatMul", f"{n}_Add", f"{n}_Transpose")]


def build_dynamic(pre: Path, out: Path, s: isa.QuantSettings, op_types: list[str],
                  exclude: list[str]) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    with _quiet():
        quantize_dynamic(str(pre), str(out), weight_type=_qtype("int8"), per_channel=False,
                         reduce_range=s.reduce_range, op_types_to_quantize=list(op_types),
                         nodes_to_exclude=_with_ort_splits(list(exclude)),
                         extra_options={"EnableSubgraph": True, "MatMulConstBOnly": True})
    return out


# onnxruntime's CPU provider has no float16 recurrent kernels (an fp16 LSTM crashes session
# creation in 1.32 instead of raising), so they stay float32 like the converter's own list
FP16_BLOCK = ["LSTM", "GRU", "RNN"]
FP16_SHAPE_OPS = ["ConstantOfShape", "Concat", "Gather", "Unsqueeze", "Squeeze", "Shape",
                  "Reshape", "Transpose"]


def build_fp16(pre: Path, out: Path, keep_io_types: bool, exclude: list[str]) -> Path:
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(pre))
    blocked = list(float16.DEFAULT_OP_BLOCK_LIST) + FP16_BLOCK

    def convert(keep: bool):
        with _quiet():
            return float16.convert_float_to_float16(
                model, keep_io_types=keep, op_block_list=blocked,
                node_block_list=list(exclude) or None, disable_shape_infer=False)

    def build() -> None:
        try:
            m16 = convert(keep_io_types)
        except Exception:  # noqa: BLE001 - the converter's keep_io_types cleanup has known failures
            if not keep_io_types:
                raise
            # ("The downstream node of the second cast node should be graph output"): convert
            # with fp16 inputs/outputs, then put the fp32 boundary back with explicit Casts
            m16 = graph.fp32_io(convert(False), model)
        graph.fix_fp16_casts(m16)
        onnx.save(m16, str(out))

    build()
    try:
        gates.probe_loads(out)
    except RuntimeError:
        # seen with recurrent models: fp16 shape arithmetic around a float32 LSTM crashes
        # onnxruntime; keep shape ops in float32 and try once more
        blocked += FP16_SHAPE_OPS
        build()
    return out


# ----------------------------------------------------------------------------- load + run check

MAX_REPAIRS = 8
_QUOTED = re.compile(r"""["']([^"']+)["']""")
_PATTERN = re.compile(r"""["'][^"']*["']|\d+""")     # an error message without its names
_QDQ_SUFFIXES = ("_DequantizeLinear_Output", "_DequantizeLinear", "_QuantizeLinear_Output",
                 "_QuantizeLinear", "_quantized", "_scale", "_zero_point")


class _Checked:
    """A variant builder whose every result is loaded and run on one feed in a child process
    before anything uses it. When onnxruntime refuses the result, the nodes it names (mapped
    back from Q/DQ names to the float nodes around the tensor) stay float; when it names none,
    the first quantized node that breaks it is found by bisection. Each node kept float this
    way is recorded with the reason (`repairs`), and the rest of the model stays quantized."""

    def __init__(self, build: Callable[[list[str], Path], Path], pre_model, feed: Path,
                 work: Path, repairs: list[dict], prog: Progress, label: str):
        self.build, self.pre, self.feed, self.work = build, pre_model, feed, work
        self.repairs, self.prog, self.label = repairs, prog, label
        self.nodes = [n.name for n in pre_model.graph.node]
        self.op_type = {n.name: n.op_type for n in pre_model.graph.node}
        self.producer = {o: n.name for n in pre_model.graph.node for o in n.output}
        self.consumers: dict[str, list[str]] = {}
        for n in pre_model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n.name)

    def __call__(self, exclude: list[str], out: Path) -> Path:
        seen: dict[str, int] = {}
        for _ in range(MAX_REPAIRS + 1):
            kept = [r["node"] for r in self.repairs]
            self.build(exclude + [k for k in kept if k not in exclude], out)
            why = gates.probe(out, self.feed)
            if why is None:
                return out
            excluded = set(exclude) | set(kept)
            culprits = self._named(why, out, excluded) or self._bisect(sorted(excluded), out)
            if not culprits:
                raise ConversionError(f"{self.label}: onnxruntime cannot use the result, and no "
                                      f"node could be singled out: {why[:300]}")
            # the same failure again on another node is a pattern: every node of those op
            # types goes float in one step instead of one build per node
            pattern = _PATTERN.sub("#", why)
            seen[pattern] = seen.get(pattern, 0) + 1
            if seen[pattern] >= 2:
                ops = {self.op_type[c] for c in culprits}
                culprits += [n for n in self.nodes if self.op_type[n] in ops
                             and n not in excluded and n not in culprits]
            for c in culprits:
                self.repairs.append({"node": c, "reason": why[:300]})
            shown = ", ".join(culprits[:5]) + (f" and {len(culprits) - 5} more" if len(culprits) > 5 else "")
            self.prog.warn(f"{self.label}: keeping {shown} in float: the quantized form fails in "
                           f"onnxruntime ({why[:160]})")
        raise ConversionError(f"{self.label}: still failing after {MAX_REPAIRS} repairs "
                              f"({len(self.repairs)} nodes kept float): {self.repairs[-1]['reason']}")

    def _float_nodes(self, tensor: str) -> list[str]:
        for suf in _QDQ_SUFFIXES:
            if tensor.endswith(suf):
                tensor = tensor[:-len(suf)]
                break
        names = [self.producer[tensor]] if tensor in self.producer else []
        return names + self.consumers.get(tensor, [])

    def _named(self, why: str, out: Path, excluded: set[str]) -> list[str]:
        """Float nodes behind the names in onnxruntime's message."""
        import onnx

        from ..agent.ort import failing_node

        qm = onnx.load(str(out), load_external_data=False)
        q_nodes = {n.name: n for n in qm.graph.node}
        names = [m.group(1) for m in _QUOTED.finditer(why)]
        hit = failing_node(Exception(why))
        if hit:
            names.insert(0, hit[1])
        found: list[str] = []
        for x in names:
            if x in self.nodes:
                cands = [x]
            elif x in q_nodes:
                qn = q_nodes[x]
                cands = [c for t in list(qn.input) + list(qn.output) for c in self._float_nodes(t)]
            else:
                cands = self._float_nodes(x)
            for c in cands:
                if c not in found and c not in excluded:
                    found.append(c)
        return found

    def _bisect(self, excluded: list[str], out: Path) -> list[str]:
        """The first node (graph order) whose quantization breaks the model: quantizing only a
        prefix of the nodes, find the shortest prefix that fails."""
        cands = [n for n in self.nodes if n not in excluded]
        probe_path = self.work / f"{out.stem}.bisect.onnx"
        if not cands:
            return []
        self.build(excluded + cands, probe_path)
        if gates.probe(probe_path, self.feed) is not None:
            return []                     # fails with nothing quantized: not a node's fault
        lo, hi = 0, len(cands)            # cands[:lo] works (nothing quantized), cands[:hi] fails
        while hi - lo > 1:
            mid = (lo + hi) // 2
            self.build(excluded + cands[mid:], probe_path)
            if gates.probe(probe_path, self.feed) is None:
                lo = mid
            else:
                hi = mid
        return [cands[hi - 1]]


# ----------------------------------------------------------------------------- evaluation

class _Evaluator:
    def __init__(self, data: gates.Dataset, metric: str, ref: gates.Outputs, threads: int,
                 prog: Progress):
        self.data, self.metric, self.ref, self.threads, self.prog = data, metric, ref, threads, prog

    def __call__(self, path: Path, label: str) -> float:
        gates.probe_loads(path)
        sess = gates.session(path, self.threads)
        tick = self.prog.task(f"evaluating {label}", self.data.n_batches())
        try:
            outs = gates.collect_outputs(lambda f: sess.run(None, f), self.data, tick)
        finally:
            self.prog.done()
        return gates.score(self.metric, outs, self.ref, self.data.labels)


def _within(metric_fp32: float, metric: float, max_drop: float) -> bool:
    return metric_fp32 - metric <= max_drop + 1e-12


MAX_FALLBACK_ROUNDS = 12


def _budget_search(name: str, build: Callable[[list[str], Path], Path], evaluate: _Evaluator,
                   metric_fp32: float, max_drop: float, pre: Path, sens_batches: list[dict],
                   workdir: Path, candidates_of: Callable[[Path], set[str] | None],
                   user_exclude: list[str], prog: Progress, variant: Variant,
                   first: tuple[Path, float] | None = None, shared_activations: bool = True) -> None:
    """Build with no fallback; while over budget, re-rank the nodes of the current model by
    the error they inject and keep the worst in float (one group per round for the first
    rounds, then doubling), and finally bisect the last round down to the groups it needed.
    Re-ranking each round matters: once the worst node is float, the next culprit shows."""
    counter = [0]

    def attempt(fallback: list[str]) -> tuple[Path, float]:
        counter[0] += 1
        out = workdir / f"{name}.{counter[0]}.onnx"
        build(user_exclude + fallback, out)
        label = f"{name}" + (f" ({len(fallback)} nodes float)" if fallback else "")
        m = evaluate(out, label)
        variant.attempts.append(asdict(Attempt(len(fallback), round(m, 6),
                                               round(metric_fp32 - m, 6),
                                               _within(metric_fp32, m, max_drop))))
        return out, m

    if first is not None:       # already built and scored (the calibration-method probe)
        path, m = first
        variant.attempts.append(asdict(Attempt(0, round(m, 6), round(metric_fp32 - m, 6),
                                               _within(metric_fp32, m, max_drop))))
    else:
        path, m = attempt([])
    best = (m, path, [])
    if _within(metric_fp32, m, max_drop):
        _set(variant, path, m, metric_fp32, max_drop, [])
        return
    prog.say(f"{name}: drop {100 * (metric_fp32 - m):.2f} points is over the "
             f"{100 * max_drop:.2f} budget; keeping the most error-injecting nodes in float")
    all_cands = candidates_of(path)
    fallback: list[str] = []
    step, rounds = 1, 0
    while rounds < MAX_FALLBACK_ROUNDS:
        rounds += 1
        ranked = rank_sensitivity(pre, path, sens_batches, workdir, all_cands,
                                  set(fallback) | set(user_exclude), shared_activations)
        if not ranked:
            break
        before = list(fallback)
        groups = [r.group for r in ranked[:step]]
        added = _union(fallback, groups)
        if all_cands is not None and set(added) >= all_cands:
            break               # every quantized node in float: that is the fp32 model
        path, m = attempt(added)
        fallback = added
        if m > best[0]:
            best = (m, path, list(fallback))
        if _within(metric_fp32, m, max_drop):
            # bisect the groups of this round: the fewest that still meet the budget
            lo, hi = 0, len(groups)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                fb = _union(before, groups[:mid])
                p2, m2 = attempt(fb)
                if _within(metric_fp32, m2, max_drop):
                    hi, path, m, fallback = mid, p2, m2, fb
                else:
                    lo = mid
            _set(variant, path, m, metric_fp32, max_drop, fallback)
            return
        if rounds >= 3:
            step *= 2
    m, path, fb = best
    _set(variant, path, m, metric_fp32, max_drop, fb)


def _union(base: list[str], groups: list[list[str]]) -> list[str]:
    out = list(base)
    for g in groups:
        out += [n for n in g if n not in out]
    return out


def _set(v: Variant, path: Path, metric: float, metric_fp32: float, max_drop: float,
         fallback: list[str]) -> None:
    v.path, v.metric, v.drop = str(path), metric, metric_fp32 - metric
    v.within_budget = _within(metric_fp32, metric, max_drop)
    v.fallback_nodes = list(fallback)


# ----------------------------------------------------------------------------- main entry

def _check_source(src: Path):
    from ..formats import onnx as onnx_fmt

    model = onnx_fmt.require(
        src, "optimize --quantize works on ONNX models",
        "Core ML models cannot be quantized here: there is no Core ML runtime on this OS to "
        "measure accuracy or speed",
        "quantize the ONNX model, then convert it to Core ML (or use coremltools.optimize on macOS)")
    onnx_fmt.load_session(src)          # a model onnxruntime refuses: one line that says why
    already = graph.quantized_op_count(model)
    if already:
        ops = sorted({n.op_type for n in graph.walk_nodes(model.graph)
                      if n.op_type in graph.QUANTIZED_OPS})
        raise UsageError(f"{src}: the model is already quantized ({already} nodes: "
                         f"{', '.join(ops)}); quantizing it again would stack a second "
                         "rounding on the first",
                         hint="quantize the float model it was made from")
    stats = graph.weight_stats(model)
    if stats.float_params == 0:
        raise UsageError(f"{src}: the model has no float weights, nothing to quantize",
                         hint="it may already be quantized, or keep its weights in "
                              "attributes (e.g. tree ensembles)")
    return model, stats


def _check_names(model, exclude: list[str] | None, op_types: list[str] | None) -> None:
    """--exclude names nodes and --op-types names ops: a typo would silently do nothing."""
    nodes = {n.name for n in graph.walk_nodes(model.graph)}
    ops = {n.op_type for n in graph.walk_nodes(model.graph)}
    missing = [n for n in exclude or [] if n not in nodes]
    if missing:
        raise UsageError(f"--exclude: no node named {', '.join(map(repr, missing))} in the model",
                         hint="node names are listed by onnx tools (e.g. Netron); unnamed "
                              "nodes cannot be excluded")
    if op_types and not set(op_types) & ops:
        raise UsageError(f"--op-types {','.join(op_types)}: the model has none of these ops "
                         f"(it has {', '.join(sorted(ops))})")


def quantize(src: str | Path, dst: str | Path, mode: str = "auto", *,
             calibration: str | Path | None = None, eval_data: str | Path | None = None,
             labels: str | None = None, metric: str = "auto", max_drop: float = 0.01,
             calib_method: str = "auto", target: str | Path | None = None, threads: int = 1,
             require_speedup: bool = False, op_types: list[str] | None = None,
             exclude: list[str] | None = None, keep_io_types: bool = True,
             shapes: dict[str, tuple[int, ...]] | None = None, measure_seconds: float = 3.0,
             keep_opset: bool = False, progress: Progress | None = None) -> QuantizeReport:
    from .. import lineage
    from ..formats import onnx as onnx_fmt
    from ..formats.base import sha256_path

    t_start = time.perf_counter()
    prog = progress or Progress()
    src, dst = Path(src), Path(dst)
    if mode not in MODES:
        raise UsageError(f"--quantize {mode}: choose from {', '.join(MODES)}")
    if calib_method != "auto" and calib_method not in CALIB_METHODS:
        raise UsageError(f"--calib-method {calib_method}: choose from auto, "
                         f"{', '.join(CALIB_METHODS)}")
    if threads < 1:
        raise UsageError("--threads must be at least 1")
    if not measure_seconds > 0:
        raise UsageError("--min-seconds must be > 0")
    if dst.suffix.lower() != ".onnx":
        raise UsageError(f"-o {dst}: the output of --quantize is an ONNX model (.onnx)")
    if dst.resolve() == src.resolve():
        raise UsageError("-o must differ from the source model; the source is never overwritten")
    model, src_stats = _check_source(src)
    sig = onnx_fmt.signature_of(model)
    _check_names(model, exclude, op_types)
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        prog.warn(msg)

    cpu = isa.from_target(target) if target else isa.detect()
    settings = isa.choose(cpu)
    if target:
        warn(f"settings chosen for {cpu.source}, but latency and the speed verdict are "
             "measured on THIS machine, not on the target")
    if op_types:
        settings.dynamic_op_types = list(op_types)
        settings.reasons.append(f"dynamic op types set by the user: {', '.join(op_types)}")

    # ---- data
    calib = None
    calib_label = None
    if calibration is not None and str(calibration) == "random":
        calib = gates.random_dataset(sig, n=64, shapes=shapes)
        calib_label = "random (generated)"
        warn("calibrating on RANDOM inputs: activation ranges will not match real data, and "
             "int8 accuracy on real inputs is unknown")
    elif calibration is not None:
        calib = gates.load_dataset(calibration, sig)
        calib_label = f"{calib.source} ({calib.n} samples)"
    elif mode == "static":
        raise UsageError("static quantization needs calibration data: --calibration DATA "
                         "(.npz keyed by input name, or a folder of .npy)",
                         hint="--calibration random calibrates on generated inputs (not advised)")
    if eval_data is not None:
        data = gates.load_dataset(eval_data, sig, labels)
    elif labels is not None:
        raise UsageError("--labels names an array in the --eval data; pass --eval DATA too")
    elif calib is not None and calib_label != "random (generated)":
        data = calib
        warn("no --eval data: evaluating on the calibration data (optimistic)")
    else:
        data = gates.random_dataset(sig, n=64, seed=1, shapes=shapes)
        warn("no --eval data: accuracy measured as agreement with fp32 on RANDOM inputs; "
             "real-data accuracy is unknown")
    if data.dropped:
        warn(f"the model takes batches of {data.batch}: the last {data.dropped} eval "
             "samples are not used")

    work = Path(tempfile.mkdtemp(prefix="edgeops-quant-"))
    try:
        prog.say("pre-processing (normalisation, shape inference, graph optimization)")
        prep = graph.prepare(src, work, (calib or data).small(2, 1), keep_opset=keep_opset)
        pre = prep.path
        if not prep.per_channel and settings.per_channel:
            settings.per_channel = False
            settings.reasons = [r.replace("weights int8 per-channel", "weights int8 per-tensor")
                                for r in settings.reasons]
            settings.reasons.append(f"weights per-tensor: the model stays at opset {prep.opset} "
                                    "(see pre-processing)")

        # ---- fp32 reference
        fsess = gates.session(src, threads)
        tick = prog.task("evaluating fp32", data.n_batches())
        try:
            ref = gates.collect_outputs(lambda f: fsess.run(None, f), data, tick)
        except EdgeopsError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"the fp32 model fails on the eval data: {first_line(exc)}") from None
        finally:
            prog.done()
        fsess = None  # free the fp32 session before building variants
        metric_name = gates.pick_metric(metric, data, ref)
        metric_fp32 = gates.score(metric_name, ref, ref, data.labels)
        evaluate = _Evaluator(data, metric_name, ref, threads, prog)
        sens_src = calib if calib is not None else data
        sens_batches = _small_batches(sens_src, SENS_LIMIT)
        user_exclude = list(exclude or [])

        import onnx
        pre_model = onnx.load(str(pre))
        import numpy as np

        probe_feed = work / "probe_feed.npz"      # every result must load AND run on this
        np.savez(probe_feed, **data.one())

        def cands(qpath: Path) -> set[str]:
            return graph.quantized_nodes(pre_model, onnx.load(str(qpath)))

        # ---- variants
        names = ["static", "dynamic", "fp16"] if mode == "auto" else [mode]
        if mode == "auto" and calib is None:
            names.remove("static")
            warn("auto: static int8 skipped, no --calibration data given")
        variants: list[Variant] = []
        for name in names:
            v = Variant(name=name, settings={})
            variants.append(v)
            try:
                _run_variant(v, pre, work, settings, calib, calib_method, user_exclude,
                             keep_io_types, evaluate, metric_fp32, max_drop, sens_batches, cands,
                             prog, pre_model, probe_feed, threads)
            except EdgeopsError:
                raise
            except Exception as exc:  # noqa: BLE001 - one failed variant must not hide the others
                v.error = first_line(exc)
                if mode != "auto":
                    raise ConversionError(f"{name} quantization failed: {v.error}") from exc
                prog.warn(f"{name}: failed: {v.error}")

        built = [v for v in variants if v.path]
        if not built:
            raise ConversionError("no quantized variant could be built: " +
                                  "; ".join(f"{v.name}: {v.error}" for v in variants))
        for v in built:
            qm = onnx.load(v.path)
            if v.name != "fp16" and graph.quantized_op_count(qm) == 0:
                v.error = "nothing was quantized (no supported op with float weights)"
                v.path = None
                continue
            ws = graph.weight_stats(qm, (1, 11) if v.name == "fp16" else graph.FLOAT_TYPES)
            v.weights = ws.to_dict()
            v.size = Path(v.path).stat().st_size
        built = [v for v in variants if v.path]
        if not built:
            raise UsageError(f"{src}: nothing to quantize: " + "; ".join(
                f"{v.name}: {v.error}" for v in variants))

        # ---- speed gate: all variants and fp32, interleaved
        prog.say(f"timing fp32 and {', '.join(v.name for v in built)} interleaved "
                 f"({threads} thread{'s' if threads > 1 else ''})")
        feeds = data.one()          # latency of one inference at the model's batch
        speed = gates.measure_interleaved({"fp32": src, **{v.name: v.path for v in built}},
                                          feeds, threads=threads, seconds=measure_seconds)
        for v in built:
            t = speed.timings[v.name]
            v.p50_ms, v.p90_ms, v.runs = t.p50_ms, t.p90_ms, t.runs
            v.speedup = speed.speedup(v.name)
            v.verdict = gates.verdict(v.speedup)
        fp32_t = speed.timings["fp32"]

        # ---- choose
        ok = [v for v in built if v.within_budget]
        keep_note = None
        if mode == "auto":
            fast = [v for v in ok if v.verdict == "faster"]
            even = [v for v in ok if v.verdict == "not faster"]
            if fast:
                chosen = max(fast, key=lambda v: v.speedup)
            elif even:                   # nothing faster: the smallest that is not slower
                chosen = min(even, key=lambda v: v.size)
                keep_note = (f"auto: no variant measured faster than fp32 here; kept "
                             f"{chosen.name}, the smallest that is not slower")
            elif ok:                     # everything within budget is slower: keep fp32
                chosen = _fp32_variant(src, metric_fp32, fp32_t)
                keep_note = ("auto: every variant within budget measured SLOWER than fp32 here "
                             "(" + ", ".join(f"{v.name} {v.speedup:.2f}x" for v in ok) +
                             "); kept the fp32 model")
            else:
                chosen = max(built, key=lambda v: v.metric)
        else:
            chosen = built[0]
        if keep_note:
            why = [f"{v.name}: {v.speed_reason}" for v in ok if v.speed_reason]
            warnings.append(keep_note + (" -- measured: " + " | ".join(why) if why else ""))
        failure = None
        if not chosen.within_budget:
            failure = (f"accuracy budget not met: best {chosen.name} drops "
                       f"{100 * chosen.drop:.2f} points ({metric_name} {metric_fp32:.4f} -> "
                       f"{chosen.metric:.4f}), budget {100 * max_drop:.2f}")
        elif require_speedup and chosen.verdict != "faster":
            failure = (f"--require-speedup: {chosen.name} is "
                       f"{'the fp32 model (nothing was faster)' if chosen.name == 'fp32' else chosen.verdict + ' than fp32'} "
                       f"({chosen.speedup:.2f}x; needs >= {gates.FASTER_THRESHOLD:.2f}x)")
        if chosen.verdict not in ("faster", "baseline") and not failure:
            warnings.append(f"{chosen.name} is {chosen.verdict.upper()} than fp32 on this CPU "
                            f"({chosen.speedup:.2f}x): it saves size, not time"
                            + (f" (measured: {chosen.speed_reason})" if chosen.speed_reason else ""))

        report = QuantizeReport(
            source=str(src), output=None, mode=mode, metric=metric_name, metric_fp32=metric_fp32,
            max_drop=max_drop, eval_data=data.source, eval_samples=data.n_used, calibration=calib_label,
            cpu={"arch": cpu.arch, "features": cpu.features, "source": cpu.source,
                 "model": cpu.model},
            settings=settings.to_dict(), preprocess=prep.notes, threads=threads,
            fp32={"size": onnx_fmt.total_size(src), "p50_ms": fp32_t.p50_ms, "p90_ms": fp32_t.p90_ms,
                  "runs": fp32_t.runs, "metric": metric_fp32, "weights": src_stats.to_dict()},
            variants=variants, chosen=chosen.name, passed=failure is None, failure=failure,
            warnings=warnings, calibration_layout=calib.description if calib else None,
            eval_layout=data.description)

        # ---- write
        final = dst if failure is None else dst.with_name(dst.stem + ".rejected.onnx")
        final.parent.mkdir(parents=True, exist_ok=True)
        # the fp32 answer is the source as normalised (an IR-3 file with weights missing
        # from its inputs is invalid for onnx's checker; the normalised one is not)
        out_model = onnx.load(str(work / "normalized.onnx") if chosen.name == "fp32" else chosen.path)
        if chosen.name != "fp32":
            graph.drop_unused_opsets(out_model)
        onnx.save(out_model, str(final))
        for v in variants:
            v.path = None       # temp paths mean nothing after this call
        parent = lineage.read_onnx_lineage(src)
        record = lineage.make_record(
            "optimize.quantize", src, sha256_path(src), "onnx",
            {"quantize": {"mode": mode, "variant": chosen.name, "settings": chosen.settings,
                          "metric": metric_name, "metric_fp32": metric_fp32,
                          "metric_quantized": chosen.metric, "max_drop": max_drop,
                          "fallback_nodes": chosen.fallback_nodes,
                          "p50_ms_fp32": fp32_t.p50_ms, "p50_ms": chosen.p50_ms,
                          "speedup": chosen.speedup, "threads": threads,
                          "calibration": calib_label, "eval_data": data.source,
                          "cpu": report.cpu, "passed": failure is None}},
            parent=parent)
        lineage.write_onnx_lineage(final, record, {"edgeops.optimize": json.dumps(
            {"variant": chosen.name, "passed": failure is None}, sort_keys=True)})
        if failure is None:
            report.output = str(final)
        else:
            report.rejected_output = str(final)
        gates.write_report(report, dst, t_start)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fp32_variant(src: Path, metric_fp32: float, t: gates.Timing) -> Variant:
    """auto's answer when every variant is slower: the source model itself."""
    from ..formats.onnx import total_size

    return Variant("fp32", {"kept": "the source model, unchanged"}, path=str(src),
                   metric=metric_fp32, drop=0.0, within_budget=True, size=total_size(src),
                   p50_ms=t.p50_ms, p90_ms=t.p90_ms, runs=t.runs, speedup=1.0, verdict="baseline")


def _small_batches(data: gates.Dataset, limit: int) -> list[dict]:
    """Sensitivity ranking keeps every intermediate tensor: small batches bound memory."""
    return data.small(limit, SENS_BATCH)


def _run_variant(v: Variant, pre: Path, work: Path, s: isa.QuantSettings,
                 calib: gates.Dataset | None, calib_method: str, user_exclude: list[str], keep_io_types: bool, evaluate: _Evaluator,
                 metric_fp32: float, max_drop: float, sens_batches: list[dict],
                 cands: Callable[[Path], set[str]], prog: Progress, pre_model, feed: Path,
                 threads: int = 1) -> None:
    def checked(raw: Callable[[list[str], Path], Path], label: str) -> _Checked:
        return _Checked(raw, pre_model, feed, work, v.repaired, prog, label)

    if v.name == "static":
        methods = list(CALIB_METHODS) if calib_method == "auto" else [calib_method]
        scores, probes = {}, {}
        for m in methods:           # calibration method: best metric with no fallback
            out = work / f"static-{m}.probe.onnx"
            raw = (lambda ex, o, m=m: build_static(pre, o, s, m, calib, work / f"calib-{m}.json",
                                                   ex, prog))
            checked(raw, f"static ({m})")(user_exclude, out)
            scores[m] = evaluate(out, f"static ({m})")
            probes[m] = out
        method = max(methods, key=lambda m: (scores[m], -methods.index(m)))
        v.settings = {"format": s.quant_format, "activation_type": s.activation_type,
                      "weight_type": s.weight_type, "per_channel": s.per_channel,
                      "reduce_range": s.reduce_range, "calibration_method": method,
                      "calibration_scores": {m: round(x, 6) for m, x in scores.items()}}
        build = checked(lambda ex, out: build_static(pre, out, s, method, calib,
                                                     work / f"calib-{method}.json", ex, prog),
                        "static")
    elif v.name == "dynamic":
        from dataclasses import replace

        ops = s.dynamic_op_types          # --op-types, when given, is already in here
        # 7-bit weights avoid U8S8 saturation on AVX2 without VNNI, but cost accuracy where
        # no saturation happens (onnxruntime's own default is 8-bit): both are measured
        ranges = [s.reduce_range] + ([False] if s.reduce_range else [])
        dyn_scores, dyn_probes = {}, {}
        for rr in ranges:
            out = work / f"dynamic-rr{int(rr)}.probe.onnx"
            label = f"dynamic ({'7' if rr else '8'}-bit weights)"
            raw = (lambda ex, o, rr=rr: build_dynamic(pre, o, replace(s, reduce_range=rr), ops, ex))
            checked(raw, label)(user_exclude, out)
            dyn_scores[rr], dyn_probes[rr] = evaluate(out, label), out
        rr = max(ranges, key=lambda r: (dyn_scores[r], r == s.reduce_range))
        v.settings = {"weight_type": "int8", "per_channel": False, "reduce_range": rr,
                      "op_types": list(ops),
                      "weight_bits_scores": {("7-bit" if r else "8-bit"): round(x, 6)
                                             for r, x in dyn_scores.items()}}
        build = checked(lambda ex, out: build_dynamic(pre, out, replace(s, reduce_range=rr), ops, ex),
                        "dynamic")
    else:
        v.settings = {"keep_io_types": keep_io_types, "via": "onnxconverter-common float16"}
        build = checked(lambda ex, out: build_fp16(pre, out, keep_io_types, ex), "fp16")
    first = (probes[method], scores[method]) if v.name == "static" else \
        (dyn_probes[rr], dyn_scores[rr]) if v.name == "dynamic" else None
    fp16 = v.name == "fp16"
    _budget_search(v.name, build, evaluate, metric_fp32, max_drop, pre, sens_batches, work,
                   (lambda p: None) if fp16 else cands, user_exclude, prog, v,
                   first, shared_activations=v.name == "static")
    if v.name in ("static", "dynamic") and v.path:
        _speed_select(v, build, evaluate, metric_fp32, max_drop, pre, work, user_exclude,
                      cands, feed_of(feed), threads, prog)


def feed_of(path: Path) -> dict:
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


SPEED_ROUNDS = 2
SPEED_MARGIN = 1.03         # a rebuilt variant replaces the previous one only if this much faster


def _speed_select(v: Variant, build, evaluate: _Evaluator, metric_fp32: float, max_drop: float,
                  pre: Path, work: Path, user_exclude: list[str], cands, feeds: dict,
                  threads: int, prog: Progress) -> None:
    """Keep float the layers that are slower in int8 on this CPU (speed.compare: per-node
    profiles of the float and the quantized graph), rebuild, and keep the rebuild only if it
    stays within budget and measures faster end to end. The last comparison's one-line
    reason goes into the report either way."""
    from . import speed

    for rnd in range(SPEED_ROUNDS):
        prog.say(f"{v.name}: profiling float and int8 per node (which layers gain)")
        cmp = speed.compare(pre, Path(v.path), feeds, threads)
        v.speed_reason = cmp.reason()
        # nodes the quantizer touched, less those already kept float (a float node fed by a
        # DequantizeLinear counts as touched, but it computes in float)
        quantized = (cands(Path(v.path)) or set()) - set(v.fallback_nodes)
        losing = [g for g in cmp.losing() if g.node in quantized]
        if not losing:
            return
        compute = {g.node for g in cmp.groups} & quantized
        if {g.node for g in losing} >= compute:
            prog.say(f"{v.name}: every quantized layer is slower in int8 on this CPU")
            return                  # nothing would stay quantized: the verdict says SLOWER
        extra = [m for g in losing for m in g.members if m not in v.fallback_nodes]
        fallback = list(v.fallback_nodes) + extra
        out = work / f"{v.name}.speed{rnd + 1}.onnx"
        try:
            build(user_exclude + fallback, out)
            m = evaluate(out, f"{v.name} (speed round {rnd + 1})")
        except EdgeopsError:
            raise
        except Exception as exc:  # noqa: BLE001 - the variant already built stands
            prog.warn(f"{v.name}: speed round {rnd + 1} failed ({first_line(exc)}); keeping "
                      "the previous build")
            return
        if not _within(metric_fp32, m, max_drop):
            return
        t = gates.measure_interleaved({"before": v.path, "after": out}, feeds, threads=threads,
                                      seconds=1.0)
        if t.speedup("after") < SPEED_MARGIN:
            prog.say(f"{v.name}: keeping {len(losing)} slower layers float did not measure "
                     f"faster ({t.speedup('after'):.2f}x); kept the previous build")
            return
        prog.say(f"{v.name}: {len(losing)} layers that are slower in int8 on this CPU stay "
                 f"float ({t.speedup('after'):.2f}x faster)")
        v.speed_float.extend(extra)
        _set(v, out, m, metric_fp32, max_drop, fallback)
