"""Core contracts: content detection and refusals, ONNX inspection, verify semantics,
the planner, and the edge registry. Fast: no framework beyond onnx/onnxruntime."""

from __future__ import annotations

import json
import struct

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeops import convert as C
from edgeops import formats as F
from edgeops import verify as V
from edgeops.errors import ConversionError, FormatError, UsageError
from edgeops.formats.base import scan_protobuf, scan_protobuf_file, scan_protobuf_prefix


def _linear_onnx(path, with_if=False):
    rng = np.random.default_rng(1)
    W = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    nodes = [
        helper.make_node("Constant", [], ["B"], value=numpy_helper.from_array(np.ones(3, np.float32))),
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Add", ["h", "B"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])]
    if with_if:
        def branch(name, val):
            c = helper.make_node("Constant", [], [f"{name}_out"],
                                 value=numpy_helper.from_array(np.full(5, val, np.float32)))
            return helper.make_graph([c], name, [], [
                helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [5])])
        nodes.append(helper.make_node("Constant", [], ["cond"],
                                      value=numpy_helper.from_array(np.array(True))))
        nodes.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch("then", 1.0),
                                      else_branch=branch("else", 2.0)))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [5]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          outputs, [W])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(path))
    return path


# ----------------------------------------------------------------------------- detection

def test_onnx_detected_by_content_not_extension(tmp_path):
    p = _linear_onnx(tmp_path / "model.h5")
    assert F.detect(p).id == "onnx"


def test_truncated_onnx_is_named(tmp_path):
    p = _linear_onnx(tmp_path / "m.onnx")
    data = p.read_bytes()
    for cut in (20, len(data) // 2, len(data) - 3):
        t = tmp_path / f"t{cut}.onnx"
        t.write_bytes(data[:cut])
        with pytest.raises(FormatError, match="truncated or corrupt"):
            F.detect(t)


@pytest.mark.parametrize("content,needle", [
    (b"", "empty"),
    (b"GGUF\x03\x00\x00\x00" + b"\x00" * 64, "GGUF"),
    (b"\x93NUMPY\x01\x00" + b"\x00" * 64, "not a model"),
    (b"hello, this is just text\n" * 4, "text file"),
    (bytes(range(256)) * 4, "unknown format"),
])
def test_refusals_and_unknown(tmp_path, content, needle):
    p = tmp_path / "model.onnx"   # a misleading suffix on purpose
    p.write_bytes(content)
    with pytest.raises(FormatError, match=needle):
        F.detect(p)


def test_safetensors_refused_as_weights_only(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    p = tmp_path / "model.bin"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 8)
    with pytest.raises(FormatError, match="weights only"):
        F.detect(p)


def test_missing_path(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        F.detect(tmp_path / "nope.onnx")


def test_protobuf_scanner():
    m = helper.make_model(helper.make_graph([], "g", [], []))
    buf = m.SerializeToString()
    fields = scan_protobuf(buf)
    assert fields[1] == 0 and fields[7] == 2
    assert scan_protobuf(buf[:-1]) is None
    seen, complete = scan_protobuf_prefix(buf[:-1])
    assert not complete and 1 in seen
    assert scan_protobuf(b"\xff\xff\xff") is None
    # the streaming scanner agrees with the in-memory one, whole and cut
    import io

    for cut in (len(buf), len(buf) - 1, 3, 1):
        b = buf[:cut]
        assert scan_protobuf_file(io.BytesIO(b), len(b)) == scan_protobuf_prefix(b)


# ----------------------------------------------------------------------------- ONNX plugin

def test_onnx_params_count_constants_and_subgraphs(tmp_path):
    from edgeops.inspect import inspect_model

    info = inspect_model(_linear_onnx(tmp_path / "m.onnx", with_if=True))
    b = info["params_breakdown"]
    assert b["initializers"] == 12
    assert b["constants"] == 3          # the bool condition is not a weight
    assert b["subgraphs"] == 10         # two branches x 5 floats in Constant nodes
    assert info["params"] == 25
    assert info["opset"] == {"ai.onnx": 17}
    assert info["signature"]["inputs"][0] == {"name": "x", "dtype": "float32", "shape": ["N", 4]}
    assert len(info["sha256"]) == 64


def test_onnx_runner_and_signature(tmp_path):
    r = F.runner(_linear_onnx(tmp_path / "m.onnx"))
    feeds = V.make_inputs(r.signature, {"x": (5, 4)})
    assert feeds["x"].shape == (5, 4)
    out = r.run(feeds)
    assert out["y"].shape == (5, 3)


# ----------------------------------------------------------------------------- verify

def test_compare_passes_within_tolerance_and_fails_outside():
    ref = {"y": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}
    close = {"y": ref["y"] + 1e-6}
    far = {"y": ref["y"] + np.array([[0, 0], [0, 0.5]], np.float32)}
    assert V.compare(ref, close).passed
    rep = V.compare(ref, far)
    assert rep.status == "failed" and rep.outputs[0].violations == 1
    assert rep.max_abs == pytest.approx(0.5)
    assert V.compare(ref, far, atol=1.0).passed


def test_compare_matches_by_position_when_names_differ():
    a = {"out": np.ones((2, 3), np.float32)}
    b = {"output_0": np.ones((2, 3), np.float32)}
    rep = V.compare(a, b)
    assert rep.passed and rep.outputs[0].candidate_name == "output_0"


def test_compare_labels_exact_but_forgives_ties():
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]], np.float32)
    ref = {"label": np.array([0, 0, 1]), "prob": probs}
    tie_flip = {"label": np.array([1, 0, 1]), "prob": probs}
    real_flip = {"label": np.array([0, 1, 1]), "prob": probs}
    rep = V.compare(ref, tie_flip)
    assert rep.passed and rep.outputs[0].ties == 1
    rep = V.compare(ref, real_flip)
    assert not rep.passed and rep.outputs[0].agreement == pytest.approx(2 / 3)


def test_compare_nan_and_shape():
    ref = {"y": np.array([1.0, np.nan], np.float32)}
    assert V.compare(ref, {"y": np.array([1.0, np.nan], np.float32)}).passed
    assert not V.compare(ref, {"y": np.array([1.0, 2.0], np.float32)}).passed
    assert not V.compare(ref, {"y": np.ones(3, np.float32)}).passed
    # [N] vs [N, 1] holds the same values: passes, with a note
    rep = V.compare({"y": np.ones((3, 1), np.float32)}, {"y": np.ones(3, np.float32)})
    assert rep.passed and "squeeze" in rep.outputs[0].note


def test_one_comparison_for_host_and_device():
    """verify.compare and the device health check are the same rule (they disagreed on NaN
    at the same place and on [1, 2] vs [2])."""
    from edgeops.agent import health

    cases = [
        (np.array([1.0, np.nan], np.float32), np.array([1.0, np.nan], np.float32)),
        (np.array([1.0, np.nan], np.float32), np.array([1.0, 2.0], np.float32)),
        (np.ones((1, 2), np.float32), np.ones(2, np.float32)),
        (np.ones((1, 2), np.float32), np.ones(3, np.float32)),
        (np.array([np.inf, 1.0], np.float32), np.array([np.inf, 1.0], np.float32)),
        (np.array([np.inf, 1.0], np.float32), np.array([-np.inf, 1.0], np.float32)),
        (np.array([3, 4]), np.array([3, 5])),
        (np.array([0.0, 1.0], np.float32), np.array([0.0, 1.0 + 5e-4], np.float32)),
    ]
    for ref, got in cases:
        host = V.compare({"y": ref}, {"y": got}).passed
        dev = health.compare(ref, got, *V.tolerance_for("float32"))["passed"]
        assert host == dev, (ref, got)
    assert [V.compare({"y": r}, {"y": g}).passed for r, g in cases] == \
        [True, False, True, False, True, False, False, True]


def test_compare_diagnoses_permuted_outputs():
    """A converter that wrote its outputs in another order than their names say (tf2onnx on a
    real TFLite model): the values are found elsewhere and the permutation is reported."""
    rng = np.random.default_rng(0)
    onset, contour = rng.random((2, 172, 88), np.float32), rng.random((2, 172, 264), np.float32)
    ref = {"contour": contour, "onset": onset}
    swapped = {"contour": onset, "onset": contour}          # same names, values swapped
    rep = V.compare(ref, swapped)
    assert not rep.passed and "permuted" in rep.reason
    assert rep.permutation == {"contour": "onset", "onset": "contour"}
    # different names: pairing by position fails, pairing by value passes and says so
    rep = V.compare(ref, {"out_0": onset, "out_1": contour})
    assert rep.passed and rep.permutation == {"contour": "out_1", "onset": "out_0"}
    assert "by value" in rep.reason
    # no pairing works: the failure names the first bad output, no permutation claimed
    rep = V.compare(ref, {"out_0": onset + 1, "out_1": contour})
    assert not rep.passed and rep.permutation is None


def test_top1_agreement_reported():
    ref = {"logits": np.array([[2.0, 1.0], [0.0, 1.0]], np.float32)}
    cand = {"logits": np.array([[1.0, 2.0], [0.0, 1.0]], np.float32)}
    rep = V.compare(ref, cand)
    assert rep.outputs[0].top1_agreement == 0.5 and not rep.passed


def test_make_inputs_dtypes_and_dynamic_dims():
    from edgeops.formats.base import Signature, TensorSpec

    sig = Signature((TensorSpec("pixel", "float32", ("batch", 3, None, None)),
                     TensorSpec("input_ids", "int64", (None, "seq")),
                     TensorSpec("attention_mask", "int64", (None, "seq")),
                     TensorSpec("flag", "bool", (1,))), ())
    feeds = V.make_inputs(sig)
    assert feeds["pixel"].shape == (2, 3, 16, 16) and feeds["pixel"].dtype == np.float32
    assert feeds["input_ids"].max() < 100 and feeds["attention_mask"].min() == 1
    assert feeds["flag"].dtype == bool
    again = V.make_inputs(sig)
    assert np.array_equal(feeds["pixel"], again["pixel"])  # deterministic
    feeds = V.make_inputs(sig, V.parse_shapes(["pixel=1,3,8,8"]))
    assert feeds["pixel"].shape == (1, 3, 8, 8)


def test_parse_shapes_errors():
    assert V.parse_shapes(["x=1,3,224,224"]) == {"x": (1, 3, 224, 224)}
    assert V.parse_shapes(["x:1x3x8x8"]) == {"x": (1, 3, 8, 8)}
    assert V.parse_shapes(["1,4"]) == {"*": (1, 4)}
    with pytest.raises(UsageError):
        V.parse_shapes(["x=a,b"])
    with pytest.raises(UsageError):
        V.parse_shapes(["x=0,3"])


def test_load_inputs_npz_and_folder(tmp_path):
    from edgeops.formats.base import Signature, TensorSpec

    sig = Signature((TensorSpec("x", "float32", (None, 4)),), ())
    np.savez(tmp_path / "d.npz", x=np.ones((3, 4), np.float64))
    got = V.load_inputs(tmp_path / "d.npz", sig)
    assert got["x"].dtype == np.float32 and got["x"].shape == (3, 4)
    (tmp_path / "dir").mkdir()
    np.save(tmp_path / "dir" / "whatever.npy", np.zeros((2, 4), np.float32))
    assert V.load_inputs(tmp_path / "dir", sig)["x"].shape == (2, 4)  # by position
    np.save(tmp_path / "single.npy", np.zeros((5, 4), np.float32))
    assert V.load_inputs(tmp_path / "single.npy", sig)["x"].shape == (5, 4)
    (tmp_path / "junk.npz").write_bytes(b"not numpy")
    with pytest.raises(UsageError, match="not a readable"):
        V.load_inputs(tmp_path / "junk.npz", sig)
    np.savez(tmp_path / "bad.npz", a=np.ones(1), b=np.ones(1))
    with pytest.raises(UsageError, match="do not match"):
        V.load_inputs(tmp_path / "bad.npz", sig)


# ----------------------------------------------------------------------------- planner

def test_every_edge_declares_tool_tolerance_and_resolves():
    seen = set()
    for e in C.edges():
        assert e.key not in seen
        seen.add(e.key)
        assert e.atol > 0 and e.rtol > 0 and e.tool and e.extras
        assert callable(C.resolve(e)), e.func
        F.get_format(e.source), F.get_format(e.target)


def test_plan_shortest_and_via():
    direct = C.plan("torchscript", "onnx")
    assert [e.key for e in direct] == [("torchscript", "onnx")]
    two = C.plan("onnx", "mlpackage")
    assert [e.target for e in two] == ["torchscript", "mlpackage"]
    via = C.plan("torchscript", "mlpackage", via=["onnx"])
    assert [e.target for e in via] == ["onnx", "torchscript", "mlpackage"]


def test_plan_refusals():
    with pytest.raises(ConversionError, match="no conversion route from mlmodel"):
        C.plan("mlmodel", "onnx")
    with pytest.raises(UsageError, match="already"):
        C.plan("onnx", "onnx")
    with pytest.raises(FormatError, match="unknown format"):
        C.plan("onnx", "tensorrt")


def test_onnx_with_external_data(tmp_path):
    """Large exports keep weights in a side file; size and params must count them."""
    from edgeops.inspect import inspect_model

    m = onnx.load(str(_linear_onnx(tmp_path / "a.onnx")))
    onnx.save(m, str(tmp_path / "ext.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
    info = inspect_model(tmp_path / "ext.onnx")
    assert info["external_data"]["files"] == ["ext.data"]
    assert info["size"] > (tmp_path / "ext.onnx").stat().st_size
    assert info["params"] == 15
    out = F.runner(tmp_path / "ext.onnx").run({"x": np.ones((2, 4), np.float32)})
    assert out["y"].shape == (2, 3)
