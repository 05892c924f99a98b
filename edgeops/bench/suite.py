"""The fixed calibration suite: at most 22 small ONNX models built with onnx.helper.

Every op class of `edgeops.bench.estimate` appears at several sizes, so each efficiency
factor (and the per-node / per-run overheads) is identifiable from the suite's timings:

* dense 3x3 convolutions and a 1x1 (pointwise) stack;
* depthwise-separable blocks at two sizes;
* MLPs (Gemm) at batch 1 (GEMV: weight-bandwidth bound), one per memory tier: 0.3 MiB
  (L2-resident), 6.5 MiB (spills L2, stays in the last-level cache) and 64 MiB (beyond the
  last-level cache of most CPUs), so near-cache, LLC and DRAM efficiencies are identifiable;
* transformer-like blocks (MatMul, Softmax, MatMul, residual + LayerNorm, FFN) at two lengths;
* LSTM and GRU of different hidden sizes and sequence lengths, one long and thin (GRU, 160
  steps of hidden 32) so the per-step cost separates from the per-FLOP one;
* a memory-bound elementwise / norm / pool chain (Sigmoid, Tanh, LayerNormalization: "norm");
* tiny chains of 1, 8 and 50 Adds for the per-run and per-node overheads (three, so leaving
  one out still identifies both);
* ten small 1-D convolutions (the per-kernel cost that dominates audio front ends and VADs)
  and a chain of small data-movement ops (Slice, Concat, Transpose, Pad, Split, Gather,
  Expand: the per-node cost of exported streaming models' plumbing);
* three int8 models: `quantize_dynamic` of an MLP and `quantize_static` (QDQ) of two CNNs.

Weights come from a fixed numpy seed, opset 17, static input shapes, batch 1. Models are
written to `out_dir` as NAME-HASH.onnx, the hash being over the serialized model (for the
quantized models: over the float model, the onnxruntime version and the recipe), so a
rebuild only writes what changed and the quantizer runs once per content.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

OPSET = 17
SUITE_VERSION = "3"


@dataclass
class SuiteModel:
    name: str
    path: Path
    classes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "classes": list(self.classes)}


class _G:
    """A tiny graph builder: nodes, initializers, fresh names."""

    def __init__(self, name: str, seed: int):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0

    def fresh(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def w(self, shape, scale: float | None = None, base: str = "w") -> str:
        from onnx import numpy_helper

        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
        s = scale if scale is not None else 1.0 / np.sqrt(max(fan_in, 1))
        name = self.fresh(base)
        arr = (self.rng.standard_normal(shape) * s).astype(np.float32)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def const(self, arr, base: str = "c") -> str:
        from onnx import numpy_helper

        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op_type: str, inputs, n_out: int = 1, **attrs):
        from onnx import helper

        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    # blocks
    def conv(self, x, cin, cout, k=3, stride=1, group=1, relu=True):
        w = self.w((cout, cin // group, k, k))
        b = self.w((cout,), scale=0.01, base="b")
        y = self.op("Conv", [x, w, b], kernel_shape=[k, k], pads=[k // 2] * 4,
                    strides=[stride, stride], group=group)
        return self.op("Relu", [y]) if relu else y

    def gemm(self, x, cin, cout, relu=True):
        y = self.op("Gemm", [x, self.w((cin, cout)), self.w((cout,), 0.01, "b")])
        return self.op("Relu", [y]) if relu else y

    def linear(self, x, cin, cout, relu=False):
        y = self.op("Add", [self.op("MatMul", [x, self.w((cin, cout))]), self.w((cout,), 0.01, "b")])
        return self.op("Relu", [y]) if relu else y

    def model(self, x_shape, y, x="x"):
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            self.nodes, self.name,
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, list(x_shape))],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
            initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edgeops.bench.suite")
        m.ir_version = 8
        return m


def _cnn(name, seed, res, chans, n_convs, k=3):
    g = _G(name, seed)
    x = g.conv("x", chans[0], chans[1], k)
    for _ in range(n_convs - 1):
        x = g.conv(x, chans[1], chans[1], k)
    return g.model((1, chans[0], res, res), x), ["conv", "memory"]


def _pointwise(seed):
    g = _G("conv1x1", seed)
    x = g.conv("x", 128, 256, 1)
    x = g.conv(x, 256, 128, 1)
    x = g.conv(x, 128, 256, 1)
    return g.model((1, 128, 28, 28), x), ["conv"]


def _dwsep(name, seed, res, c, blocks):
    g = _G(name, seed)
    x = "x"
    for _ in range(blocks):
        x = g.conv(x, c, c, 3, group=c)
        x = g.conv(x, c, c, 1)
    return g.model((1, c, res, res), x), ["depthwise", "conv"]


def _mlp(name, seed, widths):
    g = _G(name, seed)
    x = "x"
    for a, b in zip(widths[:-1], widths[1:]):
        x = g.gemm(x, a, b)
    return g.model((1, widths[0]), x), ["gemm"]


def _attention(name, seed, seq, d, heads):
    g = _G(name, seed)
    hd = d // heads
    shape = g.const(np.array([1, seq, heads, hd], np.int64), "shape")
    back = g.const(np.array([1, seq, d], np.int64), "shape")
    scale = g.const(np.array(1.0 / np.sqrt(hd), np.float32), "scale")

    def split(t):
        return g.op("Transpose", [g.op("Reshape", [t, shape])], perm=[0, 2, 1, 3])

    q = split(g.linear("x", d, d))
    k = g.op("Transpose", [g.op("Reshape", [g.linear("x", d, d), shape])], perm=[0, 2, 3, 1])
    v = split(g.linear("x", d, d))
    s = g.op("Mul", [g.op("MatMul", [q, k]), scale])
    p = g.op("Softmax", [s], axis=-1)
    o = g.op("MatMul", [p, v])
    o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), back])
    o = g.op("Add", [g.linear(o, d, d), "x"])
    o = g.op("LayerNormalization", [o, g.w((d,), 1.0, "ln_s"), g.w((d,), 0.1, "ln_b")], axis=-1)
    f = g.linear(g.linear(o, d, 2 * d, relu=True), 2 * d, d)
    o = g.op("LayerNormalization", [g.op("Add", [f, o]), g.w((d,), 1.0, "ln_s"), g.w((d,), 0.1, "ln_b")],
             axis=-1)
    return g.model((1, seq, d), o), ["gemm", "norm", "memory"]


def _rnn(name, seed, kind, seq, inp, hidden):
    g = _G(name, seed)
    gates = 4 if kind == "LSTM" else 3
    w = g.w((1, gates * hidden, inp))
    r = g.w((1, gates * hidden, hidden))
    b = g.w((1, 2 * gates * hidden), 0.01, "b")
    outs = g.op(kind, ["x", w, r, b], n_out=2, hidden_size=hidden)
    y = g.op("Squeeze", [outs[0], g.const(np.array([1], np.int64), "axes")])
    return g.model((seq, 1, inp), y), ["rnn", "memory"]


def _memchain(seed):
    g = _G("memchain", seed)
    c, res = 64, 56
    x = g.op("Relu", [g.op("Add", ["x", g.w((1, c, 1, 1), 0.1, "b")])])
    x = g.op("Mul", [x, g.w((1, c, 1, 1), 1.0, "s")])
    y = g.op("Sigmoid", [x])
    x = g.op("Mul", [x, y])
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    x = g.op("Add", [x, "x"])
    x = g.op("Transpose", [x], perm=[0, 2, 3, 1])
    x = g.op("LayerNormalization", [x, g.w((c,), 1.0, "ln_s"), g.w((c,), 0.1, "ln_b")], axis=-1)
    x = g.op("Transpose", [x], perm=[0, 3, 1, 2])
    x = g.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = g.op("Concat", [x, g.op("Tanh", [x])], axis=1)
    x = g.op("GlobalAveragePool", [x])
    return g.model((1, c, res, res), x), ["norm", "memory"]


def _tiny_convs(seed):
    """Ten small 1-D convolutions (audio front ends, VADs): per-kernel cost, not FLOPs."""
    g = _G("tiny_convs", seed)
    x = "x"
    for i in range(10):
        w = g.w((16, 1 if i % 3 == 2 else 16, 3))
        y = g.op("Conv", [x, w, g.w((16,), 0.01, "b")], kernel_shape=[3], pads=[1, 1],
                 group=16 if i % 3 == 2 else 1)
        x = g.op("Relu", [y])
    return g.model((1, 16, 24), x), ["conv", "depthwise"]


def _small_ops(seed):
    """Data movement on small tensors (the plumbing of exported streaming models): Slice,
    Concat, Transpose, Pad, Gather, Split, Expand: per-node setup cost of these kernels."""
    g = _G("small_ops", seed)
    x = "x"
    for _ in range(6):
        t = g.op("Transpose", [x], perm=[0, 2, 1])                      # [1, 32, 24]
        one = g.const(np.array([1], np.int64))
        a = g.op("Slice", [t, g.const(np.array([0], np.int64)), g.const(np.array([16], np.int64)), one])
        b = g.op("Slice", [t, g.const(np.array([16], np.int64)), g.const(np.array([32], np.int64)), one])
        c = g.op("Concat", [b, a], axis=1)                              # [1, 32, 24]
        p = g.op("Pad", [c, g.const(np.array([0, 0, 1, 0, 0, 1], np.int64))])   # [1, 32, 26]
        s1, _s2 = g.op("Split", [p, g.const(np.array([24, 2], np.int64))], n_out=2, axis=2)
        gi = g.op("Gather", [s1, g.const(np.arange(24)[::-1].copy())], axis=2)
        x = g.op("Transpose", [gi], perm=[0, 2, 1])
        x = g.op("Expand", [x, g.const(np.array([1, 24, 32], np.int64))])
    return g.model((1, 24, 32), x), ["memory"]


def _tiny_chain(name, seed, n):
    g = _G(name, seed)
    x = "x"
    one = g.const(np.ones((1, 16), np.float32), "one")
    for _ in range(n):
        x = g.op("Add", [x, one])
    return g.model((1, 16), x), ["memory"]


_FLOAT = {
    "conv3x3_l": lambda: _cnn("conv3x3_l", 3, 56, (32, 64), 3),
    "conv1x1": lambda: _pointwise(5),
    "dwsep_s": lambda: _dwsep("dwsep_s", 6, 56, 32, 2),
    "dwsep_l": lambda: _dwsep("dwsep_l", 7, 28, 128, 3),
    "mlp_s": lambda: _mlp("mlp_s", 8, (256, 256, 256, 10)),
    "mlp_m": lambda: _mlp("mlp_m", 9, (640, 1280, 640)),
    "mlp_xl": lambda: _mlp("mlp_xl", 4, (2048, 4096, 2048)),
    "attn_s": lambda: _attention("attn_s", 11, 64, 128, 4),
    "attn_l": lambda: _attention("attn_l", 12, 256, 128, 4),
    "lstm_s": lambda: _rnn("lstm_s", 13, "LSTM", 16, 64, 128),
    "lstm_l": lambda: _rnn("lstm_l", 14, "LSTM", 48, 128, 256),
    "gru": lambda: _rnn("gru", 15, "GRU", 32, 64, 192),
    "gru_s": lambda: _rnn("gru_s", 1, "GRU", 160, 16, 32),
    "memchain": lambda: _memchain(16),
    "tiny_chain": lambda: _tiny_chain("tiny_chain", 17, 50),
    "tiny_chain_s": lambda: _tiny_chain("tiny_chain_s", 18, 8),
    "tiny_one": lambda: _tiny_chain("tiny_one", 10, 1),
    "tiny_convs": lambda: _tiny_convs(21),
    "small_ops": lambda: _small_ops(22),
}

# int8 models: (name, float builder, recipe)
_INT8 = {
    "int8_dyn_mlp": (lambda: _mlp("mlp_q", 19, (512, 1024, 1024, 256)), "dynamic"),
    "int8_qdq_cnn": (lambda: _cnn("cnn_q", 20, 28, (32, 64), 3), "static"),
    "int8_qdq_cnn_s": (lambda: _cnn("cnn_qs", 2, 56, (16, 32), 2), "static"),
}


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:12]


def _write_cached(out_dir: Path, name: str, digest: str, data_fn) -> Path:
    path = out_dir / f"{name}-{digest}.onnx"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data_fn())
        os.replace(tmp, path)
    return path


def _quantize(float_bytes: bytes, recipe: str, seed: int, x_shape) -> bytes:
    import tempfile

    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(seed)
            self.items = iter([{"x": rng.standard_normal(x_shape).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as td:
        src, dst = Path(td) / "f.onnx", Path(td) / "q.onnx"
        src.write_bytes(float_bytes)
        quiet = io.StringIO()
        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                if recipe == "dynamic":
                    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
                else:
                    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                    per_channel=False)
        finally:
            logger.setLevel(level)
        return dst.read_bytes()


def build_suite(out_dir) -> list[SuiteModel]:
    """Build (or reuse from `out_dir`) the calibration suite; returns the models in a fixed order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out: list[SuiteModel] = []
    for name, fn in _FLOAT.items():
        model, classes = fn()
        data = model.SerializeToString(deterministic=True)
        out.append(SuiteModel(name, _write_cached(out_dir, name, _digest(data), lambda d=data: d), classes))
    for i, (name, (fn, recipe)) in enumerate(_INT8.items()):
        import onnxruntime

        model, _ = fn()
        data = model.SerializeToString(deterministic=True)
        x_shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        digest = _digest(data, recipe.encode(), onnxruntime.__version__.encode(), SUITE_VERSION.encode())
        path = _write_cached(out_dir, name, digest,
                             lambda d=data, r=recipe, s=100 + i, xs=x_shape: _quantize(d, r, s, xs))
        out.append(SuiteModel(name, path, ["int8", "memory"]))
    return out


def suite_feeds(model_path, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic random inputs matching the model's input signature (dynamic dims -> 1)."""
    import onnx
    from onnx import helper

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        dt = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        if dt.kind == "f":
            feeds[vi.name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind in "iu":
            feeds[vi.name] = rng.integers(0, 2, size=shape).astype(dt)
        elif dt.kind == "b":
            feeds[vi.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[vi.name] = np.zeros(shape, dt)
    return feeds
