"""-> Core ML with coremltools: from TorchScript, torch.export programs, Keras (.h5 from
Keras 2 or 3, .keras), SavedModels and frozen GraphDefs.

Target "mlpackage" is an ML program at fp32 compute precision unless --precision fp16
(coremltools' own default is fp16, which silently costs ~1e-3 of accuracy); "mlmodel" is
the older neural-network type. TensorFlow sources all go through one route: the source
runner's call wrapped in a tf.function with the sample inputs' fixed shapes, whose
concrete function coremltools converts -- that is what works for Keras 3 (ct.convert
cannot identify a Keras 3 model) and for GraphDefs (via wrap_function + prune).
Inputs and outputs are renamed to the source's names, and lineage goes into the
model's user metadata.

Not covered: flexible (range) input shapes -- the converted model takes the shapes the
hop was verified with; image inputs; scikit-learn (coremltools' sklearn converter is
broken with scikit-learn > 1.5.1).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import ConversionError
from ..extras import require
from ..formats import coreml as coreml_fmt
from ..formats.base import sha256_path
from .context import ConvertContext


def _target_args(ct, ctx: ConvertContext) -> dict:
    if ctx.target_format == "mlmodel":
        args = {"convert_to": "neuralnetwork"}
    else:
        prec = ct.precision.FLOAT16 if ctx.precision == "fp16" else ct.precision.FLOAT32
        args = {"convert_to": "mlprogram", "compute_precision": prec}
    target = ctx.options.get("minimum_deployment_target")
    if target:
        args["minimum_deployment_target"] = getattr(ct.target, target)
    return args


def _input_types(ct, ctx: ConvertContext) -> list:
    return [ct.TensorType(name=s.name, shape=tuple(ctx.sample_inputs[s.name].shape),
                          dtype=np.dtype(ctx.sample_inputs[s.name].dtype).type)
            for s in ctx.source_signature.inputs]


def _run_convert(ct, model, ctx: ConvertContext, **kw):
    try:
        with coreml_fmt._silenced_fds():
            return ct.convert(model, **_target_args(ct, ctx), **kw)
    except Exception as exc:
        text = str(exc)
        m = (re.search(r"convert function for op '([\w.:]+)' not implemented", text)
             or re.search(r"[Uu]nsupported (?:TF |tf )?[Oo]p(?:eration)?:? '?([\w.:]+)", text))
        if m:
            raise ConversionError(f"coremltools cannot convert op {m.group(1)}",
                                  hint="replace the op, or keep this model in ONNX") from exc
        raise ConversionError(f"coremltools failed: {_first_line(exc)}") from exc


def _finish(ct, mlmodel, src: Path, dst: Path, ctx: ConvertContext, source: str) -> dict:
    """Rename I/O to the source's names, stamp lineage, save."""
    spec = mlmodel.get_spec()
    renamed = {}
    for feats, want in ((spec.description.input, ctx.source_signature.inputs),
                        (spec.description.output, ctx.source_signature.outputs)):
        for f, s in zip(list(feats), want):
            if f.name != s.name:
                renamed[f.name] = s.name
                ct.utils.rename_feature(spec, f.name, s.name)
    spec.description.metadata.userDefined["edgeops.source_sha256"] = sha256_path(src)
    spec.description.metadata.userDefined["edgeops.converter"] = f"coremltools {ct.__version__} from {source}"
    weights = getattr(mlmodel, "weights_dir", None)
    out = ct.models.MLModel(spec, weights_dir=weights, skip_model_load=True) if weights else \
        ct.models.MLModel(spec, skip_model_load=True)
    out.save(str(dst))
    args = _target_args(ct, ctx)
    return {"tool": f"coremltools {ct.__version__}", "convert_to": args["convert_to"],
            "precision": ("fp16" if ctx.precision == "fp16" else "fp32")
            if args["convert_to"] == "mlprogram" else "fp32 (neural network)",
            "input_shapes": {k: list(v.shape) for k, v in ctx.sample_inputs.items()},
            **({"renamed": renamed} if renamed else {})}


def torch_to_coreml(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    torch = require("torch")
    ct = coreml_fmt._coremltools()
    from ..formats import torch as torch_fmt

    obj = torch_fmt.load(src, ctx.source_format, ctx.load)
    if ctx.source_format == "torch-export":
        model = obj.run_decompositions({})
        kw: dict = {}
        if ctx.target_format == "mlmodel":
            raise ConversionError("coremltools converts torch.export programs only to ML programs",
                                  hint="use --to mlpackage, or convert the TorchScript export")
    else:
        model = obj.eval()
        kw = {"inputs": _input_types(ct, ctx)}
    with torch.no_grad():
        mlmodel = _run_convert(ct, model, ctx, **kw)
    return _finish(ct, mlmodel, src, dst, ctx, ctx.source_format)


def _tf_concrete(call, ctx: ConvertContext):
    tf = require("tensorflow")
    specs = [tf.TensorSpec(ctx.sample_inputs[s.name].shape, ctx.sample_inputs[s.name].dtype, name=s.name)
             for s in ctx.source_signature.inputs]

    @tf.function(input_signature=specs)
    def fn(*args):
        return list(call(list(args)))

    return fn.get_concrete_function()


def _tf_to_coreml(call, src: Path, dst: Path, ctx: ConvertContext) -> dict:
    ct = coreml_fmt._coremltools()
    cf = _tf_concrete(call, ctx)
    mlmodel = _run_convert(ct, [cf], ctx, source="tensorflow", inputs=_input_types(ct, ctx))
    return _finish(ct, mlmodel, src, dst, ctx, ctx.source_format)


def keras_to_coreml(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    from ..formats import keras as keras_fmt

    model, _loader = keras_fmt._load(Path(src), ctx.source_format, ctx.load)
    packer = keras_fmt.input_packer(model)
    return _tf_to_coreml(lambda args: keras_fmt._as_list(keras_fmt.call_model(model, args, packer=packer)),
                         src, dst, ctx)


def savedmodel_to_coreml(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    from ..formats import tensorflow as tf_fmt

    loaded = tf_fmt._load_savedmodel(Path(src))
    fn = tf_fmt.serving_function(loaded, Path(src))
    names = [s.name for s in ctx.source_signature.inputs]

    def call(args):
        out = fn(**dict(zip(names, args)))
        if not isinstance(out, dict):
            return tf_fmt.tf_flatten(out)
        return [out[s.name] for s in ctx.source_signature.outputs]

    return _tf_to_coreml(call, src, dst, ctx)


def graphdef_to_coreml(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    from ..formats import tensorflow as tf_fmt

    run = tf_fmt.GraphDefRunner(Path(src), ctx.load)
    return _tf_to_coreml(lambda args: list(run.fn(*args)), src, dst, ctx)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
