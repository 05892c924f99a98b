"""ONNX graph normalisation shared by quantization (before onnxruntime's quantizer) and the
reverse converters (before onnx2torch / onnx2tf): the same real-world quirks break both.

* `initializers_out_of_inputs`: IR < 4 files (caffe2 era) list every initializer as a graph
  input too, and tools then treat weights as user inputs (KeyErrors on the weight name);
  others are IR 3 without doing so ("Input W is undefined!"). Initializers leave the inputs
  and the IR version goes up to 4.
* `constants_to_initializers`: `Constant` nodes become initializers of their graph (subgraph
  bodies included), so weights are where quantizers and converters look for them.
* `convert_opset`: the default-domain opset moved up or down with onnx's version converter,
  and kept only when onnxruntime gives the same outputs on sample inputs (`verify_same`).

Every function works in place on a ModelProto and returns what it changed, so callers can
report it. Not covered: graph optimisation (onnxruntime's, run by the callers when wanted).
"""

from __future__ import annotations

import numpy as np

from .errors import first_line


def default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _graphs(graph):
    """Every graph: the main one and every If/Loop/Scan body."""
    from .formats.onnx import all_graphs

    return (g for g, _ in all_graphs(graph))


def initializers_out_of_inputs(model) -> int:
    """Drop graph inputs that are initializers (weights, not user inputs); returns how many.
    The IR version goes up to 4 either way: below 4 an initializer that is not also an input
    counts as undefined ("Input W is undefined!"), which real IR-3 files contain."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    keep = [i for i in g.input if i.name not in inits]
    dropped = len(g.input) - len(keep)
    if dropped:
        del g.input[:]
        g.input.extend(keep)
    if model.ir_version < 4:           # IR 4 is where initializers stopped being inputs
        model.ir_version = 4
    return dropped


def constants_to_initializers(model, float_only: bool = False) -> int:
    """`Constant` nodes holding a tensor (or value_float(s)/value_int(s)) -> initializers of the
    same graph; returns how many moved. `float_only` moves only float tensors (weights)."""
    from onnx import AttributeProto, TensorProto, helper, numpy_helper

    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    moved = 0
    for g in _graphs(model.graph):
        keep = []
        for n in g.node:
            t = None
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1:
                a = n.attribute[0]
                if a.type == AttributeProto.TENSOR:
                    t = type(a.t)()
                    t.CopyFrom(a.t)
                elif a.name in ("value_float", "value_floats", "value_int", "value_ints"):
                    v = helper.get_attribute_value(a)
                    dt = np.float32 if "float" in a.name else np.int64
                    t = numpy_helper.from_array(np.asarray(v, dtype=dt))
            if t is None or (float_only and t.data_type not in float_types):
                keep.append(n)
                continue
            t.name = n.output[0]
            g.initializer.append(t)
            moved += 1
        if len(keep) != len(g.node):
            del g.node[:]
            g.node.extend(keep)
    return moved


def rename_tensor(model, old: str, new: str) -> None:
    """Rename a tensor everywhere: node inputs/outputs in every graph, graph inputs, outputs,
    value_info and initializers."""
    for g in _graphs(model.graph):
        for n in g.node:
            for names in (n.input, n.output):
                for k, x in enumerate(names):
                    if x == old:
                        names[k] = new
        for coll in (g.input, g.output, g.value_info, g.initializer):
            for v in coll:
                if v.name == old:
                    v.name = new


SOURCE_FAILS = "the source itself"


def verify_same(a, b, feeds_list: list[dict[str, np.ndarray]], atol: float = 1e-5,
                rtol: float = 1e-4) -> str | None:
    """None when models A and B (ModelProtos) give the same outputs under onnxruntime on every
    feed, else why not (one line). Both run literally (graph optimisations off): a rewrite is
    checked against the graph's own semantics, not against fused int8 kernels that round
    differently."""
    from .agent.compare import compare
    from .agent.ort import describe, session

    try:
        sa = session(a.SerializeToString(), optimization="disabled")
    except Exception as exc:  # noqa: BLE001
        return f"{SOURCE_FAILS} does not load in onnxruntime ({describe(exc, 200)})"
    try:
        sb = session(b.SerializeToString(), optimization="disabled")
    except Exception as exc:  # noqa: BLE001
        return f"onnxruntime refuses it ({describe(exc, 200)})"
    names = [o.name for o in sa.get_outputs()]
    for feeds in feeds_list:
        try:
            ra = sa.run(None, feeds)
        except Exception as exc:  # noqa: BLE001
            return f"{SOURCE_FAILS} fails to run in onnxruntime ({describe(exc, 200)})"
        try:
            rb = sb.run(None, feeds)
        except Exception as exc:  # noqa: BLE001
            return f"it fails to run ({describe(exc, 200)})"
        rep = compare(dict(zip(names, ra)), dict(zip(names, rb)), atol, rtol)
        if not rep.passed:
            return f"it computes different outputs ({rep.reason})"
    return None


def convert_opset(model, target: int, feeds_list: list[dict[str, np.ndarray]]):
    """A copy of MODEL at default-domain opset TARGET, checked to compute the same outputs on
    FEEDS_LIST: (model, None), or (None, why not)."""
    import onnx

    have = default_opset(model)
    if have == target:
        return model, None
    try:
        m = onnx.version_converter.convert_version(model, target)
        onnx.checker.check_model(m)
    except Exception as exc:  # noqa: BLE001 - the converter has gaps; say which
        text = first_line(exc, 400)
        text = text.split("failed: ", 1)[-1] if "Assertion" in text else text
        return None, f"onnx's version converter cannot take it from {have} to {target} ({text})"
    why = verify_same(model, m, feeds_list) if feeds_list else None
    if why:
        return None, f"at opset {target} {why}"
    return m, None
