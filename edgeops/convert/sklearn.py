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
        if base.is_classifier(m) and not hasattr(m, "steps"):
            found.append(m)   # a pipeline's option is its final step's: set it there
        stack += [s for _, s in getattr(m, "steps", [])]
        stack += [t[1] for t in getattr(m, "transformer_list", [])]
        stack += [t[1] for t in getattr(m, "transformers_", []) if hasattr(t[1], "get_params")]
    return found


def _takes_zipmap(model) -> bool:
    """Whether skl2onnx's converter for this class has a zipmap option (LinearSVC and other
    score-only classifiers have none, and skl2onnx rejects unknown options)."""
    try:
        from skl2onnx._supported_operators import sklearn_operator_name_map
        from skl2onnx.common._registration import get_converter

        allowed = get_converter(sklearn_operator_name_map[type(model)]).get_allowed_options()
    except Exception:  # an unregistered class (conversion will say so) or another skl2onnx
        return True
    return allowed is None or "zipmap" in allowed


def sklearn_to_onnx(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    skl2onnx = require("skl2onnx")
    from skl2onnx.common.data_types import FloatTensorType

    model = sk_fmt.load(src, "sklearn", ctx.load)
    opset = dict(DEFAULT_OPSET)
    if ctx.opset:
        opset[""] = ctx.opset
    # an empty entry for the others: skl2onnx's pipeline parser would otherwise give them
    # {"zipmap": True} itself and then reject it ("Option 'zipmap' not in ...")
    options = {id(c): {"zipmap": False} if _takes_zipmap(c) else {} for c in _classifiers(model)}
    try:
        onx = skl2onnx.convert_sklearn(
            model, initial_types=[("X", FloatTensorType([None, int(model.n_features_in_)]))],
            target_opset=opset, options=options or None)
    except Exception as exc:
        msg = _first_line(exc).split(" and attributes=")[0]   # skl2onnx dumps whole arrays
        if "shape calculator" in msg or "converter" in msg.lower() or type(exc).__name__.startswith("Missing"):
            raise ConversionError(
                f"skl2onnx has no converter for {_unsupported_name(msg, model)}",
                hint="skl2onnx supports most scikit-learn estimators; custom estimators "
                     "need a registered converter (skl2onnx.update_registered_converter)") from exc
        root = exc
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        why = msg if root is exc else f"{msg[:120]}: {_first_line(root)}"
        raise ConversionError(
            f"skl2onnx {skl2onnx.__version__} failed on {type(model).__name__}: {why[:300]}",
            hint="the converter does not handle this estimator or these settings; "
                 "check skl2onnx's supported versions of scikit-learn") from exc
    dst.write_bytes(onx.SerializeToString())
    return {"tool": f"skl2onnx {skl2onnx.__version__}", "opset": opset,
            "estimator": type(model).__name__, "zipmap": False}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unsupported_name(msg: str, model) -> str:
    import re

    m = re.search(r"type '?<class '([\w.]+)'>'?", msg) or re.search(r"for type '([\w.]+)'", msg)
    return m.group(1).rsplit(".", 1)[-1] if m else type(model).__name__
