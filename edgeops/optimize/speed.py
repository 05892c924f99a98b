"""Which nodes are worth quantizing on this CPU, and why int8 is (not) faster: measured, per
node, with onnxruntime's own profiler.

int8 wins on a compute node only when the int8 kernel's saving exceeds what quantization
adds around it: QuantizeLinear/DequantizeLinear conversions where a float op (Max, a
Sigmoid*Mul SiLU, a LayerNorm) sits between quantized ones, and activations that fused into
the float kernel but run as separate QLinear kernels in int8 (QLinearLeakyRelu). On an AVX2
CPU without VNNI, small or thin convolutions (a first layer with one input channel, a
depthwise 3x3 on 16 channels) often lose.

`compare` profiles the float model the quantizer started from and the quantized one, maps
every profiled kernel back onto the float graph (fused int8 kernels keep the node name plus
`_token_N`; onnxruntime's NCHWc float convolutions are named after their output tensor;
Q/DQ nodes after the tensor they convert), and charges each compute node's *group* (the
Conv/MatMul/Gemm and the chain of activations and affine ops after it) with its kernels and
with the conversions of the tensors it produces (a conversion whose producer is in no group
goes to the groups that consume it). Groups that cost more in int8 than in float are the
ones to keep float; the caller rebuilds and measures end to end, which decides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import gates

COMPUTE = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
# ops onnxruntime may fuse into, or run right after, the compute node they follow
CHAIN = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "Tanh", "HardSwish",
         "BatchNormalization", "Add", "Mul", "Div", "Sub", "PRelu", "Elu", "Softplus"}
CONVERSIONS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_TOKEN = re.compile(r"(_token_\d+)+$")
_CONV_SUFFIX = re.compile(r"_(QuantizeLinear|DequantizeLinear|q|dq|QuantizeLinear_Output|"
                          r"DequantizeLinear_Output)$")


@dataclass
class GroupCost:
    node: str                   # the compute node the group is named after
    members: list[str]          # float-graph nodes in the group
    fp32_us: float
    int8_us: float

    @property
    def gain_us(self) -> float:
        return self.fp32_us - self.int8_us


@dataclass
class Comparison:
    groups: list[GroupCost]
    fp32_by_op: dict[str, float]
    int8_by_op: dict[str, float]
    fp32_total_us: float
    int8_total_us: float
    unattributed: dict[str, float] = field(default_factory=dict)

    def losing(self, margin: float = 1.0) -> list[GroupCost]:
        """Groups whose int8 cost exceeds their float cost times MARGIN, worst first."""
        return sorted((g for g in self.groups if g.int8_us > g.fp32_us * margin and g.int8_us > 0),
                      key=lambda g: g.gain_us)

    def reason(self) -> str:
        """One line: where int8 saves and where it pays, in measured microseconds per run."""
        conv = sum(v for k, v in self.int8_by_op.items() if k in CONVERSIONS)
        n_conv = ", ".join(f"{k} {v:.0f}" for k, v in self.int8_by_op.items() if k in CONVERSIONS)
        int8_kernels = {k: v for k, v in self.int8_by_op.items()
                        if k.startswith(("QLinear", "QGemm", "MatMulInteger", "ConvInteger",
                                         "DynamicQuantize", "MatMulIntegerToFloat"))}
        float_compute = sum(v for k, v in self.fp32_by_op.items()
                            if k in COMPUTE or k in ("FusedConv", "FusedGemm", "FusedMatMul",
                                                     "LSTM", "GRU", "RNN"))
        won = sum(g.gain_us for g in self.groups if g.gain_us > 0)
        lost = -sum(g.gain_us for g in self.groups if g.gain_us < 0)
        parts = [f"float {self.fp32_total_us:.0f} us vs int8 {self.int8_total_us:.0f} us per run",
                 f"float compute kernels {float_compute:.0f} us, int8 kernels "
                 f"{sum(int8_kernels.values()):.0f} us",
                 f"conversions {conv:.0f} us ({n_conv or 'none'})"]
        if self.groups:
            parts.append(f"{sum(g.gain_us > 0 for g in self.groups)} of {len(self.groups)} "
                         f"layers gain ({won:.0f} us), {sum(g.gain_us < 0 for g in self.groups)} "
                         f"lose ({lost:.0f} us)")
        return "; ".join(parts)


def groups_of(model) -> dict[str, list[str]]:
    """compute node -> [it, then its chain of single-consumer activation/affine successors]."""
    nodes = list(model.graph.node)
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    out: dict[str, list[str]] = {}
    for n in nodes:
        if n.op_type not in COMPUTE or not n.name:
            continue
        members, cur = [n.name], n
        for _ in range(6):
            if len(cur.output) != 1 or cur.output[0] in outputs:
                break
            nxt = consumers.get(cur.output[0], [])
            if len(nxt) != 1 or nxt[0].op_type not in CHAIN or not nxt[0].name:
                break
            cur = nxt[0]
            members.append(cur.name)
        out[n.name] = members
    return out


def attribute(profile: dict[str, dict], model) -> tuple[dict[str, float], dict[str, float],
                                                      dict[str, float]]:
    """Profiled kernel time mapped onto MODEL: (per node, conversions per tensor, unattributed
    per op type). Fused int8 kernels keep their node's name (+ `_token_N`); NCHWc float
    kernels are named after their output tensor; Q/DQ after the tensor they convert."""
    names = {n.name for n in model.graph.node}
    producer = {o: n.name for n in model.graph.node for o in n.output}
    per_node: dict[str, float] = {}
    per_tensor: dict[str, float] = {}
    lost: dict[str, float] = {}
    graph_inputs = {i.name for i in model.graph.input}
    for name, rec in profile.items():
        base = _TOKEN.sub("", name)
        us = rec["us"]
        if base in names and rec["op"] not in CONVERSIONS:
            per_node[base] = per_node.get(base, 0.0) + us
        elif base.endswith("_nchwc") and base[: -len("_nchwc")] in producer:
            node = producer[base[: -len("_nchwc")]]
            per_node[node] = per_node.get(node, 0.0) + us
        elif rec["op"] in CONVERSIONS or _CONV_SUFFIX.search(base):
            tensor = _CONV_SUFFIX.sub("", base).removesuffix("_quantized")
            if tensor in producer or tensor in graph_inputs:
                per_tensor[tensor] = per_tensor.get(tensor, 0.0) + us
            else:
                lost[rec["op"]] = lost.get(rec["op"], 0.0) + us
        else:
            lost[rec["op"]] = lost.get(rec["op"], 0.0) + us
    return per_node, per_tensor, lost


def _charge(model, groups: dict[str, list[str]], per_node: dict[str, float],
            per_tensor: dict[str, float]) -> dict[str, float]:
    """Each group's time: its nodes' kernels, plus conversions of the tensors its nodes produce;
    a conversion whose producer is in no group is split over the groups that consume it."""
    owner = {m: c for c, ms in groups.items() for m in ms}
    producer = {o: n.name for n in model.graph.node for o in n.output}
    consumers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.name)
    cost = {c: sum(per_node.get(m, 0.0) for m in ms) for c, ms in groups.items()}
    for t, us in per_tensor.items():
        p = producer.get(t)
        if p in owner:
            cost[owner[p]] += us
            continue
        takers = sorted({owner[c] for c in consumers.get(t, []) if c in owner})
        for g in takers:
            cost[g] += us / len(takers)
    return cost


def compare(float_path: Path, quant_path: Path, feeds: dict[str, np.ndarray],
            threads: int = 1, runs: int = 30) -> Comparison:
    """Profile FLOAT_PATH (the graph the quantizer started from) and QUANT_PATH on FEEDS and
    cost every compute group in both."""
    import onnx

    model = onnx.load(str(float_path), load_external_data=False)
    groups = groups_of(model)
    fp = gates.profile_nodes(float_path, feeds, runs, threads)
    qp = gates.profile_nodes(quant_path, feeds, runs, threads)
    fn, ft, f_lost = attribute(fp, model)
    qn, qt, q_lost = attribute(qp, model)
    f_cost = _charge(model, groups, fn, ft)
    q_cost = _charge(model, groups, qn, qt)
    costs = [GroupCost(c, ms, f_cost[c], q_cost[c]) for c, ms in groups.items()]
    return Comparison(costs, gates.by_op(fp), gates.by_op(qp),
                      sum(r["us"] for r in fp.values()), sum(r["us"] for r in qp.values()),
                      {"float": sum(f_lost.values()), "int8": sum(q_lost.values())})
