"""Converters onnx2torch lacks, registered through its public `add_converter` hook: LSTM and GRU
(recurrent speech/OCR/text models: 5 of the corpus models), QuantizeLinear/DequantizeLinear
(QDQ int8 models), and ops newer exports use: CastLike, Trilu, and the opset-18 reductions
whose axes became an input. Imported by `convert.torch._import_onnx2torch`, after onnx2torch.

* LSTM / GRU map onto torch.nn.LSTM / torch.nn.GRU (their weights reordered: ONNX gates are
  i,o,f,c and z,r,h; torch's are i,f,g,o and r,z,n), batch-first layouts, both directions,
  initial states, and `sequence_lens` through pack_padded_sequence (ONNX zeroes the outputs
  past each length and returns the state at the last valid step, as packing does). What
  torch's modules cannot express is refused by name: peepholes, `clip`, non-default
  activations, `input_forget`, GRU with linear_before_reset=0 (torch applies the reset gate
  after the hidden projection, which is ONNX's linear_before_reset=1).
* QuantizeLinear / DequantizeLinear: round half to even, zero point, saturation to the
  integer type, per-tensor or per-axis; the integer tensor is a real uint8/int8 torch tensor,
  so a QDQ model converts with the same arithmetic onnxruntime's reference kernels use.
"""

from __future__ import annotations

import torch
from torch import nn

from onnx2torch.node_converters.registry import add_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult

_DEFAULT_ACTS = {"LSTM": [b"Sigmoid", b"Tanh", b"Tanh"], "GRU": [b"Sigmoid", b"Tanh"]}


def _attr(node: OnnxNode, name: str, default=None):
    v = node.attributes.get(name, default)
    return v.decode() if isinstance(v, bytes) else v


def _init(graph: OnnxGraph, name: str) -> torch.Tensor | None:
    if not name:
        return None
    t = graph.initializers.get(name)
    return None if t is None else t.to_torch()


def _reorder(w: torch.Tensor, hidden: int, order: list[int]) -> torch.Tensor:
    """Gate blocks of size HIDDEN along axis 0 permuted into ORDER."""
    blocks = [w[i * hidden:(i + 1) * hidden] for i in range(w.shape[0] // hidden)]
    return torch.cat([blocks[i] for i in order], 0)


class _Recurrent(nn.Module, OnnxToTorchModule):
    """ONNX LSTM/GRU semantics around torch.nn.LSTM/GRU."""

    def __init__(self, rnn: nn.Module, kind: str, directions: int, hidden: int, layout: int,
                 n_out: int, has_lens: bool, has_h: bool, has_c: bool):
        super().__init__()
        self.rnn = rnn
        self.kind, self.dirs, self.hidden, self.layout = kind, directions, hidden, layout
        self.n_out, self.has_lens, self.has_h, self.has_c = n_out, has_lens, has_h, has_c

    def forward(self, x, *rest):
        rest = list(rest)
        lens = rest.pop(0) if self.has_lens else None
        h0 = rest.pop(0) if self.has_h else None
        c0 = rest.pop(0) if self.has_c else None
        if self.layout == 1:                      # [batch, seq, in]
            x = x.transpose(0, 1)
            h0 = h0.transpose(0, 1) if h0 is not None else None
            c0 = c0.transpose(0, 1) if c0 is not None else None
        seq, batch = x.shape[0], x.shape[1]
        if h0 is None:
            h0 = x.new_zeros(self.dirs, batch, self.hidden)
        if self.kind == "LSTM" and c0 is None:
            c0 = x.new_zeros(self.dirs, batch, self.hidden)
        state = (h0, c0) if self.kind == "LSTM" else h0
        if lens is not None:
            packed = nn.utils.rnn.pack_padded_sequence(x, lens.to(torch.int64).cpu(),
                                                       enforce_sorted=False)
            y, last = self.rnn(packed, state)
            y, _ = nn.utils.rnn.pad_packed_sequence(y, total_length=seq)
        else:
            y, last = self.rnn(x, state)
        h, c = (last if self.kind == "LSTM" else (last, None))
        # torch: [seq, batch, dirs*H] -> ONNX: [seq, dirs, batch, H]
        y = y.reshape(seq, batch, self.dirs, self.hidden).permute(0, 2, 1, 3)
        if self.layout == 1:
            y = y.permute(2, 0, 1, 3)             # [batch, seq, dirs, H]
            h = h.transpose(0, 1)
            c = c.transpose(0, 1) if c is not None else None
        outs = (y, h, c)[: self.n_out]
        return outs if len(outs) > 1 else outs[0]


def _recurrent(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    kind = node.operation_type
    ins = list(node.input_values) + [""] * (8 - len(node.input_values))
    if kind == "LSTM":
        x, w, r, b, lens, h0, c0, p = ins[:8]
    else:
        x, w, r, b, lens, h0 = ins[:6]
        c0 = p = ""
    direction = _attr(node, "direction", "forward")
    hidden = int(_attr(node, "hidden_size"))
    layout = int(_attr(node, "layout", 0))
    acts = node.attributes.get("activations")
    if acts is not None:
        default = _DEFAULT_ACTS[kind] * (2 if direction == "bidirectional" else 1)
        if [a.lower() if isinstance(a, bytes) else a.encode().lower() for a in acts] != \
                [a.lower() for a in default]:
            raise NotImplementedError(f"{kind} with activations {acts} (torch has the defaults only)")
    for bad in ("clip",) + (("input_forget",) if kind == "LSTM" else ()):
        if _attr(node, bad):
            raise NotImplementedError(f"{kind} with {bad}={_attr(node, bad)}")
    if kind == "GRU" and not _attr(node, "linear_before_reset", 0):
        raise NotImplementedError("GRU with linear_before_reset=0 (torch's GRU is "
                                  "linear_before_reset=1)")
    if p:
        raise NotImplementedError("LSTM with peephole weights (input P)")
    W, R, B = _init(graph, w), _init(graph, r), _init(graph, b)
    if W is None or R is None or (b and B is None):
        raise NotImplementedError(f"{kind} whose weights are computed, not initializers")
    dirs = 2 if direction == "bidirectional" else 1
    if direction == "reverse":
        raise NotImplementedError(f"{kind} with direction=reverse")
    gates = 4 if kind == "LSTM" else 3
    # ONNX i,o,f,c -> torch i,f,g,o ; ONNX z,r,h -> torch r,z,n
    order = [0, 2, 3, 1] if kind == "LSTM" else [1, 0, 2]
    in_size = W.shape[2]
    cls = nn.LSTM if kind == "LSTM" else nn.GRU
    rnn = cls(in_size, hidden, num_layers=1, bias=True, bidirectional=dirs == 2)
    with torch.no_grad():
        for d in range(dirs):
            sfx = "_reverse" if d == 1 else ""
            getattr(rnn, f"weight_ih_l0{sfx}").copy_(_reorder(W[d], hidden, order))
            getattr(rnn, f"weight_hh_l0{sfx}").copy_(_reorder(R[d], hidden, order))
            if B is not None:
                wb, rb = B[d][: gates * hidden], B[d][gates * hidden:]
            else:
                wb = rb = torch.zeros(gates * hidden)
            getattr(rnn, f"bias_ih_l0{sfx}").copy_(_reorder(wb, hidden, order))
            getattr(rnn, f"bias_hh_l0{sfx}").copy_(_reorder(rb, hidden, order))
    n_out = len(node.output_values)
    module = _Recurrent(rnn.eval(), kind, dirs, hidden, layout, n_out, bool(lens), bool(h0),
                        bool(c0))
    inputs = tuple(v for v in (x, lens, h0, c0) if v)
    outputs = tuple(o if o else f"{node.name}_unused_{i}" for i, o in enumerate(node.output_values))
    return OperationConverterResult(torch_module=module,
                                    onnx_mapping=OnnxMapping(inputs=inputs, outputs=outputs))


_INT_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


class _Quantize(nn.Module, OnnxToTorchModule):
    def __init__(self, axis: int, dtype: torch.dtype):
        super().__init__()
        self.axis, self.dtype = axis, dtype

    def forward(self, x, scale, zero_point=None):
        lo, hi = _INT_RANGE[self.dtype]
        if scale.dim() == 1 and scale.numel() > 1:
            shape = [1] * x.dim()
            shape[self.axis] = -1
            scale = scale.reshape(shape)
            zero_point = zero_point.reshape(shape) if zero_point is not None else None
        zp = zero_point.to(torch.float32) if zero_point is not None else 0.0
        return torch.clamp(torch.round(x / scale) + zp, lo, hi).to(self.dtype)


class _Dequantize(nn.Module, OnnxToTorchModule):
    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, x, scale, zero_point=None):
        if scale.dim() == 1 and scale.numel() > 1:
            shape = [1] * x.dim()
            shape[self.axis] = -1
            scale = scale.reshape(shape)
            zero_point = zero_point.reshape(shape) if zero_point is not None else None
        xf = x.to(torch.float32)
        if zero_point is not None:
            xf = xf - zero_point.to(torch.float32)
        return xf * scale


def _qdq(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    axis = int(_attr(node, "axis", 1))
    if _attr(node, "block_size", 0):
        raise NotImplementedError(f"{node.operation_type} with block_size (blocked quantization)")
    ins = tuple(v for v in node.input_values if v)
    if node.operation_type == "DequantizeLinear":
        module = _Dequantize(axis)
    else:
        zp = _init(graph, node.input_values[2]) if len(node.input_values) > 2 else None
        if len(node.input_values) > 2 and node.input_values[2] and zp is None:
            raise NotImplementedError("QuantizeLinear with a computed zero point")
        dtype = zp.dtype if zp is not None else torch.uint8
        if dtype not in _INT_RANGE:
            raise NotImplementedError(f"QuantizeLinear to {dtype} (8-bit integers only)")
        if _attr(node, "saturate", 1) == 0:
            raise NotImplementedError("QuantizeLinear with saturate=0")
        module = _Quantize(axis, dtype)
    return OperationConverterResult(torch_module=module,
                                    onnx_mapping=OnnxMapping(inputs=ins, outputs=node.output_values))


class _CastLike(nn.Module, OnnxToTorchModule):
    def forward(self, x, like):
        return x.to(like.dtype)


class _Trilu(nn.Module, OnnxToTorchModule):
    def __init__(self, upper: bool):
        super().__init__()
        self.upper = upper

    def forward(self, x, k=None):
        diag = int(k.reshape(-1)[0]) if k is not None else 0
        return torch.triu(x, diag) if self.upper else torch.tril(x, diag)


_REDUCE = {
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "ReduceProd": lambda x, d, k: _prod(x, d, k),
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
}


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keep)
    return x


class _ReduceAxesInput(nn.Module, OnnxToTorchModule):
    """Opset-18 reductions: axes are an input (constant here), noop_with_empty_axes."""

    def __init__(self, op: str, axes: list[int] | None, keepdims: bool, noop: bool):
        super().__init__()
        self.op, self.axes, self.keepdims, self.noop = op, axes, keepdims, noop

    def forward(self, x):
        if not self.axes:
            if self.noop:
                return x
            dims = list(range(x.dim()))
        else:
            dims = [a % x.dim() for a in self.axes]
        if not dims:                        # a scalar: reducing nothing
            return _REDUCE[self.op](x.reshape(1), [0], False).reshape(()) if x.dim() == 0 else x
        return _REDUCE[self.op](x, dims, self.keepdims)


def _cast_like(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return OperationConverterResult(torch_module=_CastLike(), onnx_mapping=OnnxMapping(
        inputs=tuple(node.input_values[:2]), outputs=node.output_values))


def _trilu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return OperationConverterResult(
        torch_module=_Trilu(bool(_attr(node, "upper", 1))),
        onnx_mapping=OnnxMapping(inputs=tuple(v for v in node.input_values if v),
                                 outputs=node.output_values))


def _reduce18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    axes = None
    if len(node.input_values) > 1 and node.input_values[1]:
        t = _init(graph, node.input_values[1])
        if t is None:
            raise NotImplementedError(f"{node.operation_type} with computed axes")
        axes = [int(a) for a in t.reshape(-1).tolist()]
    module = _ReduceAxesInput(node.operation_type, axes, bool(_attr(node, "keepdims", 1)),
                              bool(_attr(node, "noop_with_empty_axes", 0)))
    return OperationConverterResult(torch_module=module, onnx_mapping=OnnxMapping(
        inputs=(node.input_values[0],), outputs=node.output_values))


_REGISTERED = False


def register() -> None:
    """Add the converters above for every opset version where the op changed (once per
    process). A converter onnx2torch itself gained for a key is kept: theirs wins."""
    global _REGISTERED
    if _REGISTERED:
        return
    wanted = [("LSTM", (7, 14), _recurrent), ("GRU", (7, 14), _recurrent),
              ("QuantizeLinear", (10, 13, 19, 21), _qdq),
              ("DequantizeLinear", (10, 13, 19, 21), _qdq),
              ("CastLike", (15, 19, 21, 23, 24, 25), _cast_like), ("Trilu", (14,), _trilu)]
    wanted += [(op, (18, 20) if op in ("ReduceMax", "ReduceMin") else (18,), _reduce18)
               for op in _REDUCE]
    for op, versions, fn in wanted:
        for v in versions:
            try:
                add_converter(operation_type=op, version=v)(fn)
            except ValueError:          # "already registered": onnx2torch has its own
                pass
    _REGISTERED = True
