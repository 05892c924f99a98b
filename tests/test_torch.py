"""PyTorch: detection of every torch.save flavour by content, refusals, shapes, and the
ONNX <-> torch edges (parity itself is asserted per edge in test_convert_matrix)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from edgeops import convert as C
from edgeops import formats as F
from edgeops.errors import ConversionError, FormatError
from edgeops.formats.base import LoadOptions


class Net(nn.Module):  # a user's own class, as in a real project
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).relu()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("torch")
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 4)
    out = {
        "traced": d / "traced.onnx",            # misleading suffixes on purpose
        "scripted": d / "scripted.bin",
        "pt2": d / "program.pt",
        "state_dict": d / "weights.pt",
        "whole": d / "whole.pt",
        "legacy": d / "legacy.pth",
        "legacy_whole": d / "legacy_whole.pth",
    }
    torch.jit.trace(net, x).save(str(out["traced"]))
    torch.jit.script(net).save(str(out["scripted"]))
    torch.export.save(torch.export.export(net, (x,)), str(out["pt2"]))
    torch.save(net.state_dict(), out["state_dict"])
    torch.save(net, out["whole"])
    torch.save(net.state_dict(), out["legacy"], _use_new_zipfile_serialization=False)
    torch.save(net, out["legacy_whole"], _use_new_zipfile_serialization=False)
    return out


@pytest.mark.parametrize("key,fmt", [("traced", "torchscript"), ("scripted", "torchscript"),
                                     ("pt2", "torch-export")])
def test_detect_models(files, key, fmt):
    assert F.detect(files[key]).id == fmt


@pytest.mark.parametrize("key,needle", [
    ("state_dict", "weights only, the model's code is needed"),
    ("legacy", "weights only, the model's code is needed"),
    ("whole", r"needs \(and runs\) the model.s Python code"),
    ("legacy_whole", r"needs \(and runs\) the model.s Python code"),
])
def test_refusals(files, key, needle):
    with pytest.raises(FormatError, match=needle):
        F.detect(files[key])


def test_traced_module_knows_its_shapes(files):
    sig = F.signature(files["traced"])
    assert sig.inputs[0].shape == (2, 4) and sig.outputs[0].name == "output_0"


def test_scripted_module_needs_shape(files):
    with pytest.raises(FormatError, match="no input shape for 'x'") as err:
        F.signature(files["scripted"])
    assert "--shape x=" in err.value.hint
    sig = F.signature(files["scripted"], opts=LoadOptions(shapes={"x": (5, 4)}))
    assert sig.inputs[0].shape == (5, 4)


def test_export_signature_and_inspect(files):
    from edgeops.inspect import inspect_model

    info = inspect_model(files["pt2"])
    assert info["params"] == 4 * 3 + 3
    assert info["signature"]["inputs"][0]["shape"] == [2, 4]
    assert inspect_model(files["traced"])["params"] == 15


def test_truncated_archive(files, tmp_path):
    data = files["traced"].read_bytes()
    p = tmp_path / "cut.pt"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError):
        F.runner(p)


def _onnx_with(tmp_path, node, opset, domain_imports=()):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *domain_imports])
    p = tmp_path / f"m{opset}.onnx"
    onnx.save(m, str(p))
    return p


@pytest.mark.slow
def test_onnx2torch_refusals_name_the_op(tmp_path):
    p = _onnx_with(tmp_path, helper.make_node("ReduceMean", ["x"], ["y"]), 18)
    with pytest.raises(ConversionError, match="ReduceMean at opset 18"):
        C.convert(p, tmp_path / "out.pt")
    ml = helper.make_node("Normalizer", ["x"], ["y"], domain="ai.onnx.ml", norm="L2")
    p = _onnx_with(tmp_path, ml, 17, [helper.make_opsetid("ai.onnx.ml", 3)])
    with pytest.raises(ConversionError, match="ai.onnx.ml domain"):
        C.convert(p, tmp_path / "out2.pt")


@pytest.mark.slow
def test_onnx2torch_imports_without_torchvision():
    from edgeops.convert.torch import _import_onnx2torch

    mod = _import_onnx2torch()
    assert hasattr(mod, "convert")
    import sys

    assert "torchvision" not in sys.modules or hasattr(sys.modules["torchvision"], "__file__")


@pytest.mark.slow
def test_scripted_roundtrip_with_shape(files, tmp_path):
    rep = C.convert(files["scripted"], tmp_path / "s.onnx", shapes={"x": (3, 4)})
    assert rep.passed and rep.hops[0].parity.n_inputs == 3
    sess_in = F.signature(tmp_path / "s.onnx").inputs[0]
    assert sess_in.name == "x" and sess_in.shape[0] == "batch"
    # the exported batch dimension is dynamic: run with another batch size
    out = F.runner(tmp_path / "s.onnx").run({"x": np.ones((7, 4), np.float32)})
    assert out["output_0"].shape == (7, 3)
