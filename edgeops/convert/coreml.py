"""-> Core ML with coremltools: from TorchScript, torch.export programs (.pt2), Keras
(.h5 written by Keras 2 or 3, .keras), TF SavedModels and frozen GraphDefs.

Target "mlpackage" is an ML program at fp32 compute precision unless precision is "fp16"
(coremltools' own default is fp16, which silently costs ~1e-3 of accuracy); "mlmodel" is
the older neural-network type (fp16 there means fp16 weights). TensorFlow sources all go
through one route: the model's call wrapped in a tf.function with the sample inputs'
fixed shapes, whose concrete function coremltools converts -- that is what works for
Keras 3 (ct.convert cannot identify a Keras 3 model), for SavedModels with several
functions (ct.convert on the directory wants exactly one) and for GraphDefs (via
wrap_function + prune). torch.export programs are lowered with run_decompositions({})
first: coremltools refuses the training dialect torch.export.load returns.

Inputs and outputs are renamed to the source's names, and the source's sha256 and the
converter go into the model's user metadata; `set_metadata` (formats.coreml) lets the
planner add the rest of the lineage.

Not covered: flexible (range) input shapes -- the converted model takes the shapes the
hop was verified with; image inputs; scikit-learn (coremltools' sklearn converter is
broken with scikit-learn > 1.5.1).
"""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import ConversionError, UsageError, first_line
from ..extras import require
from ..formats import coreml as coreml_fmt
from ..formats.base import sha256_path
from .context import ConvertContext

# the last ct.target a neural network (.mlmodel) can be built for
_NN_MAX_SPEC = 5   # iOS14


def _deployment_target(ct, ctx: ConvertContext):
    """ctx.options["minimum_deployment_target"] ("iOS15", "macos13", ...) as a ct.target."""
    want = ctx.options.get("minimum_deployment_target")
    if not want:
        return None
    if not isinstance(want, str):
        return want
    by_name = {t.name.lower(): t for t in ct.target}
    target = by_name.get(want.strip().lower())
    if target is None:
        raise UsageError(f"unknown Core ML deployment target {want!r}",
                         hint="one of: " + ", ".join(t.name for t in ct.target))
    return target


def _target_args(ct, ctx: ConvertContext) -> dict:
    target = _deployment_target(ct, ctx)
    if ctx.target_format == "mlmodel":
        if target is not None and target.value > _NN_MAX_SPEC:
            raise UsageError(f"a neural network (.mlmodel) can target at most iOS14/macOS11, "
                             f"not {target.name}",
                             hint="convert to mlpackage (an ML program) for newer targets")
        args = {"convert_to": "neuralnetwork"}
    else:
        prec = ct.precision.FLOAT16 if ctx.precision == "fp16" else ct.precision.FLOAT32
        args = {"convert_to": "mlprogram", "compute_precision": prec}
    if target is not None:
        args["minimum_deployment_target"] = target
    return args


@contextmanager
def _quiet_and_watch(ct):
    """Silence coremltools' progress bars and warnings; record the op it was converting
    when it failed (the torch frontend logs it at ERROR before re-raising)."""
    seen: list[str] = []

    class _Catch(logging.Handler):
        def emit(self, record):
            m = re.search(r"converting '([^']+)' op", record.getMessage())
            if m:
                seen.append(m.group(1))

    handler = _Catch(level=logging.ERROR)
    log = logging.getLogger("coremltools")
    log.addHandler(handler)
    try:
        with coreml_fmt.silenced_fds(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield seen
    finally:
        log.removeHandler(handler)


_OP_PATTERNS = (
    r"convert function for op '([\w.:]+)' not implemented",
    r"Conversion for TF op '([\w.:]+)' not implemented",
    r"lowering for Torch `([\w.:]+)` op is not supported",
    r"[Uu]nsupported (?:TF |tf )?[Oo]p(?:eration)?:? '?([\w.:]+)",
)


def _run_convert(ct, model, ctx: ConvertContext, **kw):
    seen: list[str] = []
    try:
        with _quiet_and_watch(ct) as seen:
            return ct.convert(model, **_target_args(ct, ctx), **kw)
    except (UsageError, ConversionError):
        raise
    except Exception as exc:
        text = str(exc)
        for pat in _OP_PATTERNS:
            m = re.search(pat, text)
            if m:
                raise ConversionError(
                    f"coremltools {ct.__version__} cannot convert op '{m.group(1)}' "
                    f"({ctx.source_format} -> {ctx.target_format})",
                    hint="rewrite or remove that op, or keep this model in ONNX") from exc
        if seen:
            raise ConversionError(
                f"coremltools {ct.__version__} failed on op '{seen[-1]}' "
                f"({ctx.source_format} -> {ctx.target_format}): {first_line(exc)}",
                hint="rewrite that op (e.g. give pooling an explicit stride), or keep this "
                     "model in ONNX") from exc
        raise ConversionError(f"coremltools {ct.__version__} failed converting "
                              f"{ctx.source_format} -> {ctx.target_format}: {first_line(exc)}") from exc


def _finish(ct, mlmodel, src: Path, dst: Path, ctx: ConvertContext) -> dict:
    """fp16 weights for a neural network if asked, I/O renamed to the source's names,
    lineage stamped, saved."""
    args = _target_args(ct, ctx)
    if ctx.target_format == "mlmodel" and ctx.precision == "fp16":
        from coremltools.models.neural_network import quantization_utils

        with _quiet_and_watch(ct):
            mlmodel = quantization_utils.quantize_weights(mlmodel, nbits=16)
    spec = mlmodel.get_spec()
    renamed = {}
    for feats, want in ((spec.description.input, ctx.source_signature.inputs),
                        (spec.description.output, ctx.source_signature.outputs)):
        for f, s in zip(list(feats), want):
            if f.name != s.name:
                renamed[f.name] = s.name
                ct.utils.rename_feature(spec, f.name, s.name)
    meta = spec.description.metadata.userDefined
    meta["edgeops.source_sha256"] = sha256_path(src)
    meta["edgeops.converter"] = f"coremltools {ct.__version__} ({ctx.source_format} -> {ctx.target_format})"
    weights = getattr(mlmodel, "weights_dir", None)
    with _quiet_and_watch(ct):
        out = ct.models.MLModel(spec, weights_dir=weights, skip_model_load=True) if weights \
            else ct.models.MLModel(spec, skip_model_load=True)
        out.save(str(dst))
    version = int(spec.specificationVersion)
    if args["convert_to"] == "mlprogram":
        precision = "fp16" if ctx.precision == "fp16" else "fp32"
    else:
        precision = "fp16 weights" if ctx.precision == "fp16" else "fp32"
    requested = args.get("minimum_deployment_target")
    return {"tool": f"coremltools {ct.__version__}", "convert_to": args["convert_to"],
            "precision": precision,
            "deployment_target": requested.name if requested is not None
            else coreml_fmt.DEPLOYMENT_TARGETS.get(version, str(version)),
            "specification_version": version,
            "input_shapes": {k: list(v.shape) for k, v in ctx.sample_inputs.items()},
            **({"renamed": renamed} if renamed else {})}


def _core_dtype(dtype) -> type:
    """Core ML has no int64/float64 tensors: coremltools maps them down anyway."""
    dt = np.dtype(dtype)
    return {np.dtype("int64"): np.int32, np.dtype("float64"): np.float32}.get(dt, dt.type)


def _sample(ctx: ConvertContext, name: str) -> np.ndarray:
    try:
        return np.asarray(ctx.sample_inputs[name])
    except KeyError:
        raise ConversionError(f"no sample input for {name!r}; Core ML needs each input's shape",
                              hint=f"pass --shape {name}=... or --inputs data.npz") from None


# ----------------------------------------------------------------------------- torch

def torch_to_coreml(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    torch = require("torch", what="converting PyTorch models")
    ct = coreml_fmt._coremltools()
    from ..formats import torch as torch_fmt

    obj = torch_fmt.load(Path(src), ctx.source_format, ctx.load)
    kw: dict = {}
    if ctx.source_format == "torch-export":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = obj.run_decompositions({})   # coremltools refuses the TRAINING dialect
        except Exception as exc:
            raise ConversionError(f"torch.export program cannot be lowered to ATen ops for "
                                  f"coremltools: {first_line(exc)}") from exc
    else:
        model = obj.eval()
        kw["inputs"] = [ct.TensorType(name=s.name, shape=_sample(ctx, s.name).shape,
                                      dtype=_core_dtype(_sample(ctx, s.name).dtype))
                        for s in ctx.source_signature.inputs]
    with torch.no_grad():
        mlmodel = _run_convert(ct, model, ctx, **kw)
    return _finish(ct, mlmodel, Path(src), Path(dst), ctx)


# ----------------------------------------------------------------------------- TensorFlow

def _tf_to_coreml(call, src: Path, dst: Path, ctx: ConvertContext) -> dict:
    """Trace `call(list of tensors) -> list of tensors` at the sample shapes and convert
    the concrete function. Placeholders are named in_0, in_1 ... (source names may not be
    valid TF names, e.g. "x:1") and renamed to the source's names afterwards."""
    tf = require("tensorflow", what="converting TensorFlow models")
    ct = coreml_fmt._coremltools()
    names = [s.name for s in ctx.source_signature.inputs]
    samples = [_sample(ctx, n) for n in names]
    specs = [tf.TensorSpec(a.shape, tf.as_dtype(a.dtype), name=f"in_{i}") for i, a in enumerate(samples)]

    @tf.function(input_signature=specs)
    def fn(*args):
        return call(list(args))

    try:
        concrete = fn.get_concrete_function()
    except Exception as exc:
        raise ConversionError(f"cannot trace the {ctx.source_format} model at shapes "
                              f"{[list(a.shape) for a in samples]}: {first_line(exc)}") from exc
    inputs = [ct.TensorType(name=f"in_{i}", shape=a.shape, dtype=_core_dtype(a.dtype))
              for i, a in enumerate(samples)]
    mlmodel = _run_convert(ct, [concrete], ctx, source="tensorflow", inputs=inputs)
    return _finish(ct, mlmodel, Path(src), Path(dst), ctx)


def _ordered(out, ctx: ConvertContext, tf) -> list:
    """Outputs as a list in the source signature's order."""
    if isinstance(out, dict):
        want = [s.name for s in ctx.source_signature.outputs]
        if all(n in out for n in want):
            return [out[n] for n in want]
        return list(out.values())
    return list(tf.nest.flatten(out))


def keras_to_coreml(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    tf = require("tensorflow", what="converting Keras models")
    from ..formats import keras as keras_fmt

    model = keras_fmt.load(Path(src), ctx.source_format, ctx.load)
    struct = getattr(model, "_inputs_struct", None)   # Keras 3 Functional: list/dict/tensor
    n_in = len(ctx.source_signature.inputs)

    def pack(args):
        if struct is not None and len(tf.nest.flatten(struct)) == n_in:
            keras = require("keras")
            return keras.tree.pack_sequence_as(struct, args)
        return args[0] if n_in == 1 else args

    return _tf_to_coreml(lambda args: _ordered(model(pack(args), training=False), ctx, tf),
                         src, dst, ctx)


def savedmodel_to_coreml(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    tf = require("tensorflow", what="converting SavedModels")
    from ..formats import tensorflow as tf_fmt

    loaded = tf_fmt.load(Path(src), "savedmodel", ctx.load)
    fn = (getattr(loaded, "signatures", None) or {}).get("serving_default")
    if fn is None:
        raise ConversionError(f"{src}: the SavedModel has no 'serving_default' signature to convert")
    names = [s.name for s in ctx.source_signature.inputs]
    return _tf_to_coreml(lambda args: _ordered(fn(**dict(zip(names, args))), ctx, tf),
                         src, dst, ctx)


def _tensor_name(name: str) -> str:
    return name if re.search(r":\d+\Z", name) else f"{name}:0"


def graphdef_to_coreml(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    tf = require("tensorflow", what="converting frozen GraphDefs")
    from ..formats import tensorflow as tf_fmt

    gd = tf_fmt.load(Path(src), "graphdef", ctx.load)
    wrapped = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(gd, name=""), [])
    g = wrapped.graph
    ins = [s.name for s in ctx.source_signature.inputs]
    outs = [s.name for s in ctx.source_signature.outputs]
    try:
        pruned = wrapped.prune([g.as_graph_element(_tensor_name(n)) for n in ins],
                               [g.as_graph_element(_tensor_name(n)) for n in outs])
    except Exception as exc:
        raise ConversionError(f"{src}: cannot cut the GraphDef at inputs {ins} / outputs {outs}: "
                              f"{first_line(exc)}") from exc
    return _tf_to_coreml(lambda args: list(pruned(*args)), src, dst, ctx)
