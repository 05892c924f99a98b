"""ONNX -> TensorFlow SavedModel / TFLite with onnx2tf, and the TFLite format family.

Real models (an MLP and an NCHW CNN exported by torch at opset 17) are converted for real
and run against onnxruntime on the same random inputs. onnx2tf is an optional extra that
must be installed with --no-deps (its exact pins would downgrade numpy/onnx/protobuf), so
the whole module is skipped when it is absent.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

_MISSING = [m for m in ("onnx2tf", "ai_edge_litert", "onnx_graphsurgeon", "sng4onnx")
            if importlib.util.find_spec(m) is None]
if _MISSING:
    pytest.skip(f"onnx2tf extra not installed (missing {', '.join(_MISSING)}): "
                "pip install --no-deps onnx2tf, then ai-edge-litert onnx-graphsurgeon sng4onnx "
                "sne4onnx psutil", allow_module_level=True)

from edgeops.convert import onnx2tf as O2T  # noqa: E402
from edgeops.convert.context import ConvertContext  # noqa: E402
from edgeops.errors import ConversionError  # noqa: E402
from edgeops.formats import onnx as onnx_fmt  # noqa: E402
from edgeops.formats import tensorflow as tf_fmt  # noqa: E402
from edgeops.formats import tflite as tfl  # noqa: E402
from edgeops.formats.base import Probe  # noqa: E402

pytestmark = pytest.mark.slow


def _ctx(src, workdir, precision="fp32"):
    sig = onnx_fmt.signature(src)
    return ConvertContext("onnx", "tflite", sig, {}, workdir, precision=precision)


def _feeds(sig, batch, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for s in sig.inputs:
        shape = [batch if not isinstance(d, int) else d for d in s.shape]
        out[s.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def _max_abs(ref: dict, got: dict) -> float:
    assert list(got) == list(ref), f"outputs {list(got)} != ONNX outputs {list(ref)}"
    worst = 0.0
    for k in ref:
        assert got[k].shape == ref[k].shape, (k, got[k].shape, ref[k].shape)
        worst = max(worst, float(np.abs(got[k] - ref[k]).max()))
    return worst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from edgeops.extras import require
    from edgeops.samples import onnx_models

    torch = require("torch")
    d = tmp_path_factory.mktemp("onnx2tf")
    cnn = onnx_models(d)[0].path                      # x [batch, 1, 8, 8] -> logits
    torch.manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 10)).eval()
    mlp_path = d / "mlp.onnx"
    torch.onnx.export(mlp, (torch.randn(2, 64),), str(mlp_path), input_names=["features"],
                      output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}})
    return {"mlp": mlp_path, "cnn": cnn}


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    """Each model converted once to each target (onnx2tf runs take ~1-2 s each)."""
    d = tmp_path_factory.mktemp("converted")
    out = {}
    for name, src in models.items():
        sm, tf_lite = d / f"{name}_savedmodel", d / f"{name}.tflite"
        out[name, "savedmodel"] = (sm, O2T.onnx_to_savedmodel(src, sm, _ctx(src, d / "work")))
        out[name, "tflite"] = (tf_lite, O2T.onnx_to_tflite(src, tf_lite, _ctx(src, d / "work")))
    return out


@pytest.mark.parametrize("target", ["savedmodel", "tflite"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_parity_against_onnxruntime(models, converted, name, target):
    src = models[name]
    path, facts = converted[name, target]
    assert facts["tool"] == "onnx2tf" and facts["onnx2tf"]
    ref = onnx_fmt.runner(src)
    cand = tf_fmt.runner(path, "savedmodel") if target == "savedmodel" else tfl.runner(path)
    # the converted model takes the ONNX inputs as they are: same names, same NCHW layout
    def norm(specs):  # ONNX names its symbolic dims ("batch"), TF has None
        return [(s.name, s.dtype, tuple(d if isinstance(d, int) else None for d in s.shape))
                for s in specs]

    assert norm(cand.signature.inputs) == norm(ref.signature.inputs)
    assert [o.name for o in cand.signature.outputs] == [o.name for o in ref.signature.outputs]
    for batch in (1, 5, 2):  # dynamic batch, including a resize back down
        feeds = _feeds(ref.signature, batch, seed=batch)
        assert _max_abs(ref.run(feeds), cand.run(feeds)) < 1e-5


def test_cnn_layout_kept(converted):
    _, facts = converted["cnn", "tflite"]
    assert facts["layout"] == "inputs kept in ONNX layout: x"


def test_tflite_family(models, converted):
    path, _ = converted["cnn", "tflite"]
    assert tfl.detect(Probe(path)) == "tflite"
    assert tfl.detect(Probe(models["cnn"])) is None
    assert tfl.detect(Probe(converted["cnn", "savedmodel"][0])) is None
    sig = tfl.signature(path)
    assert [s.to_dict() for s in sig.inputs] == [{"name": "x", "dtype": "float32",
                                                  "shape": [None, 1, 8, 8]}]
    facts = tfl.inspect(path)
    # same weights as the ONNX graph (torch folded BatchNorm into the conv at export)
    assert facts["params"] == onnx_fmt.inspect(models["cnn"])["params"]
    assert facts["ops"]["CONV_2D"] == 2 and facts["signatures"] == ["serving_default"]


def test_fp16_tflite(models, tmp_path):
    src = models["mlp"]
    dst = tmp_path / "mlp16.tflite"
    facts = O2T.onnx_to_tflite(src, dst, _ctx(src, tmp_path / "w", precision="fp16"))
    assert facts["precision"] == "float16"
    assert "FLOAT16" in tfl.inspect(dst)["constant_tensors"]
    ref, cand = onnx_fmt.runner(src), tfl.runner(dst)
    feeds = _feeds(ref.signature, 4)
    assert 1e-6 < _max_abs(ref.run(feeds), cand.run(feeds)) < 5e-3


def test_tflite_without_signature_runs_by_tensor_name(models, converted, tmp_path):
    """Older converters write no SignatureDef: the runner falls back to tensor names."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    path, _ = converted["mlp", "tflite"]
    m = schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    m.signatureDefs = []
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    bare = tmp_path / "bare.tflite"
    bare.write_bytes(bytes(b.Output()))
    run = tfl.runner(bare)
    assert run.key is None
    assert [s.name for s in run.signature.inputs] == ["serving_default_features"]
    ref = onnx_fmt.runner(models["mlp"])
    for batch in (3, 1):
        x = _feeds(ref.signature, batch)
        want = ref.run(x)["logits"]
        got = list(run.run({"serving_default_features": x["features"]}).values())[0]
        assert np.abs(got - want).max() < 1e-5


def test_unsupported_op_is_named(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    like = helper.make_tensor("like", TensorProto.FLOAT, [1], [0.0])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]),
                           helper.make_node("CastLike", ["r", "like"], ["y"])],
                          "g", [x], [y], [like])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    src = tmp_path / "castlike.onnx"
    onnx.save(m, src)
    with pytest.raises(ConversionError, match=r"onnx2tf.*CastLike|CastLike.*onnx2tf"):
        O2T.onnx_to_tflite(src, tmp_path / "out.tflite", _ctx(src, tmp_path / "w"))
    assert not (tmp_path / "out.tflite").exists()


def test_no_network_for_image_inputs(tmp_path, monkeypatch):
    """A fixed-batch input whose last dim is 3 makes onnx2tf fetch a calibration file from
    GitHub; the conversion must neither try nor need it."""
    import requests

    from edgeops.extras import require

    torch = require("torch")

    def no_network(*a, **k):
        raise AssertionError("onnx2tf tried to use the network")

    monkeypatch.setattr(requests, "get", no_network)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 3, 3)).eval()
    src = tmp_path / "w3.onnx"
    torch.onnx.export(net, (torch.randn(1, 2, 5, 3),), str(src), input_names=["img"],
                      output_names=["y"], opset_version=17, dynamo=False)
    dst = tmp_path / "w3.tflite"
    O2T.onnx_to_tflite(src, dst, _ctx(src, tmp_path / "w"))
    ref, cand = onnx_fmt.runner(src), tfl.runner(dst)
    feeds = _feeds(ref.signature, 1)
    assert _max_abs(ref.run(feeds), cand.run(feeds)) < 1e-5


def test_planner_route_when_wired(models, tmp_path):
    """Through edgeops.convert once the lead registers the onnx -> tflite edge."""
    from edgeops import convert as C
    from edgeops import formats as F

    if ("onnx", "tflite") not in {e.key for e in C.edges()} or "tflite" not in F.FAMILIES:
        pytest.skip("onnx -> tflite edge or tflite family not registered yet")
    rep = C.convert(models["cnn"], tmp_path / "cnn.tflite", to="tflite")
    assert rep.status == "passed", rep.message
    assert rep.hops[-1].parity.max_abs < 1e-5
    assert F.detect(tmp_path / "cnn.tflite").id == "tflite"
