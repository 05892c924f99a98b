"""scikit-learn: detection by content, the runner, skl2onnx conversion with parity on
real rows of scikit-learn's bundled datasets (onnxruntime vs scikit-learn), and clear
refusals (unsupported estimators, poisoned pickles, unfitted models)."""

from __future__ import annotations

import operator
import os
import pickle

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_iris
from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from edgeops import convert as C
from edgeops import formats as F
from edgeops.convert.context import ConvertContext
from edgeops.convert.sklearn import sklearn_to_onnx
from edgeops.errors import ConversionError, FormatError, UnsafePickleError
from edgeops.formats import sklearn as sk
from edgeops.formats.base import LoadOptions, Signature, TensorSpec


def _data(loader):
    X, y = loader(return_X_y=True)
    return X.astype(np.float32), y


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (path, real float32 rows, kind). Saved in the ways people save them."""
    d = tmp_path_factory.mktemp("sk")
    Xd, yd = _data(load_digits)
    Xi, yi = _data(load_iris)
    Xb, yb = _data(load_breast_cancer)
    Xr, yr = _data(load_diabetes)
    out = {}
    rf = RandomForestClassifier(n_estimators=10, max_depth=6, random_state=0).fit(Xd, yd)
    joblib.dump(rf, d / "rf.joblib")                                   # plain joblib
    out["rf"] = (d / "rf.joblib", Xd, "classifier")
    lr = LogisticRegression(max_iter=500).fit(Xi, yi)
    (d / "logreg.pkl").write_bytes(pickle.dumps(lr, protocol=5))       # plain pickle
    out["logreg"] = (d / "logreg.pkl", Xi, "classifier")
    pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=500))]).fit(Xb, yb)
    joblib.dump(pipe, d / "pipe.joblib", compress=3)                   # zlib-compressed joblib
    out["pipeline"] = (d / "pipe.joblib", Xb, "classifier")
    gbr = GradientBoostingRegressor(n_estimators=20, max_depth=3, random_state=0).fit(Xr, yr)
    joblib.dump(gbr, d / "gbr.joblib", compress="gzip")                # gzip-compressed joblib
    out["gbr"] = (d / "gbr.joblib", Xr, "regressor")
    return out


def _ctx(src, opset=None, trust=False) -> ConvertContext:
    return ConvertContext("sklearn", "onnx", F.signature(src), {}, src.parent, opset=opset,
                          load=LoadOptions(trust_pickle=trust))


def _onnx_outputs(path, X):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"X": X})))


def test_detected_by_content_under_any_name(models, tmp_path):
    for name, (path, _, _) in models.items():
        odd = tmp_path / f"{name}.bin"
        odd.write_bytes(path.read_bytes())
        assert F.detect(odd).id == "sklearn", name


def test_signature_and_runner(models):
    path, X, _ = models["rf"]
    r = F.runner(path)
    sig = r.signature
    assert [(t.name, t.dtype, t.shape) for t in sig.inputs] == [("X", "float32", (None, 64))]
    assert [(t.name, t.dtype, t.shape) for t in sig.outputs] == [
        ("label", "int64", (None,)), ("probabilities", "float32", (None, 10))]
    out = r.run({"X": X[:5]})
    assert out["label"].dtype == np.int64 and out["probabilities"].dtype == np.float32
    path, X, _ = models["gbr"]
    r = F.runner(path)
    assert [(t.name, t.shape) for t in r.signature.outputs] == [("variable", (None, 1))]
    assert r.run({"X": X[:7]})["variable"].shape == (7, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rf", "logreg", "pipeline", "gbr"])
def test_to_onnx_parity_on_real_data(models, tmp_path, name):
    path, X, kind = models[name]
    dst = tmp_path / f"{name}.onnx"
    info = sklearn_to_onnx(path, dst, _ctx(path))
    assert info["tool"].startswith("skl2onnx ") and info["opset"] == {"": 17, "ai.onnx.ml": 3}
    ref = F.runner(path).run({"X": X})
    got = _onnx_outputs(dst, X)
    assert set(got) == set(ref), "ONNX outputs are named as the runner names them"
    if kind == "classifier":
        assert got["probabilities"].dtype == np.float32          # a tensor, not ZipMap dicts
        err = float(np.max(np.abs(got["probabilities"] - ref["probabilities"])))
        assert err < 1e-4, err
        assert np.array_equal(got["label"], ref["label"])
    else:
        err = float(np.max(np.abs(got["variable"] - ref["variable"])))
        rel = err / float(np.max(np.abs(ref["variable"])))
        # float32 thresholds and sums over 20 trees, outputs up to ~300
        assert rel < 1e-5 and err < 1e-3, (err, rel)


@pytest.mark.slow
def test_score_only_classifier(tmp_path):
    """LinearSVC's converter has no zipmap option: it is not passed (skl2onnx would refuse)."""
    from sklearn.svm import LinearSVC

    X, y = _data(load_iris)
    m = make_pipeline(StandardScaler(), LinearSVC()).fit(X, y)
    p = tmp_path / "svc.joblib"
    joblib.dump(m, p)
    sklearn_to_onnx(p, tmp_path / "svc.onnx", _ctx(p))
    assert np.array_equal(_onnx_outputs(tmp_path / "svc.onnx", X)["label"], m.predict(X))


@pytest.mark.slow
def test_opset_from_context(models, tmp_path):
    import onnx

    path, X, _ = models["logreg"]
    dst = tmp_path / "lr15.onnx"
    info = sklearn_to_onnx(path, dst, _ctx(path, opset=15))
    opsets = {o.domain: o.version for o in onnx.load(str(dst)).opset_import}
    assert info["opset"][""] == 15 and opsets.get("", opsets.get("ai.onnx")) <= 15


@pytest.mark.slow
def test_planner_with_string_labels(tmp_path):
    X, y = _data(load_breast_cancer)
    labels = np.where(y == 1, "benign", "malignant")
    pipe = make_pipeline(StandardScaler(), RandomForestClassifier(n_estimators=5, random_state=0))
    pipe.fit(X, labels)
    p = tmp_path / "bc.pkl"
    p.write_bytes(pickle.dumps(pipe, protocol=4))
    assert sk.signature_of(pipe).outputs[0].dtype == "str"
    np.savez(tmp_path / "bc.npz", X=X[:80])
    rep = C.convert(p, tmp_path / "bc.onnx", inputs=tmp_path / "bc.npz")
    assert rep.passed, rep.message
    out = rep.hops[0].parity.outputs[0]
    assert out.name == "label" and out.agreement == 1.0
    got = _onnx_outputs(tmp_path / "bc.onnx", X[:80])
    assert list(got["label"][:3]) == list(pipe.predict(X[:3]))       # skl2onnx emits strings


def test_inspect(models):
    from edgeops.inspect import inspect_model

    info = inspect_model(models["pipeline"][0])   # scaler + logistic regression, 30 features
    assert info["estimator"] == "Pipeline" and info["n_features_in"] == 30
    assert info["steps"] == ["scale: StandardScaler", "clf: LogisticRegression"]
    # scaler: mean_, var_, scale_; logreg: coef_ 1x30 + intercept_ 1
    assert info["params"] == 3 * 30 + 30 + 1
    assert info["signature"]["outputs"][1]["shape"] == [None, 2]
    info = inspect_model(models["rf"][0])
    assert info["estimator"] == "RandomForestClassifier" and info["params"] > 10 * 10


@pytest.mark.slow
def test_unsupported_estimator_named(tmp_path):
    X, y = _data(load_iris)
    p = tmp_path / "nc.joblib"
    joblib.dump(NearestCentroid().fit(X, y), p)
    with pytest.raises(ConversionError, match="skl2onnx has no converter for NearestCentroid"):
        sklearn_to_onnx(p, tmp_path / "nc.onnx", _ctx(p))
    # inside a pipeline: the inner estimator is named, not the Pipeline
    p = tmp_path / "pipe_nc.joblib"
    joblib.dump(make_pipeline(StandardScaler(), NearestCentroid()).fit(X, y), p)
    with pytest.raises(ConversionError, match="NearestCentroid"):
        C.convert(p, tmp_path / "pipe_nc.onnx")


def test_poisoned_pickle_through_the_format_loader(tmp_path):
    marker = tmp_path / "MARKER"
    X, y = _data(load_iris)
    model = make_pipeline(FunctionTransformer(np.log1p), LogisticRegression(max_iter=300)).fit(X, y)
    model.steps[0][1].func = os.system
    model.steps[0][1].kw_args = {"command": f"touch {marker}"}
    p = tmp_path / "model.bin"
    joblib.dump(model, p, compress=3)
    assert F.detect(p).id == "sklearn"
    for call in (lambda: sk.load(p), lambda: F.runner(p), lambda: sk.inspect(p),
                 lambda: sklearn_to_onnx(p, tmp_path / "m.onnx", _ctx_untrusted(p))):
        with pytest.raises(UnsafePickleError, match=r"refusing to load model\.bin: it references posix\.system"):
            call()
    assert not marker.exists()


def _ctx_untrusted(p):
    sig = Signature((TensorSpec("X", "float32", (None, 4)),), ())
    return ConvertContext("sklearn", "onnx", sig, {}, p.parent)


def test_trust_pickle_loads_an_off_list_global(tmp_path):
    """A harmless function off the list is refused like any other, until trusted."""
    X, y = _data(load_iris)
    m = make_pipeline(FunctionTransformer(operator.neg), LogisticRegression(max_iter=300)).fit(X, y)
    p = tmp_path / "neg.joblib"
    joblib.dump(m, p)
    with pytest.raises(UnsafePickleError, match="_operator.neg"):
        F.runner(p)
    r = F.runner(p, opts=LoadOptions(trust_pickle=True))
    assert np.array_equal(r.run({"X": X})["label"], m.predict(X))


def test_not_an_estimator_and_unfitted(tmp_path):
    p = tmp_path / "unfitted.joblib"
    joblib.dump(RandomForestClassifier(), p)
    with pytest.raises(FormatError, match="not fitted"):
        F.runner(p)
    p = tmp_path / "scaler_dict.joblib"   # names sklearn, but is no estimator
    joblib.dump({"scaler": StandardScaler, "n": 3}, p)
    assert F.detect(p).id == "sklearn"
    with pytest.raises(FormatError, match="not a scikit-learn estimator"):
        F.runner(p)


def test_truncated_pickle(models, tmp_path):
    data = models["rf"][0].read_bytes()
    p = tmp_path / "cut.joblib"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated or corrupt"):
        F.runner(p)
