"""Keras / SavedModel / frozen GraphDef -> ONNX with tf2onnx.

Keras models and SavedModel signatures go through a `tf.function` with an explicit
input signature and `tf2onnx.convert.from_function`: `from_keras` fails on Keras 3
(KeyError 'keras_tensor_N'), and one route for both Keras generations and for
SavedModels keeps the naming identical. GraphDefs go through `from_graph_def`.

The ONNX inputs/outputs are renamed to the source runner's names (Keras input/output
layer names, SavedModel signature keys, GraphDef tensor names without ":0"), so verify
matches outputs by name.

tf2onnx logs unsupported ops and still returns a model ("continue_on_error"); here any
TF op left in the graph, or any node tf2onnx failed to convert, raises ConversionError.

Not covered: ONNX -> TensorFlow (that needs onnx2tf, which is not a dependency), TFLite,
models over 2 GB (tf2onnx's large_model zip output).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from .. import extras
from ..errors import ConversionError, first_line
from ..formats import keras as keras_fmt
from ..formats import tensorflow as tf_fmt
from ..formats.onnx import walk_nodes as _walk_nodes
from .context import ConvertContext

DEFAULT_OPSET = 17  # onnx2torch (the ONNX -> TorchScript hop) covers opset <= 17

# Domains whose ops are real ONNX: anything else left by tf2onnx is an unconverted op.
_KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
_UNSUPPORTED_RE = re.compile(r"Tensorflow op \[(.*): (\w+)\] is not supported")
_TF_NAME_RE = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.\-/]*\Z")


# ----------------------------------------------------------------------------- tf2onnx plumbing

class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _tf2onnx_log():
    """Collect tf2onnx's warnings/errors instead of letting it print them, and keep
    TensorFlow's deprecation notices (tf2onnx calls tf.compat.v1 APIs) quiet."""
    logger = logging.getLogger("tf2onnx")
    tf_logger = logging.getLogger("tensorflow")
    cap = _Capture()
    saved = (logger.propagate, logger.level, tf_logger.level)
    logger.addHandler(cap)
    logger.propagate = False
    tf_logger.setLevel(logging.ERROR)
    try:
        yield cap.records
    finally:
        logger.removeHandler(cap)
        logger.propagate, logger.level, tf_logger.level = saved


def unconverted_ops(model, records: list[logging.LogRecord] = ()) -> list[str]:
    """Op types tf2onnx left as TensorFlow ops or failed to convert."""
    import onnx.defs

    bad: Counter = Counter()
    for n in _walk_nodes(model.graph):
        if n.domain in ("", "ai.onnx"):
            if not onnx.defs.has(n.op_type, ""):
                bad[n.op_type] += 1
        elif n.domain not in _KNOWN_DOMAINS:
            bad[f"{n.domain}.{n.op_type}"] += 1
    for r in records:
        if r.levelno < logging.ERROR:
            continue
        msg = r.getMessage()
        m = _UNSUPPORTED_RE.search(msg)
        if m:
            bad.setdefault(m.group(2), 1)
        elif msg.startswith("Failed to convert node"):
            node = r.args[0] if isinstance(r.args, tuple) and r.args else "?"
            bad.setdefault(f"node {node}", 1)
    return sorted(bad)


def _check(model, records, tool: str) -> None:
    bad = unconverted_ops(model, records)
    if bad:
        raise ConversionError(
            f"{tool} cannot convert TensorFlow op(s) {', '.join(bad)}: no ONNX mapping, the "
            "result would not run",
            hint="replace those ops in the model with supported ones, or try another target")
    import onnx

    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ConversionError(f"{tool} produced an invalid ONNX model: "
                              f"{str(exc).strip().splitlines()[0][:300]}") from exc


def _rename(model, mapping: dict[str, str]) -> None:
    """Rename graph tensors (inputs/outputs) everywhere they appear in the main graph."""
    mapping = {k: v for k, v in mapping.items() if k != v}
    if not mapping:
        return
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.name in mapping:
            vi.name = mapping[vi.name]
    for n in _walk_nodes(g):
        for i, name in enumerate(n.input):
            if name in mapping:
                n.input[i] = mapping[name]
        for i, name in enumerate(n.output):
            if name in mapping:
                n.output[i] = mapping[name]


def _name_batch_dim(model) -> None:
    """tf2onnx names unknown dims "unk__N"; a Keras model's first axis is its batch."""
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and dims[0].dim_param.startswith("unk__"):
            dims[0].dim_param = "batch"


def _tool_version() -> str:
    tf2onnx = extras.require("tf2onnx", what="converting TensorFlow models to ONNX")
    return f"tf2onnx {tf2onnx.__version__}"


def _safe_tf_name(name: str, i: int) -> str:
    return name if _TF_NAME_RE.match(name) else f"input_{i}"


def _function_to_onnx(call, sig, dst: Path, ctx: ConvertContext, tool: str, extra: dict,
                      batch_first: bool = False) -> dict:
    """Wrap `call(list_of_tensors) -> list_of_tensors` in a tf.function with the
    signature's input specs, convert it, rename I/O to the signature's names."""
    tf = extras.require("tensorflow", what="converting TensorFlow models to ONNX")
    tf2onnx = extras.require("tf2onnx", what="converting TensorFlow models to ONNX")
    import onnx

    tf_names = [_safe_tf_name(s.name, i) for i, s in enumerate(sig.inputs)]
    specs = [tf.TensorSpec(s.shape, tf.string if s.dtype == "str" else s.dtype, name=n)
             for s, n in zip(sig.inputs, tf_names)]

    @tf.function(input_signature=specs)
    def fn(*args):
        # a list (not a dict) keeps the output order: tf.nest sorts dict keys
        return list(call(list(args)))

    opset = ctx.opset or DEFAULT_OPSET
    with _tf2onnx_log() as records:
        try:
            model, _ = tf2onnx.convert.from_function(fn, input_signature=specs, opset=opset)
        except Exception as exc:
            raise ConversionError(f"{tool} failed: {first_line(exc)}") from exc
    _check(model, records, tool)
    if len(model.graph.input) != len(sig.inputs):
        # Tensors the function captures (constants baked into a SavedModel, as onnx2tf
        # writes them) become extra graph inputs in from_function; freezing the concrete
        # function turns them into constants first.
        model = _frozen_to_onnx(fn, tf, tf2onnx, opset, tool)
    g = model.graph
    if len(g.input) != len(sig.inputs) or len(g.output) != len(sig.outputs):
        raise ConversionError(
            f"{tool} produced {len(g.input)} input(s)/{len(g.output)} output(s), the model has "
            f"{len(sig.inputs)}/{len(sig.outputs)}")
    # Inputs come out under the TensorSpec names (map by name; by position if tf2onnx
    # renamed them); outputs in list order under "Identity:0"-style names.
    if sorted(vi.name for vi in g.input) == sorted(tf_names):
        mapping = {n: s.name for s, n in zip(sig.inputs, tf_names)}
    else:
        mapping = {vi.name: s.name for s, vi in zip(sig.inputs, g.input)}
    mapping.update({vi.name: s.name for s, vi in zip(sig.outputs, g.output)})
    _rename(model, mapping)
    if batch_first:
        _name_batch_dim(model)
    onnx.save(model, str(dst))
    return {"tool": tool, "opset": opset, "inputs": [s.name for s in sig.inputs],
            "outputs": [s.name for s in sig.outputs], "tensorflow": tf.__version__, **extra}


def _frozen_to_onnx(fn, tf, tf2onnx, opset: int, tool: str):
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    frozen = convert_variables_to_constants_v2(fn.get_concrete_function())
    ins = [t.name for t in frozen.inputs if t.dtype != tf.resource]
    outs = [t.name for t in frozen.outputs]
    with _tf2onnx_log() as records:
        try:
            model, _ = tf2onnx.convert.from_graph_def(
                frozen.graph.as_graph_def(), input_names=ins, output_names=outs, opset=opset)
        except Exception as exc:
            raise ConversionError(f"{tool} failed: {first_line(exc)}") from exc
    _check(model, records, tool)
    return model


# ----------------------------------------------------------------------------- edges

def keras_to_onnx(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    """Keras .h5 (Keras 2 or 3 writer) or .keras -> ONNX."""
    tool = _tool_version()
    model, loader = keras_fmt._load(Path(src), ctx.source_format, ctx.load)
    sig = keras_fmt.signature_of(model)

    packer = keras_fmt.input_packer(model)

    def call(args):
        return keras_fmt._as_list(keras_fmt.call_model(model, args, packer=packer))

    return _function_to_onnx(call, sig, Path(dst), ctx, tool, {"loader": loader}, batch_first=True)


def savedmodel_to_onnx(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    """SavedModel (serving_default signature) -> ONNX."""
    tool = _tool_version()
    loaded = tf_fmt._load_savedmodel(Path(src))
    fn = tf_fmt.serving_function(loaded, Path(src))
    sig = tf_fmt.savedmodel_signature_of(fn)
    names = [s.name for s in sig.inputs]

    def call(args):
        out = fn(**dict(zip(names, args)))
        if not isinstance(out, dict):
            return tf_fmt.tf_flatten(out)
        return [out[s.name] for s in sig.outputs]

    return _function_to_onnx(call, sig, Path(dst), ctx, tool, {"signature": tf_fmt.SERVING})


def graphdef_to_onnx(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    """Frozen GraphDef -> ONNX; inputs = Placeholders, outputs = unconsumed nodes, unless
    ctx.load.input_names / output_names say otherwise."""
    tool = _tool_version()
    tf = extras.require("tensorflow", what="converting TensorFlow models to ONNX")
    tf2onnx = extras.require("tf2onnx", what="converting TensorFlow models to ONNX")
    import onnx

    sig, gd, _ = tf_fmt.graphdef_signature(Path(src), ctx.load)
    ins = [tf_fmt.tensor_name(s.name) for s in sig.inputs]
    outs = [tf_fmt.tensor_name(s.name) for s in sig.outputs]
    rename = {t: s.name for t, s in zip(ins + outs, sig.inputs + sig.outputs)}
    opset = ctx.opset or DEFAULT_OPSET
    with _tf2onnx_log() as records:
        try:
            model, _ = tf2onnx.convert.from_graph_def(
                gd, name=Path(src).stem, input_names=ins, output_names=outs, opset=opset,
                tensors_to_rename=dict(rename))
        except Exception as exc:
            raise ConversionError(f"{tool} failed: {first_line(exc)}") from exc
    _check(model, records, tool)
    # tensors_to_rename normally did this already; make sure (idempotent)
    _rename(model, rename)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    want_in, want_out = [s.name for s in sig.inputs], [s.name for s in sig.outputs]
    if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
        raise ConversionError(f"{tool} changed the graph's inputs/outputs: {got_in} -> {got_out}, "
                              f"expected {want_in} -> {want_out}")
    onnx.save(model, str(dst))
    return {"tool": tool, "opset": opset, "inputs": want_in, "outputs": want_out,
            "tensorflow": tf.__version__}



_STATE_OPS = {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CALL_ONCE"}


def tflite_to_onnx(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    """TFLite flatbuffer -> ONNX with tf2onnx's TFLite frontend. ONNX inputs/outputs
    are renamed (by position) to the names the TFLite runner uses, so verify matches
    them by name."""
    tool = _tool_version()
    tf2onnx = extras.require("tf2onnx", what="converting TFLite models to ONNX")
    import onnx

    from ..formats import tflite as tflite_fmt

    sig = tflite_fmt.signature(Path(src), "tflite", ctx.load)
    ops = tflite_fmt.read_model(Path(src))["ops"]
    state = sorted(o for o in ops if o in _STATE_OPS)
    if state:
        raise ConversionError(
            f"{tool} cannot convert a TFLite model that keeps state in resource variables "
            f"({', '.join(state)}): ONNX carries state as explicit inputs and outputs",
            hint="export the streaming model with its state as inputs/outputs, or keep it in TFLite")
    if "DENSIFY" in ops:
        raise ConversionError(
            f"{tool} cannot convert sparse weights ({ops['DENSIFY']} DENSIFY op(s)): its TFLite "
            "frontend reads them as dense tensors of the wrong size",
            hint="export the model without sparsity, or keep it in TFLite")
    opset = ctx.opset or DEFAULT_OPSET
    with _tf2onnx_log() as records:
        try:
            model, _ = tf2onnx.convert.from_tflite(str(src), opset=opset)
        except Exception as exc:
            raise ConversionError(f"{tool} failed on the TFLite model: {first_line(exc)}") from exc
    _check(model, records, tool)
    g = model.graph
    if len(g.input) != len(sig.inputs) or len(g.output) != len(sig.outputs):
        raise ConversionError(
            f"{tool} produced {len(g.input)} input(s)/{len(g.output)} output(s), the TFLite "
            f"model has {len(sig.inputs)}/{len(sig.outputs)}")
    mapping = {vi.name: s.name for s, vi in zip(sig.inputs, g.input)}
    mapping.update({vi.name: s.name for s, vi in zip(sig.outputs, g.output)})
    _rename(model, mapping)
    onnx.save(model, str(dst))
    return {"tool": tool, "opset": opset, "inputs": [s.name for s in sig.inputs],
            "outputs": [s.name for s in sig.outputs]}
