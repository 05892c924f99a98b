"""TensorFlow graphs: the SavedModel directory and the frozen GraphDef (.pb).

Covered: detection by content (a directory holding saved_model.pb; a protobuf whose
top-level fields and first NodeDef look like a GraphDef), the `serving_default`
signature of a SavedModel, Placeholder inputs / unconsumed outputs of a GraphDef,
eager runners for both, and inspection (params, nodes, ops).

Not covered: TF1 sessions with un-frozen variables in a bare GraphDef (freeze first),
text-format GraphDefs, TF checkpoints (formats.other refuses those), TFLite.

Tensor names: a GraphDef tensor is named after its node for output port 0 ("x", not
"x:0") and "node:k" for other ports. The tf2onnx converter in edgeops.convert.tensorflow
renames the ONNX inputs/outputs to the same names, so verify can match them by name.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from .. import extras
from ..errors import FormatError, first_line
from .base import FormatInfo, LoadOptions, Probe, Signature, TensorSpec, _varint

FORMATS = (
    FormatInfo("savedmodel", "tensorflow", "TensorFlow SavedModel directory", "tensorflow",
               suffixes=(), is_dir=True),
    FormatInfo("graphdef", "tensorflow", "TensorFlow frozen GraphDef", "tensorflow",
               suffixes=(".pb",)),
)

SERVING = "serving_default"

# GraphDef: 1 node (NodeDef, repeated), 2 library, 3 version (deprecated int32),
# 4 versions, 5 debug_info. field -> wire type.
_GRAPHDEF_FIELDS = {1: 2, 2: 2, 3: 0, 4: 2, 5: 2}
_NODE_NAME = re.compile(rb"[A-Za-z0-9.][A-Za-z0-9_.\-/>]*\Z")
_OP_NAME = re.compile(rb"[A-Za-z_][A-Za-z0-9_>]*\Z")

# Ops that end a graph without being a model output.
_NOT_OUTPUT_OPS = {
    "Const", "NoOp", "Assert", "Placeholder", "PlaceholderWithDefault", "SaveV2", "RestoreV2",
    "Save", "Restore", "SaveSlices", "MergeV2Checkpoints", "ShardedFilename", "VarHandleOp",
    "VariableV2", "Variable", "AssignVariableOp", "Assign", "ReadVariableOp", "VarIsInitializedOp",
    "IsVariableInitialized", "Print", "PrintV2", "StringFormat", "HashTableV2",
    "InitializeTableV2", "InitializeTableFromTextFileV2", "MutableHashTableV2",
}


# ----------------------------------------------------------------------------- detect

def detect(probe: Probe) -> str | None:
    if probe.is_dir:
        if (probe.path / "saved_model.pb").is_file() or (probe.path / "saved_model.pbtxt").is_file():
            return "savedmodel"
        return None
    if not probe.head or probe.is_zip or probe.is_hdf5 or probe.is_pickle:
        return None
    head = probe.head  # name and op of the first node sit in the first bytes
    fields, complete = probe.proto_prefix  # streamed: no need to read a big graph
    if head.startswith(b"\x08\x01\x12") and complete and fields == {1: 0, 2: 2}:
        # saved_model_schema_version = 1, then meta_graphs: a SavedModel's saved_model.pb
        parent = probe.path.parent
        sm = parent / "saved_model.pb"
        if sm.is_file() and sm.samefile(probe.path):
            return "savedmodel"
        raise FormatError(f"{probe.path}: this is a SavedModel's saved_model.pb outside its "
                          "directory: pass the SavedModel directory (with saved_model.pb and "
                          "variables/) instead")
    if not _first_node_ok(head):
        return None
    if any(_GRAPHDEF_FIELDS.get(n) != wt for n, wt in fields.items()):
        return None
    if complete:
        return "graphdef"
    raise FormatError(f"{probe.path}: TensorFlow GraphDef is truncated or corrupt "
                      f"(protobuf ends mid-field after {probe.size} bytes)")


def _first_node_ok(buf: bytes) -> bool:
    """The file starts with a NodeDef (field 1) whose name and op are identifiers.

    The prefix scan alone is weak evidence (any bytes starting 0x0a parse a little), so
    decode the first node's name and op strings from the file's head too. Works on a
    truncated file.
    """
    try:
        if buf[:1] != b"\x0a":
            return False
        _, pos = _varint(buf, 1)
        strings = []
        for want in (0x0A, 0x12):  # NodeDef.name, NodeDef.op
            if pos >= len(buf) or buf[pos] != want:
                return False
            n, pos = _varint(buf, pos + 1)
            if not 0 < n <= 4096 or pos + n > len(buf):
                return False
            strings.append(buf[pos:pos + n])
            pos += n
    except ValueError:
        return False
    return bool(_NODE_NAME.match(strings[0]) and _OP_NAME.match(strings[1]))


# ----------------------------------------------------------------------------- helpers

def _tf():
    return extras.require("tensorflow", what="TensorFlow models")


def savedmodel_dir(path: Path) -> Path:
    """The SavedModel directory for a directory or its saved_model.pb."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def _np_dtype(dt) -> str:
    try:
        return np.dtype(dt.as_numpy_dtype).name
    except (TypeError, AttributeError):
        return "str" if getattr(dt, "name", "") == "string" else str(getattr(dt, "name", dt))


def _shape(shape) -> tuple | None:
    if shape is None or shape.rank is None:
        return None
    return tuple(None if d is None else int(d) for d in shape.as_list())


def tensor_name(name: str) -> str:
    """"x" -> "x:0" (the TF graph tensor name); "x:1" stays."""
    return name if re.search(r":\d+\Z", name) else f"{name}:0"


def short_name(name: str) -> str:
    """"x:0" -> "x" (the edgeops name); "x:1" stays."""
    return name[:-2] if name.endswith(":0") else name


# ----------------------------------------------------------------------------- SavedModel

def _load_savedmodel(path: Path):
    tf = _tf()
    d = savedmodel_dir(path)
    try:
        return tf.saved_model.load(str(d))
    except Exception as exc:  # OSError, NotFoundError, ValueError, parse errors ...
        raise FormatError(f"{d}: TensorFlow cannot load the SavedModel: {first_line(exc)}") from exc


def serving_function(loaded, path: Path):
    sigs = getattr(loaded, "signatures", {}) or {}
    if SERVING in sigs:
        return sigs[SERVING]
    found = ", ".join(sorted(sigs)) or "none"
    raise FormatError(
        f"{savedmodel_dir(path)}: the SavedModel has no '{SERVING}' signature "
        f"(signatures found: {found})",
        hint="re-save with tf.saved_model.save(obj, dir, signatures={'serving_default': "
             "fn.get_concrete_function(...)}) or Keras model.export(dir)")


def savedmodel_signature_of(fn) -> Signature:
    args, kwargs = fn.structured_input_signature
    specs = dict(kwargs)
    for i, a in enumerate(tf_flatten(args)):
        specs[getattr(a, "name", None) or f"input_{i}"] = a
    ins = tuple(TensorSpec(k, _np_dtype(s.dtype), _shape(s.shape)) for k, s in specs.items())
    outs_struct = fn.structured_outputs
    if not isinstance(outs_struct, dict):
        outs_struct = {f"output_{i}": t for i, t in enumerate(tf_flatten(outs_struct))}
    outs = tuple(TensorSpec(k, _np_dtype(t.dtype), _shape(t.shape)) for k, t in outs_struct.items())
    return Signature(ins, outs)


def tf_flatten(x) -> list:
    return list(_tf().nest.flatten(x))


def _tensors(feeds: dict[str, np.ndarray], signature: Signature) -> list:
    """Feeds as TF tensors in signature order; a missing input is a clear error."""
    tf = _tf()
    missing = [s.name for s in signature.inputs if s.name not in feeds]
    if missing:
        raise FormatError(f"missing input(s) {missing}; the model takes "
                          f"{[s.name for s in signature.inputs]}")
    return [tf.constant(feeds[s.name], dtype=s.dtype if s.dtype != "str" else tf.string)
            for s in signature.inputs]


class SavedModelRunner:
    """Calls the serving_default signature eagerly; outputs keyed by signature output key."""

    def __init__(self, path: Path):
        self.loaded = _load_savedmodel(path)  # keep alive: the function references it
        self.fn = serving_function(self.loaded, path)
        self.signature = savedmodel_signature_of(self.fn)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [s.name for s in self.signature.inputs]
        out = self.fn(**dict(zip(names, _tensors(feeds, self.signature))))
        if not isinstance(out, dict):
            out = {f"output_{i}": t for i, t in enumerate(tf_flatten(out))}
        return {s.name: np.asarray(out[s.name].numpy()) for s in self.signature.outputs}


# ----------------------------------------------------------------------------- GraphDef

def read_graphdef(path: Path):
    tf = _tf()
    gd = tf.compat.v1.GraphDef()
    try:
        gd.ParseFromString(Path(path).read_bytes())
    except Exception as exc:  # google.protobuf DecodeError
        raise FormatError(f"{path}: TensorFlow GraphDef is truncated or corrupt "
                          f"({first_line(exc)})") from exc
    return gd


def _import(gd, path: Path):
    tf = _tf()
    graph = tf.Graph()
    try:
        with graph.as_default():
            tf.compat.v1.import_graph_def(gd, name="")
    except Exception as exc:  # unknown op (custom kernel), malformed graph ...
        raise FormatError(f"{path}: TensorFlow cannot import the GraphDef: {first_line(exc)}") from exc
    return graph


def graphdef_io(gd, graph, opts: LoadOptions, path: Path) -> tuple[list[str], list[str]]:
    """(input names, output names) in edgeops form: node name for port 0, "node:k" else."""
    if opts.input_names:
        inputs = [short_name(n) for n in opts.input_names]
    else:
        inputs = [n.name for n in gd.node if n.op == "Placeholder"
                  and n.attr["dtype"].type != 20]  # 20 = DT_RESOURCE: captured variables
    if opts.output_names:
        outputs = [short_name(n) for n in opts.output_names]
    else:
        consumed = set()
        for n in gd.node:
            for i in n.input:
                consumed.add(i.lstrip("^").split(":")[0])
        outputs = []
        for n in gd.node:
            if n.name in consumed or n.op in _NOT_OUTPUT_OPS:
                continue
            op = graph.get_operation_by_name(n.name)
            outputs += [n.name if k == 0 else f"{n.name}:{k}" for k in range(len(op.outputs))]
    for kind, names in (("input", inputs), ("output", outputs)):
        for name in names:
            try:
                graph.get_tensor_by_name(tensor_name(name))
            except (KeyError, ValueError) as exc:
                raise FormatError(f"{path}: the GraphDef has no tensor {name!r} (given as {kind})") from exc
    if not outputs:
        raise FormatError(f"{path}: cannot tell the GraphDef's outputs (every node is consumed)",
                          hint="name them with --output-names")
    return inputs, outputs


def graphdef_signature(path: Path, opts: LoadOptions) -> tuple[Signature, object, object]:
    gd = read_graphdef(path)
    graph = _import(gd, path)
    inputs, outputs = graphdef_io(gd, graph, opts, path)

    def spec(name: str) -> TensorSpec:
        t = graph.get_tensor_by_name(tensor_name(name))
        return TensorSpec(name, _np_dtype(t.dtype), _shape(t.shape))

    return Signature(tuple(spec(n) for n in inputs), tuple(spec(n) for n in outputs)), gd, graph


class GraphDefRunner:
    """The GraphDef imported into a wrapped function, pruned to the chosen inputs/outputs."""

    def __init__(self, path: Path, opts: LoadOptions):
        tf = _tf()
        self.signature, gd, _ = graphdef_signature(path, opts)

        def _imports():
            tf.compat.v1.import_graph_def(gd, name="")

        wrapped = tf.compat.v1.wrap_function(_imports, [])
        g = wrapped.graph
        try:
            self.fn = wrapped.prune(
                [g.as_graph_element(tensor_name(s.name)) for s in self.signature.inputs],
                [g.as_graph_element(tensor_name(s.name)) for s in self.signature.outputs])
        except Exception as exc:
            raise FormatError(f"{path}: cannot cut the GraphDef at inputs "
                              f"{[s.name for s in self.signature.inputs]}: {first_line(exc)}") from exc

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = _tensors(feeds, self.signature)
        outs = self.fn(*args)
        return {s.name: np.asarray(o.numpy()) for s, o in zip(self.signature.outputs, outs)}


# ----------------------------------------------------------------------------- verbs

def load(path: Path, fmt: str = "savedmodel", opts: LoadOptions | None = None):
    """A SavedModel: the tf.saved_model.load object. A GraphDef: the GraphDef proto."""
    if fmt == "savedmodel":
        return _load_savedmodel(path)
    return read_graphdef(path)


def save(obj, path: Path, fmt: str = "savedmodel") -> None:
    if fmt == "savedmodel":
        _tf().saved_model.save(obj, str(path))
    else:
        Path(path).write_bytes(obj.SerializeToString())


def signature(path: Path, fmt: str = "savedmodel", opts: LoadOptions | None = None) -> Signature:
    opts = opts or LoadOptions()
    if fmt == "savedmodel":
        return savedmodel_signature_of(serving_function(_load_savedmodel(path), path))
    return graphdef_signature(path, opts)[0]


def runner(path: Path, fmt: str = "savedmodel", opts: LoadOptions | None = None):
    opts = opts or LoadOptions()
    if fmt == "savedmodel":
        return SavedModelRunner(path)
    return GraphDefRunner(path, opts)


_FLOAT_DT = {1, 2, 14, 19}  # DT_FLOAT, DT_DOUBLE, DT_BFLOAT16, DT_HALF


def _const_params(nodes) -> int:
    total = 0
    for n in nodes:
        if n.op != "Const":
            continue
        t = n.attr["value"].tensor
        if t.dtype in _FLOAT_DT:
            dims = [d.size for d in t.tensor_shape.dim]
            total += int(np.prod(dims)) if dims else 1
    return total


def _op_counts(graph_def) -> Counter:
    ops = Counter(n.op for n in graph_def.node)
    for f in graph_def.library.function:
        ops.update(n.op for n in f.node_def)
    return ops


def _read_savedmodel_proto(d: Path):
    _tf()  # a missing extra becomes MissingExtraError, not ImportError
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    try:
        if (d / "saved_model.pb").is_file():
            sm.ParseFromString((d / "saved_model.pb").read_bytes())
        else:
            text_format.Parse((d / "saved_model.pbtxt").read_text(), sm)
    except Exception as exc:
        raise FormatError(f"{d}: saved_model.pb is truncated or corrupt ({first_line(exc)})") from exc
    return sm


def _variable_params(d: Path) -> tuple[int, int]:
    """(float elements, variable count) from the SavedModel's checkpoint."""
    tf = _tf()
    prefix = d / "variables" / "variables"
    if not (d / "variables" / "variables.index").is_file():
        return 0, 0
    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except Exception as exc:
        raise FormatError(f"{d}: the SavedModel's variables are unreadable ({first_line(exc)})") from exc
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    total = count = 0
    for key, shape in shapes.items():
        low = key.lower()
        if key.startswith("_CHECKPOINTABLE") or "optimizer" in low or "save_counter" in low:
            continue
        if not dtypes[key].is_floating:
            continue
        total += int(np.prod(shape)) if shape else 1
        count += 1
    return total, count


def inspect(path: Path, fmt: str = "savedmodel", opts: LoadOptions | None = None) -> dict:
    opts = opts or LoadOptions()
    if fmt == "savedmodel":
        d = savedmodel_dir(path)
        sm = _read_savedmodel_proto(d)
        ops: Counter = Counter()
        sigs: list[str] = []
        tf_version = ""
        tags: list[list[str]] = []
        for mg in sm.meta_graphs:
            ops.update(_op_counts(mg.graph_def))
            # "__saved_model_init_op" is TF's initializer hook, not a callable signature
            sigs += [k for k in mg.signature_def.keys() if not k.startswith("__")]
            tf_version = tf_version or mg.meta_info_def.tensorflow_version
            tags.append(list(mg.meta_info_def.tags))
        params, nvars = _variable_params(d)
        # weights baked into the graph as constants (onnx2tf and frozen exports do that)
        consts = sum(_const_params(mg.graph_def.node)
                     + sum(_const_params(f.node_def) for f in mg.graph_def.library.function)
                     for mg in sm.meta_graphs)
        sig = None
        if SERVING in sigs:
            sig = signature(path, fmt, opts)
        return {
            "params": params + consts,
            "params_breakdown": {"variables": params, "constants": consts},
            "variables": nvars,
            "signatures": sorted(set(sigs)),
            "tags": tags,
            "written_by": {"tensorflow_version": tf_version} if tf_version else {},
            "nodes": sum(ops.values()),
            "ops": dict(ops.most_common()),
            "inputs": [s.to_dict() for s in sig.inputs] if sig else [],
            "outputs": [s.to_dict() for s in sig.outputs] if sig else [],
        }
    sig, gd, _ = graphdef_signature(path, opts)
    ops = _op_counts(gd)
    return {
        "params": _const_params(gd.node) + sum(_const_params(f.node_def) for f in gd.library.function),
        "nodes": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "producer": int(gd.versions.producer),
        "inputs": [s.to_dict() for s in sig.inputs],
        "outputs": [s.to_dict() for s in sig.outputs],
    }
