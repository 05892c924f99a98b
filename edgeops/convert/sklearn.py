"""scikit-learn -> ONNX with skl2onnx.

Classifiers get `zipmap: False`, so probabilities come out as a tensor (not a list of
dicts that onnxruntime returns as Python objects and that other runtimes reject). The
estimator is loaded through the pickle gate (edgeops.safety). Inputs are float32, the
type edge runtimes use; verification measures what that costs against scikit-learn's
float64 arithmetic.

Not covered: estimators skl2onnx has no converter for (refused with their class name),
custom transformers, sparse or string inputs.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConversionError
from ..extras import require
from ..formats import sklearn as sk_fmt
from .context import ConvertContext

DEFAULT_OPSET = {"": 17, "ai.onnx.ml": 3}


def _classifiers(model) -> list:
    """Every classifier inside the model (the model itself, pipeline steps, ensembles)."""
    base = require("sklearn.base")
    found, stack = [], [model]
    while stack:
        m = stack.pop()
        if base.is_classifier(m):
            found.append(m)
        stack += [s for _, s in getattr(m, "steps", [])]
        stack += [t[1] for t in getattr(m, "transformer_list", [])]
        stack += [t[1] for t in getattr(m, "transformers_", []) if hasattr(t[1], "get_params")]
    return found


def sklearn_to_onnx(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    skl2onnx = require("skl2onnx")
    from skl2onnx.common.data_types import FloatTensorType

    model = sk_fmt.load(src, "sklearn", ctx.load)
    opset = dict(DEFAULT_OPSET)
    if ctx.opset:
        opset[""] = ctx.opset
    options = {id(c): {"zipmap": False} for c in _classifiers(model)}
    try:
        onx = skl2onnx.convert_sklearn(
            model, initial_types=[("X", FloatTensorType([None, int(model.n_features_in_)]))],
            target_opset=opset, options=options or None)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "shape calculator" in msg or "converter" in msg.lower() or type(exc).__name__.startswith("Missing"):
            raise ConversionError(
                f"skl2onnx has no converter for {_unsupported_name(msg, model)}",
                hint="skl2onnx supports most scikit-learn estimators; custom estimators "
                     "need a registered converter (skl2onnx.update_registered_converter)") from exc
        raise ConversionError(f"skl2onnx failed on {type(model).__name__}: {msg[:300]}") from exc
    dst.write_bytes(onx.SerializeToString())
    return {"tool": f"skl2onnx {skl2onnx.__version__}", "opset": opset,
            "estimator": type(model).__name__, "zipmap": False}


def _unsupported_name(msg: str, model) -> str:
    import re

    m = re.search(r"type '?<class '([\w.]+)'>'?", msg) or re.search(r"for type '([\w.]+)'", msg)
    return m.group(1).rsplit(".", 1)[-1] if m else type(model).__name__
