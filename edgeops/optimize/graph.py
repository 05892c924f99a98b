"""ONNX graph chores around quantization: preparation, weight accounting, sensitivity.

* `prepare`: name every node (exclusion lists need names), normalise (edgeops.normalize:
  initializers out of the inputs, float `Constant` tensors to initializers in every graph
  including If/Loop/Scan bodies, since the quantizers only look at initializers), raise
  opsets below 13 to 13 when that verifies (per-channel weights need it), then onnxruntime's
  pre-processing (shape inference + graph optimization).
* `weight_stats`: how many float parameters a model holds, and which of them still feed a
  float compute op after quantization ("stayed float"), across all subgraphs.
* `rank_sensitivity`: run the float and the quantized model side by side with every node
  output exposed; a node's score is the error it *adds* (channel-averaged normalised MSE of
  its output minus the worst of its inputs), so the nodes that inject the error rank first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConversionError, first_line
from ..formats.onnx import all_graphs, walk_nodes  # noqa: F401 (all_graphs: callers use graph.all_graphs)

FLOAT_TYPES = (1, 10, 11, 16)          # onnx TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
QUANT_CONSUMERS = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"}


def name_nodes(model) -> int:
    """Give every unnamed node a unique name; returns how many were named."""
    used = {n.name for n in walk_nodes(model.graph) if n.name}
    count = 0
    for n in walk_nodes(model.graph):
        if not n.name:
            base = f"{n.op_type}_eo{count}"
            while base in used:
                base += "_"
            n.name = base
            used.add(base)
            count += 1
    return count


@dataclass
class Prepared:
    path: Path
    notes: list[str] = field(default_factory=list)
    per_channel: bool = True          # False: the opset stayed below 13 (no DequantizeLinear axis)
    opset: int = 0


PER_CHANNEL_OPSET = 13      # DequantizeLinear/QuantizeLinear gained `axis` in opset 13


def prepare(src: Path, workdir: Path, feeds_list: list[dict] | None = None,
            keep_opset: bool = False) -> Prepared:
    """Normalise (names, initializers out of the inputs, float Constants to initializers),
    bring opsets below 13 up to 13 when onnx's converter manages it and onnxruntime gives the
    same outputs on FEEDS_LIST (unless KEEP_OPSET: a device runtime may need the opset), then
    onnxruntime's pre-processing. Every step is noted."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .. import normalize
    from ..paths import scratch_cwd

    model = onnx.load(str(src))
    notes = []
    named = name_nodes(model)
    if named:
        notes.append(f"named {named} unnamed nodes")
    ir = model.ir_version
    dropped = normalize.initializers_out_of_inputs(model)
    if dropped:
        notes.append(f"removed {dropped} initializers from the graph inputs (IR < 4 style)")
    if model.ir_version != ir:
        notes.append(f"IR version {ir} -> {model.ir_version} (initializers are not inputs)")
    moved = normalize.constants_to_initializers(model, float_only=True)
    if moved:
        notes.append(f"moved {moved} float Constant tensors to initializers")
    onnx.save(model, str(workdir / "normalized.onnx"))   # what `auto` writes when fp32 wins
    have = normalize.default_opset(model)
    per_channel = True
    if have < PER_CHANNEL_OPSET and keep_opset:
        per_channel = False
        notes.append(f"opset {have} kept (--keep-opset): weights per-tensor, since "
                     f"DequantizeLinear has no axis before opset {PER_CHANNEL_OPSET}")
    elif have < PER_CHANNEL_OPSET:
        up, why = normalize.convert_opset(model, PER_CHANNEL_OPSET, feeds_list or [])
        if up is not None:
            model = up
            notes.append(f"opset {have} -> {PER_CHANNEL_OPSET} (onnx version converter; same "
                         f"outputs under onnxruntime on {len(feeds_list or [])} sample(s)): "
                         "per-channel weights need DequantizeLinear's axis")
        else:
            per_channel = False
            notes.append(f"opset {have} kept ({why}): weights per-tensor, since "
                         f"DequantizeLinear has no axis before opset {PER_CHANNEL_OPSET}")
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
            with scratch_cwd():     # symbolic inference leaves files in the cwd on failure
                quant_pre_process(str(staged.resolve()), str(out.resolve()), **kwargs)
            m = onnx.load(str(out))
            name_nodes(m)      # the optimizer may add unnamed nodes
            onnx.save(m, str(out))
            notes.insert(0, f"pre-processing: {what}")
            return Prepared(path=out, notes=notes, per_channel=per_channel,
                            opset=normalize.default_opset(m))
        except Exception as exc:  # noqa: BLE001 - each attempt is a fallback, reported
            last = exc
    raise ConversionError(f"onnxruntime pre-processing failed: {first_line(last)}")


def fix_fp16_casts(model) -> int:
    """onnxconverter-common retypes a `Cast(to=float)` output as float16 in value_info but
    leaves the attribute, and onnxruntime then refuses the model ("Type (tensor(float16)) of
    output arg ... does not match"). Make such Casts cast to float16. Returns the count."""
    from onnx import TensorProto

    fixed = 0
    for g, _ in all_graphs(model.graph):
        vi = {v.name: v for v in list(g.value_info) + list(g.output)}
        for n in g.node:
            if n.op_type != "Cast":
                continue
            v = vi.get(n.output[0])
            if v is None or v.type.tensor_type.elem_type != TensorProto.FLOAT16:
                continue
            for a in n.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
                    fixed += 1
    return fixed


def _rename(graph, old: str, new: str) -> None:
    """Rename a tensor wherever a node (in any body) produces or reads it."""
    for node in walk_nodes(graph):
        for names in (node.input, node.output):
            for k, x in enumerate(names):
                if x == old:
                    names[k] = new


def fp32_io(m16, original):
    """Give an fp16 model the original's float32 inputs and outputs with explicit Casts."""
    from onnx import TensorProto, helper

    orig_types = {v.name: v.type.tensor_type.elem_type
                  for v in list(original.graph.input) + list(original.graph.output)}
    g = m16.graph
    front, back = [], []
    for values, cast_in in ((g.input, True), (g.output, False)):
        for vi in values:
            if (vi.type.tensor_type.elem_type != TensorProto.FLOAT16
                    or orig_types.get(vi.name) != TensorProto.FLOAT):
                continue
            inner = f"{vi.name}__fp16"
            _rename(g, vi.name, inner)
            if cast_in:
                front.append(helper.make_node("Cast", [vi.name], [inner], name=f"{vi.name}_to_fp16",
                                              to=TensorProto.FLOAT16))
            else:
                back.append(helper.make_node("Cast", [inner], [vi.name], name=f"{vi.name}_to_fp32",
                                             to=TensorProto.FLOAT))
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    nodes = front + list(g.node) + back
    del g.node[:]
    g.node.extend(nodes)
    return m16


def drop_unused_opsets(model) -> None:
    """onnxruntime's optimizer declares every domain it knows (training, preview, nchwc...);
    keep the default domain and the ones a node actually uses, so other tools accept it."""
    used = {n.domain for n in walk_nodes(model.graph)}
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)


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


QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                 "ConvInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul",
                 "MatMulIntegerToFloat", "QAttention", "DynamicQuantizeLSTM", "QGemm",
                 "QLinearAdd", "QLinearMul", "QLinearConcat", "MatMulNBits"}


def quantized_op_count(model) -> int:
    """Nodes that carry int8 compute or quantized tensors (0 means nothing was quantized)."""
    return sum(1 for n in walk_nodes(model.graph) if n.op_type in QUANTIZED_OPS)


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


# ops that only move or clip values: a QDQ pair on their output is their producer's
PASS_THROUGH = {"Relu", "Clip", "LeakyRelu", "MaxPool", "Reshape", "Transpose", "Flatten",
                "Squeeze", "Unsqueeze", "Identity", "Dropout", "Cast", "Slice", "Gather",
                "Split", "Pad", "Resize"}


def _channel_axis(a: np.ndarray) -> int:
    return 1 if a.ndim in (2, 4, 5) else a.ndim - 1


@dataclass
class Sensitivity:
    node: str
    score: float | None          # error added by this node; None: not comparable
    group: list[str]             # what to keep in float to undo it


def _group(node, producers: dict, consumers: dict, candidates: set[str] | None,
           shared_activations: bool) -> list[str]:
    """The node, plus (when activations are quantized as shared tensors, i.e. QDQ) the
    consumers of its outputs and the producers back through pass-through ops: a QDQ pair on
    a tensor goes away only when its producer and every consumer stay float."""
    group = [node.name]
    if not shared_activations:
        return group
    for o in node.output:
        group += [c.name for c in consumers.get(o, []) if c.name not in group]
    stack = [(i, 0) for i in node.input]
    while stack:
        t, depth = stack.pop()
        p = producers.get(t)
        if p is None or depth > 6 or p.name in group:
            continue
        group.append(p.name)
        if p.op_type in PASS_THROUGH:
            stack.extend((i, depth + 1) for i in p.input[:1])
    return [g for g in group if candidates is None or g in candidates or g == node.name]


def rank_sensitivity(float_path: Path, quant_path: Path, batches: list[dict], workdir: Path,
                     candidates: set[str] | None = None, skip: set[str] = frozenset(),
                     shared_activations: bool = True) -> list[Sensitivity]:
    """Main-graph nodes of the float model, most error-injecting first.

    Errors are channel-averaged normalised MSE (so one huge channel cannot hide the damage
    done to all the others). Candidates whose outputs cannot be compared (fused or removed by
    the quantizer) follow in graph order with score None."""
    import onnx

    from .gates import session

    fm = onnx.load(str(float_path))
    qm = onnx.load(str(quant_path))
    q_outputs = {o for n in qm.graph.node for o in n.output}
    graph_in = {i.name for i in fm.graph.input}
    producers = {o: n for n in fm.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in fm.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    # compare what consumers see: a tensor's DequantizeLinear output when it has one (that
    # also covers activations the quantizer fused away, e.g. a Relu folded into the range)
    qname = {}
    for t in [i.name for i in fm.graph.input] + [o for n in fm.graph.node for o in n.output if o]:
        if f"{t}_DequantizeLinear_Output" in q_outputs:
            qname[t] = f"{t}_DequantizeLinear_Output"
        elif t in q_outputs:
            qname[t] = t
    tensors = list(qname)
    cmse: dict[str, float] = {}
    if tensors:
        fpath, qpath = workdir / "sens_float.onnx", workdir / "sens_quant.onnx"
        onnx.save(_expose(fm, [t for t in tensors if t not in graph_in]), str(fpath))
        onnx.save(_expose(qm, [qname[t] for t in tensors]), str(qpath))
        fs, qs = session(fpath, 1), session(qpath, 1)
        fnames = [o.name for o in fs.get_outputs()]
        qnames = [o.name for o in qs.get_outputs()]
        err: dict[str, np.ndarray] = {}
        norm: dict[str, np.ndarray] = {}
        for feeds in batches:
            fo = dict(zip(fnames, fs.run(None, feeds)))
            fo.update(feeds)
            qo = dict(zip(qnames, qs.run(None, feeds)))
            for t in tensors:
                a, b = fo.get(t), qo.get(qname[t])
                if (a is None or b is None or a.shape != b.shape or a.ndim == 0
                        or not np.issubdtype(a.dtype, np.floating)):
                    continue
                ax = _channel_axis(a)
                a64 = np.moveaxis(a.astype(np.float64), ax, 0).reshape(a.shape[ax], -1)
                b64 = np.moveaxis(b.astype(np.float64), ax, 0).reshape(a.shape[ax], -1)
                e, nm = np.sum((a64 - b64) ** 2, axis=1), np.sum(a64 ** 2, axis=1)
                err[t] = err.get(t, 0) + e
                norm[t] = norm.get(t, 0) + nm
        for t in err:
            n = norm[t]
            floor = 1e-6 * float(np.mean(n)) + 1e-20
            v = float(np.mean(err[t] / (n + floor)))
            cmse[t] = v if np.isfinite(v) else float("inf")    # NaN/inf: the worst error
    scored, rest = [], []
    for n in fm.graph.node:
        if n.name in skip or (candidates is not None and n.name not in candidates):
            continue
        group = [g for g in _group(n, producers, consumers, candidates, shared_activations)
                 if g not in skip]
        outs = [cmse[o] for o in n.output if o in cmse]
        if not outs:
            rest.append(Sensitivity(n.name, None, group))
            continue
        ins = [cmse.get(i, 0.0) for i in n.input if i in cmse]
        o, i = max(outs), (max(ins) if ins else 0.0)
        added = 0.0 if o == i == float("inf") else o - i     # inf in: this node added nothing
        scored.append(Sensitivity(n.name, added, group))
    scored.sort(key=lambda x: -x.score)
    return scored + rest


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


def weight_only_int8(model, per_channel: bool = True) -> int:
    """Store float MatMul/Gemm/Conv weights that live in, or are only used inside, If/Loop
    bodies as int8 + DequantizeLinear (symmetric, per output channel). The QDQ quantizer
    does not enter those bodies: this shrinks the file, the math stays float. Weights with
    a consumer in the main graph are left to the quantizer (and to the fallback list).
    `per_channel=False` (opset < 13: DequantizeLinear has no axis) uses one scale per tensor.
    Returns how many tensors were converted."""
    from onnx import TensorProto, helper, numpy_helper

    consumers: dict[str, list[tuple]] = {}
    for g, depth in all_graphs(model.graph):
        for n in g.node:
            for k, i in enumerate(n.input):
                if i:
                    consumers.setdefault(i, []).append((n, depth, k))
    done = 0
    for g, depth in all_graphs(model.graph):
        dq_nodes = []
        for t in list(g.initializer):
            uses = consumers.get(t.name, [])
            if (t.data_type != TensorProto.FLOAT or len(t.dims) < 2 or not uses
                    or (depth == 0 and any(d == 0 for _, d, _ in uses))
                    or not all(n.op_type in ("MatMul", "Gemm", "Conv") and k == 1 for n, _, k in uses)):
                continue
            arr = numpy_helper.to_array(t)
            axes = {_weight_axis(n, arr) for n, _, _ in uses}
            if len(axes) != 1:
                continue
            axis = axes.pop()
            if per_channel:
                red = tuple(i for i in range(arr.ndim) if i != axis)
                scale = (np.abs(arr).max(axis=red) / 127.0).astype(np.float32)
                scale[scale == 0] = 1.0
                shape = [1] * arr.ndim
                shape[axis] = -1
                q = np.clip(np.round(arr / scale.reshape(shape)), -127, 127).astype(np.int8)
            else:
                scale = np.float32(max(float(np.abs(arr).max()), 1e-30) / 127.0)
                q = np.clip(np.round(arr / scale), -127, 127).astype(np.int8)
                scale = np.asarray(scale, np.float32)
            w = t.name
            g.initializer.remove(t)
            g.initializer.extend([numpy_helper.from_array(q, f"{w}_int8"),
                                  numpy_helper.from_array(scale, f"{w}_int8_scale"),
                                  numpy_helper.from_array(np.zeros_like(scale, np.int8), f"{w}_int8_zp")])
            dq_nodes.append(helper.make_node(
                "DequantizeLinear", [f"{w}_int8", f"{w}_int8_scale", f"{w}_int8_zp"], [w],
                name=f"{w}_weight_dq", **({"axis": axis} if per_channel else {})))
            done += 1
        if dq_nodes:            # inputs are initializers only: first in the graph is in order
            rest = list(g.node)
            del g.node[:]
            g.node.extend(dq_nodes + rest)
    return done


def _weight_axis(node, arr: np.ndarray) -> int:
    """The output-channel axis of a weight for its consumer."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return arr.ndim - 1
