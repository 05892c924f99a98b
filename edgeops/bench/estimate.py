"""Latency and memory prediction from a target profile: per-node FLOPs and bytes, a roofline
per op class, and a fitter that calibrates the profile's [efficiency] factors on measurements.

Pure numpy + onnx: `analyze` and `predict` never need onnxruntime (a device profile is usually
used on a machine that is not the device). Every number produced here is a *prediction*.

Analysis
--------
Dynamic dims are fixed (batch 1, others from `shapes` or 1), ONNX shape inference runs (with
data propagation, falling back to plain inference, then to none); nodes whose shapes stay
unknown are counted in `unknown_nodes`, keep their per-node overhead, and widen the interval.

Each node gets an op class:
  conv       dense Conv / ConvTranspose (fp32)
  depthwise  Conv with group > 1
  gemm       MatMul, Gemm (incl. batched attention MatMuls)
  rnn        LSTM / GRU / RNN
  int8       QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger(ToFloat), DynamicQuantizeMatMul,
             QGemm, and QDQ: a Conv/MatMul/Gemm whose weight is DequantizeLinear(int8 initializer)
  norm       normalisation / transcendental ops (LayerNormalization and friends, Softmax, Erf,
             Sigmoid, Tanh, Exp...): nominal vector ops per element (_NORM_OPS) against the fp32
             peak; a LayerNormalization fed by a residual Add is onnxruntime's
             SkipLayerNormalization, whose CPU kernel costs ~10x more per element
  memory     everything else (bytes moved, no compute peak)

and a status that mirrors what onnxruntime does to the graph (heuristic rules, no onnxruntime):
  run     executed: costs its roofline time plus one `node_overhead_us`
  alias   shape-only ops (Reshape, Squeeze, Unsqueeze, Flatten, Identity, and Shape of a
          tensor whose shape is only known after fixing dims): 0 bytes (onnxruntime aliases
          the buffer) but one node overhead, since the kernel still runs
  fused   merged into a neighbour by onnxruntime's graph optimizer: Conv+BatchNorm/bias/Mul,
          Conv/Gemm+activation, MatMul+bias Add (-> Gemm), MatMul+scalar Mul, QDQ Q/DQ pairs
          around an int8 compute node, the dynamic-quantization chain around MatMulInteger,
          residual Add + LayerNormalization (SkipLayerNormalization), Div/Erf/Add/Mul/Mul (Gelu),
          Dropout/Identity-like no-ops: no time, no overhead
  folded  computed from constants only (initializers, Constant, Shape of a static tensor):
          constant-folded at session creation, no time, no overhead

FLOPs: Conv 2*out*(Cin/g*kh*kw); ConvTranspose 2*in*(Cout/g*kh*kw); MatMul/Gemm 2*M*N*K;
LSTM/GRU/RNN 2*G*H*(I+H) per step and direction (G = 4/3/1 gates) -- the two gate matmuls;
elementwise ops 1 per output element (informative: memory-class nodes are costed by bytes).
Bytes: every input (weights included, int8 weights at 1 byte) plus every output, element size
from the dtype; Gather/Slice-like ops move the output (not the whole table).

Peak activation memory: a liveness walk over the topologically ordered graph; a tensor lives
from its producer to its last consumer (graph inputs from the start, outputs to the end);
alias ops share their input's buffer; initializers and folded constants are weights.

Cost model
----------
per node   t = max(FLOPs / (peak_class * eff_class),
                   near / (bw * eff_memory) + llc / (bw * eff_llc) + dram / (bw * eff_dram))
               + node_overhead_us (+ kernel_overhead_us for conv/depthwise/gemm/rnn/int8)
               (+ rnn_step_us x time steps x directions for LSTM/GRU/RNN: onnxruntime's
               recurrent kernels run two small GEMMs and the gate math once per step, so a long
               thin RNN costs more per FLOP than a short wide one)
total      sum(t) + run_overhead_us
Bytes are split by where they come from on a steady-state run: activations and the weights that
fit in the per-core cache ("near"), weights that only fit in the last-level cache ("llc"),
weights beyond it ("dram"). With F = weights + peak activations, C2 = per-core L2 and C3 = the
last-level cache (memory.l2_mb / memory.cache_mb; detected from sysfs for the host profile), a
cyclic sweep over F keeps about C2 resident in L2 and C3 in the LLC: llc share of the weight
bytes = (min(F, C3) - C2) / F, dram share = (F - C3) / F.
peak_class = freq_ghz * fp32_flops_per_cycle (int8_ops_per_cycle for "int8") per core;
bw = memory.bandwidth_gbs. With threads > 1 both are multiplied by
min(threads, cores) * parallel ** (threads - 1) (Amdahl-like decay per extra thread; overheads
do not scale). When the fit has no model whose weights spill past L2 into the LLC, the LLC
efficiency is tied to the near-cache one rather than left at the prior. The memory efficiency may exceed 1 after calibration (up to 8): small working
sets stay in cache, whose bandwidth is above the DRAM peak the profile states.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

CLASSES = ("conv", "depthwise", "gemm", "rnn", "int8", "norm", "memory")
COMPUTE_CLASSES = ("conv", "depthwise", "gemm", "rnn", "int8", "norm")
_KERNEL_CLASSES = ("conv", "depthwise", "gemm", "rnn", "int8")   # pay kernel_overhead_us

# "norm", "llc", "dram", "kernel_overhead_us" and "rnn_step_us" are optional profile keys
# (defaults below)
DEFAULT_EFFICIENCY = {"conv": 0.30, "depthwise": 0.08, "gemm": 0.35, "rnn": 0.15, "int8": 0.25,
                      "norm": 0.30, "memory": 0.40, "llc": 0.40, "dram": 0.40, "node_overhead_us": 4.0,
                      "kernel_overhead_us": 0.0, "rnn_step_us": 0.0, "struct_overhead_us": 0.0,
                      "run_overhead_us": 15.0,
                      "parallel": 0.85}
DEFAULT_CACHE_MB = 2.0           # last-level cache when the profile has no memory.cache_mb
FIT_KERNEL_OVERHEAD = True       # fit a fixed cost per compute-class kernel call
FIT_RNN_STEP = True              # fit a fixed cost per recurrent time step (and direction)

# nominal vector operations per output element of the "norm" class (reductions, exp/erf
# polynomials, a divide or rsqrt). Ratios from single-op timings of onnxruntime 1.32 CPU
# kernels (x86 AVX-512, 1 thread): Softmax ~0.33 ns/elem, Sigmoid/Tanh ~0.37, Erf ~0.55,
# LayerNormalization ~0.5-1, the fused SkipLayerNormalization (residual Add + LayerNorm) ~6.
_NORM_OPS = {"Softmax": 16, "LogSoftmax": 16, "Sigmoid": 16, "Tanh": 16, "Erf": 24, "Gelu": 24,
             "FastGelu": 24, "BiasGelu": 24, "QuickGelu": 16, "Softplus": 16, "Elu": 8, "Selu": 8,
             "Exp": 8, "Log": 16, "Mish": 32,
             "LayerNormalization": 32, "SimplifiedLayerNormalization": 32, "RMSNormalization": 32,
             "GroupNormalization": 32, "InstanceNormalization": 32, "MeanVarianceNormalization": 32,
             "LpNormalization": 16, "SkipLayerNormalization": 256,
             "SkipSimplifiedLayerNormalization": 256}
_SKIP_LN_OPS = 256               # LayerNormalization fused with a residual Add

# efficiency bounds used by fit(). Compute classes may reach 2: a profile states a sustained or
# base clock, and turbo clocks (or a peak per cycle the features under-report) put the real
# peak above it. Memory may reach 8: cache bandwidth is far above the DRAM peak.
EFF_BOUNDS = {c: (0.005, 2.0) for c in COMPUTE_CLASSES}
EFF_BOUNDS["memory"] = (0.005, 8.0)
EFF_BOUNDS["llc"] = (0.005, 8.0)
EFF_BOUNDS["dram"] = (0.005, 2.0)
OVERHEAD_BOUNDS = {"node_overhead_us": (0.0, 200.0), "kernel_overhead_us": (0.0, 200.0),
                   "rnn_step_us": (0.0, 100.0), "struct_overhead_us": (0.0, 200.0),
                   "run_overhead_us": (0.0, 5000.0)}

UNCALIBRATED_FACTOR = 2.0        # uncalibrated interval: [p50 / 2, p50 * 2]
MIN_REL_ERR = 0.05               # calibrated interval never narrower than +-5 %
UNSEEN_WIDEN = 1.0               # + this x (share of time in classes calibration never saw)
UNKNOWN_WIDEN = 1.0              # + this x (share of nodes with unknown shapes)

_ALIAS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
_NOOP = {"Dropout"}
_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "HardSwish"}
_INT8_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
             "DynamicQuantizeMatMul", "QGemm", "MatMulNBits"}
_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_GATHER_LIKE = {"Gather", "GatherElements", "GatherND", "Slice", "Split"}
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial", "Bernoulli"}


# ----------------------------------------------------------------------------- data classes

@dataclass
class NodeCost:
    name: str
    op_type: str
    op_class: str
    flops: int
    bytes: int
    status: str = "run"             # run | alias | fused | folded
    count: int = 1                  # executions (x trip count inside Loop/Scan bodies)
    shapes_known: bool = True
    fused_into: str | None = None
    in_subgraph: bool = False
    weight_bytes: int = 0           # part of `bytes` read from initializers / constants
    steps: int = 0                  # recurrent time steps x directions (LSTM / GRU / RNN)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Analysis:
    name: str
    nodes: list[NodeCost]
    flops: int
    bytes: int
    weight_bytes: int
    peak_activation_bytes: int
    unknown_nodes: list[str]
    n_nodes: int
    n_executed: int
    input_shapes: dict[str, list[int]]
    notes: list[str] = field(default_factory=list)
    # onnxruntime's NCHWc layout on x86 (block 8 with AVX2, 16 with AVX-512): the bytes of
    # every ReorderInput/ReorderOutput it would insert, per block size (see _nchwc_reorders)
    reorders: dict[int, list[int]] = field(default_factory=dict)
    struct_nodes: int = 0           # executed data-movement nodes (STRUCT_OPS)

    @property
    def classes(self) -> list[str]:
        """Op classes that carry work (executed nodes with FLOPs or bytes)."""
        seen = {n.op_class for n in self.nodes if n.status == "run" and (n.flops or n.bytes)}
        return [c for c in CLASSES if c in seen]

    def to_dict(self, nodes: bool = False) -> dict:
        d = {"name": self.name, "flops": self.flops, "bytes": self.bytes,
             "weight_bytes": self.weight_bytes, "peak_activation_bytes": self.peak_activation_bytes,
             "unknown_nodes": list(self.unknown_nodes), "n_nodes": self.n_nodes,
             "n_executed": self.n_executed, "classes": self.classes,
             "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
             "notes": list(self.notes)}
        if nodes:
            d["nodes"] = [n.to_dict() for n in self.nodes]
        return d


@dataclass
class Prediction:
    p50_ms: float
    interval_ms: tuple[float, float]
    by_class_ms: dict[str, float]
    overhead_ms: float
    top_nodes: list[dict]
    weights_mb: float
    peak_activation_mb: float
    total_mb: float
    ram_mb: float | None
    fits: bool | None
    calibrated: bool
    basis: str
    threads: int
    unseen_classes: list[str]
    unknown_nodes: list[str]
    label: str = "predicted"
    statistic: str = "p50"          # what the calibration fitted: "p50", or "mean" (p50_ms holds it)
    dram_fraction: float = 0.0      # share of weight bytes costed at DRAM bandwidth
    llc_fraction: float = 0.0       # share of weight bytes costed at last-level-cache bandwidth

    def to_dict(self) -> dict:
        d = asdict(self)
        d["interval_ms"] = [float(self.interval_ms[0]), float(self.interval_ms[1])]
        if self.statistic != "p50":          # never call a predicted mean a p50
            d[f"{self.statistic}_ms"] = d.pop("p50_ms")
        return d


# ----------------------------------------------------------------------------- analysis

def _load(model):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model, (model.graph.name or "model")
    path = Path(model)
    return onnx.load(str(path)), path.stem


def _fix_dims(model, shapes):
    """Copy of the model with every graph-input dim fixed; returns (model, had_dynamic)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    dynamic = False
    fixed: dict[str, list[int]] = {}
    for vi in m.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        want = (shapes or {}).get(vi.name)
        tt = vi.type.tensor_type
        if want is not None and not tt.HasField("shape"):
            for v in want:
                tt.shape.dim.add().dim_value = int(v)
        dims = tt.shape.dim
        for i, d in enumerate(dims):
            static = d.HasField("dim_value") and d.dim_value > 0
            if want is not None and i < len(want):
                if not static or d.dim_value != int(want[i]):
                    dynamic = dynamic or not static
                    d.Clear()
                    d.dim_value = int(want[i])
            elif not static:
                dynamic = True
                d.Clear()
                d.dim_value = 1
        fixed[vi.name] = [int(d.dim_value) for d in dims]
    return m, dynamic, fixed


def _add_shapes(graph, ts: "_Tensors", extra: dict[str, list[int]]) -> None:
    """Record EXTRA shapes as value_info where the graph has none (element type kept)."""
    from onnx import helper

    have = {vi.name for vi in list(graph.value_info) + list(graph.output) + list(graph.input)}
    for name, shape in extra.items():
        if ts.shape.get(name) is not None:
            continue
        if name in have:
            for vi in list(graph.value_info) + list(graph.output):
                if vi.name == name and vi.type.HasField("tensor_type"):
                    vi.type.tensor_type.shape.Clear()
                    for d in shape:
                        vi.type.tensor_type.shape.dim.add().dim_value = int(d)
            continue
        graph.value_info.append(helper.make_tensor_value_info(name, 0, list(shape)))


def _infer(model, notes):
    import onnx

    for kw in ({"data_prop": True}, {}):
        try:
            return onnx.shape_inference.infer_shapes(model, **kw)
        except Exception as exc:  # noqa: BLE001 - degrade to fewer known shapes, and say so
            notes.append(f"shape inference ({'data_prop' if kw else 'plain'}) failed: "
                         f"{str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}")
    return model


def _elem_size(elem_type: int) -> int:
    from onnx import helper

    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except Exception:  # noqa: BLE001 - strings, unknown types
        return 4


class _Tensors:
    """name -> (shape list | None, element size), from value_info, inputs, outputs, inits."""

    def __init__(self):
        self.shape: dict[str, list[int] | None] = {}
        self.esize: dict[str, int] = {}

    def add_vi(self, vi):
        t = vi.type
        if t.WhichOneof("value") != "tensor_type":
            return
        tt = t.tensor_type
        if tt.elem_type:
            self.esize[vi.name] = _elem_size(tt.elem_type)
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                    for d in tt.shape.dim]
            self.shape[vi.name] = None if None in dims else [int(x) for x in dims]

    def add_tensor(self, name, t):
        self.shape[name] = [int(x) for x in t.dims]
        self.esize[name] = _elem_size(t.data_type)

    def numel(self, name) -> int | None:
        s = self.shape.get(name)
        return None if s is None else int(np.prod(s)) if s else 1

    def nbytes(self, name) -> int | None:
        n = self.numel(name)
        return None if n is None else n * self.esize.get(name, 4)

    def collect(self, graph):
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            self.add_vi(vi)
        for t in graph.initializer:
            self.add_tensor(t.name, t)
        for n in graph.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value" and a.t is not None:
                        self.add_tensor(n.output[0], a.t)


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _subgraphs(node):
    from onnx import AttributeProto

    out = []
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            out.append((a.name, a.g))
        elif a.type == AttributeProto.GRAPHS:
            out.extend((a.name, g) for g in a.graphs)
    return out


class _Walker:
    def __init__(self, ts: _Tensors, const: set[str], int8_consts: set[str], static_names: set[str] | None):
        self.ts = ts
        self.const = const                  # tensors known at session creation
        self.int8_consts = int8_consts      # DequantizeLinear outputs of int8/uint8 initializers
        self.static = static_names          # tensors with static shape in the ORIGINAL model
        self.unknown: list[str] = []
        self.depth = 0

    # --- per node ------------------------------------------------------------------------
    def op_class(self, n) -> str:
        op = n.op_type
        if op in _INT8_OPS:
            return "int8"
        if op in ("Conv", "ConvTranspose", "FusedConv"):
            if len(n.input) > 1 and n.input[1] in self.int8_consts:
                return "int8"
            if op != "ConvTranspose" and (_attr(n, "group", 1) or 1) > 1:
                return "depthwise"
            return "conv"
        if op in ("MatMul", "Gemm", "FusedGemm", "FusedMatMul"):
            if any(i in self.int8_consts for i in n.input[:2]):
                return "int8"
            return "gemm"
        if op in _RNN_GATES:
            return "rnn"
        if op in _NORM_OPS:
            return "norm"
        return "memory"

    def flops(self, n) -> int | None:
        ts, op = self.ts, n.op_type
        outs = [o for o in n.output if o]
        out = ts.shape.get(outs[0]) if outs else None
        if op in ("Conv", "FusedConv", "ConvInteger", "QLinearConv", "ConvTranspose"):
            wi = 3 if op == "QLinearConv" else 1
            w = ts.shape.get(n.input[wi]) if len(n.input) > wi else None
            if op == "ConvTranspose":
                x = ts.shape.get(n.input[0])
                return None if (w is None or x is None) else 2 * int(np.prod(x)) * int(np.prod(w[1:]))
            return None if (w is None or out is None) else 2 * int(np.prod(out)) * int(np.prod(w[1:]))
        if op in ("MatMul", "Gemm", "FusedGemm", "FusedMatMul", "MatMulInteger", "QLinearMatMul",
                  "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm"):
            a = ts.shape.get(n.input[0])
            if a is None or out is None:
                return None
            trans_a = bool(_attr(n, "transA", 0))
            if len(a) == 1:
                k = a[0]
            else:
                k = a[-2] if trans_a else a[-1]
            return 2 * int(np.prod(out)) * int(k)
        if op in _RNN_GATES:
            x = ts.shape.get(n.input[0])
            h = _attr(n, "hidden_size")
            if x is None or not h:
                return None
            layout = _attr(n, "layout", 0) or 0
            seq, batch = (x[0], x[1]) if layout == 0 else (x[1], x[0])
            dirs = 2 if (_attr(n, "direction", b"forward") in (b"bidirectional", "bidirectional")) else 1
            self.last_steps = int(seq) * dirs
            return seq * batch * dirs * 2 * _RNN_GATES[op] * int(h) * (int(x[2]) + int(h))
        if out is None:
            return None
        return (int(np.prod(out)) if out else 1) * _NORM_OPS.get(op, 1)

    def nbytes(self, n, cls: str) -> int | None:
        ts, op = self.ts, n.op_type
        ins = [i for i in n.input if i]
        outs = [o for o in n.output if o]
        total = 0
        self.last_wbytes = 0
        for o in outs:
            b = ts.nbytes(o)
            if b is None:
                return None
            total += b
        if op in _GATHER_LIKE:
            # reads what it writes (plus indices), not the whole table
            idx = ts.nbytes(ins[1]) if op != "Slice" and len(ins) > 1 else 0
            return 2 * total + (idx or 0)
        for i in ins:
            b = ts.nbytes(i)
            if b is None:
                if i in self.const:
                    continue
                return None
            if cls == "int8" and i in self.int8_consts:
                b //= max(ts.esize.get(i, 4), 1)       # weight stored as int8
            total += b
            if i in self.const:
                self.last_wbytes += b
        return total

    def is_const_only(self, n) -> bool:
        if n.op_type in _NONDETERMINISTIC or _subgraphs(n):
            return False
        if n.op_type == "Constant":
            return True
        if n.op_type == "Shape" and n.input[0] in (self.static or set()):
            return True
        if n.op_type == "DequantizeLinear":
            return n.input[0] in self.const
        ins = [i for i in n.input if i]
        return bool(ins) and all(i in self.const for i in ins)

    # --- graph --------------------------------------------------------------------------
    def walk(self, graph, prefix: str = "", scale: int = 1) -> list[NodeCost]:
        out: list[NodeCost] = []
        for idx, n in enumerate(graph.node):
            name = prefix + (n.name or f"{n.op_type}_{idx}")
            if self.is_const_only(n):
                for o in n.output:
                    self.const.add(o)
                if n.op_type == "DequantizeLinear":
                    from onnx import TensorProto

                    src = n.input[0]
                    if self.ts.esize.get(src) == 1 or self._init_dtype.get(src) in (
                            TensorProto.INT8, TensorProto.UINT8):
                        self.int8_consts.add(n.output[0])
                out.append(NodeCost(name, n.op_type, "memory", 0, 0, "folded", 0))
                continue
            subs = _subgraphs(n)
            if subs:
                out.extend(self.control_flow(n, name, subs, scale))
                continue
            cls = self.op_class(n)
            self.last_steps = 0
            f = self.flops(n)
            steps = self.last_steps
            wb = 0
            if n.op_type in _ALIAS or n.op_type == "Shape" or n.op_type in _NOOP:
                b = 0
                status = "fused" if n.op_type in _NOOP else "alias"
            else:
                b = self.nbytes(n, cls)
                wb = self.last_wbytes if b is not None else 0
                status = "run"
            known = f is not None and b is not None
            if not known and status == "run":
                self.unknown.append(name)
            out.append(NodeCost(name, n.op_type, cls, scale * (f or 0), scale * (b or 0), status,
                                scale, known, weight_bytes=scale * wb, steps=scale * steps))
        for rec in out:
            rec.in_subgraph = rec.in_subgraph or self.depth > 0
        return out

    def _body(self, g, name, scale):
        self.ts.collect(g)
        self.depth += 1
        try:
            return self.walk(g, name + "/", scale)
        finally:
            self.depth -= 1

    def control_flow(self, n, name, subs, scale) -> list[NodeCost]:
        """If: the costlier branch (one runs); Loop: body x trip count when it is a constant;
        Scan: body x the scan axis length. Unknown trip counts count once and are reported."""
        head = NodeCost(name, n.op_type, "memory", 0, 0, "run", scale, True)
        if n.op_type == "If":
            best: list[NodeCost] = []
            for _, g in subs:
                nodes = self._body(g, name, scale)
                if sum(x.flops + x.bytes for x in nodes) >= sum(x.flops + x.bytes for x in best):
                    best = nodes
            return [head] + best
        trip = None
        if n.op_type == "Loop":
            m = n.input[0] if n.input else ""
            trip = self._const_value(m)
        elif n.op_type == "Scan":
            x = self.ts.shape.get(n.input[-1]) if n.input else None
            axes = _attr(n, "scan_input_axes", None)
            ax = axes[0] if axes else 0
            trip = x[ax] if x else None
        known = trip is not None
        if not known:
            self.unknown.append(name)
        out = [head]
        for _, g in subs:
            out.extend(self._body(g, name, scale * int(trip or 1)))
        head.shapes_known = known
        return out

    def _const_value(self, name):
        v = self._init_values.get(name)
        if v is None:
            return None
        try:
            return int(np.asarray(v).reshape(-1)[0])
        except Exception:  # noqa: BLE001
            return None


def _fuse(graph, nodes: list[NodeCost], ts: _Tensors) -> None:
    """Mark nodes onnxruntime's graph optimizer merges into a neighbour (heuristic, top level)."""
    recs = [nc for nc in nodes if not nc.in_subgraph]
    node_list = list(graph.node)
    if len(recs) != len(node_list):
        return
    producer: dict[str, int] = {}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(node_list):
        for o in n.output:
            producer[o] = i
        for t in n.input:
            if t:
                consumers.setdefault(t, []).append(i)
    graph_outs = {o.name for o in graph.output}

    def live(i):
        return recs[i].status in ("run", "alias", "fused")

    def single_src(i, k=0):
        """The producing node index of input k when that producer feeds only this node."""
        n = node_list[i]
        if len(n.input) <= k or not n.input[k]:
            return None
        t = n.input[k]
        j = producer.get(t)
        if j is None or t in graph_outs or len(consumers.get(t, [])) != 1 or not live(j):
            return None
        return j

    def const_input(i):
        n = node_list[i]
        return [t for t in n.input if t and (t not in producer or recs[producer[t]].status == "folded")
                and t not in {x.name for x in graph.input}]

    into: dict[int, int] = {}

    def fuse(i, j):
        recs[i].status, recs[i].fused_into = "fused", recs[j].name
        recs[i].bytes = recs[i].weight_bytes = 0
        into[i] = j

    def root(j):
        while j in into:
            j = into[j]
        return j

    for i, n in enumerate(node_list):
        rec = recs[i]
        if rec.status != "run":
            continue
        op = n.op_type
        if op == "MatMul":
            # Transpose of the last two axes feeding only a MatMul -> FusedMatMul (transA/B),
            # also through a scalar Mul (the attention scale), which becomes its alpha
            for k in (0, 1):
                t = single_src(i, k)
                if t is not None and node_list[t].op_type == "Mul" and recs[t].status == "run" \
                        and const_input(t) and all(ts.numel(c) == 1 for c in const_input(t)):
                    fuse(t, i)
                    t = single_src(t, 0)
                if t is not None and node_list[t].op_type == "Transpose" and recs[t].status == "run":
                    perm = list(_attr(node_list[t], "perm", []) or [])
                    r = len(perm)
                    if r >= 2 and perm[:-2] == list(range(r - 2)) and perm[-2:] == [r - 1, r - 2]:
                        fuse(t, i)
        j = single_src(i, 0)
        if j is None and op in ("Add", "Mul"):
            j = single_src(i, 1)
        if j is None:
            continue
        r = root(j)
        src = node_list[r].op_type
        src_cls = recs[r].op_class
        if op in _ACTIVATIONS and src in ("Conv", "FusedConv", "Gemm", "ConvTranspose") and recs[j].status != "alias":
            fuse(i, r)
        elif op in _ACTIVATIONS and src_cls == "int8" and "Conv" in src:
            fuse(i, r)
        elif op == "BatchNormalization" and src in ("Conv", "ConvTranspose") and j == r:
            fuse(i, r)
        elif op in ("Add", "Mul") and src in ("Conv", "ConvTranspose") and j == r and const_input(i):
            fuse(i, r)
        elif op == "Add" and src in ("MatMul", "Gemm") and j == r and const_input(i):
            fuse(i, r)
        elif op == "Mul" and src == "MatMul" and j == r and const_input(i) and \
                all(ts.numel(t) == 1 for t in const_input(i)):
            fuse(i, r)
        elif src_cls == "int8" and op in ("Cast", "Mul", "Add", "QuantizeLinear"):
            fuse(i, r)

    # LayerNormalization fed by a residual Add of two activations -> SkipLayerNormalization,
    # only when the LayerNorm is the sum's sole consumer (post-norm blocks): in pre-norm
    # blocks the sum also feeds the next residual, and onnxruntime 1.32 keeps Add and
    # LayerNormalization apart (checked on its optimized graph of a pre-norm encoder);
    # Div -> Erf -> Add -> Mul -> Mul (exact GELU) -> Gelu
    for i, n in enumerate(node_list):
        if recs[i].status != "run":
            continue
        if n.op_type == "LayerNormalization" and n.input:
            j = single_src(i, 0)
            if j is not None and recs[j].status == "run" and node_list[j].op_type == "Add" \
                    and not const_input(j):
                a, b = (ts.numel(t) for t in node_list[j].input[:2])
                numel = ts.numel(n.input[0])
                if a is not None and a == b == numel:
                    extra = ts.nbytes(node_list[j].input[1]) or 0
                    fuse(j, i)
                    recs[i].bytes += extra
                    recs[i].flops = recs[i].count * numel * _SKIP_LN_OPS
        elif n.op_type == "Erf":
            j = single_src(i, 0)
            if j is not None and node_list[j].op_type in ("Div", "Mul") and const_input(j):
                fuse(j, i)
            cur = i
            for _ in range(3):
                cons = consumers.get(node_list[cur].output[0], [])
                if len(cons) != 1 or recs[cons[0]].status != "run" or \
                        node_list[cons[0]].op_type not in ("Add", "Mul"):
                    break
                fuse(cons[0], i)
                cur = cons[0]

    # QDQ: a DequantizeLinear on an activation whose consumers are all int8 compute nodes,
    # and the QuantizeLinear feeding it, become part of the QLinear kernel
    for i, n in enumerate(node_list):
        if recs[i].status != "run" or n.op_type not in ("DequantizeLinear", "DynamicQuantizeLinear"):
            continue
        cons = consumers.get(n.output[0], [])
        if cons and all(recs[c].op_class == "int8" or recs[c].status == "fused" or
                        (node_list[c].op_type == "Mul" and ts.numel(node_list[c].output[0]) == 1)
                        for c in cons):
            target = next((c for c in cons if recs[c].op_class == "int8"), cons[0])
            if n.op_type == "DequantizeLinear":
                fuse(i, target)
                j = producer.get(n.input[0])
                if j is not None and node_list[j].op_type == "QuantizeLinear" and recs[j].status == "run" \
                        and len(consumers.get(n.input[0], [])) == 1:
                    jj = producer.get(node_list[j].input[0])
                    if jj is not None and recs[root(jj)].op_class == "int8":
                        fuse(j, target)
            else:
                # DynamicQuantizeLinear + MatMulInteger (+Cast, Mul, Add) -> DynamicQuantizeMatMul:
                # the activation quantization is done inside the fused kernel
                recs[target].bytes += recs[i].bytes
                fuse(i, target)
                for o in n.output[1:]:
                    for c in consumers.get(o, []):
                        if node_list[c].op_type == "Mul" and recs[c].status == "run" \
                                and ts.numel(node_list[c].output[0]) == 1:
                            fuse(c, target)
    for rec in recs:
        if rec.status == "fused":
            rec.count = 0


def _peak_activation(graph, nodes: list[NodeCost], ts: _Tensors, const: set[str]) -> int:
    recs = [nc for nc in nodes if not nc.in_subgraph]
    node_list = list(graph.node)
    inits = {t.name for t in graph.initializer}
    alias: dict[str, str] = {}
    last: dict[str, int] = {}
    first: dict[str, int] = {}
    end = len(node_list)

    def rootof(t):
        while t in alias:
            t = alias[t]
        return t

    for vi in graph.input:
        if vi.name not in inits:
            first[vi.name] = -1
            last[vi.name] = -1
    for i, n in enumerate(node_list):
        is_alias = i < len(recs) and recs[i].status == "alias" and n.op_type in _ALIAS | _NOOP
        for t in n.input:
            if t and t not in const and t not in inits:
                r = rootof(t)
                last[r] = max(last.get(r, -1), i)
        for k, o in enumerate(n.output):
            if not o or o in const:
                continue
            if is_alias and k == 0 and n.input and n.input[0] not in const:
                alias[o] = rootof(n.input[0])
            else:
                first[o] = i
                last.setdefault(o, i)
    for o in graph.output:
        if o.name in first or o.name in alias:
            last[rootof(o.name)] = end
    events = np.zeros(end + 3, dtype=np.int64)
    for t, s in first.items():
        b = ts.nbytes(t) or 0
        events[s + 1] += b
        events[max(last.get(t, s), s) + 2] -= b
    return int(np.cumsum(events).max()) if len(events) else 0


def _missing_shapes(graph, ts: "_Tensors") -> list[str]:
    """Main-graph node outputs whose shape is still unknown."""
    return [o for n in graph.node for o in n.output if o and ts.shape.get(o) is None]


def _symbolic_shapes(model, notes: list[str]) -> dict[str, list[int]]:
    """onnxruntime's symbolic shape inference (what its optimizer sees), concrete dims only."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        from ..paths import scratch_cwd

        with scratch_cwd():     # it leaves files in the cwd when inference is incomplete
            out = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    except Exception as exc:  # noqa: BLE001 - it gives up on some graphs: the run comes next
        notes.append(f"symbolic shape inference failed: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}")
        return {}
    ts = _Tensors()
    ts.collect(out.graph)
    return {k: v for k, v in ts.shape.items() if v is not None}


def _run_shapes(model, input_shapes: dict[str, list[int]], notes: list[str]) -> dict[str, list[int]]:
    """Every intermediate tensor's shape from one onnxruntime run on this machine at the given
    input shapes (seeded inputs, graph optimisations off so every node runs as written)."""
    import onnx

    from ..agent.ort import describe, session
    from ..formats.onnx import signature_of
    from ..verify import make_inputs

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in m.graph.node:
        for o in n.output:
            if o and o not in have:
                vi = onnx.ValueInfoProto()
                vi.name = o
                m.graph.output.append(vi)
                have.add(o)
    try:
        feeds = make_inputs(signature_of(model), {k: tuple(v) for k, v in input_shapes.items()},
                            batch=1, dynamic=1)
        sess = session(m.SerializeToString(), optimization="disabled")
        names = [o.name for o in sess.get_outputs()]
        outs = sess.run(names, feeds)
    except Exception as exc:  # noqa: BLE001 - the caller names what stays unknown
        notes.append(f"the shape-recording run failed: {describe(exc, 160)}")
        return {}
    notes.append("intermediate shapes recorded by one onnxruntime run here at the given shapes")
    return {k: [int(d) for d in np.shape(v)] for k, v in zip(names, outs)}


def analyze(model, shapes: dict[str, tuple] | None = None, resolve: bool = True) -> Analysis:
    """Per-node FLOPs, bytes, op class and fusion status; totals, weights, peak activations.

    `model` is a path or an onnx.ModelProto; `shapes` fixes input dims by name (other dynamic
    dims become 1). Shapes ONNX inference leaves unknown are resolved the way onnxruntime
    sees them (RESOLVE): its symbolic shape inference, then one real run here recording every
    intermediate shape; what stays unknown is in `unknown_nodes`."""
    proto, name = _load(model)
    notes: list[str] = []
    fixed, dynamic, input_shapes = _fix_dims(proto, shapes)
    inferred = _infer(fixed, notes)
    if resolve:
        probe = _Tensors()
        probe.collect(inferred.graph)
        if _missing_shapes(inferred.graph, probe):
            extra = _symbolic_shapes(fixed, notes)
            missing = [t for t in _missing_shapes(inferred.graph, probe) if t not in extra]
            if missing:
                extra.update(_run_shapes(fixed, input_shapes, notes))
            elif extra:
                notes.append("shapes ONNX inference left open resolved by onnxruntime's symbolic "
                             "shape inference")
            _add_shapes(inferred.graph, probe, extra)
    static_names = None
    if dynamic:
        orig = _infer(proto, [])
        t0 = _Tensors()
        t0.collect(orig.graph)
        static_names = {k for k, v in t0.shape.items() if v is not None}
    ts = _Tensors()
    ts.collect(inferred.graph)
    g = inferred.graph
    const = {t.name for t in g.initializer}
    walker = _Walker(ts, const, set(), static_names if dynamic else set(ts.shape))
    walker._init_dtype = {t.name: t.data_type for t in g.initializer}
    from onnx import numpy_helper

    walker._init_values = {t.name: numpy_helper.to_array(t) for t in g.initializer
                           if len(t.dims) <= 1 and (not t.dims or t.dims[0] <= 1)}
    nodes = walker.walk(g)
    _fuse(g, nodes, ts)
    weight_bytes = 0
    for t in g.initializer:
        weight_bytes += int(np.prod(t.dims)) * _elem_size(t.data_type) if len(t.dims) else _elem_size(t.data_type)
    for n in g.node:
        if n.op_type == "Constant":
            weight_bytes += ts.nbytes(n.output[0]) or 0
    peak = _peak_activation(g, nodes, ts, walker.const)
    executed = [x for x in nodes if x.status in ("run", "alias")]
    reorders = {b: _nchwc_reorders(g, nodes, ts, b) for b in NCHWC_BLOCKS}
    struct = int(sum(x.count for x in nodes if x.status == "run" and x.op_type in STRUCT_OPS))
    return Analysis(
        name=name, nodes=nodes,
        flops=int(sum(x.flops for x in nodes if x.status == "run")),
        bytes=int(sum(x.bytes for x in nodes if x.status == "run")),
        weight_bytes=int(weight_bytes), peak_activation_bytes=int(peak),
        unknown_nodes=walker.unknown, n_nodes=len(nodes),
        n_executed=int(sum(x.count for x in executed)),
        input_shapes=input_shapes, notes=notes, reorders=reorders, struct_nodes=struct)


NCHWC_BLOCKS = (8, 16)
# ops that keep onnxruntime's NCHWc layout when their input has it (nchwc_transformer.cc)
# (Mul of two NCHWc tensors: the Sigmoid * x of SiLU, which onnxruntime fuses to QuickGelu)
_NCHWC_PASS = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "BatchNormalization",
               "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Add", "Sum", "Concat",
               "Resize", "Upsample", "Mul"}
# data-movement ops: each run costs more setup than an elementwise kernel on a small tensor
STRUCT_OPS = {"Slice", "Concat", "Transpose", "Gather", "GatherElements", "GatherND", "Split",
              "Pad", "Expand", "Tile", "Resize", "Upsample", "Where", "ScatterND",
              "ScatterElements", "ConstantOfShape", "Range", "TopK", "CumSum", "NonZero"}


def nchwc_block(profile: dict) -> int | None:
    """NCHWc block size onnxruntime's CPU provider uses on the profile's CPU, or None."""
    cpu = profile.get("cpu") or {}
    if str(cpu.get("isa", "")).lower() not in ("x86_64", "amd64", "x64"):
        return None
    feats = {str(f).lower() for f in cpu.get("features") or ()}
    if "avx512f" in feats:
        return 16
    return 8 if "avx2" in feats or "avx" in feats else None


def _nchwc_reorders(graph, nodes: list[NodeCost], ts: _Tensors, block: int) -> list[int]:
    """Bytes of each layout reorder onnxruntime's NCHWc transformer would insert at BLOCK:
    a 4-D Conv goes NCHWc when its output channels are a multiple of BLOCK (depthwise: its
    channels); layout-transparent ops keep NCHWc when all their inputs have it; a tensor in
    NCHWc read by any other op (or a graph output) is reordered back once (ReorderOutput),
    and an NCHW tensor entering an NCHWc Conv with a multiple of BLOCK input channels is
    reordered in (ReorderInput; smaller channel counts are read as they are)."""
    recs = [nc for nc in nodes if not nc.in_subgraph]
    node_list = list(graph.node)
    if len(recs) != len(node_list):
        return []
    layout: set[str] = set()
    out_bytes: list[int] = []
    reordered_in: set[str] = set()
    graph_outs = {o.name for o in graph.output}
    for n, rec in zip(node_list, recs):
        if rec.status not in ("run", "fused") or not n.output:
            continue
        ins = [i for i in n.input if i]
        if n.op_type == "Conv" and len(ins) > 1:
            w = ts.shape.get(ins[1])
            y = ts.shape.get(n.output[0])
            if w is None or y is None or len(y) != 4:
                continue
            group = _attr(n, "group", 1) or 1
            cout, cin = int(w[0]), int(w[1]) * int(group)
            ok = (cout % block == 0) if group == 1 else (group == cin == cout and cout % block == 0)
            if not ok:
                continue
            if ins[0] not in layout and cin % block == 0 and ins[0] not in reordered_in:
                b = ts.nbytes(ins[0])
                if b:
                    out_bytes.append(2 * b)
                    reordered_in.add(ins[0])
            layout.add(n.output[0])
        elif n.op_type in _NCHWC_PASS and ins and all(i in layout or i not in ts.shape or
                                                      len(ts.shape.get(i) or []) <= 1
                                                      for i in ins) and ins[0] in layout:
            layout.update(o for o in n.output if o)
        elif rec.status == "fused":
            layout.update(o for o in n.output if o and any(i in layout for i in ins))
    consumers: dict[str, list[str]] = {}
    for n in node_list:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    kept = set()
    for n, rec in zip(node_list, recs):
        for o in n.output:
            if o in layout:
                kept.add(o)
    for t in kept:
        outside = t in graph_outs or any(
            c not in _NCHWC_PASS and c != "Conv" for c in consumers.get(t, []))
        if outside:
            b = ts.nbytes(t)
            if b:
                out_bytes.append(2 * b)
    return out_bytes


def unknown_compute(analysis: Analysis) -> list[str]:
    """Nodes that carry compute (every class but memory) whose shapes stayed unknown: a
    prediction would count them as free."""
    unknown = set(analysis.unknown_nodes)
    return [n.name for n in analysis.nodes if n.name in unknown and n.op_class != "memory"]


# ----------------------------------------------------------------------------- cost model

def _eff(profile: dict) -> dict:
    e = dict(DEFAULT_EFFICIENCY)
    e.update({k: float(v) for k, v in (profile.get("efficiency") or {}).items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)})
    given = profile.get("efficiency") or {}
    for k in ("llc", "dram"):       # optional: a profile without them behaves as before
        if k not in given and "memory" in given:
            e[k] = e["memory"]
    return e


def _mb(profile: dict, key: str) -> float | None:
    v = (profile.get("memory") or {}).get(key)
    return float(v) * 2**20 if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def cache_bytes(profile: dict) -> float:
    """Last-level cache of the target: memory.cache_mb (for the host profile detected from
    sysfs when it is loaded), else DEFAULT_CACHE_MB."""
    return _mb(profile, "cache_mb") or DEFAULT_CACHE_MB * 2**20


def l2_bytes(profile: dict) -> float:
    """Per-core mid-level (L2) cache when the target has a larger last-level cache behind it
    (memory.l2_mb); equal to the LLC size when there is none."""
    llc = cache_bytes(profile)
    v = _mb(profile, "l2_mb")
    return min(float(v), llc) if v else llc


def cache_fractions(analysis: Analysis, profile: dict) -> tuple[float, float]:
    """(share of the weight bytes read from the last-level cache, share read from DRAM) on
    every run: a cyclic sweep over a footprint F (weights + peak activations) keeps about
    C_l2 of it in L2 and C_llc in the last-level cache, so (min(F, C_llc) - C_l2) / F of the
    weights come from the LLC and (F - C_llc) / F from DRAM."""
    f = float(analysis.weight_bytes + analysis.peak_activation_bytes)
    llc, l2 = cache_bytes(profile), l2_bytes(profile)
    if f <= l2 or f <= 0:
        return 0.0, 0.0
    return (min(f, llc) - l2) / f, max(f - llc, 0.0) / f


def _peaks(profile: dict, threads: int, eff: dict) -> tuple[dict, float]:
    """Peak ops/s per class at efficiency 1 (thread scaling applied) and bytes/s."""
    cpu, mem = profile.get("cpu", {}), profile.get("memory", {})
    f = float(cpu.get("freq_ghz", 2.0)) * 1e9
    fp32 = f * float(cpu.get("fp32_flops_per_cycle", 16))
    i8 = f * float(cpu.get("int8_ops_per_cycle", 32))
    threads = max(int(threads or 1), 1)
    scale = min(threads, int(cpu.get("cores", 1) or 1)) * float(eff.get("parallel", 0.85)) ** (threads - 1)
    peaks = {c: fp32 * scale for c in COMPUTE_CLASSES}
    peaks["int8"] = i8 * scale
    bw = float(mem.get("bandwidth_gbs", 10.0)) * 1e9 * scale
    return peaks, bw


# parameter vector of the fit: inverse efficiency per class, inverse DRAM efficiency, then the
# overheads in seconds (per executed node, per compute-class node, per run)
_NP = len(CLASSES) + 2 + 5
_I_MEM, _I_LLC, _I_DRAM = CLASSES.index("memory"), len(CLASSES), len(CLASSES) + 1
_I_NODE, _I_KERN, _I_STEP, _I_STRUCT, _I_RUN = (len(CLASSES) + 2, len(CLASSES) + 3,
                                                len(CLASSES) + 4, len(CLASSES) + 5,
                                                len(CLASSES) + 6)
_OH_KEYS = ("node_overhead_us", "kernel_overhead_us", "rnn_step_us", "struct_overhead_us",
            "run_overhead_us")


def _node_parts(n: NodeCost, peaks: dict, bw: float, frac) -> tuple[float, float, float, float]:
    """(compute s, near-cache bytes s, LLC bytes s, DRAM bytes s) at efficiency 1."""
    if n.status != "run":
        return 0.0, 0.0, 0.0, 0.0
    tc = n.flops / peaks[n.op_class] if n.op_class != "memory" else 0.0
    w = min(n.weight_bytes, n.bytes)
    wl, wd = w * frac[0], w * frac[1]
    return tc, (n.bytes - wl - wd) / bw, wl / bw, wd / bw


def _reorder_nodes(a: Analysis, profile: dict) -> list[NodeCost]:
    """The NCHWc layout reorders onnxruntime inserts on the profile's CPU, as memory nodes."""
    block = nchwc_block(profile)
    return [NodeCost(f"Reorder_{i}", "ReorderOutput", "memory", 0, int(b))
            for i, b in enumerate((a.reorders or {}).get(block, []) if block else [])]


class _Flat:
    """Node arrays of one or more analyses, for vectorised prediction and fitting."""

    def __init__(self, analyses: list[Analysis], profile: dict, threads: int):
        peaks, bw = _peaks(profile, threads, _eff(profile))
        model, cls, tc, tmc, tml, tmd = [], [], [], [], [], []
        self.n_exec = np.zeros(len(analyses))
        self.n_kern = np.zeros(len(analyses))
        self.n_step = np.zeros(len(analyses))       # recurrent steps (per-step cost)
        self.n_struct = np.zeros(len(analyses))     # data-movement nodes
        for k, a in enumerate(analyses):
            frac = cache_fractions(a, profile)
            self.n_struct[k] = a.struct_nodes
            reorders = _reorder_nodes(a, profile)
            self.n_exec[k] += len(reorders)
            for n in reorders:
                c, m, ll, d = _node_parts(n, peaks, bw, (0.0, 0.0))
                model.append(k)
                cls.append(CLASSES.index("memory"))
                tc.append(c)
                tmc.append(m)
                tml.append(ll)
                tmd.append(d)
            for n in a.nodes:
                if n.status in ("run", "alias"):
                    self.n_exec[k] += n.count
                if n.status == "run" and n.op_class in _KERNEL_CLASSES:
                    self.n_kern[k] += n.count
                if n.status == "run":
                    self.n_step[k] += n.steps
                if n.status != "run" or not (n.flops or n.bytes):
                    continue
                c, m, ll, d = _node_parts(n, peaks, bw, frac)
                model.append(k)
                cls.append(CLASSES.index(n.op_class))
                tc.append(c)
                tmc.append(m)
                tml.append(ll)
                tmd.append(d)
        self.model = np.asarray(model, dtype=np.int64)
        self.cls = np.asarray(cls, dtype=np.int64)
        self.tc = np.asarray(tc, dtype=float)         # seconds at efficiency 1
        self.tmc = np.asarray(tmc, dtype=float)
        self.tml = np.asarray(tml, dtype=float)
        self.tmd = np.asarray(tmd, dtype=float)
        self.n = len(analyses)

    def node_times(self, x: np.ndarray):
        """x: parameter vector. Returns (time, compute_bound mask)."""
        c = self.tc * x[self.cls]
        m = self.tmc * x[_I_MEM] + self.tml * x[_I_LLC] + self.tmd * x[_I_DRAM]
        return np.maximum(c, m), c >= m

    def totals(self, x):
        t, _ = self.node_times(x)
        return (np.bincount(self.model, weights=t, minlength=self.n) + self.n_exec * x[_I_NODE]
                + self.n_kern * x[_I_KERN] + self.n_step * x[_I_STEP]
                + self.n_struct * x[_I_STRUCT] + x[_I_RUN])


def _xvec(eff: dict) -> np.ndarray:
    inv = [1.0 / max(float(eff[c]), 1e-9) for c in CLASSES + ("llc", "dram")]
    return np.array(inv + [float(eff[k]) * 1e-6 for k in _OH_KEYS])


def predict(analysis: Analysis, profile: dict, threads: int = 1) -> Prediction:
    """Predicted p50 latency with an interval, the per-class breakdown, the 10 costliest nodes
    and whether weights + peak activations fit in RAM."""
    eff = _eff(profile)
    peaks, bw = _peaks(profile, threads, eff)
    x = _xvec(eff)
    frac = cache_fractions(analysis, profile)
    node_oh, kern_oh, step_oh, struct_oh = x[_I_NODE], x[_I_KERN], x[_I_STEP], x[_I_STRUCT]
    by_class = {c: 0.0 for c in CLASSES}
    costs = []
    n_kern = 0
    reorders = _reorder_nodes(analysis, profile)
    for n in list(analysis.nodes) + reorders:
        if n.status not in ("run", "alias"):
            continue
        c, m, ll, d = _node_parts(n, peaks, bw, frac)
        tc = c * x[CLASSES.index(n.op_class)]
        tm = m * x[_I_MEM] + ll * x[_I_LLC] + d * x[_I_DRAM]
        t = max(tc, tm) + (n.steps * step_oh if n.status == "run" else 0.0)
        by_class[n.op_class] += t
        k = n.count if (n.status == "run" and n.op_class in _KERNEL_CLASSES) else 0
        n_kern += k
        s = n.count * struct_oh if (n.status == "run" and n.op_type in STRUCT_OPS) else 0.0
        costs.append((t + n.count * node_oh + k * kern_oh + s, n, "compute" if tc > tm else "memory"))
    overhead = ((analysis.n_executed + len(reorders)) * node_oh + n_kern * kern_oh
                + analysis.struct_nodes * struct_oh + x[_I_RUN])
    p50 = sum(by_class.values()) + overhead

    cal = profile.get("calibration") or {}
    calibrated = bool(profile.get("calibrated")) and bool(cal)
    share = {c: (by_class[c] / p50 if p50 > 0 else 0.0) for c in CLASSES}
    seen = set(cal.get("classes_seen", [])) if calibrated else set()
    unseen = [c for c in CLASSES if by_class[c] > 0 and calibrated and c not in seen]
    unknown_share = len(analysis.unknown_nodes) / max(analysis.n_nodes, 1)
    if calibrated:
        e = max(float(cal.get("p90_abs_loo", cal.get("p90_abs_in_sample", MIN_REL_ERR))), MIN_REL_ERR)
        e += UNSEEN_WIDEN * sum(share[c] for c in unseen) + UNKNOWN_WIDEN * unknown_share
        lo, hi = p50 / (1 + e), p50 * (1 + e)
        basis = (f"roofline per op class with efficiency factors calibrated on "
                 f"{cal.get('n_models', '?')} suite models (leave-one-out p90 relative error "
                 f"{float(cal.get('p90_abs_loo', float('nan'))) * 100:.1f} %); interval +-{e * 100:.0f} %")
        if unseen:
            basis += f"; widened for op classes the calibration never saw: {', '.join(unseen)}"
    else:
        f = UNCALIBRATED_FACTOR * (1 + UNKNOWN_WIDEN * unknown_share)
        lo, hi = p50 / f, p50 * f
        basis = (f"roofline per op class with UNCALIBRATED efficiency factors (priors from public "
                 f"specs); interval /{f:.1f} .. x{f:.1f}")
    if frac[1] > 0:
        basis += (f"; weights + activations exceed the {cache_bytes(profile) / 2**20:.0f} MB "
                  f"last-level cache: {frac[1] * 100:.0f} % of weight bytes costed at DRAM bandwidth")
    if analysis.unknown_nodes:
        basis += f"; {len(analysis.unknown_nodes)} node(s) with unknown shapes counted as overhead only"
    costs.sort(key=lambda x: (-x[0], x[1].name))
    top = [{"name": n.name, "op_type": n.op_type, "op_class": n.op_class, "ms": t * 1e3,
            "flops": n.flops, "bytes": n.bytes, "bound": b} for t, n, b in costs[:10]]
    w_mb = analysis.weight_bytes / 2**20
    a_mb = analysis.peak_activation_bytes / 2**20
    ram = profile.get("memory", {}).get("ram_gb")
    ram_mb = float(ram) * 1024.0 if ram else None
    return Prediction(
        p50_ms=p50 * 1e3, interval_ms=(lo * 1e3, hi * 1e3),
        by_class_ms={c: v * 1e3 for c, v in by_class.items()}, overhead_ms=overhead * 1e3,
        top_nodes=top, weights_mb=w_mb, peak_activation_mb=a_mb, total_mb=w_mb + a_mb,
        ram_mb=ram_mb, fits=None if ram_mb is None else (w_mb + a_mb) <= ram_mb,
        calibrated=calibrated, basis=basis, threads=int(threads), unseen_classes=unseen,
        unknown_nodes=list(analysis.unknown_nodes), dram_fraction=float(frac[1]),
        llc_fraction=float(frac[0]),
        statistic=str((profile.get("calibration") or {}).get("statistic", "p50")))


# ----------------------------------------------------------------------------- fitting

def _bvls(A: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray, x0: np.ndarray,
          sweeps: int = 4000) -> np.ndarray:
    """min ||Ax - b||^2 subject to lo <= x <= hi (cyclic coordinate descent on normalised
    columns; deterministic, numpy only)."""
    norms = np.linalg.norm(A, axis=0)
    live = norms > 0
    x = np.clip(x0.astype(float).copy(), lo, hi)
    if not live.any():
        return x
    s = np.where(live, norms, 1.0)
    An = A / s
    z, zlo, zhi = x * s, lo * s, hi * s
    G = An.T @ An
    c = An.T @ b
    idx = np.flatnonzero(live)
    for _ in range(sweeps):
        delta = 0.0
        for j in idx:
            r = c[j] - G[j] @ z + G[j, j] * z[j]
            new = min(max(r / G[j, j], zlo[j]), zhi[j])
            delta = max(delta, abs(new - z[j]))
            z[j] = new
        if delta < 1e-12:
            break
    return z / s


def _bounds() -> tuple[np.ndarray, np.ndarray]:
    effb = [EFF_BOUNDS[c] for c in CLASSES + ("llc", "dram")]
    lo = [1.0 / b[1] for b in effb] + [OVERHEAD_BOUNDS[k][0] * 1e-6 for k in _OH_KEYS]
    hi = [1.0 / b[0] for b in effb] + [OVERHEAD_BOUNDS[k][1] * 1e-6 for k in _OH_KEYS]
    return np.array(lo), np.array(hi)


def _fit_core(flat: _Flat, meas: np.ndarray, prior: np.ndarray, rows: np.ndarray,
              seen: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Alternate (bound assignment) <-> (bounded linear LSQ in inverse efficiencies and
    overheads, rows weighted by 1/measured); then a deterministic log-space pattern search on
    the true max() objective. Parameters not `seen` keep their prior, except the LLC
    bandwidth: when no model exercises it but the near-cache one is fitted, it is tied to that
    (a cache level is far closer to the next one up than to a generic prior)."""
    lo, hi = _bounds()
    tie = bool(seen[_I_MEM]) and not bool(seen[_I_LLC])

    def tied(v):
        if tie:
            v = v.copy()
            v[_I_LLC] = v[_I_MEM]
        return v

    x = prior.copy()
    fixed = ~seen
    lo = np.where(fixed, x, lo)
    hi = np.where(fixed, x, hi)
    x = np.clip(x, lo, hi)
    sel = np.isin(flat.model, rows)
    w = 1.0 / meas[rows]

    def objective(xx):
        pred = flat.totals(tied(xx))[rows]
        return float(np.sum(((pred - meas[rows]) * w) ** 2))

    best, best_obj, it = x.copy(), objective(x), 0
    for it in range(1, 31):
        _, cbound = flat.node_times(x)
        A = np.zeros((flat.n, _NP))
        mi, ci = flat.model[sel], flat.cls[sel]
        cb = cbound[sel]
        np.add.at(A, (mi[cb], ci[cb]), flat.tc[sel][cb])
        np.add.at(A, (mi[~cb], np.full((~cb).sum(), _I_MEM)), flat.tmc[sel][~cb])
        np.add.at(A, (mi[~cb], np.full((~cb).sum(), _I_MEM if tie else _I_LLC)), flat.tml[sel][~cb])
        np.add.at(A, (mi[~cb], np.full((~cb).sum(), _I_DRAM)), flat.tmd[sel][~cb])
        A[:, _I_NODE] = flat.n_exec
        A[:, _I_KERN] = flat.n_kern
        A[:, _I_STEP] = flat.n_step
        A[:, _I_STRUCT] = flat.n_struct
        A[:, _I_RUN] = 1.0
        Aw = A[rows] * w[:, None]
        x = tied(_bvls(Aw, np.ones(len(rows)), lo, hi, x))
        obj = objective(x)
        if obj < best_obj - 1e-15:
            best, best_obj = x.copy(), obj
        _, cb2 = flat.node_times(x)
        if np.array_equal(cb2, cbound):
            break
    # pattern search in log space on the true objective
    x, step = best.copy(), 0.5
    while step > 1e-3:
        improved = False
        for j in range(_NP):
            if lo[j] == hi[j]:
                continue
            for sgn in (1, -1):
                y = x.copy()
                y[j] = x[j] * math.exp(sgn * step) if x[j] > 0 else (hi[j] - lo[j]) * 1e-3
                y[j] = min(max(y[j], lo[j]), hi[j])
                o = objective(y)
                if o < best_obj - 1e-15:
                    x, best_obj, improved = y, o, True
        if not improved:
            step /= 2
    x = tied(x)
    return x, flat.totals(x), it


def fit(analyses: list[Analysis], measured_p50_ms: list[float], profile: dict, threads: int = 1) -> dict:
    """Fit the profile's [efficiency] factors to measured medians (relative least squares).

    Returns {"efficiency": {...}, "calibration": {...}}, both TOML-friendly: the fitted
    efficiencies and overheads, and the in-sample and leave-one-out relative errors."""
    if len(analyses) != len(measured_p50_ms) or not analyses:
        raise ValueError("fit() needs one measured p50 per analysis (and at least one)")
    meas = np.asarray(measured_p50_ms, dtype=float) * 1e-3
    if not np.all(np.isfinite(meas)) or np.any(meas <= 0):
        raise ValueError("measured p50 values must be positive and finite")
    eff = _eff(profile)
    flat = _Flat(analyses, profile, threads)
    prior = _xvec(eff)

    def seen_in(rows):
        """A class (or the DRAM term) must carry >= 2 % of some model's time at the prior;
        the per-kernel overhead needs >= 2 models with compute nodes."""
        m = np.isin(flat.model, rows)
        c = flat.tc * prior[flat.cls]
        mc, ml, md = flat.tmc * prior[_I_MEM], flat.tml * prior[_I_LLC], flat.tmd * prior[_I_DRAM]
        t = np.maximum(c, mc + ml + md)
        tot = flat.totals(prior)
        share = np.zeros(_NP)
        for k in rows:
            mk = m & (flat.model == k)
            share[:len(CLASSES)] = np.maximum(
                share[:len(CLASSES)], np.bincount(flat.cls[mk], weights=t[mk], minlength=len(CLASSES)) / tot[k])
            share[_I_DRAM] = max(share[_I_DRAM], float(md[mk].sum()) / tot[k])
            share[_I_LLC] = max(share[_I_LLC], float(ml[mk].sum()) / tot[k])
        s = share >= 0.02
        s[_I_NODE] = s[_I_RUN] = True
        s[_I_KERN] = FIT_KERNEL_OVERHEAD and int(np.sum(flat.n_kern[rows] > 0)) >= 2
        s[_I_STEP] = FIT_RNN_STEP and int(np.sum(flat.n_step[rows] > 0)) >= 2
        s[_I_STRUCT] = int(np.sum(flat.n_struct[rows] >= 4)) >= 2
        return s

    all_rows = np.arange(len(analyses))
    seen = seen_in(all_rows)
    x, pred_in, iters = _fit_core(flat, meas, prior, all_rows, seen)
    prior_pred = flat.totals(prior)
    loo = np.zeros(len(analyses))
    for i in all_rows:
        rows = all_rows[all_rows != i]
        if len(rows) == 0:
            loo[i] = pred_in[i]
            continue
        xi, _, _ = _fit_core(flat, meas, prior, rows, seen_in(rows))
        loo[i] = flat.totals(xi)[i]
    err_in = pred_in / meas - 1
    err_loo = loo / meas - 1
    err_prior = prior_pred / meas - 1

    efficiency = {c: float(round(1.0 / x[k], 6)) for k, c in enumerate(CLASSES)}
    efficiency["llc"] = float(round(1.0 / x[_I_LLC], 6))
    efficiency["dram"] = float(round(1.0 / x[_I_DRAM], 6))
    for k, i in zip(_OH_KEYS, (_I_NODE, _I_KERN, _I_STEP, _I_STRUCT, _I_RUN)):
        efficiency[k] = float(round(x[i] * 1e6, 4))
    efficiency["parallel"] = float(eff["parallel"])

    def r(v):
        return [float(round(float(e), 5)) for e in v]

    calibration = {
        "method": "relative least squares on suite medians: bound assignment <-> bounded "
                  "linear LSQ, then log-space pattern search",
        "n_models": int(len(analyses)),
        "threads": int(threads),
        "models": [a.name for a in analyses],
        "classes_seen": [c for k, c in enumerate(CLASSES) if seen[k]],
        "classes_prior": [c for k, c in enumerate(CLASSES) if not seen[k]],
        "llc_seen": bool(seen[_I_LLC]),
        "dram_seen": bool(seen[_I_DRAM]),
        "cache_mb": float(round(cache_bytes(profile) / 2**20, 3)),
        "l2_mb": float(round(l2_bytes(profile) / 2**20, 3)),
        "measured_ms": r(meas * 1e3),
        "predicted_ms": r(pred_in * 1e3),
        "loo_predicted_ms": r(loo * 1e3),
        "rel_err_in_sample": r(err_in),
        "rel_err_loo": r(err_loo),
        "rel_err_prior": r(err_prior),
        "median_abs_in_sample": float(np.median(np.abs(err_in))),
        "p90_abs_in_sample": float(np.percentile(np.abs(err_in), 90)),
        "median_abs_loo": float(np.median(np.abs(err_loo))),
        "p90_abs_loo": float(np.percentile(np.abs(err_loo), 90)),
        "median_abs_prior": float(np.median(np.abs(err_prior))),
        "iterations": int(iters),
    }
    return {"efficiency": efficiency, "calibration": calibration}
