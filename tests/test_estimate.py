"""Latency / memory prediction (edgeops.bench.estimate) and the calibration suite.

No timing thresholds: this machine is shared and noisy. The real-timing test only checks that
a fit on real onnxruntime medians is finite and better than the uncalibrated prior.
"""

from __future__ import annotations

import math
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeops.bench import estimate as E
from edgeops.bench.suite import build_suite, suite_feeds

PROFILE = {
    "name": "t", "calibrated": False,
    "cpu": {"cores": 2, "freq_ghz": 2.5, "fp32_flops_per_cycle": 32, "int8_ops_per_cycle": 128},
    "memory": {"ram_gb": 4.0, "bandwidth_gbs": 20.0},
    "efficiency": {"conv": 0.3, "depthwise": 0.08, "gemm": 0.35, "rnn": 0.15, "int8": 0.25,
                   "memory": 0.4, "node_overhead_us": 4.0, "run_overhead_us": 15.0, "parallel": 0.85},
    "calibration": {},
}


def _model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "t", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _vi(name, shape, dt=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dt, shape)


def _init(name, shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _node(a, op):
    return next(n for n in a.nodes if n.op_type == op)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return build_suite(tmp_path_factory.mktemp("suite"))


@pytest.fixture(scope="module")
def suite_analyses(suite):
    return [E.analyze(m.path) for m in suite]


def test_conv_flops_bytes_and_fused_relu():
    m = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                helper.make_node("Relu", ["y"], ["z"])],
               [_vi("x", ["N", 3, 8, 8])], [_vi("z", None)], [_init("w", (4, 3, 3, 3)), _init("b", (4,))])
    a = E.analyze(m)
    conv = _node(a, "Conv")
    assert a.input_shapes == {"x": [1, 3, 8, 8]}           # dynamic batch fixed to 1
    assert conv.op_class == "conv"
    assert conv.flops == 2 * (4 * 8 * 8) * (3 * 3 * 3)
    assert conv.bytes == 4 * (3 * 64 + 4 * 27 + 4 + 4 * 64)  # x, w, b, y in fp32
    relu = _node(a, "Relu")
    assert relu.status == "fused" and relu.count == 0      # onnxruntime fuses Conv+Relu
    assert a.weight_bytes == 4 * (4 * 27 + 4)
    assert not a.unknown_nodes


def test_gemm_matmul_flops():
    m = _model([helper.make_node("Gemm", ["x", "w", "b"], ["y"]),
                helper.make_node("MatMul", ["y", "w2"], ["z"])],
               [_vi("x", [1, 16])], [_vi("z", None)],
               [_init("w", (16, 8)), _init("b", (8,)), _init("w2", (8, 5))])
    a = E.analyze(m)
    assert _node(a, "Gemm").flops == 2 * 1 * 8 * 16 and _node(a, "Gemm").op_class == "gemm"
    assert _node(a, "MatMul").flops == 2 * 1 * 5 * 8
    assert _node(a, "Gemm").bytes == 4 * (16 + 16 * 8 + 8 + 8)
    # batched attention MatMul: [1, 4, 10, 16] x [1, 4, 16, 10]
    m2 = _model([helper.make_node("MatMul", ["q", "k"], ["s"])],
                [_vi("q", [1, 4, 10, 16]), _vi("k", [1, 4, 16, 10])], [_vi("s", None)])
    assert _node(E.analyze(m2), "MatMul").flops == 2 * (4 * 10 * 10) * 16


@pytest.mark.parametrize("kind,gates,direction,dirs", [("LSTM", 4, "forward", 1), ("GRU", 3, "bidirectional", 2)])
def test_rnn_flops(kind, gates, direction, dirs):
    seq, inp, hid = 5, 3, 4
    m = _model([helper.make_node(kind, ["x", "W", "R"], ["y"], hidden_size=hid, direction=direction)],
               [_vi("x", [seq, 1, inp])], [_vi("y", None)],
               [_init("W", (dirs, gates * hid, inp)), _init("R", (dirs, gates * hid, hid))])
    n = _node(E.analyze(m), kind)
    assert n.op_class == "rnn"
    assert n.flops == seq * dirs * 2 * gates * hid * (inp + hid)
    assert n.steps == seq * dirs                      # per-step cost: time steps x directions


def test_rnn_step_cost_scales_with_sequence_length():
    """onnxruntime's LSTM/GRU kernels run small per-timestep GEMMs: a fixed cost per step
    (rnn_step_us) on top of the FLOPs, so a long thin RNN costs more than its FLOPs say."""
    def gru(seq, hid):
        return E.analyze(_model([helper.make_node("GRU", ["x", "W", "R"], ["y"], hidden_size=hid)],
                                [_vi("x", [seq, 1, 8])], [_vi("y", None)],
                                [_init("W", (1, 3 * hid, 8)), _init("R", (1, 3 * hid, hid))]))
    prof = dict(PROFILE, efficiency={**PROFILE["efficiency"], "rnn_step_us": 2.0})
    a = gru(100, 16)
    assert E.predict(a, prof).p50_ms - E.predict(a, PROFILE).p50_ms == pytest.approx(100 * 2e-3)
    assert E.predict(a, PROFILE).by_class_ms["rnn"] < E.predict(a, prof).by_class_ms["rnn"]


def test_depthwise_classification():
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1] * 4, group=8),
                helper.make_node("Conv", ["y", "w2"], ["z"], kernel_shape=[1, 1])],
               [_vi("x", [1, 8, 6, 6])], [_vi("z", None)], [_init("w", (8, 1, 3, 3)), _init("w2", (16, 8, 1, 1))])
    a = E.analyze(m)
    convs = [n for n in a.nodes if n.op_type == "Conv"]
    assert [c.op_class for c in convs] == ["depthwise", "conv"]
    assert convs[0].flops == 2 * 8 * 36 * 9


def test_qdq_int8_detection(suite):
    path = next(m.path for m in suite if m.name == "int8_qdq_cnn")
    a = E.analyze(path)
    convs = [n for n in a.nodes if n.op_type == "Conv"]
    assert convs and all(c.op_class == "int8" for c in convs)
    # weight DequantizeLinear nodes fold; activation Q/DQ pairs between convs fuse into QLinearConv
    dq = [n for n in a.nodes if n.op_type == "DequantizeLinear"]
    assert {n.status for n in dq} <= {"folded", "fused", "run"}
    assert sum(n.status == "folded" for n in dq) >= len(convs)
    assert "int8" in a.classes
    # int8 weights are counted at 1 byte in the conv's bytes
    w = next(t for t in onnx.load(str(path)).graph.initializer if t.data_type == TensorProto.INT8)
    assert convs[0].bytes < convs[0].flops  # sanity: no fp32 weight inflation
    assert w.data_type == TensorProto.INT8
    dyn = E.analyze(next(m.path for m in suite if m.name == "int8_dyn_mlp"))
    assert [n.op_class for n in dyn.nodes if n.op_type == "MatMulInteger"] == ["int8"] * 3


def test_peak_activation_chain():
    # x -> Relu -> Reshape (alias) -> Relu -> Relu: at most two 100-float buffers live at once
    shape = numpy_helper.from_array(np.array([10, 10], np.int64), "shape")
    m = _model([helper.make_node("Relu", ["x"], ["a"]),
                helper.make_node("Reshape", ["a", "shape"], ["b"]),
                helper.make_node("Relu", ["b"], ["c"]),
                helper.make_node("Relu", ["c"], ["d"])],
               [_vi("x", [1, 100])], [_vi("d", None)], [shape])
    a = E.analyze(m)
    assert a.peak_activation_bytes == 2 * 100 * 4
    r = _node(a, "Reshape")
    assert r.status == "alias" and r.bytes == 0 and r.count == 1   # no bytes, one node overhead
    # a branch keeps x alive: x -> Relu -> Add(x, .) needs x, a at once, then a, y
    m2 = _model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                 helper.make_node("Add", ["x", "b"], ["y"])],
                [_vi("x", [1, 100])], [_vi("y", None)])
    assert E.analyze(m2).peak_activation_bytes == 3 * 100 * 4


def test_unknown_and_subgraph_nodes():
    m = _model([helper.make_node("Relu", ["x"], ["a"]),
                helper.make_node("Mystery", ["a"], ["b"], domain="com.example"),
                helper.make_node("Relu", ["b"], ["c"])],
               [_vi("x", [1, 8])], [_vi("c", None)])
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    a = E.analyze(m)
    assert len(a.unknown_nodes) >= 1                      # counted and reported, not dropped
    p = E.predict(a, PROFILE)
    assert p.unknown_nodes == a.unknown_nodes and "unknown shapes" in p.basis
    # If: both branches analysed, the costlier one counted
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"])], "then", [], [_vi("t", [1, 64])])
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], ["e"])], "else", [], [_vi("e", [1, 64])])
    m2 = _model([helper.make_node("If", ["cond"], ["o"], then_branch=then_g, else_branch=else_g)],
                [_vi("cond", [], TensorProto.BOOL), _vi("x", [1, 64])], [_vi("o", None)],
                [_init("w", (64, 64))])
    a2 = E.analyze(m2)
    mm = [n for n in a2.nodes if n.op_type == "MatMul"]
    assert mm and mm[0].flops == 2 * 64 * 64 and mm[0].in_subgraph


def test_predict_labels_and_intervals(suite_analyses):
    a = next(x for x in suite_analyses if x.name.startswith("conv3x3_l"))
    p = E.predict(a, PROFILE)
    d = p.to_dict()
    assert d["label"] == "predicted" and not d["calibrated"]
    lo, hi = d["interval_ms"]
    assert lo < d["p50_ms"] < hi and hi / lo >= 4 - 1e-9        # uncalibrated: /2 .. x2
    assert "UNCALIBRATED" in d["basis"]
    assert set(d["by_class_ms"]) == set(E.CLASSES) and d["by_class_ms"]["conv"] > 0
    assert 0 < len(d["top_nodes"]) <= 10
    assert all(t["bound"] in ("compute", "memory") for t in d["top_nodes"])
    assert d["fits"] is True and d["total_mb"] == pytest.approx(d["weights_mb"] + d["peak_activation_mb"])
    small = dict(PROFILE, memory={"ram_gb": 1e-6, "bandwidth_gbs": 20.0})
    assert E.predict(a, small).fits is False
    # more threads: faster compute
    assert E.predict(a, PROFILE, threads=2).p50_ms < p.p50_ms
    # calibrated: interval from the leave-one-out error, at least +-5 %
    cal = dict(PROFILE, calibrated=True, calibration={"p90_abs_loo": 0.01, "n_models": 20,
                                                       "classes_seen": ["conv", "memory"]})
    pc = E.predict(a, cal)
    assert pc.calibrated and pc.interval_ms[1] / pc.p50_ms == pytest.approx(1.05)
    # classes the calibration never saw widen the interval and are reported
    g = next(x for x in suite_analyses if x.name.startswith("mlp_m"))
    pg = E.predict(g, cal)
    assert pg.unseen_classes == ["gemm"] and pg.interval_ms[1] / pg.p50_ms > 1.5


def test_fit_recovers_synthetic_truth(suite_analyses):
    truth = dict(PROFILE, efficiency={"conv": 0.62, "depthwise": 0.21, "gemm": 0.8, "rnn": 0.33,
                                      "int8": 0.45, "norm": 0.5, "memory": 2.5, "llc": 1.1,
                                      "dram": 0.45, "node_overhead_us": 0.9,
                                      "kernel_overhead_us": 1.5, "rnn_step_us": 0.4,
                                      "run_overhead_us": 6.0,
                                      "parallel": 0.85})
    meas = [E.predict(a, truth).p50_ms for a in suite_analyses]
    res = E.fit(suite_analyses, meas, PROFILE)
    cal = res["calibration"]
    assert cal["n_models"] == len(suite_analyses)
    assert set(cal["classes_seen"]) == set(E.CLASSES)
    assert cal["median_abs_in_sample"] < 0.02 and cal["p90_abs_in_sample"] < 0.02
    fitted = dict(PROFILE, efficiency={**PROFILE["efficiency"], **res["efficiency"]})
    for a, m in zip(suite_analyses, meas):
        assert E.predict(a, fitted).p50_ms == pytest.approx(m, rel=0.02)
    assert cal["median_abs_prior"] > 0.2                    # the prior was really wrong
    assert cal["dram_seen"]                                 # the suite has a model beyond the cache
    assert res["efficiency"]["rnn_step_us"] == pytest.approx(0.4, rel=0.1)
    for v in list(res["efficiency"].values()) + [x for x in cal.values() if not isinstance(x, list)]:
        assert isinstance(v, (str, int, float, bool))        # TOML-friendly
    assert all(isinstance(x, (str, int, float)) for v in cal.values() if isinstance(v, list) for x in v)


def test_fit_real_timings(suite, suite_analyses):
    import onnxruntime as ort

    meas = []
    for m in suite:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
        sess = ort.InferenceSession(str(m.path), so, providers=["CPUExecutionProvider"])
        feeds = suite_feeds(m.path)
        for _ in range(3):
            sess.run(None, feeds)
        ts = []
        for _ in range(21):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            ts.append(time.perf_counter() - t0)
        meas.append(float(np.median(ts)) * 1e3)
    res = E.fit(suite_analyses, meas, PROFILE)
    cal = res["calibration"]
    print(f"\nsuite fit on this machine: in-sample median |err| {cal['median_abs_in_sample']:.3f}, "
          f"leave-one-out median |err| {cal['median_abs_loo']:.3f} (p90 {cal['p90_abs_loo']:.3f}), "
          f"prior {cal['median_abs_prior']:.3f}")
    assert math.isfinite(cal["median_abs_loo"]) and math.isfinite(cal["p90_abs_loo"])
    assert cal["median_abs_in_sample"] < cal["median_abs_prior"]
    assert cal["median_abs_loo"] < cal["median_abs_prior"]
    for c in E.COMPUTE_CLASSES:
        assert E.EFF_BOUNDS[c][0] <= res["efficiency"][c] <= E.EFF_BOUNDS[c][1]


def test_suite_size_and_determinism(suite, tmp_path):
    assert 0 < len(suite) <= 22
    covered = {c for m in suite for c in m.classes}
    assert set(E.CLASSES) <= covered
    again = build_suite(tmp_path)
    assert [m.name for m in again] == [m.name for m in suite]
    assert [m.path.read_bytes() for m in again] == [m.path.read_bytes() for m in suite]
    assert [m.path.name for m in build_suite(tmp_path)] == [m.path.name for m in again]   # cached
    f1, f2 = suite_feeds(suite[0].path), suite_feeds(suite[0].path)
    assert all(np.array_equal(f1[k], f2[k]) for k in f1)


def _mlp_model(widths):
    nodes, inits, x = [], [], "x"
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        inits += [_init(f"w{k}", (a, b), k), _init(f"b{k}", (b,), k)]
        nodes.append(helper.make_node("Gemm", [x, f"w{k}", f"b{k}"], [f"y{k}"]))
        x = f"y{k}"
    return _model(nodes, [_vi("x", [1, widths[0]])], [_vi(x, None)], inits)


def test_weights_beyond_the_cache_cost_dram_bandwidth():
    a = E.analyze(_mlp_model((1024, 2048, 1024)))             # 16 MiB of fp32 weights
    g = _node(a, "Gemm")
    assert g.weight_bytes == 4 * (1024 * 2048 + 2048)
    eff = {**PROFILE["efficiency"], "memory": 2.0, "llc": 1.0, "dram": 0.5}
    big = dict(PROFILE, efficiency=eff, memory={"ram_gb": 4.0, "bandwidth_gbs": 20.0, "cache_mb": 64.0})
    small = dict(big, memory={**big["memory"], "cache_mb": 4.0})
    l2 = dict(big, memory={**big["memory"], "l2_mb": 1.0})
    pb, ps, pl = E.predict(a, big), E.predict(a, small), E.predict(a, l2)
    assert pb.dram_fraction == 0 and pb.llc_fraction == 0
    assert 0.7 < ps.dram_fraction < 0.8 and "DRAM" in ps.basis
    assert pl.dram_fraction == 0 and 0.9 < pl.llc_fraction < 1
    assert pb.p50_ms < pl.p50_ms < ps.p50_ms
    # the old profile schema (no llc/dram/cache keys) still predicts
    assert E.predict(a, PROFILE).p50_ms > 0


def test_skip_layernorm_and_gelu_fusion():
    d = 16
    m = _model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                helper.make_node("Add", ["h", "x"], ["r"]),
                helper.make_node("LayerNormalization", ["r", "s", "b"], ["n"], axis=-1),
                helper.make_node("Div", ["n", "c"], ["d1"]),
                helper.make_node("Erf", ["d1"], ["e"]),
                helper.make_node("Add", ["e", "one"], ["e1"]),
                helper.make_node("Mul", ["n", "e1"], ["g"]),
                helper.make_node("Mul", ["g", "half"], ["y"])],
               [_vi("x", [1, 8, d])], [_vi("y", None)],
               [_init("w", (d, d)), _init("s", (d,)), _init("b", (d,)),
                numpy_helper.from_array(np.array(1.41421, np.float32), "c"),
                numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                numpy_helper.from_array(np.array(0.5, np.float32), "half")])
    a = E.analyze(m)
    ln, erf = _node(a, "LayerNormalization"), _node(a, "Erf")
    assert ln.op_class == "norm" and erf.op_class == "norm" and "norm" in a.classes
    assert _node(a, "Add").status == "fused" and _node(a, "Add").fused_into == ln.name
    assert ln.flops == 8 * d * E._SKIP_LN_OPS                 # SkipLayerNormalization cost
    assert {n.status for n in a.nodes if n.op_type in ("Div", "Mul")} == {"fused"}
    assert [n.op_type for n in a.nodes if n.status == "run"] == ["MatMul", "LayerNormalization", "Erf"]
