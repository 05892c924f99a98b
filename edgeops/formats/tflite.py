"""TensorFlow Lite flatbuffers (.tflite): detection, signature, a LiteRT runner, inspection.

Detection reads the flatbuffer file identifier (bytes 4..8 == b"TFL3"). Running uses the
LiteRT interpreter from `ai_edge_litert` (the runtime Google ships for TFLite since TF
2.20 deprecated tf.lite.Interpreter), falling back to tf.lite.Interpreter when only
TensorFlow is installed. Models with a SignatureDef are run through it, so inputs and
outputs carry the signature's names (onnx2tf copies the ONNX names there); models
without one use the raw tensor names without ":0". Inputs whose shape differs from the
model's current one are resized, which is how a dynamic batch (-1) is served.

Inspection parses the flatbuffer with the schema module bundled in ai_edge_litert (no
interpreter, no TensorFlow): parameters are the elements of constant float / int8 /
uint8 / int4 tensors (shape constants and int32 biases are not counted), ops are the
builtin or custom op names per operator.

Not covered: writing TFLite from other formats (edgeops.convert.onnx2tf does that),
models that need the Flex delegate (SELECT_TF_OPS) or custom ops -- LiteRT refuses them
when tensors are allocated and the runner raises FormatError -- and automatic
(de)quantization of int8 model inputs/outputs: feeds and results are the raw tensors.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from .. import extras
from ..errors import FormatError, MissingExtraError, first_line
from .base import FormatInfo, LoadOptions, Probe, Signature, TensorSpec

FORMATS = (
    FormatInfo("tflite", "tflite", "TensorFlow Lite flatbuffer", "tflite", suffixes=(".tflite",)),
)

SERVING = "serving_default"
_MAGIC = b"TFL3"


def detect(probe: Probe) -> str | None:
    if probe.is_dir:
        return None
    return "tflite" if probe.head[4:8] == _MAGIC else None


# ----------------------------------------------------------------------------- interpreter

def _interpreter_class():
    try:
        return extras.require("ai_edge_litert.interpreter", "tflite", "TFLite models").Interpreter
    except MissingExtraError as missing:
        try:
            tf = extras.require("tensorflow", "tflite", "TFLite models")
        except MissingExtraError:
            raise missing from None
        return tf.lite.Interpreter


def load(path: Path, fmt: str = "tflite", opts: LoadOptions | None = None, threads: int | None = None,
         reference: bool = False):
    """A LiteRT (or tf.lite) Interpreter, tensors not yet allocated; `reference` selects the
    reference kernels (no XNNPack), the literal semantics of a quantized model."""
    cls = _interpreter_class()
    kwargs = {"num_threads": threads} if threads else {}
    if reference:
        mod = __import__(cls.__module__, fromlist=["OpResolverType"])
        kind = getattr(mod, "OpResolverType", None)
        if kind is not None:
            kwargs["experimental_op_resolver_type"] = kind.BUILTIN_REF
    try:
        with warnings.catch_warnings():
            # tf.lite.Interpreter warns that it is deprecated in favour of ai_edge_litert
            warnings.simplefilter("ignore")
            return cls(model_path=str(path), **kwargs)
    except Exception as exc:  # ValueError for a corrupt flatbuffer, RuntimeError ...
        raise FormatError(f"{path}: the TFLite interpreter cannot load the model: {first_line(exc)}") from exc


def save(obj, path: Path, fmt: str = "tflite") -> None:
    """Write a flatbuffer given as bytes (what TFLiteConverter.convert() returns)."""
    if not isinstance(obj, (bytes, bytearray, memoryview)):
        raise FormatError(f"cannot save {type(obj).__name__} as TFLite: pass the flatbuffer bytes")
    Path(path).write_bytes(bytes(obj))


def _short(name: str) -> str:
    return name[:-2] if name.endswith(":0") else name


def _spec(name: str, d: dict) -> TensorSpec:
    sig = d.get("shape_signature")
    shape = sig if sig is not None and len(sig) == len(d["shape"]) else d["shape"]
    return TensorSpec(name, np.dtype(d["dtype"]).name,
                      tuple(None if int(s) < 0 else int(s) for s in shape))


def _signature_key(interp) -> str | None:
    sigs = interp.get_signature_list() or {}
    if not sigs:
        return None
    return SERVING if SERVING in sigs else sorted(sigs)[0]


def _signature_of(interp, key: str | None) -> Signature:
    if key is not None:
        sr = interp.get_signature_runner(key)
        listed = interp.get_signature_list()[key]
        ind, outd = sr.get_input_details(), sr.get_output_details()
        return Signature(tuple(_spec(n, ind[n]) for n in listed["inputs"]),
                         tuple(_spec(n, outd[n]) for n in listed["outputs"]))
    return Signature(tuple(_spec(_short(d["name"]), d) for d in interp.get_input_details()),
                     tuple(_spec(_short(d["name"]), d) for d in interp.get_output_details()))


def signature(path: Path, fmt: str = "tflite", opts: LoadOptions | None = None) -> Signature:
    interp = load(path)
    return _signature_of(interp, _signature_key(interp))


class TFLiteRunner:
    """LiteRT interpreter behind the common Runner interface."""

    def __init__(self, path: Path, threads: int | None = None, reference: bool = False):
        self.path = Path(path)
        self.interp = load(path, threads=threads, reference=reference)
        self.key = _signature_key(self.interp)
        self.signature = _signature_of(self.interp, self.key)
        if self.key is not None:
            self._sr = self.interp.get_signature_runner(self.key)
        else:
            self._in = {_short(d["name"]): d for d in self.interp.get_input_details()}
            self._out = [(_short(d["name"]), d["index"]) for d in self.interp.get_output_details()]
            self._shapes: dict[str, tuple] = {}

    def _feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [s.name for s in self.signature.inputs]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise FormatError(f"missing input(s) {missing}; the model takes {names}")
        return {s.name: np.ascontiguousarray(feeds[s.name], dtype=s.dtype)
                for s in self.signature.inputs}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = self._feeds(feeds)
        try:
            if self.key is not None:
                # SignatureRunner resizes inputs whose shape changed and re-allocates
                out = self._sr(**x)
                return {s.name: np.asarray(out[s.name]) for s in self.signature.outputs}
            return self._run_raw(x)
        except (RuntimeError, ValueError) as exc:
            raise FormatError(f"{self.path}: the TFLite interpreter failed: {first_line(exc)}",
                              hint="models with Flex (SELECT_TF_OPS) or custom ops need a "
                                   "runtime built with them") from exc

    def _run_raw(self, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        it = self.interp
        shapes = {n: a.shape for n, a in x.items()}
        if shapes != self._shapes:
            for n, shape in shapes.items():
                it.resize_tensor_input(self._in[n]["index"], list(shape), strict=False)
            it.allocate_tensors()
            self._shapes = shapes
        for n, a in x.items():
            it.set_tensor(self._in[n]["index"], a)
        it.invoke()
        return {n: np.array(it.get_tensor(i)) for n, i in self._out}


def runner(path: Path, fmt: str = "tflite", opts: LoadOptions | None = None,
           threads: int | None = None) -> TFLiteRunner:
    return TFLiteRunner(path, threads)


def reference_runner(path: Path, fmt: str = "tflite", opts: LoadOptions | None = None):
    """LiteRT's reference kernels (no XNNPack, no optimised int8 kernels)."""
    return TFLiteRunner(path, reference=True)


def quantization(path: Path, fmt: str = "tflite", opts: LoadOptions | None = None) -> dict[str, float]:
    """For outputs of quantized arithmetic: the step in the output's units (1 for an int8 /
    uint8 output; the scale of the quantized tensor a DEQUANTIZE turns into a float output)."""
    interp = load(path)
    key = _signature_key(interp)
    try:
        interp.allocate_tensors()
    except Exception:  # noqa: BLE001 - dynamic shapes: the runner resizes first; no steps then
        return {}
    details = {d["index"]: d for d in interp.get_tensor_details()}
    produced = {}
    try:
        for op in interp._get_ops_details():          # noqa: SLF001 - the only op listing
            for o in op["outputs"]:
                produced[int(o)] = op
    except Exception:  # noqa: BLE001
        produced = {}
    names = {}
    if key is not None:            # signature output name -> tensor index
        full = interp._get_full_signature_list()[key]["outputs"]     # noqa: SLF001
        names = {int(idx): name for name, idx in full.items()}
    out: dict[str, float] = {}
    for d in interp.get_output_details():
        name = names.get(int(d["index"]), _short(d["name"]))
        scale = float(d["quantization"][0] or 0.0)
        if scale > 0 and np.issubdtype(d["dtype"], np.integer):
            out[name] = 1.0
            continue
        op = produced.get(int(d["index"]))
        if op is not None and op["op_name"] == "DEQUANTIZE":
            src = details.get(int(op["inputs"][0]))
            s = float((src or {}).get("quantization", (0.0, 0))[0] or 0.0)
            if s > 0:
                out[name] = s
    return out


# ----------------------------------------------------------------------------- inspect

def _schema():
    try:
        return extras.require("ai_edge_litert.schema_py_generated", "tflite", "TFLite inspection")
    except MissingExtraError as missing:
        try:
            # importing it loads TensorFlow, hence only as a fallback
            return extras.require("tensorflow.lite.python.schema_py_generated", "tflite",
                                  "TFLite inspection")
        except MissingExtraError:
            raise missing from None


def _enum_names(cls) -> dict[int, str]:
    return {v: k for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, int)}


def _weight_types(schema) -> set[int]:
    tt = schema.TensorType
    names = ("FLOAT32", "FLOAT16", "FLOAT64", "BFLOAT16", "INT8", "UINT8", "INT4", "UINT4",
             "INT2", "FLOAT8_E4M3FN", "FLOAT8_E5M2")
    return {getattr(tt, n) for n in names if hasattr(tt, n)}


def _decode(b) -> str:
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else (b or "")


def read_model(path: Path) -> dict:
    """Structural facts straight from the flatbuffer: params, ops, tensor types."""
    schema = _schema()
    buf = Path(path).read_bytes()
    if buf[4:8] != _MAGIC:
        raise FormatError(f"{path}: not a TFLite flatbuffer (no TFL3 identifier)")
    try:
        m = schema.Model.GetRootAs(buf, 0)
        builtin = _enum_names(schema.BuiltinOperator)
        types = _enum_names(schema.TensorType)
        weight_types = _weight_types(schema)
        opnames = []
        for i in range(m.OperatorCodesLength()):
            oc = m.OperatorCodes(i)
            code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
            custom = _decode(oc.CustomCode())
            opnames.append(f"custom:{custom}" if custom else builtin.get(code, f"op{code}"))

        def const(buffer_index: int) -> bool:
            if buffer_index <= 0 or buffer_index >= m.BuffersLength():
                return False
            b = m.Buffers(buffer_index)
            # small models keep data inline; >2 GB models store it after the flatbuffer
            return b.DataLength() > 0 or b.Offset() > 1

        ops: Counter = Counter()
        params = 0
        counted: set[int] = set()
        dtypes: Counter = Counter()
        n_tensors = 0
        for s in range(m.SubgraphsLength()):
            g = m.Subgraphs(s)
            for j in range(g.OperatorsLength()):
                ops[opnames[g.Operators(j).OpcodeIndex()]] += 1
            n_tensors += g.TensorsLength()
            for t in range(g.TensorsLength()):
                ten = g.Tensors(t)
                bi = int(ten.Buffer())
                if bi in counted or not const(bi):
                    continue
                counted.add(bi)
                dtypes[types.get(ten.Type(), str(ten.Type()))] += 1
                if ten.Type() in weight_types:
                    shape = ten.ShapeAsNumpy() if ten.ShapeLength() else []
                    params += int(np.prod(shape)) if len(shape) else 1
        metadata = [_decode(m.Metadata(i).Name()) for i in range(m.MetadataLength())]
        return {
            "params": params,
            "schema_version": int(m.Version()),
            "description": _decode(m.Description()),
            "subgraphs": int(m.SubgraphsLength()),
            "tensors": n_tensors,
            "constant_tensors": dict(dtypes.most_common()),
            "nodes": sum(ops.values()),
            "ops": dict(ops.most_common()),
            "metadata": metadata,
        }
    except FormatError:
        raise
    except Exception as exc:  # IndexError / struct.error on a truncated flatbuffer
        raise FormatError(f"{path}: corrupt or truncated TFLite flatbuffer: {first_line(exc)}") from exc


def inspect(path: Path, fmt: str = "tflite", opts: LoadOptions | None = None) -> dict:
    facts = read_model(path)
    interp = load(path)
    key = _signature_key(interp)
    sig = _signature_of(interp, key)
    facts.update({
        "signatures": sorted(interp.get_signature_list() or {}),
        "inputs": [s.to_dict() for s in sig.inputs],
        "outputs": [s.to_dict() for s in sig.outputs],
    })
    return facts
