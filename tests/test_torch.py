"""PyTorch: detection of every way torch saves a model (by content, under misleading
names), refusals, signatures, the runner, and the TorchScript/.pt2 -> ONNX and
ONNX -> TorchScript edges with parity against onnxruntime and eager torch."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import _torch_models as M
from edgeops import convert as C
from edgeops import formats as F
from edgeops.errors import ConversionError, FormatError, UnsafePickleError
from edgeops.formats.base import LoadOptions

TOL = 1e-4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("torch")
    # misleading names on purpose: detection must read content
    return {
        "mlp_scripted": M.mlp_torchscript(d / "mlp.onnx"),
        "mlp_traced": M.mlp_torchscript(d / "mlp_traced.bin", traced=True),
        "cnn_traced": M.cnn_torchscript(d / "cnn.pt"),
        "cnn_scripted": M.cnn_torchscript(d / "cnn_scripted.pth", traced=False),
        "cnn_pt2": M.cnn_export_pt2(d / "cnn_program.pt"),
        "cnn_pt2_dyn": M.cnn_export_pt2(d / "cnn_dyn.pt2", dynamic_batch=True),
        "state_dict": M.mlp_state_dict(d / "weights.onnx"),
        "whole": M.mlp_pickled_module(d / "whole.pt"),
        "legacy": M.mlp_state_dict(d / "legacy.pth", legacy=True),
        "legacy_whole": M.mlp_pickled_module(d / "legacy_whole.pt", legacy=True),
    }


def _rand(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _ort(path, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


# ----------------------------------------------------------------------------- detection

@pytest.mark.parametrize("key,fmt", [
    ("mlp_scripted", "torchscript"), ("mlp_traced", "torchscript"), ("cnn_traced", "torchscript"),
    ("cnn_scripted", "torchscript"), ("cnn_pt2", "torch-export"), ("cnn_pt2_dyn", "torch-export"),
])
def test_detect_models(files, key, fmt):
    assert F.detect(files[key]).id == fmt


@pytest.mark.parametrize("key,needle", [
    ("state_dict", "weights only, the model's code is needed"),
    ("legacy", "weights only, the model's code is needed"),
    ("whole", "references the model's Python class"),
    ("legacy_whole", "references the model's Python class"),
])
def test_refusals(files, key, needle):
    with pytest.raises(FormatError, match=needle) as err:
        F.detect(files[key])
    assert "torch.jit.script/trace(model).save" in str(err.value)


def test_detect_imports_no_torch(files):
    code = ("import sys; from edgeops import formats as F\n"
            f"ids = [F.detect(p).id for p in {[str(files['cnn_traced']), str(files['cnn_pt2'])]!r}]\n"
            "for p in " + repr([str(files["state_dict"]), str(files["legacy_whole"])]) + ":\n"
            "    try: F.detect(p)\n"
            "    except Exception as e: ids.append(type(e).__name__)\n"
            "print(ids, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['torchscript', 'torch-export', 'FormatError', 'FormatError'] False"


def test_truncated_archives(files, tmp_path):
    # cut near the end too: a .pt2 holds its sample inputs as a torch.save zip, whose
    # directory then looks like the whole file's
    for key, what, keep in (("cnn_traced", "TorchScript", 0.5), ("cnn_pt2", ".pt2", 0.5),
                            ("cnn_pt2", ".pt2", 0.99)):
        data = files[key].read_bytes()
        p = tmp_path / f"cut_{key}_{keep}.onnx"
        p.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(FormatError, match=f"truncated or corrupt.*{what}|{what}.*truncated"):
            F.detect(p)
        with pytest.raises(FormatError, match="truncated"):
            F.runner(p)


def test_pt2_with_a_foreign_pickle_is_not_loaded(files, tmp_path):
    # torch.export.load unpickles sample inputs with weights_only=False as a fallback:
    # a .pt2 whose pickle names os.system must be refused before torch sees it
    bad = tmp_path / "evil.pt2"
    with zipfile.ZipFile(files["cnn_pt2"]) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if "/sample_inputs/" in info.filename:
                data = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00truep\x01\x85R."
            dst.writestr(info, data)
    assert F.detect(bad).id == "torch-export"
    with pytest.raises(UnsafePickleError, match="os.system"):
        F.runner(bad)


# ----------------------------------------------------------------------------- signature / run

def test_signatures(files):
    sig = F.signature(files["cnn_traced"])  # traced: the example inputs' shapes were saved
    assert [(s.name, s.dtype, s.shape) for s in sig.inputs] == [("x", "float32", (2, 1, 8, 8))]
    assert [(s.name, s.shape) for s in sig.outputs] == [("output_0", (2, 10))]
    with pytest.raises(FormatError, match=r"TorchScript has no input shapes: pass --shape x="):
        F.signature(files["mlp_scripted"])
    sig = F.signature(files["mlp_scripted"], opts=LoadOptions(shapes={"x": (5, 64)}))
    assert sig.inputs[0].shape == (5, 64) and sig.outputs[0].shape == (5, 10)
    star = F.signature(files["mlp_scripted"], opts=LoadOptions(shapes={"*": (3, 64)}))
    assert star.inputs[0].shape == (3, 64)
    sig = F.signature(files["cnn_pt2"])
    assert sig.inputs[0].name == "x" and sig.inputs[0].shape == (2, 1, 8, 8)
    dyn = F.signature(files["cnn_pt2_dyn"]).inputs[0].shape
    assert isinstance(dyn[0], str) and dyn[1:] == (1, 8, 8)


def test_runner_matches_eager_torch(files):
    x = _rand((2, 1, 8, 8))
    with torch.no_grad():
        ref = M.cnn()(torch.from_numpy(x)).numpy()
    for key in ("cnn_traced", "cnn_scripted", "cnn_pt2", "cnn_pt2_dyn"):
        opts = LoadOptions(shapes={"x": (2, 1, 8, 8)})
        out = F.runner(files[key], opts=opts).run({"x": x})
        assert list(out) == ["output_0"]
        assert np.abs(out["output_0"] - ref).max() <= 1e-6, key
    # a dynamic-batch program runs at another batch size
    out = F.runner(files["cnn_pt2_dyn"]).run({"x": _rand((5, 1, 8, 8))})
    assert out["output_0"].shape == (5, 10)


def test_inspect_counts_float_weights(files):
    from edgeops.inspect import inspect_model

    mlp_params = 64 * 32 + 32 + 32 * 10 + 10
    cnn_params = (8 * 9 + 8) + 4 * 8 + (8 * 10 + 10)  # conv, bn (2 params + 2 stats), fc
    info = inspect_model(files["mlp_scripted"])
    assert info["params"] == mlp_params and info["signature"] is None
    assert "--shape" in info["signature_error"]
    info = inspect_model(files["cnn_traced"])
    assert info["params"] == cnn_params and info["traced"] and info["modules"] == 6
    assert info["ops"]["aten::_convolution"] == 1
    info = inspect_model(files["cnn_pt2"])
    assert info["params"] == cnn_params and info["ops"]["aten.conv2d.default"] == 1


# ----------------------------------------------------------------------------- conversions

@pytest.mark.slow
def test_traced_cnn_to_onnx(files, tmp_path):
    out = tmp_path / "cnn.onnx"
    rep = C.convert(files["cnn_traced"], out)
    assert rep.passed and rep.hops[0].info["opset"] == 17
    x = _rand((2, 1, 8, 8), seed=7)
    with torch.no_grad():
        ref = torch.jit.load(str(files["cnn_traced"]))(torch.from_numpy(x)).numpy()
    got = _ort(out, {"x": x})[0]
    err = float(np.abs(got - ref).max())
    print(f"traced CNN TorchScript -> ONNX: max abs {err:.2e}")
    assert err <= TOL
    # traced: the batch stays as traced (it may be baked into the graph)
    assert F.signature(out).inputs[0].shape == (2, 1, 8, 8)


@pytest.mark.slow
def test_scripted_mlp_to_onnx_has_dynamic_batch(files, tmp_path):
    out = tmp_path / "mlp.onnx"
    rep = C.convert(files["mlp_scripted"], out, shapes={"x": (3, 64)})
    assert rep.passed and rep.hops[0].parity.max_abs <= TOL
    spec = F.signature(out).inputs[0]
    assert spec.name == "x" and spec.shape == ("batch", 64)
    x = _rand((7, 64))
    with torch.no_grad():
        ref = M.mlp()(torch.from_numpy(x)).numpy()
    err = float(np.abs(_ort(out, {"x": x})[0] - ref).max())
    print(f"scripted MLP TorchScript -> ONNX at batch 7: max abs {err:.2e}")
    assert err <= TOL


@pytest.mark.slow
def test_pt2_to_onnx_comes_down_to_opset_17(files, tmp_path):
    out = tmp_path / "cnn_pt2.onnx"
    rep = C.convert(files["cnn_pt2_dyn"], out)
    assert rep.passed
    info = rep.hops[0].info
    assert info["opset"] == 17 and info["exported_opset"] == 18
    model = onnx.load(str(out))
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    x = _rand((4, 1, 8, 8), seed=3)
    with torch.no_grad():
        ref = M.cnn()(torch.from_numpy(x)).numpy()
    err = float(np.abs(_ort(out, {"x": x})[0] - ref).max())
    print(f"CNN .pt2 -> ONNX (opset 17, batch 4): max abs {err:.2e}")
    assert err <= TOL


@pytest.mark.slow
def test_onnx17_to_torchscript(tmp_path):
    src = M.cnn_onnx(tmp_path / "cnn17.onnx")
    out = tmp_path / "cnn_from_onnx.pt"
    rep = C.convert(src, out)
    assert rep.passed and F.detect(out).id == "torchscript"
    assert rep.hops[0].info["tool"].startswith("torch ") and "onnx2torch" in rep.hops[0].info["tool"]
    sig = F.signature(out)  # ONNX names and the dynamic batch travel inside the file
    assert [s.name for s in sig.inputs] == ["x"] and [s.name for s in sig.outputs] == ["logits"]
    assert sig.inputs[0].shape == ("batch", 1, 8, 8)
    x = _rand((5, 1, 8, 8), seed=11)
    with torch.no_grad():
        got = torch.jit.load(str(out))(torch.from_numpy(x)).numpy()
    err = float(np.abs(got - _ort(src, {"x": x})[0]).max())
    print(f"ONNX opset 17 -> TorchScript (batch 5): max abs {err:.2e}")
    assert err <= TOL
    assert "torchvision" not in sys.modules or hasattr(sys.modules["torchvision"], "__file__")


@pytest.mark.slow
def test_pt2_to_torchscript_through_onnx(files, tmp_path):
    rep = C.convert(files["cnn_pt2"], tmp_path / "cnn.pt", to="torchscript")
    assert rep.route == ["torch-export", "onnx", "torchscript"] and rep.passed
    assert rep.end_to_end is None or rep.end_to_end.max_abs <= TOL


def _onnx_with(tmp_path, node, opset, extra_opsets=(), name="m.onnx", inits=()):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    p = tmp_path / name
    onnx.save(m, str(p))
    return p


@pytest.mark.slow
def test_onnx2torch_gaps_are_named(tmp_path):
    # Pad-18 has no onnx2torch converter (it stops at 13, and 18 added an input, so it is not
    # a type-only bridge): the model is moved to opset 17 (checked to compute the same),
    # converted, and the report says so -- a user holding only the file cannot re-export it
    p = _onnx_with(tmp_path, helper.make_node("Pad", ["x", "pads"], ["y"]), 18, name="pad18.onnx",
                   inits=[numpy_helper.from_array(np.array([0, 1, 0, 1], np.int64), "pads")])
    rep = C.convert(p, tmp_path / "pad.pt")
    assert rep.passed and any("opset 18 -> 17" in n for n in rep.hops[0].info["normalised"])
    # an op onnx2torch has at no opset is refused by name, with no re-export advice
    p = _onnx_with(tmp_path, helper.make_node("Hardmax", ["x"], ["y"]), 17, name="hm.onnx")
    with pytest.raises(ConversionError, match="onnx2torch cannot convert Hardmax at opset 17") as err:
        C.convert(p, tmp_path / "hm.pt")
    assert "keep the model in ONNX" in err.value.hint and "--opset" not in err.value.hint
    ml = helper.make_node("Normalizer", ["x"], ["y"], domain="ai.onnx.ml", norm="L2")
    p = _onnx_with(tmp_path, ml, 17, [helper.make_opsetid("ai.onnx.ml", 3)], name="ml.onnx")
    with pytest.raises(ConversionError, match="onnx2torch .*ai.onnx.ml domain .*Normalizer"):
        C.convert(p, tmp_path / "ml.pt")


@pytest.mark.slow
def test_unsupported_torch_op_is_named(tmp_path):
    class Bessel(torch.nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x)

    p = tmp_path / "bessel.pt"
    torch.jit.script(Bessel()).save(str(p))
    with pytest.raises(ConversionError, match=r"torch.onnx cannot export operator "
                                              r"aten::special_bessel_j0 at opset 17"):
        C.convert(p, tmp_path / "bessel.onnx", shapes={"x": (2, 3)})
