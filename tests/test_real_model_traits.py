"""The traits real third-party models have, rebuilt small so each mechanism is tested on its
own in the default tier (the real models themselves run in test_realmodels.py):

* calibration data for a streaming model: a GRU state [1, batch, 64] (batch on axis 1) and
  a scalar input, given stacked, batched or as per-sample files;
* refusals: an already-quantized model, a broken graph, an unknown --shape name;
* the load-and-run check: per-channel weights forced at opset 11 (DequantizeLinear has no
  axis there: the failure real opset-11 models hit) are repaired node by node;
* the speed attribution that decides which layers stay float, on a hand-written profile;
* gates on the prune path, the pickle gate on registry add, prediction refusing shapes it
  cannot resolve, permuted outputs repaired.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeops.errors import UsageError

FAST = {"measure_seconds": 0.3}


def _cli(*args, home: Path, cwd: Path | None = None):
    env = {**os.environ, "EDGEOPS_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "edgeops", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600, cwd=cwd)


def _streaming(path: Path) -> Path:
    """feature [batch, 8] -> Gemm -> GRU(state [1, batch, 16]) -> * gain (a scalar input);
    outputs the score and the next state, like a real streaming VAD."""
    rng = np.random.default_rng(0)
    h = 16
    inits = [numpy_helper.from_array(rng.standard_normal((8, 32)).astype(np.float32) * 0.3, "w1"),
             numpy_helper.from_array(np.zeros(32, np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((1, 3 * h, 32)).astype(np.float32) * 0.2, "W"),
             numpy_helper.from_array(rng.standard_normal((1, 3 * h, h)).astype(np.float32) * 0.2, "R"),
             numpy_helper.from_array(np.zeros((1, 6 * h), np.float32), "B"),
             numpy_helper.from_array(np.array([0], np.int64), "ax0"),
             numpy_helper.from_array(rng.standard_normal((h, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Gemm", ["feature", "w1", "b1"], ["e"], name="embed"),
             helper.make_node("Unsqueeze", ["e", "ax0"], ["seq"], name="as_seq"),
             helper.make_node("GRU", ["seq", "W", "R", "B", "", "state"], ["y", "next_state"],
                              name="gru", hidden_size=h, linear_before_reset=1),
             helper.make_node("Squeeze", ["next_state", "ax0"], ["hs"], name="last"),
             helper.make_node("MatMul", ["hs", "w2"], ["logit"], name="head"),
             helper.make_node("Mul", ["logit", "gain"], ["score"], name="scale")]
    g = helper.make_graph(nodes, "streaming", [
        helper.make_tensor_value_info("feature", TensorProto.FLOAT, ["batch", 8]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, "batch", h]),
        helper.make_tensor_value_info("gain", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("next_state", TensorProto.FLOAT, [1, "batch", h])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _stream_samples(n: int) -> list[dict]:
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    return [{"feature": rng.standard_normal((1, 8)).astype(np.float32),
             "state": rng.standard_normal((1, 1, 16)).astype(np.float32) * 0.5,
             "gain": np.array(1.5, np.float32)} for _ in range(n)]


def test_calibration_layouts_for_state_and_scalar_inputs(tmp_path):
    """Real streaming models take a state with batch on axis 1 and scalars: calibration data
    stacked (N, *input), batched on each input's batch axis, or as per-sample files."""
    from edgeops.optimize.quantize import quantize

    src = _streaming(tmp_path / "stream.onnx")
    feeds = _stream_samples(24)
    stacked = tmp_path / "stacked.npz"
    np.savez(stacked, **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
    batched = tmp_path / "batched.npz"
    np.savez(batched, feature=np.concatenate([f["feature"] for f in feeds]),
             state=np.concatenate([f["state"] for f in feeds], axis=1), gain=np.array(1.5, np.float32))
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, f in enumerate(feeds):
        np.savez(folder / f"{i:03d}.npz", **f)
    for data, layout in ((stacked, "stacked"), (batched, "state on axis 1"), (folder, "files")):
        out = tmp_path / f"q-{data.stem}.onnx"
        r = quantize(src, out, "static", calibration=data, metric="cosine", max_drop=0.05,
                     calib_method="minmax", **FAST)
        assert r.variant("static").path is None and (r.output or r.rejected_output)
        assert layout in r.calibration_layout, r.calibration_layout
        assert r.eval_samples == 24
    # a layout that fits neither is one line naming the input and the ranks it accepts
    bad = tmp_path / "bad.npz"
    np.savez(bad, feature=np.zeros((24, 1, 1, 8), np.float32), state=np.zeros((24, 1, 1, 16), np.float32),
             gain=np.zeros(24, np.float32))
    with pytest.raises(UsageError, match="'feature' has shape .* rank 3 .* or rank 2"):
        quantize(src, tmp_path / "x.onnx", "static", calibration=bad, **FAST)


def test_already_quantized_and_broken_models_refused(tmp_path):
    from edgeops.optimize.quantize import quantize

    src = _streaming(tmp_path / "s.onnx")
    feeds = _stream_samples(8)
    np.savez(tmp_path / "d.npz", **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
    r = quantize(src, tmp_path / "q.onnx", "dynamic", eval_data=tmp_path / "d.npz", metric="cosine",
                 max_drop=0.05, **FAST)
    q = Path(r.output or r.rejected_output)
    with pytest.raises(UsageError, match="already quantized"):
        quantize(q, tmp_path / "qq.onnx", "dynamic", **FAST)
    # a node reading a tensor nothing defines (the shipped oww-hey-jarvis file)
    m = onnx.load(str(src))
    m.graph.node[0].input[1] = "w_missing"
    onnx.save(m, str(tmp_path / "broken.onnx"))
    with pytest.raises(Exception, match="reads 'w_missing', which no graph in the model defines"):
        quantize(tmp_path / "broken.onnx", tmp_path / "b.onnx", "dynamic", **FAST)


@pytest.mark.slow
def test_failing_quantized_nodes_are_kept_float_and_named(tmp_path):
    """Per-channel weights at opset 11 make every DequantizeLinear invalid (no axis before
    opset 13): what real opset-11 exports hit. The load-and-run check names the nodes,
    recognises the pattern after the second, keeps those float, and the result loads."""
    import torch

    from edgeops.optimize import gates, graph, isa
    from edgeops.optimize.quantize import Progress, _Checked, build_static

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 1)).eval()
    src = tmp_path / "cnn11.onnx"
    torch.onnx.export(net, torch.randn(1, 3, 16, 16), str(src), opset_version=11, dynamo=False,
                      input_names=["x"], output_names=["y"])
    x = np.random.default_rng(0).standard_normal((16, 1, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    prep = graph.prepare(src, tmp_path, [{"x": x[0]}], keep_opset=True)
    assert prep.opset == 11 and not prep.per_channel
    s = isa.choose(isa.detect())
    s.per_channel = True                          # what the old code did at opset 11
    calib = gates.load_dataset(tmp_path / "calib.npz", __import__("edgeops.formats.onnx", fromlist=["x"]).signature(src))
    feed = tmp_path / "feed.npz"
    np.savez(feed, **calib.one())
    repairs: list[dict] = []
    build = _Checked(lambda ex, o: build_static(prep.path, o, s, "minmax", calib, tmp_path / "c.json",
                                                ex, Progress()),
                     onnx.load(str(prep.path)), feed, tmp_path, repairs, Progress(), "static")
    out = build([], tmp_path / "q.onnx")
    assert gates.probe(out, feed) is None                       # it loads and runs now
    assert repairs and all("axis" in r["reason"] for r in repairs)
    assert {r["node"] for r in repairs} >= {n.name for n in onnx.load(str(prep.path)).graph.node
                                            if n.op_type == "Conv"}


def test_speed_attribution_charges_layers_with_their_conversions():
    """Which layers stay float is decided from onnxruntime's per-node profile mapped onto the
    float graph: fused int8 kernels keep the node name (+ _token_N), NCHWc float kernels their
    output tensor's, Q/DQ their tensor's; a conversion after a float op goes to the layers
    that consume it."""
    from edgeops.optimize import speed

    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("LeakyRelu", ["c1"], ["a1"], name="act1"),
             helper.make_node("Max", ["a1", "x"], ["m1"], name="max1"),
             helper.make_node("Conv", ["m1", "w2"], ["c2"], name="conv2")]
    w = numpy_helper.from_array(np.zeros((1, 1, 1, 1), np.float32), "w1")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                          [helper.make_tensor_value_info("c2", TensorProto.FLOAT, None)],
                          [w, numpy_helper.from_array(np.zeros((1, 1, 1, 1), np.float32), "w2")])
    model = helper.make_model(g)
    assert speed.groups_of(model) == {"conv1": ["conv1", "act1"], "conv2": ["conv2"]}
    fp32 = {"a1_nchwc": {"op": "Conv", "us": 100.0}, "max1": {"op": "Max", "us": 20.0},
            "conv2": {"op": "Conv", "us": 50.0}}
    int8 = {"conv1_token_3": {"op": "QLinearConv", "us": 60.0},
            "act1": {"op": "QLinearLeakyRelu", "us": 30.0},
            "a1_DequantizeLinear": {"op": "DequantizeLinear", "us": 10.0},
            "max1": {"op": "Max", "us": 20.0},
            "m1_QuantizeLinear": {"op": "QuantizeLinear", "us": 12.0},
            "conv2_token_7": {"op": "QLinearConv", "us": 45.0}}
    fn, ft, _ = speed.attribute(fp32, model)
    qn, qt, _ = speed.attribute(int8, model)
    groups = speed.groups_of(model)
    f_cost, q_cost = speed._charge(model, groups, fn, ft), speed._charge(model, groups, qn, qt)
    assert f_cost == {"conv1": 100.0, "conv2": 50.0}
    # conv1: its kernel + its activation + the DQ of its output; conv2: its kernel + the Q of
    # the float Max's output it consumes
    assert q_cost == {"conv1": 100.0, "conv2": 57.0}


def test_prune_gates_and_misplaced_options(tmp_path):
    """--prune honours --max-drop and --require-speedup as --quantize does; an option of the
    other engine is refused in one line (it was silently ignored)."""
    from edgeops.samples import onnx_models

    src = onnx_models(tmp_path)[0].path
    home = tmp_path / "home"
    r = _cli("optimize", src, "--prune", "0.5", "--max-drop", "0%", "--metric", "cosine",
             "-o", tmp_path / "p.onnx", "--json", home=home)
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    assert rep["passed"] is False and "budget not met" in rep["failure"]
    assert not (tmp_path / "p.onnx").exists() and Path(rep["rejected_output"]).exists()
    r = _cli("optimize", src, "--prune", "0.5", "--unstructured", "--require-speedup",
             "-o", tmp_path / "u.onnx", "--json", home=home)
    assert r.returncode == 1 and "--require-speedup" in json.loads(r.stdout)["failure"]
    for args, flag in ((["--prune", "0.5", "--calibration", "random"], "--calibration"),
                       (["--quantize", "dynamic", "--epochs", "3"], "--epochs")):
        r = _cli("optimize", src, *args, "-o", tmp_path / "x.onnx", home=home)
        assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr


def test_registry_add_runs_the_pickle_gate(tmp_path):
    class Evil:
        def __reduce__(self):
            return (subprocess.call, (["true"],))

    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps(Evil()))
    home = tmp_path / "home"
    r = _cli("registry", "add", p, "--name", "evil", home=home)
    assert r.returncode == 2 and "subprocess.call" in r.stderr and "--trust-pickle" in r.stderr
    r = _cli("registry", "add", p, "--name", "evil", "--trust-pickle", "--json", home=home)
    assert r.returncode == 0
    r = _cli("registry", "show", "evil", "--json", home=home)
    shown = json.loads(r.stdout)
    assert any(a["kind"] == "safety" for a in shown["attachments"])


def test_prediction_refuses_shapes_it_cannot_resolve(tmp_path):
    """A MatMul whose input shape depends on an integer scalar's value (frames of sr // 500
    samples): inference cannot know it, the recording run fails on a guessed value, so the
    prediction is refused by name instead of counting the MatMul as free."""
    w = numpy_helper.from_array(np.zeros((16, 4), np.float32), "w")
    nodes = [helper.make_node("Div", ["sr", "k500"], ["flen"]),
             helper.make_node("Unsqueeze", ["flen", "ax0"], ["flen1"]),
             helper.make_node("Concat", ["minus1", "flen1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["framed"], name="frame", allowzero=1),
             helper.make_node("MatMul", ["framed", "w"], ["y"], name="project")]
    g = helper.make_graph(nodes, "vad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1536]),
                                         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [w, numpy_helper.from_array(np.array(500, np.int64), "k500"),
                           numpy_helper.from_array(np.array([0], np.int64), "ax0"),
                           numpy_helper.from_array(np.array([-1], np.int64), "minus1")])
    src = tmp_path / "vad.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    work = tmp_path / "cwd"
    work.mkdir()
    r = _cli("bench", src, "--target", "rpi4", "--predict", home=tmp_path / "home", cwd=work)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "project" in r.stderr and "stay unknown" in r.stderr and "Traceback" not in r.stderr
    # onnxruntime's symbolic inference gives up here and saves its debug model into the cwd;
    # the user's folder stays clean
    assert not list(work.iterdir())


def test_permuted_onnx_outputs_are_renamed_back(tmp_path):
    """A converter that wrote two outputs under each other's names: compare finds the
    permutation by value and the names are put back on the ONNX result."""
    from edgeops.agent.ort import session
    from edgeops.convert import _repair_output_names
    from edgeops.verify import compare

    nodes = [helper.make_node("Relu", ["x"], ["onset"]), helper.make_node("Concat", ["x", "x"], ["contour"], axis=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("onset", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("contour", TensorProto.FLOAT, None)])
    good = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    bad = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    for n in bad.graph.node:                      # the values under the other name
        n.output[0] = {"onset": "contour", "contour": "onset"}[n.output[0]]
    for o in bad.graph.output:
        o.name = {"onset": "contour", "contour": "onset"}[o.name]
    p = tmp_path / "bad.onnx"
    onnx.save(bad, str(p))
    x = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}

    def run(model_path):
        s = session(model_path)
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, x)))

    ref = dict(zip(["onset", "contour"], session(good.SerializeToString()).run(None, x)))
    rep = compare(ref, run(p))
    assert not rep.passed and rep.permutation == {"onset": "contour", "contour": "onset"}
    _repair_output_names(p, rep.permutation)
    assert compare(ref, run(p)).passed


def test_shape_names_are_checked(tmp_path):
    from edgeops.formats.base import Signature, TensorSpec
    from edgeops.verify import make_inputs, parse_shapes

    assert parse_shapes(["onnx::Flatten_0=1,34,96"]) == {"onnx::Flatten_0": (1, 34, 96)}
    assert parse_shapes(["x:1x3x8x8"]) == {"x": (1, 3, 8, 8)}
    sig = Signature((TensorSpec("input", "float32", ("b", "n")),), ())
    assert make_inputs(sig, {"serving_default_input:0": (1, 1280)})["input"].shape == (1, 1280)
    with pytest.raises(UsageError, match="no input named 'inputt'"):
        make_inputs(sig, {"inputt": (1, 2)})
