"""Core ML: .mlmodel protobufs (neural networks and the other Core ML model types) and
.mlpackage directories (ML programs). Detection, spec loading and validation, signature,
inspection (parameters, precision, deployment target), lineage metadata -- and an honest
runner.

Core ML executes only on Apple platforms: on Linux coremltools can build, load and
inspect a spec, but `MLModel.predict` and `compile_model` raise. The runner therefore
validates the model and then raises NotExecutableError everywhere but macOS, and the planner reports such a hop as
"not executed", never as parity passed. On macOS the runner calls MLModel.predict.
Validation here is what can be checked without the runtime: the spec parses, its model
type is known, its specification version suits the model type, a neural network's layer
dataflow is closed, an ML program's I/O matches its description, and every weight blob
it references is inside weight.bin with the blob sentinel in place.

Detection reads content and never imports coremltools (a package's Manifest.json, an
.mlmodel's top-level protobuf tags). coremltools takes seconds to import and prints a
page of notices; `_coremltools()` imports it once with those notices silenced.

Not covered: executing Core ML off Apple platforms (no runtime exists); parameter counts
for non-neural model types (trees, GLMs, SVMs: reported without "params").
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import FormatError, NotExecutableError, first_line
from ..extras import require
from .base import FormatInfo, LoadOptions, Probe, Signature, TensorSpec

FORMATS = (
    FormatInfo("mlmodel", "coreml", "Core ML model (.mlmodel)", "coreml", suffixes=(".mlmodel",)),
    FormatInfo("mlpackage", "coreml", "Core ML package (.mlpackage)", "coreml",
               suffixes=(".mlpackage",), is_dir=True),
)

NOT_EXECUTABLE = "not executed: no Core ML runtime on this OS (Core ML runs only on macOS/iOS)"

# Model.proto: 1 specificationVersion (varint), 2 description, 10 isUpdatable; the model
# itself is a oneof whose field numbers start at 200 (names below, for messages only).
_MODEL_FIELDS = {1, 2, 10}
MODEL_TYPES = {
    200: "pipelineClassifier", 201: "pipelineRegressor", 202: "pipeline",
    300: "glmRegressor", 301: "supportVectorRegressor", 302: "treeEnsembleRegressor",
    303: "neuralNetworkRegressor", 304: "bayesianProbitRegressor",
    400: "glmClassifier", 401: "supportVectorClassifier", 402: "treeEnsembleClassifier",
    403: "neuralNetworkClassifier", 404: "kNearestNeighborsClassifier",
    500: "neuralNetwork", 501: "itemSimilarityRecommender", 502: "mlProgram",
    555: "customModel", 556: "linkedModel", 560: "classConfidenceThresholding",
    600: "oneHotEncoder", 601: "imputer", 602: "featureVectorizer", 603: "dictVectorizer",
    604: "scaler", 606: "categoricalMapping", 607: "normalizer", 609: "arrayFeatureExtractor",
    610: "nonMaximumSuppression", 900: "identity",
    2000: "textClassifier", 2001: "wordTagger", 2002: "visionFeaturePrint",
    2003: "soundAnalysisPreprocessing", 2004: "gazetteer", 2005: "wordEmbedding",
    2006: "audioFeaturePrint", 3000: "serializedModel",
}
_NN_KINDS = {"neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor"}
_PIPELINE_KINDS = {"pipeline", "pipelineClassifier", "pipelineRegressor"}

# specificationVersion -> the oldest OS release that reads it (coremltools' ct.target
# uses the same numbers for iOS13..iOS26).
DEPLOYMENT_TARGETS = {1: "iOS11", 2: "iOS11.2", 3: "iOS12", 4: "iOS13", 5: "iOS14",
                      6: "iOS15", 7: "iOS16", 8: "iOS17", 9: "iOS18", 10: "iOS26"}
_MLPROGRAM_MIN_SPEC = 6   # ML programs arrived with iOS15 / macOS12

_DEFAULT_SPEC_IN_PACKAGE = Path("Data/com.apple.CoreML/model.mlmodel")
_BLOB_SENTINEL = 0xDEADBEEF


def can_execute() -> bool:
    """True where a Core ML runtime exists (macOS); iOS never runs Python."""
    return sys.platform == "darwin"


# ----------------------------------------------------------------------------- detect

def _manifest(pkg: Path) -> dict | None:
    """The package's Manifest.json when it declares Core ML content, else None."""
    manifest = pkg / "Manifest.json"
    if not manifest.is_file():
        return None
    try:
        text = manifest.read_text(errors="replace")
    except OSError:
        return None
    # a cut-off manifest may have lost the author names; the Data folder still tells
    if "com.apple.CoreML" not in text and not (pkg / "Data" / "com.apple.CoreML").is_dir():
        return None
    try:
        data = json.loads(text)
    except ValueError:
        raise FormatError(f"{pkg}: Core ML package with an unreadable Manifest.json "
                          "(truncated or hand-edited?)") from None
    return data if isinstance(data, dict) else None


def package_spec_path(pkg: Path) -> Path:
    """Where the package's root model spec lives: the manifest's rootModelIdentifier
    entry (coremltools writes Data/com.apple.CoreML/model.mlmodel)."""
    pkg = Path(pkg)
    data = _manifest(pkg) or {}
    entries = data.get("itemInfoEntries") or {}
    root = entries.get(data.get("rootModelIdentifier", ""), {})
    rel = root.get("path") if isinstance(root, dict) else None
    return pkg / "Data" / rel if rel else pkg / _DEFAULT_SPEC_IN_PACKAGE


def detect(probe: Probe) -> str | None:
    if probe.is_dir:
        data = _manifest(probe.path)
        if data is None:
            return None
        entries = (data.get("itemInfoEntries") or {}).values()
        if not any(isinstance(e, dict) and e.get("author") == "com.apple.CoreML" for e in entries):
            return None
        spec = package_spec_path(probe.path)
        if not spec.is_file():
            raise FormatError(f"{probe.path}: Core ML package without its model spec "
                              f"({spec.relative_to(probe.path)}): incomplete copy?")
        return "mlpackage"
    if not probe.head or probe.is_zip or probe.is_hdf5 or probe.is_pickle:
        return None
    fields, complete = probe.proto_prefix
    if fields.get(1) != 0 or fields.get(2) != 2:   # specificationVersion, description
        return None
    types = [n for n in fields if n >= 200]
    if fields.keys() - _MODEL_FIELDS - set(types):
        return None   # fields Core ML's Model message does not have (ONNX has 3..8, 14 ...)
    if complete and types:
        return "mlmodel" if len(types) == 1 and fields[types[0]] == 2 else None
    # Cut off (a cut right after the description walks cleanly but holds no model). Random bytes pass the tag walk above often enough, and a SavedModel's
    # saved_model.pb has the same two first fields, so ask for more of Core ML's header:
    # a model-type tag after the description, or -- cut inside the description -- a first
    # input whose name is followed by its type.
    if probe.size > 64 and all(t in MODEL_TYPES and fields[t] == 2 for t in types) \
            and _core_ml_header(probe.head, need_input_type=not types):
        raise FormatError(f"{probe.path}: Core ML model is truncated or corrupt "
                          f"(protobuf ends mid-field after {probe.size} bytes)")
    return None


def _read_len(buf: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while pos < len(buf) and shift < 35:
        b = buf[pos]
        n |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return n, pos
        shift += 7
    return -1, pos


def _core_ml_header(head: bytes, need_input_type: bool) -> bool:
    """08 <version 1..64> 12 <len> 0a <len> 0a <len> <name> [1a]: specificationVersion,
    the description, its first input FeatureDescription, the input's name and (when
    asked) its type right after. A SavedModel has 12 (graph_def) there instead."""
    if len(head) < 8 or head[0] != 0x08 or not 1 <= head[1] <= 64 or head[2] != 0x12:
        return False
    _, pos = _read_len(head, 3)
    if pos >= len(head) or head[pos] != 0x0A:
        return False
    _, pos = _read_len(head, pos + 1)
    if pos >= len(head) or head[pos] != 0x0A:
        return False
    if not need_input_type:
        return True
    n, pos = _read_len(head, pos + 1)
    return n > 0 and pos + n < len(head) and head[pos + n] == 0x1A


# ----------------------------------------------------------------------------- coremltools

@contextmanager
def silenced_fds():
    """coremltools (and the TensorFlow it imports) print to the process's fds directly,
    and its converters draw progress bars there: send both to /dev/null meanwhile."""
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
    mod = sys.modules.get("coremltools")
    if mod is not None:
        return mod
    import logging
    import warnings

    with silenced_fds(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct = require("coremltools", "coreml", what="Core ML models")
    # its import logs "Failed to load _MLModelProxy ..." on Linux, and converters log
    # progress at INFO: keep errors (they name the op that failed)
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return ct


def spec_path(path: Path, fmt: str) -> Path:
    return package_spec_path(path) if fmt == "mlpackage" else Path(path)


def load_spec(path: Path, fmt: str):
    """The Model protobuf. Parsed with coremltools' generated classes, which is all
    ct.utils.load_spec does for a file; for a package it also finds the root spec."""
    _coremltools()
    from coremltools.proto import Model_pb2

    target = spec_path(Path(path), fmt)
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(target.read_bytes())
    except OSError as exc:
        raise FormatError(f"{path}: cannot read the Core ML spec: {exc.strerror or exc}") from exc
    except Exception as exc:  # google.protobuf DecodeError
        raise FormatError(f"{path}: Core ML model is truncated or corrupt "
                          f"({first_line(exc)})") from exc
    return spec


def _weights_file(path: Path, fmt: str, file_name: str) -> Path:
    # blob file names are "@model_path/weights/weight.bin", relative to the spec's folder
    rel = file_name.removeprefix("@model_path/")
    return spec_path(Path(path), fmt).parent / rel


def _check_blobs(spec, path: Path, fmt: str) -> int:
    """Check every weight blob the ML program references: inside its file, metadata
    sentinel in place, data within bounds. Returns the bytes of weight data."""
    refs = list(_blob_refs(spec))
    total, handles = 0, {}
    try:
        for name, offset in refs:
            f = handles.get(name)
            if f is None:
                wpath = _weights_file(path, fmt, name)
                if not wpath.is_file():
                    raise FormatError(f"{path}: the ML program's weight file is missing "
                                      f"({wpath.relative_to(path) if fmt == 'mlpackage' else wpath})")
                f = handles[name] = open(wpath, "rb")
            size = os.fstat(f.fileno()).st_size
            f.seek(offset)
            meta = f.read(24)
            if len(meta) < 24:
                raise FormatError(f"{path}: weight.bin is truncated (a blob at offset {offset} "
                                  f"is past its end, {size} bytes)")
            sentinel, _dtype, nbytes, data_off = struct.unpack("<IIQQ", meta)
            if sentinel != _BLOB_SENTINEL or data_off + nbytes > size:
                raise FormatError(f"{path}: weight.bin is truncated or corrupt "
                                  f"(blob at offset {offset})")
            total += nbytes
    finally:
        for f in handles.values():
            f.close()
    return total


def _blob_refs(spec):
    """(file name, offset) of every blobFileValue in an ML program."""
    def values(op):
        for v in op.attributes.values():
            yield v
        for arg in op.inputs.values():
            for b in arg.arguments:
                if b.WhichOneof("binding") == "value":
                    yield b.value

    def walk(block):
        for op in block.operations:
            for v in values(op):
                if v.WhichOneof("value") == "blobFileValue":
                    yield v.blobFileValue.fileName, int(v.blobFileValue.offset)
            for b in op.blocks:
                yield from walk(b)

    for fn in spec.mlProgram.functions.values():
        for blk in fn.block_specializations.values():
            yield from walk(blk)


def _validate_nn(nn, kind: str, desc, where: str) -> int:
    """A neural network's layers read only model inputs and earlier layers' outputs,
    and the model's outputs are produced. Returns the number of layers."""
    have = {f.name for f in desc.input}
    for layer in nn.layers:
        missing = [i for i in layer.input if i not in have]
        if missing:
            raise FormatError(f"{where}: layer {layer.name!r} reads {missing[0]!r}, which no "
                              "input or earlier layer produces")
        have.update(layer.output)
    if kind == "neuralNetwork":
        lost = [f.name for f in desc.output if f.name not in have]
        if lost:
            raise FormatError(f"{where}: output {lost[0]!r} is produced by no layer")
    return len(nn.layers)


def _validate_program(spec, where: str) -> str:
    prog = spec.mlProgram
    fname = spec.description.defaultFunctionName or "main"
    if fname not in prog.functions:
        raise FormatError(f"{where}: the ML program has no {fname!r} function")
    fn = prog.functions[fname]
    if fn.opset not in fn.block_specializations:
        raise FormatError(f"{where}: the ML program's {fname!r} function has no block for "
                          f"its opset {fn.opset!r}")
    block = fn.block_specializations[fn.opset]
    declared_in = {f.name for f in spec.description.input}
    program_in = {i.name for i in fn.inputs}
    if declared_in != program_in:
        raise FormatError(f"{where}: the model's inputs {sorted(declared_in)} do not match the "
                          f"ML program's {sorted(program_in)}")
    declared_out = [f.name for f in spec.description.output]
    if declared_out != list(block.outputs):
        raise FormatError(f"{where}: the model's outputs {declared_out} do not match the "
                          f"ML program's {list(block.outputs)}")
    return fn.opset


def _validate_spec(spec, path: Path, fmt: str, checks: list[str], where: str) -> None:
    kind = spec.WhichOneof("Type")
    if kind is None:
        raise FormatError(f"{where}: the Core ML spec holds no model")
    version = int(spec.specificationVersion)
    if version < 1:
        raise FormatError(f"{where}: specification version {version} is invalid")
    if not spec.description.input or not spec.description.output:
        raise FormatError(f"{where}: the Core ML model declares no inputs or no outputs")
    if kind == "mlProgram":
        if version < _MLPROGRAM_MIN_SPEC:
            raise FormatError(f"{where}: an ML program needs specification version >= "
                              f"{_MLPROGRAM_MIN_SPEC}, the spec says {version}")
        if fmt != "mlpackage":
            raise FormatError(f"{where}: an ML program spec outside its .mlpackage (its weights "
                              "live beside it)", hint="open the .mlpackage directory instead")
        opset = _validate_program(spec, where)
        nbytes = _check_blobs(spec, path, fmt)
        checks.append(f"ML program ({opset}): I/O match the description; "
                      f"{len(list(_blob_refs(spec)))} weight blob(s), {nbytes} bytes, in bounds")
    elif kind in _NN_KINDS:
        n = _validate_nn(getattr(spec, kind), kind, spec.description, where)
        checks.append(f"neural network: {n} layers, dataflow closed")
    elif kind in _PIPELINE_KINDS:
        models = getattr(spec, kind).pipeline.models if kind != "pipeline" else spec.pipeline.models
        if not models:
            raise FormatError(f"{where}: empty pipeline")
        for i, sub in enumerate(models):
            _validate_spec(sub, path, fmt, checks, f"{where} (pipeline model {i})")
        checks.append(f"pipeline of {len(models)} model(s)")


def validate(path: Path, fmt: str) -> list[str]:
    """What can be checked without a Core ML runtime (and, on macOS, a real compile).
    Returns the checks done; raises FormatError for a broken model."""
    path = Path(path)
    spec = load_spec(path, fmt)
    kind = spec.WhichOneof("Type")
    if kind is None:
        raise FormatError(f"{path}: the Core ML spec holds no model (unknown model type, or "
                          "written by a newer Core ML than coremltools knows)")
    checks = [f"spec parsed ({kind}, specification version {spec.specificationVersion})"]
    _validate_spec(spec, path, fmt, checks, str(path))
    checks.append(f"{len(spec.description.input)} input(s), {len(spec.description.output)} output(s)")
    if can_execute():
        ct = _coremltools()
        try:
            ct.models.MLModel(str(path))     # compiles: Core ML's own validation
        except Exception as exc:
            raise FormatError(f"{path}: Core ML refuses the model: {first_line(exc)}") from exc
        checks.append("compiled by Core ML")
    return checks


def load(path: Path, fmt: str, opts: LoadOptions | None = None):
    """The coremltools MLModel (not compiled off macOS: skip_model_load)."""
    ct = _coremltools()
    validate(path, fmt)
    try:
        return ct.models.MLModel(str(path), skip_model_load=not can_execute())
    except Exception as exc:
        raise FormatError(f"{path}: coremltools cannot load the model: {first_line(exc)}") from exc


def save(obj, path: Path, fmt: str) -> None:
    """An MLModel, or a bare spec (neural networks and other weight-inline types)."""
    if hasattr(obj, "save"):
        obj.save(str(path))
        return
    ct = _coremltools()
    if fmt == "mlpackage" or obj.WhichOneof("Type") == "mlProgram":
        raise FormatError("an ML program needs its weights: save the MLModel, not its spec")
    ct.utils.save_spec(obj, str(path))


# ----------------------------------------------------------------------------- signature

# ArrayFeatureType.ArrayDataType
_ARRAY_DTYPES = {65568: "float32", 65600: "float64", 65552: "float16", 131104: "int32", 131080: "int8"}
# ImageFeatureType.ColorSpace
_COLOR_SPACES = {10: ("GRAYSCALE", 1), 20: ("RGB", 3), 30: ("BGR", 3), 40: ("GRAYSCALE_FLOAT16", 1)}


def _flex_shape(at, shape: tuple[int, ...]) -> tuple:
    """Flexible shapes -> None where a dimension varies (a fixed range stays fixed)."""
    flex = at.WhichOneof("ShapeFlexibility")
    if flex == "shapeRange":
        return tuple(int(d) if r.lowerBound == r.upperBound else None
                     for d, r in zip(shape, at.shapeRange.sizeRanges))
    if flex == "enumeratedShapes":
        shapes = [tuple(s.shape) for s in at.enumeratedShapes.shapes]
        if shapes and all(len(s) == len(shape) for s in shapes):
            return tuple(int(d) if all(s[i] == d for s in shapes) else None
                         for i, d in enumerate(shape))
        return tuple(None for _ in shape)
    return shape


def _feature_spec(f) -> TensorSpec:
    kind = f.type.WhichOneof("Type")
    if kind == "multiArrayType":
        at = f.type.multiArrayType
        dtype = _ARRAY_DTYPES.get(int(at.dataType), f"coreml:{int(at.dataType)}")
        shape = tuple(int(d) for d in at.shape) if at.shape else None
        if shape is not None:
            shape = _flex_shape(at, shape)
        return TensorSpec(f.name, dtype, shape)
    if kind == "imageType":
        # Core ML feeds images (CVPixelBuffer / PIL), not arrays: dtype says so
        it = f.type.imageType
        space, channels = _COLOR_SPACES.get(int(it.colorSpace), (str(it.colorSpace), 3))
        flexible = it.WhichOneof("SizeFlexibility") is not None
        h = None if flexible else int(it.height)
        w = None if flexible else int(it.width)
        return TensorSpec(f.name, f"image:{space}", (channels, h, w))
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


# ----------------------------------------------------------------------------- runner

class CoreMLRunner:
    """MLModel.predict behind the Runner interface -- macOS only."""

    def __init__(self, path: Path, fmt: str):
        if not can_execute():
            # validate first: a hop reported "not executed" still had its spec checked
            # (a broken model is a FormatError, not a shrug)
            validate(path, fmt)
            raise NotExecutableError(NOT_EXECUTABLE,
                                     hint="run the model on a Mac, or verify the ONNX/TorchScript "
                                          "hop before it")
        self.model = load(path, fmt)
        self.signature = signature_of(self.model.get_spec())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [s.name for s in self.signature.inputs if s.name not in feeds]
        if missing:
            raise FormatError(f"missing input(s) {missing}; the model takes "
                              f"{[s.name for s in self.signature.inputs]}")
        out = self.model.predict({s.name: np.asarray(feeds[s.name]) for s in self.signature.inputs})
        return {s.name: np.asarray(out[s.name]) for s in self.signature.outputs if s.name in out}


def runner(path: Path, fmt: str, opts: LoadOptions | None = None) -> CoreMLRunner:
    return CoreMLRunner(Path(path), fmt)


# ----------------------------------------------------------------------------- inspect

# MIL DataType names that hold weights (int32/int64 consts are shapes, axes, pads)
_MIL_WEIGHT = {"FLOAT16", "FLOAT32", "FLOAT64", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E5M2",
               "INT8", "UINT8", "INT4", "UINT4", "UINT2", "UINT1", "UINT3", "UINT6", "INT16", "UINT16"}
_MIL_FLOATS = {"FLOAT16": "fp16", "FLOAT32": "fp32", "FLOAT64": "fp64", "BFLOAT16": "bf16"}


def _tensor_type(vtype):
    from coremltools.proto import MIL_pb2

    if vtype.WhichOneof("type") != "tensorType":
        return None, None
    tt = vtype.tensorType
    dims = [int(d.constant.size) if d.WhichOneof("dimension") == "constant" else None
            for d in tt.dimensions]
    return MIL_pb2.DataType.Name(tt.dataType), dims


def _program_facts(spec) -> dict:
    """Parameters (const tensors, and the dense outputs of constexpr_* decompression ops
    instead of their compressed inputs), weight dtypes, compute dtypes, op counts."""
    fn = spec.mlProgram.functions.get(spec.description.defaultFunctionName or "main")
    if fn is None:
        return {}
    block = fn.block_specializations[fn.opset]
    ops: list = []

    def walk(b):
        for op in b.operations:
            ops.append(op)
            for sub in op.blocks:
                walk(sub)

    walk(block)
    # a const feeding a constexpr op is compressed data (indices, LUT, scales), not a param
    feeds_constexpr = {b.name for op in ops if op.type.startswith("constexpr_")
                       for arg in op.inputs.values() for b in arg.arguments
                       if b.WhichOneof("binding") == "name"}
    params, weight_dtypes, compute, op_counts = 0, {}, set(), {}
    for op in ops:
        op_counts[op.type] = op_counts.get(op.type, 0) + 1
        for out in op.outputs:
            dtype, dims = _tensor_type(out.type)
            if dtype is None:
                continue
            is_weight = op.type == "const" or op.type.startswith("constexpr_")
            if is_weight:
                if (op.type == "const" and out.name in feeds_constexpr) or dtype not in _MIL_WEIGHT \
                        or not dims or None in dims:
                    continue
                n = int(np.prod(dims))
                params += n
                weight_dtypes[dtype] = weight_dtypes.get(dtype, 0) + n
            elif op.type != "cast" and dtype in _MIL_FLOATS:
                compute.add(_MIL_FLOATS[dtype])
    if compute == {"fp16"}:
        precision = "fp16"
    elif compute <= {"fp32"}:
        precision = "fp32"
    else:
        precision = "mixed (" + "+".join(sorted(compute)) + ")"
    return {"params": params, "precision": precision,
            "weight_dtypes": {k.lower(): v for k, v in sorted(weight_dtypes.items())},
            "ops": dict(sorted(op_counts.items(), key=lambda kv: -kv[1])),
            "opset": _opset(fn.opset)}


def _opset(name: str) -> dict:
    """"CoreML5" -> {"CoreML": 5}, the {domain: version} shape ONNX's inspect uses."""
    m = re.fullmatch(r"([A-Za-z]+)(\d+)", name)
    return {m.group(1): int(m.group(2))} if m else {name: ""}


def _weight_params(msg, dtypes: dict[str, int]) -> int:
    """Elements of every WeightParams inside a (neural network) message, by storage type."""
    if type(msg).__name__ == "WeightParams":
        if msg.floatValue:
            n, key = len(msg.floatValue), "fp32"
        elif msg.float16Value:
            n, key = len(msg.float16Value) // 2, "fp16"
        elif msg.int8RawValue:
            n, key = len(msg.int8RawValue), "int8"
        elif msg.rawValue:
            bits = int(msg.quantization.numberOfBits) if msg.HasField("quantization") else 8
            n, key = len(msg.rawValue) * 8 // max(bits, 1), f"int{bits}" if bits != 16 else "fp16"
        else:
            return 0
        dtypes[key] = dtypes.get(key, 0) + n
        return n
    total = 0
    for desc, val in msg.ListFields():
        if desc.message_type is None:
            continue
        # protobuf 5+ (upb) has is_repeated; older runtimes only label
        repeated = desc.is_repeated if hasattr(desc, "is_repeated") \
            else desc.label == desc.LABEL_REPEATED
        if repeated:
            total += sum(_weight_params(v, dtypes) for v in val)
        else:
            total += _weight_params(val, dtypes)
    return total


def _model_facts(spec) -> dict:
    kind = spec.WhichOneof("Type")
    if kind == "mlProgram":
        return _program_facts(spec)
    if kind in _NN_KINDS:
        dtypes: dict[str, int] = {}
        nn = getattr(spec, kind)
        n = _weight_params(nn, dtypes)
        floats = {k for k in dtypes if k.startswith("fp")}
        return {"params": n, "layers": len(nn.layers),
                "precision": "fp16" if floats == {"fp16"} else "fp32",
                "weight_dtypes": dict(sorted(dtypes.items())),
                "layer_types": _layer_types(nn)}
    if kind in _PIPELINE_KINDS:
        models = spec.pipeline.models if kind == "pipeline" else getattr(spec, kind).pipeline.models
        subs = [{"model_type": m.WhichOneof("Type"), **_model_facts(m)} for m in models]
        out: dict = {"models": subs}
        if all("params" in s for s in subs):
            out["params"] = sum(s["params"] for s in subs)
        return out
    return {}


def _layer_types(nn) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in nn.layers:
        k = layer.WhichOneof("layer") or "unknown"
        counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def inspect(path: Path, fmt: str, opts: LoadOptions | None = None) -> dict:
    path = Path(path)
    spec = load_spec(path, fmt)
    kind = spec.WhichOneof("Type")
    version = int(spec.specificationVersion)
    meta = spec.description.metadata
    info: dict = {
        "model_type": kind,
        "specification_version": version,
        "deployment_target": DEPLOYMENT_TARGETS.get(version, f"newer than {DEPLOYMENT_TARGETS[10]}"),
        "metadata": dict(meta.userDefined),
        "validation": validate(path, fmt),
        "executable_here": can_execute(),
    }
    made_by = meta.userDefined.get("com.github.apple.coremltools.version")
    if made_by:
        src = meta.userDefined.get("com.github.apple.coremltools.source", "")
        info["producer"] = f"coremltools {made_by}" + (f" from {src}" if src else "")
    for key, val in (("author", meta.author), ("license", meta.license),
                     ("description", meta.shortDescription), ("version", meta.versionString)):
        if val:
            info[key] = val
    info.update(_model_facts(spec))
    if kind == "mlProgram":
        info["weights_bytes"] = _check_blobs(spec, path, fmt)
    images = [f.name for f in spec.description.input if f.type.WhichOneof("Type") == "imageType"]
    if images:
        info["image_inputs"] = images
    lineage = info["metadata"].pop("edgeops.lineage", None)
    if lineage:
        try:
            info["lineage"] = json.loads(lineage)
        except ValueError:
            info["lineage"] = lineage
    return info


def program_weights(path: Path, fmt: str = "mlpackage") -> dict[str, np.ndarray]:
    """The float const tensors of an ML program's main function, by const name, read from
    weight.bin or from the spec (small consts sit inline). Lets a converted model's
    weights be compared with the source's where Core ML cannot run."""
    path = Path(path)
    spec = load_spec(path, fmt)
    if spec.WhichOneof("Type") != "mlProgram":
        raise FormatError(f"{path}: not an ML program (program_weights reads ML programs only)")
    np_types = {"FLOAT32": np.float32, "FLOAT16": np.float16}
    fn = spec.mlProgram.functions[spec.description.defaultFunctionName or "main"]
    out: dict[str, np.ndarray] = {}
    for op in fn.block_specializations[fn.opset].operations:
        if op.type != "const" or "val" not in op.attributes:
            continue
        val = op.attributes["val"]
        dtype, dims = _tensor_type(val.type)
        if dtype not in np_types or not dims or None in dims:
            continue
        kind = val.WhichOneof("value")
        if kind == "blobFileValue":
            with open(_weights_file(path, fmt, val.blobFileValue.fileName), "rb") as f:
                f.seek(val.blobFileValue.offset)
                _s, _d, nbytes, data_off = struct.unpack("<IIQQ", f.read(24))
                f.seek(data_off)
                arr = np.frombuffer(f.read(nbytes), dtype=np_types[dtype])
        elif kind == "immediateValue":
            t = val.immediateValue.tensor
            arr = (np.asarray(t.floats.values, np.float32) if dtype == "FLOAT32"
                   else np.frombuffer(t.bytes.values, np.float16))
        else:
            continue
        out[op.outputs[0].name] = arr.reshape(dims)
    return out


# ----------------------------------------------------------------------------- metadata

def set_metadata(path: Path, fmt: str, items: dict[str, str]) -> None:
    """Write user-defined metadata (lineage) into a saved model's spec, in place. Only
    the spec file is rewritten; a package's weights are untouched."""
    spec = load_spec(path, fmt)
    for k, v in items.items():
        spec.description.metadata.userDefined[str(k)] = str(v)
    target = spec_path(Path(path), fmt)
    tmp = target.with_name(target.name + ".edgeops-tmp")
    tmp.write_bytes(spec.SerializeToString())
    os.replace(tmp, target)   # never leave a half-written spec behind
