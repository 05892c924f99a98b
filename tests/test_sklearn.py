"""scikit-learn: detection by content, the runner, skl2onnx conversion with parity on
real data from scikit-learn's bundled datasets, and clear refusals."""

from __future__ import annotations

import pickle

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from edgeops import convert as C
from edgeops import formats as F
from edgeops.errors import ConversionError, FormatError
from edgeops.formats import onnx as onnx_fmt
from edgeops.samples import sklearn_models
from edgeops.verify import load_inputs, verify


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return sklearn_models(tmp_path_factory.mktemp("sk"))


def test_detected_by_content_under_any_name(models, tmp_path):
    for s in models:
        odd = tmp_path / f"{s.name}.bin"
        odd.write_bytes(s.path.read_bytes())
        assert F.detect(odd).id == "sklearn"


@pytest.mark.slow
@pytest.mark.parametrize("idx,bound", [(0, 1e-5), (1, 1e-5), (2, 1e-5), (3, 1e-3)])
def test_to_onnx_parity_on_real_data(models, tmp_path, idx, bound):
    s = models[idx]
    out = tmp_path / "m.onnx"
    rep = C.convert(s.path, out, inputs=s.inputs)
    assert rep.passed, rep.message
    # independently of the planner: scikit-learn vs onnxruntime on the real rows
    ref, cand = F.runner(s.path), onnx_fmt.runner(out)
    feeds = load_inputs(s.inputs, ref.signature)
    par = verify(ref, cand, feeds)
    assert par.passed and par.max_abs < bound
    names = [o.name for o in cand.signature.outputs]
    if idx < 3:   # classifiers: tensors, not ZipMap dicts
        assert names == ["label", "probabilities"]
        assert cand.signature.outputs[1].dtype == "float32"
        assert next(o for o in par.outputs if o.name == "label").agreement == 1.0
    else:
        assert names == ["variable"]


@pytest.mark.slow
def test_string_labels_and_plain_pickle(tmp_path):
    X, y = load_breast_cancer(return_X_y=True)
    labels = np.where(y == 1, "benign", "malignant")
    pipe = make_pipeline(StandardScaler(), RandomForestClassifier(n_estimators=5, random_state=0))
    pipe.fit(X, labels)
    p = tmp_path / "bc.pkl"
    p.write_bytes(pickle.dumps(pipe, protocol=4))
    np.savez(tmp_path / "bc.npz", X=X[:80].astype(np.float32))
    rep = C.convert(p, tmp_path / "bc.onnx", inputs=tmp_path / "bc.npz")
    assert rep.passed, rep.message
    out = rep.hops[0].parity.outputs[0]
    assert out.name == "label" and out.agreement == 1.0


def test_inspect(models):
    from edgeops.inspect import inspect_model

    info = inspect_model(models[2].path)   # scaler + logistic regression on digits
    assert info["estimator"] == "Pipeline" and info["n_features_in"] == 64
    # scaler: mean_, var_, scale_ (64 each, + n_samples_seen_); logreg: coef_ 10x64 + intercept_ 10
    assert info["params"] >= 3 * 64 + 640 + 10
    assert info["signature"]["outputs"][1]["shape"] == [None, 10]


def test_unsupported_estimator_named(tmp_path):
    X, y = load_iris(return_X_y=True)
    p = tmp_path / "nc.joblib"
    joblib.dump(NearestCentroid().fit(X, y), p)
    with pytest.raises(ConversionError, match="skl2onnx has no converter for NearestCentroid"):
        C.convert(p, tmp_path / "nc.onnx")


def test_truncated_pickle(models, tmp_path):
    data = models[0].path.read_bytes()
    p = tmp_path / "cut.joblib"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated or corrupt"):
        F.runner(p)


def test_unfitted_estimator_refused(tmp_path):
    p = tmp_path / "unfitted.joblib"
    joblib.dump(RandomForestClassifier(), p)
    with pytest.raises(FormatError, match="not fitted"):
        F.runner(p)
