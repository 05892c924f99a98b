"""Core ML: real conversions from every source family edgeops reads (TorchScript, .pt2,
Keras 3 .h5/.keras, tf-keras .h5, SavedModel, frozen GraphDef) to .mlpackage (ML
program) and .mlmodel (neural network), then detection by content, signature, parameter
counts against the source, precision, lineage metadata, validation of broken files, and
the honest "not executed" on Linux. Models are built here, tiny, and seeded.

Parity cannot be measured here: Core ML has no runtime off Apple platforms, which is
exactly what test_not_executed_on_linux pins down.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from edgeops import convert as C  # noqa: E402
from edgeops import formats as F  # noqa: E402
from edgeops.convert import coreml as CC  # noqa: E402
from edgeops.convert.context import ConvertContext  # noqa: E402
from edgeops.errors import ConversionError, FormatError, NotExecutableError, UsageError  # noqa: E402
from edgeops.formats import coreml as CM  # noqa: E402
from edgeops.verify import make_inputs  # noqa: E402

pytestmark = pytest.mark.slow

ON_MAC = sys.platform == "darwin"


# ----------------------------------------------------------------------------- sources

class Src:
    """A source model and what Core ML should keep of it."""

    def __init__(self, path: Path, fmt: str, params: int, coreml_params: int, why: str = ""):
        self.path, self.fmt, self.params, self.coreml_params, self.why = path, fmt, params, coreml_params, why


def _torch_sources(d: Path) -> dict[str, Src]:
    import torch
    from torch import nn

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.pool = nn.MaxPool2d(2)
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.gap(self.pool(torch.relu(self.bn(self.conv(x))))), 1))

    torch.manual_seed(0)
    cnn = CNN().eval()
    with torch.no_grad():   # non-trivial statistics, so the folded BatchNorm matters
        cnn.bn.running_mean.uniform_(-0.5, 0.5)
        cnn.bn.running_var.uniform_(0.5, 2.0)
    mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x_img, x_vec = torch.randn(2, 1, 8, 8), torch.randn(2, 64)
    torch.jit.trace(cnn, x_img).save(str(d / "cnn.pt"))
    torch.jit.trace(mlp, x_vec).save(str(d / "mlp.pt"))
    torch.export.save(torch.export.export(cnn, (x_img,)), str(d / "cnn.pt2"))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    folded = n(cnn.conv) + n(cnn.fc)   # BatchNorm (gamma, beta + 2 running stats) folds into conv
    why = "BatchNorm folded into the convolution"
    return {"torch_cnn": Src(d / "cnn.pt", "torchscript", n(cnn), folded, why),
            "torch_mlp": Src(d / "mlp.pt", "torchscript", n(mlp), n(mlp)),
            "torch_cnn_pt2": Src(d / "cnn.pt2", "torch-export", n(cnn), folded, why)}


def _randomize(model, rng):
    """Every weight non-zero (Keras initialises biases to zero, and coremltools drops an
    add of zeros -- the count would then differ for a reason that is not the converter's),
    positive so that BatchNorm's variance is valid, and BatchNorm far from identity."""
    model.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in model.get_weights()])


def _tf_sources(d: Path) -> dict[str, Src]:
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    bn = keras.layers.BatchNormalization(name="bn")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(bn(x)))
    k3 = keras.Model(inp, [keras.layers.Dense(3, name="logits")(x),
                           keras.layers.Dense(2, activation="softmax", name="probs")(x)])
    _randomize(k3, rng)
    k3.save(str(d / "k3.keras"))
    k3.save(str(d / "k3.h5"))
    k3_params = k3.count_params()
    # TF hands coremltools BatchNorm as x * scale + shift (gamma, beta and the moving
    # statistics folded into 2 vectors); it sits after the NHWC transpose, so coremltools
    # does not fold it further into the conv
    k3_core = k3_params - 2 * 4

    import tf_keras

    tf_keras.utils.set_random_seed(0)
    k2 = tf_keras.Sequential([tf_keras.Input((8,), name="features"),
                              tf_keras.layers.Dense(16, activation="relu", name="hidden"),
                              tf_keras.layers.Dense(4, activation="softmax", name="probs")])
    _randomize(k2, rng)
    with warnings.catch_warnings():   # "HDF5 is legacy": writing one is the point
        warnings.simplefilter("ignore")
        k2.save(str(d / "k2.h5"))

    class Affine(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(rng.standard_normal((8, 3)).astype("float32"))
            self.b = tf.Variable(rng.standard_normal(3).astype("float32"))

        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.nn.tanh(tf.matmul(x, self.w) + self.b)}

    mod = Affine()
    tf.saved_model.save(mod, str(d / "sm"), signatures={"serving_default": mod.serve})
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    frozen = convert_variables_to_constants_v2(mod.serve.get_concrete_function())
    (d / "frozen.pb").write_bytes(frozen.graph.as_graph_def().SerializeToString())
    return {"keras3_h5": Src(d / "k3.h5", "keras-h5", k3_params, k3_core, "BatchNorm -> scale + shift"),
            "keras3_v3": Src(d / "k3.keras", "keras-v3", k3_params, k3_core, "BatchNorm -> scale + shift"),
            "tfkeras_h5": Src(d / "k2.h5", "keras-h5", k2.count_params(), k2.count_params()),
            "savedmodel": Src(d / "sm", "savedmodel", 27, 27),
            "graphdef": Src(d / "frozen.pb", "graphdef", 27, 27)}


_CONVERTERS = {"torchscript": CC.torch_to_coreml, "torch-export": CC.torch_to_coreml,
               "keras-h5": CC.keras_to_coreml, "keras-v3": CC.keras_to_coreml,
               "savedmodel": CC.savedmodel_to_coreml, "graphdef": CC.graphdef_to_coreml}


def _convert(src: Src, dst: Path, to: str, precision: str = "fp32", **options) -> dict:
    sig = F.signature(src.path, src.fmt)
    ctx = ConvertContext(src.fmt, to, sig, make_inputs(sig), dst.parent, precision=precision,
                         options=options)
    return _CONVERTERS[src.fmt](src.path, dst, ctx)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Src]:
    d = tmp_path_factory.mktemp("sources")
    return {**_torch_sources(d), **_tf_sources(d)}


CASES = [(name, to) for name in ("torch_cnn", "torch_mlp", "torch_cnn_pt2", "keras3_h5", "keras3_v3",
                                 "tfkeras_h5", "savedmodel", "graphdef")
         for to in ("mlpackage", "mlmodel")]


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, dict, float]]:
    d = tmp_path_factory.mktemp("coreml")
    out = {}
    for name, to in CASES:
        dst = d / f"{name}.{to}"
        t0 = time.perf_counter()
        info = _convert(sources[name], dst, to)
        out[(name, to)] = (dst, info, time.perf_counter() - t0)
    print("\nconversion seconds:", {f"{k[0]}->{k[1]}": round(v[2], 2) for k, v in out.items()})
    return out


# ----------------------------------------------------------------------------- conversions

@pytest.mark.parametrize("name,to", CASES)
def test_conversion(sources, converted, name, to, tmp_path):
    src = sources[name]
    dst, info, _ = converted[(name, to)]

    # detection by content, also under a misleading name
    assert F.detect(dst).id == to
    odd = tmp_path / ("weights.onnx" if to == "mlmodel" else "saved_model_dir")
    (shutil.copy if to == "mlmodel" else shutil.copytree)(dst, odd)
    assert F.detect(odd).id == to

    # names, dtypes and input shapes of the source (dynamic batch pinned to the sample's 2)
    s_sig, c_sig = F.signature(src.path, src.fmt), F.signature(dst, to)
    assert [t.name for t in c_sig.inputs] == [t.name for t in s_sig.inputs]
    assert [t.name for t in c_sig.outputs] == [t.name for t in s_sig.outputs]
    for s, c in zip(s_sig.inputs, c_sig.inputs):
        assert c.dtype == "float32"
        assert c.shape == tuple(2 if d is None else d for d in s.shape)
    if to == "mlpackage":   # neural networks do not record output shapes
        for s, c in zip(s_sig.outputs, c_sig.outputs):
            assert c.shape == tuple(2 if d is None else d for d in s.shape)

    facts = CM.inspect(dst, to)
    assert facts["params"] == src.coreml_params, src.why
    assert facts["precision"] == "fp32"          # not coremltools' fp16 default
    assert facts["model_type"] == ("mlProgram" if to == "mlpackage" else "neuralNetwork")
    assert facts["deployment_target"] == ("iOS15" if to == "mlpackage" else info["deployment_target"])
    assert facts["metadata"]["edgeops.converter"].startswith("coremltools ")
    from edgeops.formats.base import sha256_path
    assert facts["metadata"]["edgeops.source_sha256"] == sha256_path(src.path)
    if to == "mlpackage":
        assert 0 < facts["weights_bytes"] <= 4 * facts["params"]   # small consts sit inline
    assert info["tool"].startswith("coremltools ")
    assert info["convert_to"] == ("mlprogram" if to == "mlpackage" else "neuralnetwork")
    assert info["precision"] == "fp32"


@pytest.mark.skipif(ON_MAC, reason="Core ML executes on macOS")
def test_not_executed_on_linux(converted):
    assert not CM.can_execute()
    for to in ("mlpackage", "mlmodel"):
        dst = converted[("torch_cnn", to)][0]
        with pytest.raises(NotExecutableError, match="^not executed: no Core ML runtime on this OS"):
            F.runner(dst)


def test_fp16_is_asked_for_not_default(sources, tmp_path):
    src = sources["torch_mlp"]
    info = _convert(src, tmp_path / "m16.mlpackage", "mlpackage", precision="fp16")
    facts = CM.inspect(tmp_path / "m16.mlpackage", "mlpackage")
    assert info["precision"] == facts["precision"] == "fp16"
    assert facts["weight_dtypes"] == {"float16": src.params}
    assert facts["weights_bytes"] == 2 * src.params
    _convert(src, tmp_path / "m16.mlmodel", "mlmodel", precision="fp16")
    facts = CM.inspect(tmp_path / "m16.mlmodel", "mlmodel")
    assert facts["precision"] == "fp16" and facts["params"] == src.params


def test_deployment_target(sources, tmp_path):
    src = sources["torch_mlp"]
    info = _convert(src, tmp_path / "t.mlpackage", "mlpackage", minimum_deployment_target="iOS17")
    assert info["deployment_target"] == "iOS17" and info["specification_version"] == 8
    assert CM.inspect(tmp_path / "t.mlpackage", "mlpackage")["deployment_target"] == "iOS17"
    with pytest.raises(UsageError, match="at most iOS14"):
        _convert(src, tmp_path / "t.mlmodel", "mlmodel", minimum_deployment_target="iOS15")
    with pytest.raises(UsageError, match="unknown Core ML deployment target"):
        _convert(src, tmp_path / "u.mlpackage", "mlpackage", minimum_deployment_target="iOS99")


def test_unsupported_op_names_op_and_tool(tmp_path):
    import torch

    class Dist(torch.nn.Module):
        def forward(self, a):
            return torch.cdist(a, a)

    p = tmp_path / "dist.pt"
    torch.jit.trace(Dist(), torch.randn(2, 3, 4)).save(str(p))
    src = Src(p, "torchscript", 0, 0)
    with pytest.raises(ConversionError, match=r"coremltools .* cannot convert op 'cdist'") as ei:
        _convert(src, tmp_path / "dist.mlpackage", "mlpackage")
    assert isinstance(ei.value.__cause__, NotImplementedError)


def test_planner_records_lineage_and_not_executed(sources, tmp_path):
    dst = tmp_path / "cnn.mlpackage"
    rep = C.convert(sources["torch_cnn"].path, dst)
    assert rep.route == ["torchscript", "mlpackage"]
    if not ON_MAC:
        assert rep.status == "not-executed" and not rep.passed
        assert rep.hops[-1].parity.status == "not-executed"
        assert rep.hops[-1].parity.summary() == ("not executed: no Core ML runtime on this OS "
                                                 "(Core ML runs only on macOS/iOS)")
    facts = F.module_for("mlpackage").inspect(dst, "mlpackage")
    assert facts["metadata"]["edgeops.parity"] == rep.status
    assert facts["lineage"]["source"]["format"] == "torchscript"
    assert facts["metadata"]["edgeops.source_sha256"] == rep.source_sha256


def test_set_metadata_roundtrip(converted, tmp_path):
    for to in ("mlpackage", "mlmodel"):
        p = tmp_path / f"m.{to}"
        src = converted[("torch_mlp", to)][0]
        (shutil.copy if to == "mlmodel" else shutil.copytree)(src, p)
        CM.set_metadata(p, to, {"edgeops.note": "hello", "n": 3})
        meta = CM.inspect(p, to)["metadata"]
        assert meta["edgeops.note"] == "hello" and meta["n"] == "3"
        assert meta["edgeops.converter"].startswith("coremltools")   # kept


# ----------------------------------------------------------------------------- broken files

def test_truncated_mlmodel(converted, tmp_path):
    data = converted[("torch_cnn", "mlmodel")][0].read_bytes()
    for cut in (len(data) // 2, 80):
        p = tmp_path / f"cut{cut}.bin"
        p.write_bytes(data[:cut])
        with pytest.raises(FormatError, match="Core ML model is truncated or corrupt"):
            F.detect(p)


def test_broken_packages(converted, tmp_path):
    good = converted[("torch_cnn", "mlpackage")][0]

    no_spec = tmp_path / "no_spec.mlpackage"
    shutil.copytree(good, no_spec)
    (no_spec / "Data/com.apple.CoreML/model.mlmodel").unlink()
    with pytest.raises(FormatError, match="without its model spec"):
        F.detect(no_spec)

    cut_weights = tmp_path / "cut_weights.mlpackage"
    shutil.copytree(good, cut_weights)
    w = cut_weights / "Data/com.apple.CoreML/weights/weight.bin"
    w.write_bytes(w.read_bytes()[:200])
    assert F.detect(cut_weights).id == "mlpackage"    # detection is cheap; validation is not
    with pytest.raises(FormatError, match="weight.bin is truncated"):
        CM.validate(cut_weights, "mlpackage")
    with pytest.raises(FormatError, match="weight.bin is truncated"):
        F.runner(cut_weights)       # validated before "not executed"

    no_weights = tmp_path / "no_weights.mlpackage"
    shutil.copytree(good, no_weights)
    shutil.rmtree(no_weights / "Data/com.apple.CoreML/weights")
    with pytest.raises(FormatError, match="weight file is missing"):
        CM.load(no_weights, "mlpackage")

    bad_manifest = tmp_path / "bad_manifest.mlpackage"
    shutil.copytree(good, bad_manifest)
    m = bad_manifest / "Manifest.json"
    m.write_text(m.read_text()[:60])
    with pytest.raises(FormatError, match="unreadable Manifest.json"):
        F.detect(bad_manifest)

    # the program spec lifted out of its package has no weights beside it
    lone = tmp_path / "lone.mlmodel"
    shutil.copy(good / "Data/com.apple.CoreML/model.mlmodel", lone)
    assert F.detect(lone).id == "mlmodel"
    with pytest.raises(FormatError, match="outside its .mlpackage"):
        CM.validate(lone, "mlmodel")


def test_renamed_output_mismatch_is_caught(converted, tmp_path):
    """A package whose description and program disagree (a botched hand edit) fails validation."""
    p = tmp_path / "m.mlpackage"
    shutil.copytree(converted[("torch_mlp", "mlpackage")][0], p)
    spec = CM.load_spec(p, "mlpackage")
    spec.description.output[0].name = "renamed"
    CM.spec_path(p, "mlpackage").write_bytes(spec.SerializeToString())
    with pytest.raises(FormatError, match="do not match the ML program"):
        CM.validate(p, "mlpackage")


def test_detect_imports_no_framework(converted):
    paths = [str(converted[("torch_cnn", to)][0]) for to in ("mlpackage", "mlmodel")]
    code = ("import sys, json; from edgeops import formats as F; "
            f"ids = [F.detect(p).id for p in {paths!r}]; "
            "heavy = [m for m in ('coremltools', 'torch', 'tensorflow') if m in sys.modules]; "
            "print(json.dumps([ids, heavy]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    ids, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert ids == ["mlpackage", "mlmodel"] and heavy == []


def test_weights_stored_faithfully(sources, converted, tmp_path):
    """What can stand in for parity on Linux: the Core ML model holds the source's weights
    -- bit-exact at fp32, within fp16 rounding when fp16 is asked for."""
    import torch

    sd = torch.jit.load(str(sources["torch_mlp"].path)).state_dict()
    want = sorted((v.numpy() for v in sd.values()), key=lambda a: a.size)
    for dst, prec, tol in ((converted[("torch_mlp", "mlpackage")][0], "fp32", 0.0),
                           (tmp_path / "m16.mlpackage", "fp16", 1e-3)):
        if prec == "fp16":
            _convert(sources["torch_mlp"], dst, "mlpackage", precision="fp16")
        got = sorted(CM.program_weights(dst).values(), key=lambda a: a.size)
        assert [a.shape for a in got] == [a.shape for a in want]
        err = max(float(np.max(np.abs(g.astype(np.float32) - w))) for g, w in zip(got, want))
        assert err <= tol, (prec, err)
        print(f"\nmlp weights {prec}: max abs diff {err:.2e}")
    spec = CM.load_spec(converted[("torch_mlp", "mlmodel")][0], "mlmodel")
    nn_w = sorted((np.asarray(layer.innerProduct.weights.floatValue, np.float32)
                   for layer in spec.neuralNetwork.layers if layer.WhichOneof("layer") == "innerProduct"),
                  key=lambda a: a.size)
    src_w = sorted((v.numpy().ravel() for k, v in sd.items() if k.endswith("weight")), key=lambda a: a.size)
    assert all(np.array_equal(a, b) for a, b in zip(nn_w, src_w))


def test_flexible_shapes_are_dynamic_dims(sources, tmp_path):
    """A model built with a range or enumerated batch (not what edgeops writes, but what
    users bring) reports the varying dimension as None."""
    import torch

    ct = CM._coremltools()
    m = torch.jit.load(str(sources["torch_mlp"].path))
    for name, shape in (("range", (ct.RangeDim(1, 8), 64)),
                        ("enum", ct.EnumeratedShapes(shapes=[(1, 64), (4, 64)]))):
        with CM.silenced_fds(), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "output renamed to var_10"
            mm = ct.convert(m, inputs=[ct.TensorType(name="x", shape=shape)], convert_to="mlprogram",
                            compute_precision=ct.precision.FLOAT32)
        p = tmp_path / f"{name}.mlpackage"
        mm.save(str(p))
        assert F.signature(p).inputs[0].shape == (None, 64), name
        assert CM.inspect(p, "mlpackage")["params"] == sources["torch_mlp"].params


def test_every_cut_is_flagged_and_random_bytes_are_not_core_ml(sources, converted, tmp_path):
    data = converted[("torch_mlp", "mlmodel")][0].read_bytes()
    p = tmp_path / "m"
    for cut in range(65, len(data), 2):
        p.write_bytes(data[:cut])
        with pytest.raises(FormatError, match="truncated or corrupt"):
            CM.detect(F.Probe(p))
    # a SavedModel's saved_model.pb starts like a Core ML spec (1: varint, 2: message)
    pb = (sources["savedmodel"].path / "saved_model.pb").read_bytes()
    for cut in [*range(65, 400, 5), *range(400, len(pb), 997), len(pb)]:
        p.write_bytes(pb[:cut])
        assert CM.detect(F.Probe(p)) is None, cut
    # bytes that start like a protobuf with a varint field 1, as Core ML and ONNX do
    rng = np.random.default_rng(0)
    for _ in range(500):
        p.write_bytes(b"\x08" + rng.integers(0, 256, int(rng.integers(10, 2000)), dtype=np.uint8).tobytes())
        assert CM.detect(F.Probe(p)) is None
