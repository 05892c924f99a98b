"""Keras (.h5 from Keras 3 and tf-keras, .keras) and TensorFlow (SavedModel, frozen
GraphDef): detection by content, refusals, runners, and tf2onnx conversion checked
against onnxruntime on the same random inputs.

Models are tiny and built once per module (see tests/_tf_models.py).
"""

from __future__ import annotations

import importlib
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

import _tf_models as M
from edgeops.convert import tensorflow as C
from edgeops.convert.context import ConvertContext
from edgeops.errors import ConversionError, FormatError, UnsafePickleError
from edgeops.formats import FAMILIES
from edgeops.formats import keras as K
from edgeops.formats import onnx as O
from edgeops.formats import tensorflow as T
from edgeops.formats.base import LoadOptions, Probe
from edgeops.verify import make_inputs, verify

pytest.importorskip("tensorflow")  # the tensorflow extra; installed in CI
pytestmark = pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5")

ATOL = 1e-4

# name -> (builder, file name, expected format id)
CASES = {
    "keras3-mlp-h5": (M.keras3_mlp, "mlp.h5", "keras-h5"),
    "keras3-mlp-keras": (M.keras3_mlp, "mlp.keras", "keras-v3"),
    "keras3-cnn-h5": (M.keras3_cnn, "cnn.h5", "keras-h5"),
    "keras3-cnn-keras": (M.keras3_cnn, "cnn.keras", "keras-v3"),
    "keras3-two-io-keras": (M.keras3_two_io, "two_io.keras", "keras-v3"),
    "keras3-sequential-h5": (M.keras3_sequential, "seq.h5", "keras-h5"),
    "tfkeras-mlp-h5": (M.tfkeras_mlp_h5, "tk_mlp.h5", "keras-h5"),
    "tfkeras-cnn-h5": (M.tfkeras_cnn_h5, "tk_cnn.h5", "keras-h5"),
    "savedmodel-module": (M.saved_model, "sm", "savedmodel"),
    "savedmodel-keras-export": (M.keras3_export, "sm_export", "savedmodel"),
    "graphdef": (M.frozen_graphdef, "frozen.pb", "graphdef"),
}

CONVERTERS = {"keras-h5": C.keras_to_onnx, "keras-v3": C.keras_to_onnx,
              "savedmodel": C.savedmodel_to_onnx, "graphdef": C.graphdef_to_onnx}
MODULES = {"keras-h5": K, "keras-v3": K, "savedmodel": T, "graphdef": T}
# formats.get_format imports every family; some are still being written in parallel
OWN_FORMATS = {i.id: i for i in K.FORMATS + T.FORMATS + O.FORMATS}


def detect(path) -> str:
    """edgeops.formats.detect over the families that exist (others are written in
    parallel): same order, same refusal handling."""
    probe = Probe(path)
    for fam in FAMILIES:
        try:
            mod = importlib.import_module(f"edgeops.formats.{fam}")
        except ModuleNotFoundError as exc:
            if exc.name == f"edgeops.formats.{fam}":
                continue
            raise
        fmt = mod.detect(probe)
        if fmt:
            info = OWN_FORMATS.get(fmt)
            if info is not None and info.refused:
                raise FormatError(f"{path}: {info.description}: {info.refused}")
            return fmt
    raise FormatError(f"{path}: unknown format")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tfmodels")
    return {name: builder(d / fname) for name, (builder, fname, _) in CASES.items()}


# ----------------------------------------------------------------------------- detection

@pytest.mark.parametrize("name", list(CASES))
def test_detect_by_content(built, name, tmp_path):
    path, want = built[name], CASES[name][2]
    assert detect(path) == want
    # a misleading name: content wins
    if path.is_file():
        odd = tmp_path / "model.bin"
        shutil.copy(path, odd)
        assert detect(odd) == want


def test_misleading_name_still_loads_and_runs(built, tmp_path):
    odd = tmp_path / "weights.onnx"  # a Keras .h5 under an ONNX name
    shutil.copy(built["keras3-cnn-h5"], odd)
    assert detect(odd) == "keras-h5"
    r = K.runner(odd, "keras-h5")
    out = r.run(make_inputs(r.signature))
    assert out["logits"].shape == (2, M.CLASSES)


def test_saved_model_pb_in_place_is_the_directory(built):
    pb = built["savedmodel-module"] / "saved_model.pb"
    assert detect(pb) == "savedmodel"
    assert T.signature(pb, "savedmodel").inputs[0].name == "x"


def test_saved_model_pb_alone_asks_for_the_directory(built, tmp_path):
    lonely = tmp_path / "model.pb"
    shutil.copy(built["savedmodel-module"] / "saved_model.pb", lonely)
    with pytest.raises(FormatError, match="pass the SavedModel directory"):
        detect(lonely)


def test_other_files_not_claimed(built, tmp_path):
    onnx_path = tmp_path / "m.onnx"
    sig = K.signature(built["keras3-mlp-h5"], "keras-h5")
    ctx = ConvertContext("keras-h5", "onnx", sig, make_inputs(sig), tmp_path)
    C.keras_to_onnx(built["keras3-mlp-h5"], onnx_path, ctx)
    for path in (onnx_path,):
        assert T.detect(Probe(path)) is None and K.detect(Probe(path)) is None
    # a zip with a config.json is not a Keras model by itself
    z = tmp_path / "other.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("config.json", "{}")
        f.writestr("metadata.json", '{"app": "x"}')
    assert K.detect(Probe(z)) is None
    # an HDF5 file that is not Keras
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["x"] = np.arange(3)
    assert K.detect(Probe(tmp_path / "data.h5")) is None
    text = tmp_path / "notes.pb"
    text.write_text("\n\nnot a graph\n")
    assert T.detect(Probe(text)) is None


# ----------------------------------------------------------------------------- refusals

def test_weights_only_refused(tmp_path):
    import keras
    import tf_keras

    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Dense(2)(inp)).save_weights(tmp_path / "k3.weights.h5")
    ti = tf_keras.Input((4,))
    tm = tf_keras.Model(ti, tf_keras.layers.Dense(2)(ti))
    tm.save_weights(str(tmp_path / "legacy.h5"))  # Keras 2 layout: layer_names at the root
    for p in (tmp_path / "k3.weights.h5", tmp_path / "legacy.h5"):
        with pytest.raises(FormatError, match=r"weights only \(no model architecture"):
            detect(p)
        with pytest.raises(FormatError, match=r"model\.save\('model\.keras'\)"):
            detect(p)


def test_truncated_files_are_format_errors(built, tmp_path):
    for name, suffix in (("keras3-cnn-h5", ".h5"), ("keras3-cnn-keras", ".keras"), ("graphdef", ".pb")):
        data = built[name].read_bytes()
        for frac in (0.3, 0.9):
            cut = tmp_path / f"cut{frac}{suffix}"
            cut.write_bytes(data[: int(len(data) * frac)])
            with pytest.raises(FormatError, match="truncated or corrupt"):
                detect(cut)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(built["tfkeras-cnn-h5"].read_bytes()[:5000])
    with pytest.raises(FormatError, match="truncated") as ei:
        K.load(cut, "keras-h5")
    assert isinstance(ei.value.__cause__, OSError)  # h5py's error kept as the cause


def test_savedmodel_without_serving_default(tmp_path):
    sm = M.saved_model(tmp_path / "sm", signatures=False)
    assert detect(sm) == "savedmodel"
    with pytest.raises(FormatError, match=r"no 'serving_default'.*found: predict"):
        T.runner(sm, "savedmodel")


def test_lambda_layer_needs_trust(tmp_path):
    import keras

    inp = keras.Input((4,), name="x")
    keras.Model(inp, keras.layers.Lambda(lambda t: t * 3.0, name="triple")(inp)).save(tmp_path / "lam.h5")
    with pytest.raises(UnsafePickleError, match="triple"):
        K.load(tmp_path / "lam.h5", "keras-h5")
    r = K.runner(tmp_path / "lam.h5", "keras-h5", LoadOptions(trust_pickle=True))
    np.testing.assert_allclose(r.run({"x": np.ones((1, 4), "float32")})["triple"], 3.0)


def test_custom_object_missing(tmp_path):
    import keras

    @keras.saving.register_keras_serializable(package="edgeops_test")
    class Twice(keras.layers.Layer):
        def call(self, x):
            return x * 2

    inp = keras.Input((4,))
    model = keras.Model(inp, Twice(name="twice")(inp))
    model.save(tmp_path / "c.keras")
    model.save(tmp_path / "c.h5")
    objs = keras.saving.get_custom_objects()
    for k in [k for k in objs if k.startswith("edgeops_test")]:
        del objs[k]
    for p, fmt in ((tmp_path / "c.keras", "keras-v3"), (tmp_path / "c.h5", "keras-h5")):
        with pytest.raises(FormatError, match=r"custom object '[^']*Twice'.*not registered"):
            K.load(p, fmt)


@pytest.mark.slow
@pytest.mark.parametrize("builder,fmt,op", [
    (M.unsupported_op_graphdef, "graphdef", "Igamma"),
    (M.unsupported_op_saved_model, "savedmodel", "Lgamma"),
])
def test_unconverted_op_is_a_conversion_error(tmp_path, builder, fmt, op):
    src = builder(tmp_path / ("m.pb" if fmt == "graphdef" else "sm"))
    r = T.runner(src, fmt)
    feeds = make_inputs(r.signature)
    feeds = {k: np.abs(v) + 0.5 for k, v in feeds.items()}
    assert all(np.isfinite(v).all() for v in r.run(feeds).values())  # the source runs
    ctx = ConvertContext(fmt, "onnx", r.signature, feeds, tmp_path)
    with pytest.raises(ConversionError, match=rf"tf2onnx.*{op}"):
        CONVERTERS[fmt](src, tmp_path / "out.onnx", ctx)
    assert not (tmp_path / "out.onnx").exists()


# ----------------------------------------------------------------------------- parity

MEASURED: dict[str, float] = {}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_convert_to_onnx_parity(built, name, tmp_path, record_property):
    src, fmt = built[name], CASES[name][2]
    ref = MODULES[fmt].runner(src, fmt, LoadOptions())
    feeds = make_inputs(ref.signature, seed=3)
    ctx = ConvertContext(fmt, "onnx", ref.signature, feeds, tmp_path)
    dst = tmp_path / "model.onnx"
    info = CONVERTERS[fmt](src, dst, ctx)
    assert info["tool"].startswith("tf2onnx ") and info["opset"] == 17

    cand = O.runner(dst)
    # names line up, so verify matches by name
    assert [s.name for s in cand.signature.inputs] == [s.name for s in ref.signature.inputs]
    assert [s.name for s in cand.signature.outputs] == [s.name for s in ref.signature.outputs]
    ref_out, cand_out = ref.run(feeds), cand.run(feeds)
    max_abs = max(float(np.max(np.abs(ref_out[k] - cand_out[k]))) for k in ref_out)
    MEASURED[name] = max_abs
    record_property("max_abs", max_abs)
    print(f"{name}: max abs {max_abs:.3g}")
    assert max_abs <= ATOL
    report = verify(ref, cand, feeds)
    assert report.passed, report.summary()
    assert O.inspect(dst)["opset"]["ai.onnx"] == 17


def test_tfkeras_file_runs_like_tf_keras(built):
    """Keras 3 reads the tf-keras .h5; its outputs must be tf-keras's own outputs."""
    import tf_keras

    path = built["tfkeras-cnn-h5"]
    r = K.runner(path, "keras-h5")
    feeds = make_inputs(r.signature, seed=5)
    ours = r.run(feeds)["logits"]
    theirs = tf_keras.models.load_model(str(path), compile=False)(feeds["image"], training=False).numpy()
    assert float(np.max(np.abs(ours - theirs))) <= 1e-5


def test_graphdef_io_names_override(built):
    opts = LoadOptions(input_names=("x:0",), output_names=("Identity:0",))
    sig = T.signature(built["graphdef"], "graphdef", opts)
    assert [s.name for s in sig.inputs] == ["x"] and [s.name for s in sig.outputs] == ["Identity"]
    with pytest.raises(FormatError, match="no tensor 'nope'"):
        T.signature(built["graphdef"], "graphdef", LoadOptions(output_names=("nope",)))


# ----------------------------------------------------------------------------- inspect

def test_inspect(built):
    info = K.inspect(built["keras3-mlp-h5"], "keras-h5")
    assert info["params"] == 8 * 16 + 16 + 16 * M.CLASSES + M.CLASSES
    assert info["written_by"]["keras_version"].startswith("3.")
    assert info["layers"] == 3 and info["inputs"][0]["shape"] == [None, 8]
    tk = K.inspect(built["tfkeras-cnn-h5"], "keras-h5")
    assert tk["written_by"]["keras_version"].startswith("2.")
    assert tk["layer_types"]["BatchNormalization"] == 1
    v3 = K.inspect(built["keras3-cnn-keras"], "keras-v3")
    assert v3["params"] == tk["params"] and v3["written_by"]["keras_version"].startswith("3.")

    module_params = 3 * 3 * 3 * 4 + 4 * M.CLASSES + M.CLASSES
    sm = T.inspect(built["savedmodel-module"], "savedmodel")
    assert sm["params"] == module_params and sm["signatures"] == ["serving_default"]
    assert sm["outputs"][0]["name"] == "logits"
    gd = T.inspect(built["graphdef"], "graphdef")
    assert gd["params"] == module_params and gd["ops"].get("Conv2D") == 1
    assert gd["inputs"][0] == {"name": "x", "dtype": "float32", "shape": [None, 16, 16, 3]}


@pytest.mark.slow
def test_savedmodel_with_captured_constants(tmp_path):
    """Weights captured as constants (as onnx2tf writes SavedModels) must not turn into
    extra ONNX inputs; params count them."""
    import tensorflow as tf

    from edgeops import convert as C
    from edgeops.inspect import inspect_model

    class M(tf.Module):
        def __init__(self):
            self.w = tf.constant(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32))
            self.b = tf.constant(np.ones(3, np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def __call__(self, x):
            return {"y": tf.matmul(x, self.w) + self.b}

    m = M()
    tf.saved_model.save(m, str(tmp_path / "sm"), signatures=m.__call__)
    rep = C.convert(tmp_path / "sm", tmp_path / "sm.onnx")
    assert rep.passed, rep.message
    assert inspect_model(tmp_path / "sm")["params"] >= 15
