"""scikit-learn estimators saved with pickle or joblib (plain or compressed).

Detection walks the pickle's opcodes (never loads) and claims files that reference
scikit-learn -- or that reference globals off the allow-list, so that loading them
gives the unsafe-pickle refusal rather than "unknown format". Every load goes through
edgeops.safety, the single pickle gate.

The runner and signature name outputs exactly as skl2onnx does, so verification matches an
estimator with its ONNX export by name: classifiers "label" (int64, or str for string
classes) and "probabilities" (float32) -- skl2onnx's names with ZipMap off, which edgeops
always asks for ("output_label"/"output_probability" are its names with ZipMap on);
regressors and transformers "variable" (float32, [N, n_out]). Not covered: estimators without
n_features_in_ (fitted before scikit-learn 1.0), sparse inputs, string features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import safety
from ..errors import FormatError
from ..extras import require
from .base import FormatInfo, LoadOptions, Probe, Signature, TensorSpec

FORMATS = (
    FormatInfo("sklearn", "sklearn", "scikit-learn estimator (pickle/joblib)", "sklearn",
               suffixes=(".pkl", ".pickle", ".joblib")),
)


def detect(probe: Probe) -> str | None:
    if probe.is_dir or probe.is_zip or probe.is_hdf5 or not probe.head:
        return None
    kind = safety.compression_of(probe.head[:8])
    if kind == "lz4":
        return "sklearn"   # joblib's lz4 files; loading says so if lz4 is not installed
    head = safety.head_decompressed(probe.head)
    if not head or not safety.looks_like_pickle(head):
        return None
    # bounded: the classes come first in a pickle, the bulk of the bytes are arrays
    scan = safety.scan_pickle(probe.path, limit=DETECT_LIMIT)
    if head[:1] != b"\x80" and scan.pickles == 0:
        return None   # protocol 0/1 has no magic: only a stream that parses to STOP counts
    if scan.references("torch"):
        return None  # a torch pickle: the torch family (which runs first) owns those
    if scan.references("sklearn"):
        return "sklearn"
    if safety.unsafe_globals(scan):
        return "sklearn"  # loading it gives the unsafe-pickle refusal, never a load
    return None


DETECT_LIMIT = 64 << 20


def load(path: Path, fmt: str = "sklearn", opts: LoadOptions | None = None):
    opts = opts or LoadOptions()
    require("sklearn")
    model = safety.safe_load(path, trust=opts.trust_pickle)
    if not (hasattr(model, "predict") or hasattr(model, "transform")):
        raise FormatError(f"{path}: the pickle holds a {type(model).__name__}, "
                          "not a scikit-learn estimator")
    if not hasattr(model, "n_features_in_"):
        raise FormatError(f"{path}: the {type(model).__name__} is not fitted "
                          "(or was fitted before scikit-learn 1.0): no n_features_in_")
    return model


def save(obj, path: Path, fmt: str = "sklearn") -> None:
    require("joblib").dump(obj, path)


def _kind(model) -> str:
    base = require("sklearn.base")
    final = model.steps[-1][1] if hasattr(model, "steps") else model
    if base.is_classifier(final):
        return "classifier"
    if base.is_regressor(final):
        return "regressor"
    return "transformer"


def signature_of(model) -> Signature:
    n = int(model.n_features_in_)
    ins = (TensorSpec("X", "float32", (None, n)),)
    kind = _kind(model)
    if kind == "classifier":
        classes = np.asarray(model.classes_)
        label_dtype = "str" if classes.dtype.kind in "USO" else "int64"
        outs = [TensorSpec("label", label_dtype, (None,))]
        if hasattr(model, "predict_proba"):
            outs.append(TensorSpec("probabilities", "float32", (None, len(classes))))
        return Signature(ins, tuple(outs))
    if kind == "regressor":
        return Signature(ins, (TensorSpec("variable", "float32", (None, _n_targets(model))),))
    return Signature(ins, (TensorSpec("variable", "float32", (None, _n_out(model))),))


def _n_targets(model) -> int:
    final = model.steps[-1][1] if hasattr(model, "steps") else model
    return int(getattr(final, "n_outputs_", 1) or 1)


def _n_out(model) -> int | None:
    """Width of transform()'s output, from scikit-learn's feature names (None if unknown)."""
    try:
        return len(model.get_feature_names_out())
    except Exception:  # not every transformer implements it (or it needs input names)
        return None


def signature(path: Path, fmt: str = "sklearn", opts: LoadOptions | None = None) -> Signature:
    return signature_of(load(path, fmt, opts))


class SklearnRunner:
    def __init__(self, model):
        self.model = model
        self.signature = signature_of(model)
        self.kind = _kind(model)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        X = np.asarray(next(iter(feeds.values())), dtype=np.float32)
        m = self.model
        if self.kind == "classifier":
            label = np.asarray(m.predict(X))
            out = {"label": label.astype(str) if label.dtype.kind in "USO" else label.astype(np.int64)}
            if hasattr(m, "predict_proba"):
                out["probabilities"] = np.asarray(m.predict_proba(X), dtype=np.float32)
            return out
        if self.kind == "regressor":
            return {"variable": np.asarray(m.predict(X), dtype=np.float32).reshape(len(X), -1)}
        return {"variable": np.asarray(m.transform(X), dtype=np.float32)}


def runner(path: Path, fmt: str = "sklearn", opts: LoadOptions | None = None) -> SklearnRunner:
    return SklearnRunner(load(path, fmt, opts))


# fitted attributes that describe the fit rather than hold learned values
_NOT_PARAMS = {"classes_", "n_iter_", "n_features_in_", "feature_names_in_", "n_samples_seen_",
               "n_outputs_", "n_classes_", "train_score_", "oob_improvement_", "oob_scores_",
               "oob_score_", "loss_curve_", "validation_scores_", "validation_score_",
               "estimators_samples_", "n_estimators_", "n_trees_per_iteration_"}


def _learned_values(obj, seen: set[int]) -> int:
    """Numbers learned by fit: numeric array attributes ending in '_' (coef_, intercept_,
    mean_ ...), tree nodes, and the same inside sub-estimators and pipeline steps."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    total = 0
    tree = getattr(obj, "tree_", None)
    if tree is not None and hasattr(tree, "node_count"):
        # per node: feature, threshold, two children, and the value vector
        total += int(tree.node_count) * (4 + int(np.prod(tree.value.shape[1:])))
    for key, val in vars(obj).items():
        if key == "tree_" or not key.endswith("_") or key.startswith("_") or key in _NOT_PARAMS:
            continue
        total += _values_in(val, seen)
    for _, step in getattr(obj, "steps", []):
        if hasattr(step, "get_params"):
            total += _learned_values(step, seen)
    return total


def _values_in(val, seen: set[int]) -> int:
    if isinstance(val, np.ndarray) and val.dtype.kind in "fiu":
        return int(val.size)
    if hasattr(val, "get_params"):
        return _learned_values(val, seen)
    if isinstance(val, (list, tuple)):
        return sum(_values_in(item, seen) for item in val)
    if isinstance(val, np.ndarray) and val.dtype.kind == "O":
        return sum(_values_in(item, seen) for item in val.ravel())
    return 0


def inspect(path: Path, fmt: str = "sklearn", opts: LoadOptions | None = None) -> dict:
    model = load(path, fmt, opts)
    info = {
        "params": _learned_values(model, set()),
        "params_note": "values learned by fit (coefficients, tree nodes)",
        "estimator": type(model).__name__,
        "task": _kind(model),
        "n_features_in": int(model.n_features_in_),
    }
    if hasattr(model, "steps"):
        info["steps"] = [f"{name}: {type(step).__name__}" for name, step in model.steps]
    if hasattr(model, "classes_"):
        info["classes"] = len(model.classes_)
    return info
