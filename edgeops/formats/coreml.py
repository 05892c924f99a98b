"""Core ML: .mlmodel protobufs (neural networks and other model types) and .mlpackage
directories (ML programs). Detection, spec loading and validation, signature,
inspection, lineage metadata -- and an honest runner.

Core ML executes only on Apple platforms: on Linux, coremltools can build, load and
validate a spec but `predict` raises. The runner therefore raises NotExecutableError
everywhere but macOS, and the planner reports such a hop as "not executed", never as
parity passed. On macOS the runner calls MLModel.predict.

coremltools takes ~14 s to import and prints a page of notices (it imports TensorFlow
and torch); `_coremltools()` imports it once with those notices silenced. Detection
never imports it.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import FormatError, NotExecutableError
from ..extras import require
from .base import FormatInfo, LoadOptions, Probe, Signature, TensorSpec

FORMATS = (
    FormatInfo("mlmodel", "coreml", "Core ML model (.mlmodel)", "coreml", suffixes=(".mlmodel",)),
    FormatInfo("mlpackage", "coreml", "Core ML package (.mlpackage)", "coreml",
               suffixes=(".mlpackage",), is_dir=True),
)

NOT_EXECUTABLE = "no Core ML runtime on this OS (Core ML runs only on macOS/iOS)"
_SPEC_IN_PACKAGE = Path("Data/com.apple.CoreML/model.mlmodel")


def can_execute() -> bool:
    return sys.platform == "darwin"


# ----------------------------------------------------------------------------- detect

def detect(probe: Probe) -> str | None:
    if probe.is_dir:
        manifest = probe.path / "Manifest.json"
        if manifest.is_file():
            try:
                text = manifest.read_text(errors="replace")
            except OSError:
                return None
            if "com.apple.CoreML" in text:
                if not (probe.path / _SPEC_IN_PACKAGE).is_file():
                    raise FormatError(f"{probe.path}: Core ML package without its model spec "
                                      f"({_SPEC_IN_PACKAGE}): incomplete copy?")
                return "mlpackage"
        return None
    if not probe.head or probe.is_zip or probe.is_hdf5 or probe.is_pickle:
        return None
    fields, complete = probe.proto_prefix
    if fields.get(1) != 0 or fields.keys() & {7, 8}:
        return None
    model_type = any(n >= 200 for n in fields)
    if complete:
        return "mlmodel" if model_type and fields.keys() <= ({1, 2, 10} | {n for n in fields if n >= 200}) else None
    if model_type or (2 in fields and fields.get(2) == 2 and fields.keys() <= {1, 2, 10}):
        if model_type or probe.size > 64:
            raise FormatError(f"{probe.path}: Core ML model is truncated or corrupt "
                              f"(protobuf ends mid-field after {probe.size} bytes)")
    return None


# ----------------------------------------------------------------------------- load

@contextmanager
def _silenced_fds():
    """coremltools (and the TensorFlow it imports) print to the process's fds directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _coremltools():
    if "coremltools" in sys.modules and sys.modules["coremltools"] is not None:
        return sys.modules["coremltools"]
    import logging
    import warnings

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with _silenced_fds(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return require("coremltools", "coreml")


def spec_path(path: Path, fmt: str) -> Path:
    return path / _SPEC_IN_PACKAGE if fmt == "mlpackage" else path


def load_spec(path: Path, fmt: str):
    ct = _coremltools()
    try:
        return ct.utils.load_spec(str(path))
    except Exception as exc:
        raise FormatError(f"{path}: cannot read the Core ML spec: {_first_line(exc)}") from exc


def validate(path: Path, fmt: str) -> list[str]:
    """What can be checked without a Core ML runtime. Returns the checks done; raises
    FormatError for a broken model."""
    spec = load_spec(path, fmt)
    kind = spec.WhichOneof("Type")
    if kind is None:
        raise FormatError(f"{path}: the Core ML spec holds no model")
    checks = [f"spec parsed ({kind}, specification version {spec.specificationVersion})"]
    if kind == "mlProgram":
        if fmt != "mlpackage":
            raise FormatError(f"{path}: an ML program must be saved as .mlpackage (weights live beside it)")
        weights = path / "Data/com.apple.CoreML/weights/weight.bin"
        if _uses_blobs(spec) and not weights.is_file():
            raise FormatError(f"{path}: the ML program's weight file is missing ({weights.name})")
        if "main" not in spec.mlProgram.functions:
            raise FormatError(f"{path}: the ML program has no 'main' function")
        checks.append("ML program main function and weight file present")
    if not spec.description.input or not spec.description.output:
        raise FormatError(f"{path}: the Core ML model declares no inputs or no outputs")
    checks.append(f"{len(spec.description.input)} input(s), {len(spec.description.output)} output(s)")
    return checks


def load(path: Path, fmt: str, opts: LoadOptions | None = None):
    ct = _coremltools()
    validate(path, fmt)
    try:
        return ct.models.MLModel(str(path), skip_model_load=not can_execute())
    except Exception as exc:
        raise FormatError(f"{path}: coremltools cannot load the model: {_first_line(exc)}") from exc


def save(obj, path: Path, fmt: str) -> None:
    obj.save(str(path))


# ----------------------------------------------------------------------------- signature

_ARRAY_DTYPES = {65568: "float32", 65600: "float64", 65552: "float16", 131104: "int32", 131080: "int8"}


def _feature_spec(f) -> TensorSpec:
    kind = f.type.WhichOneof("Type")
    if kind == "multiArrayType":
        at = f.type.multiArrayType
        dtype = _ARRAY_DTYPES.get(int(at.dataType), f"coreml:{int(at.dataType)}")
        shape = tuple(int(d) for d in at.shape) if at.shape else None
        if at.WhichOneof("ShapeFlexibility") is not None and shape is not None:
            flex = at.WhichOneof("ShapeFlexibility")
            if flex == "shapeRange":
                shape = tuple(int(d) if r.lowerBound == r.upperBound else None
                              for d, r in zip(shape, at.shapeRange.sizeRanges))
            else:
                shape = tuple(None for _ in shape)
        return TensorSpec(f.name, dtype, shape)
    if kind == "imageType":
        it = f.type.imageType
        channels = 1 if it.colorSpace == 10 else 3
        return TensorSpec(f.name, "image", (channels, int(it.height), int(it.width)))
    if kind == "int64Type":
        return TensorSpec(f.name, "int64", ())
    if kind == "doubleType":
        return TensorSpec(f.name, "float64", ())
    if kind == "stringType":
        return TensorSpec(f.name, "str", ())
    return TensorSpec(f.name, kind or "unknown", None)


def signature_of(spec) -> Signature:
    return Signature(tuple(_feature_spec(f) for f in spec.description.input),
                     tuple(_feature_spec(f) for f in spec.description.output))


def signature(path: Path, fmt: str, opts: LoadOptions | None = None) -> Signature:
    return signature_of(load_spec(path, fmt))


class CoreMLRunner:
    """MLModel.predict behind the Runner interface -- macOS only."""

    def __init__(self, path: Path, fmt: str):
        if not can_execute():
            raise NotExecutableError(NOT_EXECUTABLE)
        self.model = load(path, fmt)
        self.signature = signature_of(self.model.get_spec())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.model.predict({k: np.asarray(v) for k, v in feeds.items()})
        return {s.name: np.asarray(out[s.name]) for s in self.signature.outputs if s.name in out}


def runner(path: Path, fmt: str, opts: LoadOptions | None = None) -> CoreMLRunner:
    return CoreMLRunner(Path(path), fmt)


# ----------------------------------------------------------------------------- inspect

_MIL_FLOAT = {"FLOAT16", "FLOAT32", "FLOAT64", "BFLOAT16", "INT8", "UINT8", "INT4", "UINT4"}


def _uses_blobs(spec) -> bool:
    for fn in spec.mlProgram.functions.values():
        for blk in fn.block_specializations.values():
            for op in blk.operations:
                if op.type == "const" and op.attributes["val"].WhichOneof("value") == "blobFileValue":
                    return True
    return False


def _mil_params(spec) -> tuple[int, set[str]]:
    from coremltools.proto import MIL_pb2

    total, dtypes = 0, set()

    def walk(block):
        nonlocal total
        for op in block.operations:
            if op.type == "const" and "val" in op.attributes:
                tt = op.attributes["val"].type.tensorType
                name = MIL_pb2.DataType.Name(tt.dataType)
                dims = [d.constant.size for d in tt.dimensions]
                if name in _MIL_FLOAT and dims:
                    total += int(np.prod(dims))
                    dtypes.add(name.lower())
            for b in op.blocks:
                walk(b)

    fn = spec.mlProgram.functions.get("main")
    if fn is not None:
        walk(fn.block_specializations[fn.opset])
    return total, dtypes


def _nn_params(layers) -> int:
    total = 0
    for layer in layers:
        for _desc, msg in layer.ListFields():
            total += _weights_in(msg)
    return total


def _weights_in(msg) -> int:
    """Sum of WeightParams sizes found anywhere inside a layer message."""
    total = 0
    if type(msg).__name__ == "WeightParams":
        if msg.floatValue:
            return len(msg.floatValue)
        raw = msg.float16Value or msg.rawValue
        return len(raw) // 2 if msg.float16Value else len(raw)
    if hasattr(msg, "ListFields"):
        for desc, val in msg.ListFields():
            if desc.message_type is None:
                continue
            if not hasattr(val, "ListFields"):  # a repeated message field
                total += sum(_weights_in(v) for v in val)
            else:
                total += _weights_in(val)
    return total


def inspect(path: Path, fmt: str, opts: LoadOptions | None = None) -> dict:
    spec = load_spec(path, fmt)
    kind = spec.WhichOneof("Type")
    info: dict = {"model_type": kind, "specification_version": int(spec.specificationVersion),
                  "metadata": dict(spec.description.metadata.userDefined),
                  "validation": validate(path, fmt),
                  "executable_here": can_execute()}
    if kind == "mlProgram":
        params, dtypes = _mil_params(spec)
        info["params"] = params
        info["precision"] = "fp16" if "float16" in dtypes and "float32" not in dtypes else (
            "fp32" if dtypes <= {"float32"} else ",".join(sorted(dtypes)))
    elif kind == "neuralNetwork":
        info["params"] = _nn_params(spec.neuralNetwork.layers)
        info["layers"] = len(spec.neuralNetwork.layers)
    lineage = info["metadata"].pop("edgeops.lineage", None)
    if lineage:
        try:
            info["lineage"] = json.loads(lineage)
        except ValueError:
            info["lineage"] = lineage
    return info


def set_metadata(path: Path, fmt: str, items: dict[str, str]) -> None:
    """Write user-defined metadata (lineage) into a saved model's spec, in place."""
    spec = load_spec(path, fmt)
    for k, v in items.items():
        spec.description.metadata.userDefined[k] = str(v)
    target = spec_path(Path(path), fmt)
    target.write_bytes(spec.SerializeToString())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
