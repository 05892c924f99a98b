"""ONNX graph chores around quantization: preparation, weight accounting, sensitivity.

* `prepare`: name every node (exclusion lists need names), move float `Constant` tensors to
  initializers in every graph including If/Loop/Scan bodies (the quantizers only look at
  initializers), then onnxruntime's pre-processing (shape inference + graph optimization).
* `weight_stats`: how many float parameters a model holds, and which of them still feed a
  float compute op after quantization ("stayed float"), across all subgraphs.
* `rank_sensitivity`: run the float and the quantized model side by side with every node
  output exposed; a node's score is the error it *adds* (normalised MSE of its output minus
  the worst of its inputs), so the nodes that inject the error rank first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConversionError, first_line

FLOAT_TYPES = (1, 10, 11, 16)          # onnx TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
QUANT_CONSUMERS = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"}


def _subgraphs(node):
    from onnx import AttributeProto

    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.g
        elif a.type == AttributeProto.GRAPHS:
            yield from a.graphs


def all_graphs(graph, depth: int = 0):
    """(graph, depth) for the main graph and every nested body."""
    yield graph, depth
    for n in graph.node:
        for g in _subgraphs(n):
            yield from all_graphs(g, depth + 1)


def name_nodes(model) -> int:
    """Give every unnamed node a unique name; returns how many were named."""
    used = {n.name for g, _ in all_graphs(model.graph) for n in g.node if n.name}
    count = 0
    for g, _ in all_graphs(model.graph):
        for i, n in enumerate(g.node):
            if not n.name or n.name in ("",):
                base = f"{n.op_type}_eo{count}"
                while base in used:
                    base += "_"
                n.name = base
                used.add(base)
                count += 1
    return count


def hoist_constants(model) -> int:
    """Float `Constant` nodes -> initializers of the same graph. Returns tensors moved."""
    from onnx import AttributeProto

    moved = 0
    for g, _ in all_graphs(model.graph):
        keep = []
        for n in g.node:
            if (n.op_type == "Constant" and len(n.attribute) == 1
                    and n.attribute[0].type == AttributeProto.TENSOR
                    and n.attribute[0].t.data_type in FLOAT_TYPES):
                t = type(n.attribute[0].t)()
                t.CopyFrom(n.attribute[0].t)
                t.name = n.output[0]
                g.initializer.append(t)
                moved += 1
            else:
                keep.append(n)
        if len(keep) != len(g.node):
            del g.node[:]
            g.node.extend(keep)
    return moved


@dataclass
class Prepared:
    path: Path
    notes: list[str] = field(default_factory=list)


def prepare(src: Path, workdir: Path) -> Prepared:
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(src))
    notes = []
    named = name_nodes(model)
    if named:
        notes.append(f"named {named} unnamed nodes")
    moved = hoist_constants(model)
    if moved:
        notes.append(f"moved {moved} float Constant tensors to initializers")
    staged = workdir / "staged.onnx"
    onnx.save(model, str(staged))
    out = workdir / "prepared.onnx"
    attempts = [
        ({}, "shape inference (symbolic + ONNX) and onnxruntime graph optimization"),
        ({"skip_symbolic_shape": True}, "ONNX shape inference and graph optimization "
                                        "(symbolic shape inference failed)"),
        ({"skip_optimization": True, "skip_symbolic_shape": True},
         "ONNX shape inference only (graph optimization failed)"),
    ]
    last = None
    for kwargs, what in attempts:
        try:
            quant_pre_process(str(staged), str(out), **kwargs)
            m = onnx.load(str(out))
            name_nodes(m)      # the optimizer may add unnamed nodes
            onnx.save(m, str(out))
            notes.insert(0, f"pre-processing: {what}")
            return Prepared(path=out, notes=notes)
        except Exception as exc:  # noqa: BLE001 - each attempt is a fallback, reported
            last = exc
    raise ConversionError(f"onnxruntime pre-processing failed: {first_line(last)}")


# ----------------------------------------------------------------------------- weights

@dataclass
class WeightStats:
    float_params: int                  # float params in the model (all graphs)
    float_compute_params: int          # of those, feeding a float compute op (not a DQ/Q node)
    float_weights: list[dict]          # rank>=2 float tensors feeding compute: name, numel, op, graph
    subgraph_params: int               # float params that live inside subgraphs

    def to_dict(self) -> dict:
        return {"float_params": self.float_params,
                "float_compute_params": self.float_compute_params,
                "float_weight_tensors": len(self.float_weights),
                "float_weights": self.float_weights[:50],
                "subgraph_params": self.subgraph_params}


def _tensors(g):
    from onnx import AttributeProto

    for t in g.initializer:
        yield t.name, t
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == AttributeProto.TENSOR:
            yield n.output[0], n.attribute[0].t


def weight_stats(model, float_types: tuple[int, ...] = FLOAT_TYPES) -> WeightStats:
    consumers: dict[str, list[tuple[str, int]]] = {}
    for g, depth in all_graphs(model.graph):
        for n in g.node:
            for i in n.input:
                if i:
                    consumers.setdefault(i, []).append((n.op_type, depth))
    total = compute = sub = 0
    weights = []
    for g, depth in all_graphs(model.graph):
        for name, t in _tensors(g):
            if t.data_type not in float_types:
                continue
            numel = int(np.prod(t.dims)) if len(t.dims) else 1
            total += numel
            if depth:
                sub += numel
            ops = [op for op, _ in consumers.get(name, [])]
            float_ops = [op for op in ops if op not in QUANT_CONSUMERS]
            if float_ops and numel > 1:
                compute += numel
                if len(t.dims) >= 2:
                    weights.append({"name": name, "numel": numel, "op": float_ops[0],
                                    "in_subgraph": bool(depth)})
    weights.sort(key=lambda w: -w["numel"])
    return WeightStats(total, compute, weights, sub)


def quantized_op_count(model) -> int:
    """Nodes that carry int8 compute or quantized tensors (0 means nothing was quantized)."""
    ops = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
           "ConvInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul",
           "MatMulIntegerToFloat", "QAttention", "DynamicQuantizeLSTM"}
    return sum(1 for g, _ in all_graphs(model.graph) for n in g.node if n.op_type in ops)


# ----------------------------------------------------------------------------- sensitivity

def _expose(model, names: list[str]):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            vi = onnx.ValueInfoProto()
            vi.name = n
            m.graph.output.append(vi)
    return m


def rank_sensitivity(float_path: Path, quant_path: Path, batches: list[dict], workdir: Path,
                     candidates: set[str] | None = None) -> list[tuple[str, float]]:
    """Main-graph nodes of the float model, most error-injecting first: (name, score)."""
    import onnx

    from .gates import session

    fm = onnx.load(str(float_path))
    qm = onnx.load(str(quant_path))
    q_outputs = {o for n in qm.graph.node for o in n.output}
    graph_in = {i.name for i in fm.graph.input}
    tensors = [o for n in fm.graph.node for o in n.output if o and o in q_outputs]
    if not tensors:
        return []
    fpath, qpath = workdir / "sens_float.onnx", workdir / "sens_quant.onnx"
    onnx.save(_expose(fm, tensors), str(fpath))
    onnx.save(_expose(qm, tensors), str(qpath))
    fs, qs = session(fpath, 1), session(qpath, 1)
    fnames = [o.name for o in fs.get_outputs()]
    qnames = [o.name for o in qs.get_outputs()]
    err = {t: 0.0 for t in tensors}
    norm = {t: 0.0 for t in tensors}
    for feeds in batches:
        fo = dict(zip(fnames, fs.run(None, feeds)))
        qo = dict(zip(qnames, qs.run(None, feeds)))
        for t in tensors:
            a, b = fo.get(t), qo.get(t)
            if a is None or b is None or a.shape != b.shape or not np.issubdtype(a.dtype, np.floating):
                continue
            a64 = a.astype(np.float64)
            err[t] += float(np.sum((a64 - b.astype(np.float64)) ** 2))
            norm[t] += float(np.sum(a64 ** 2))
    nmse = {t: err[t] / (norm[t] + 1e-12) for t in tensors if norm[t] > 0 or err[t] > 0}
    scores = []
    for n in fm.graph.node:
        if candidates is not None and n.name not in candidates:
            continue
        outs = [nmse[o] for o in n.output if o in nmse]
        if not outs:
            continue
        ins = [nmse.get(i, 0.0) for i in n.input if i in nmse or i in graph_in]
        scores.append((n.name, max(outs) - (max(ins) if ins else 0.0)))
    scores.sort(key=lambda s: -s[1])
    return scores


def quantized_nodes(float_model, quant_model) -> set[str]:
    """Float-model node names that the quantizer changed: fed by a DequantizeLinear in the
    quantized model, or replaced (gone under their name)."""
    q_by_name = {n.name: n for n in quant_model.graph.node}
    producers = {o: n.op_type for n in quant_model.graph.node for o in n.output}
    out = set()
    for n in float_model.graph.node:
        q = q_by_name.get(n.name)
        if q is None:
            if n.op_type not in ("Constant",):
                out.add(n.name)
        elif q.op_type != n.op_type or any(producers.get(i) == "DequantizeLinear" for i in q.input):
            out.add(n.name)
    return out
