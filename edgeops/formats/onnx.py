"""ONNX: detection, signature, onnxruntime runner, and inspection (params incl. Constant
nodes and subgraphs, opsets, lineage metadata).

onnx and onnxruntime are core dependencies, so this module imports them at call time
only to keep `import edgeops` fast, not because they are optional.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import FormatError, UsageError, first_line
from .base import FormatInfo, LoadOptions, Probe, Signature, TensorSpec

FORMATS = (
    FormatInfo("onnx", "onnx", "ONNX model", None, suffixes=(".onnx",)),
)

# ModelProto: 1 ir_version (varint), 2 producer_name, 3 producer_version, 4 domain,
# 5 model_version, 6 doc_string, 7 graph, 8 opset_import, 14 metadata_props, 20 training_info,
# 25 functions, 26 configuration.
_ONNX_FIELDS = {1, 2, 3, 4, 5, 6, 7, 8, 14, 20, 25, 26}


def require(path: str | Path, works_on: str, coreml_reason: str, coreml_hint: str):
    """PATH loaded as an ONNX ModelProto, for a command that only runs ONNX (it needs
    onnxruntime). Any other format is refused with one line: Core ML with COREML_REASON and
    COREML_HINT (it has no runtime on this OS), the rest with WORKS_ON and a convert hint;
    a file onnx cannot load (truncated, corrupt) says so."""
    import onnx

    from . import detect as detect_format

    info = detect_format(path)
    if info.id != "onnx":
        if info.family == "coreml":
            raise UsageError(f"{path}: {coreml_reason}", hint=coreml_hint)
        raise UsageError(f"{path}: {works_on}, this is {info.description}",
                         hint=f"convert it first: edgeops convert {path} -o model.onnx")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated/corrupt file: one line
        raise UsageError(f"{path}: onnx cannot load the model: {first_line(exc)}") from None


def detect(probe: Probe) -> str | None:
    if probe.is_dir or not probe.head or probe.is_zip or probe.is_pickle or probe.is_hdf5:
        return None
    fields, complete = probe.proto_prefix
    if complete:
        if fields.get(1) == 0 and fields.get(7) == 2 and set(fields) <= _ONNX_FIELDS:
            return "onnx"
        return None
    # A cut-off ONNX file still starts with ir_version and ONNX-only fields.
    if fields.get(1) == 0 and (fields.keys() & {3, 7, 8}) and set(fields) <= _ONNX_FIELDS:
        raise FormatError(f"{probe.path}: ONNX model is truncated or corrupt "
                          f"(protobuf ends mid-field after {probe.size} bytes)")
    return None


def load(path: Path, fmt: str = "onnx", opts: LoadOptions | None = None, external_data: bool = True):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=external_data)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, OSError ...
        raise FormatError(f"{path}: cannot read ONNX model: {first_line(exc)}") from exc


def save(model, path: Path, fmt: str = "onnx") -> None:
    import onnx

    big = model.ByteSize() > (1 << 31) - (1 << 20)
    onnx.save(model, str(path), save_as_external_data=big)


def _np_dtype(elem_type: int) -> str:
    from onnx import helper

    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:
        return f"onnx:{elem_type}"


def _value_spec(vi) -> TensorSpec:
    t = vi.type
    kind = t.WhichOneof("value")
    if kind != "tensor_type":
        return TensorSpec(vi.name, kind or "unknown", None)
    tt = t.tensor_type
    if not tt.HasField("shape"):
        return TensorSpec(vi.name, _np_dtype(tt.elem_type), None)
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorSpec(vi.name, _np_dtype(tt.elem_type), tuple(dims))


def signature_of(model) -> Signature:
    inits = {i.name for i in model.graph.initializer}
    ins = tuple(_value_spec(v) for v in model.graph.input if v.name not in inits)
    outs = tuple(_value_spec(v) for v in model.graph.output)
    return Signature(ins, outs)


def signature(path: Path, fmt: str = "onnx", opts: LoadOptions | None = None) -> Signature:
    return signature_of(load(path, external_data=False))


class OnnxRunner:
    """onnxruntime CPU session behind the common Runner interface. `optimization="disabled"`
    runs the graph literally (no fusions): the reference semantics of a quantized graph, whose
    fused int8 kernels round differently."""

    def __init__(self, path: Path, threads: int | None = None, optimization: str = "all"):
        self.session = load_session(path, threads, optimization)
        self.signature = signature(path)
        self._out_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self._out_names, feeds)
        return dict(zip(self._out_names, outs))


def load_session(path: Path, threads: int | None = None, optimization: str = "all"):
    """An onnxruntime session for PATH; a model onnxruntime refuses is a FormatError that says
    why in one line (and names tensors that no graph defines, the usual cause)."""
    from ..agent.ort import describe, session

    try:
        return session(path, threads, optimization=optimization)
    except Exception as exc:
        why = describe(exc)
        try:
            missing = undefined_inputs(load(Path(path), external_data=False))
        except Exception:  # noqa: BLE001 - the diagnosis is a bonus; the ORT reason stands
            missing = []
        if missing:
            node, tensor = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            why = (f"node {node!r} reads {tensor!r}, which no graph in the model defines{more}: "
                   "the file is broken (re-export it)")
        raise FormatError(f"{path}: onnxruntime cannot load the model: {why}") from exc


def undefined_inputs(model) -> list[tuple[str, str]]:
    """(node, tensor) for node inputs that nothing defines in their scope: not a graph input,
    an initializer, a Constant or another node's output, in the node's graph or any graph
    enclosing it (subgraphs see outer scopes)."""
    from onnx import AttributeProto

    out: list[tuple[str, str]] = []

    def walk(g, outer: set[str], where: str) -> None:
        known = set(outer) | {i.name for i in g.input} | {t.name for t in g.initializer} | \
            {t.values.name for t in g.sparse_initializer} | {""}
        for n in g.node:
            label = f"{where}{n.name or n.op_type}"
            for i in n.input:
                if i not in known:
                    out.append((label, i))
            for a in n.attribute:
                subs = [a.g] if a.type == AttributeProto.GRAPH else \
                    list(a.graphs) if a.type == AttributeProto.GRAPHS else []
                for sg in subs:
                    walk(sg, known, f"{label}/{a.name}/")
            known.update(n.output)

    walk(model.graph, set(), "")
    return out


def runner(path: Path, fmt: str = "onnx", opts: LoadOptions | None = None, threads: int | None = None):
    return OnnxRunner(path, threads)


def reference_runner(path: Path, fmt: str = "onnx", opts: LoadOptions | None = None):
    """The graph run literally (onnxruntime without graph optimisations)."""
    return OnnxRunner(path, optimization="disabled")


# ops that pass a tensor's values through: a DequantizeLinear before them still sets the step
_VALUE_PASS = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Cast",
               "Concat", "Slice", "Gather", "Split", "MaxPool", "Relu", "Clip"}
_INT_OUT = {"QuantizeLinear", "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul",
            "QGemm", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool",
            "QLinearGlobalAveragePool", "DynamicQuantizeLinear"}


def quantization(path: Path, fmt: str = "onnx", opts: LoadOptions | None = None) -> dict[str, float]:
    """For outputs computed by quantized arithmetic: the quantization step in the output's
    units (a DequantizeLinear's scale, or 1 for an integer output of a quantized op). Empty
    for float models."""
    from onnx import numpy_helper

    model = load(Path(path), external_data=False)
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    out: dict[str, float] = {}
    for o in g.output:
        t, n = o.name, producers.get(o.name)
        for _ in range(16):
            if n is None or n.op_type not in _VALUE_PASS:
                break
            t = n.input[0]
            n = producers.get(t)
        if n is None:
            continue
        if n.op_type == "DequantizeLinear" and len(n.input) > 1 and n.input[1] in inits:
            out[o.name] = float(np.max(np.abs(numpy_helper.to_array(inits[n.input[1]]))))
        elif n.op_type in _INT_OUT:
            out[o.name] = 1.0
    return out


# dtypes that hold weights; int64 tensors in a graph are shapes and indices, not weights
_NON_WEIGHT = {"int64", "bool", "object", "str"}


def _tensor_numel(t) -> tuple[int, str]:
    dt = _np_dtype(t.data_type)
    return int(np.prod(t.dims)) if len(t.dims) else 1, dt


def count_params(graph) -> dict[str, int]:
    """Weights in initializers, in Constant nodes, and inside subgraphs (If/Loop/Scan)."""
    from onnx import AttributeProto

    counts = {"initializers": 0, "constants": 0, "subgraphs": 0}

    def add(key: str, t) -> None:
        n, dt = _tensor_numel(t)
        if dt not in _NON_WEIGHT:
            counts[key] += n

    def walk(g, nested: bool) -> None:
        for t in g.initializer:
            add("subgraphs" if nested else "initializers", t)
        for st in g.sparse_initializer:
            add("subgraphs" if nested else "initializers", st.values)
        for node in g.node:
            for a in node.attribute:
                if node.op_type == "Constant":
                    key = "subgraphs" if nested else "constants"
                    if a.type == AttributeProto.TENSOR:
                        add(key, a.t)
                    elif a.type == AttributeProto.SPARSE_TENSOR:
                        add(key, a.sparse_tensor.values)
                    elif a.type == AttributeProto.FLOATS:
                        counts[key] += len(a.floats)
                if a.type == AttributeProto.GRAPH:
                    walk(a.g, True)
                elif a.type == AttributeProto.GRAPHS:
                    for sg in a.graphs:
                        walk(sg, True)

    walk(graph, False)
    counts["total"] = counts["initializers"] + counts["constants"] + counts["subgraphs"]
    return counts


def all_graphs(graph, depth: int = 0):
    """(graph, depth) for a graph and every If/Loop/Scan body inside it, depth-first."""
    from onnx import AttributeProto

    yield graph, depth
    for n in graph.node:
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from all_graphs(a.g, depth + 1)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from all_graphs(g, depth + 1)


def walk_nodes(graph):
    """Every node of a graph, including those inside If/Loop/Scan subgraphs."""
    from onnx import AttributeProto

    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from walk_nodes(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from walk_nodes(g)


def metadata(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def inspect(path: Path, fmt: str = "onnx", opts: LoadOptions | None = None) -> dict:
    model = load(path)
    counts = count_params(model.graph)
    ops: dict[str, int] = {}
    for n in walk_nodes(model.graph):
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        ops[key] = ops.get(key, 0) + 1
    meta = metadata(model)
    ext = external_files(Path(path))
    try:
        load_session(Path(path))
        runtime = "onnxruntime loads it"
    except FormatError as exc:
        runtime = exc.message.split(": onnxruntime cannot load the model: ", 1)[-1]
        runtime = f"onnxruntime CANNOT load it: {runtime}"
    lineage = None
    if "edgeops.lineage" in meta:
        try:
            lineage = json.loads(meta["edgeops.lineage"])
        except ValueError:
            lineage = meta["edgeops.lineage"]
    return {
        "params": counts["total"],
        "params_breakdown": counts,
        "opset": {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        "ir_version": int(model.ir_version),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "metadata": {k: v for k, v in meta.items() if k != "edgeops.lineage"},
        "runtime": runtime,
        "lineage": lineage,
        **({"external_data": {"files": sorted(ext), "bytes": sum(ext.values())},
            "size": Path(path).stat().st_size + sum(ext.values())} if ext else {}),
    }


def external_files(path: Path) -> dict[str, int]:
    """External-data files the model references (weights stored beside the .onnx)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, int] = {}
    for t in _get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            f = path.parent / loc if loc else None
            if f is not None and f.is_file():
                out[loc] = f.stat().st_size
    return out


def total_size(path: str | Path) -> int:
    """Bytes on disk: the .onnx file plus the external-data files it references."""
    path = Path(path)
    return path.stat().st_size + sum(external_files(path).values())
