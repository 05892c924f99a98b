"""`edgeops optimize --prune / --distill` on real models (digits), through onnx2torch,
torch-pruning and back to ONNX. No timing thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import _quant_models as qm
from edgeops.errors import UsageError
from edgeops.lineage import read_onnx_lineage
from edgeops.optimize import gates
from edgeops.optimize.prune import distill, prune
from test_cli import edgeops

torch = pytest.importorskip("torch")
nn = torch.nn
FAST = {"measure_seconds": 0.3}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prune")


@pytest.fixture(scope="module")
def cnn(work):
    d = work / "cnn"
    d.mkdir()
    calib, ev = qm.write_data(d, image=True)
    x, _ = qm.digits()
    train = d / "train.npz"
    np.savez(train, x=np.kron(x[:1400].reshape(-1, 8, 8), np.ones((4, 4), np.float32))[:, None])
    return qm.cnn(d / "cnn.onnx"), train, ev


class ResCat(nn.Module):
    """A residual add and a concatenation: the couplings DepGraph must keep consistent."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, 1, 1)
        self.c2 = nn.Conv2d(32, 32, 3, 1, 1)
        self.c3 = nn.Conv2d(32, 16, 1)
        self.c4 = nn.Conv2d(32, 16, 3, 1, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(h + self.c2(h))
        h = torch.cat([self.c3(h), self.c4(h)], 1)
        return self.fc(h.mean((2, 3)))


@pytest.fixture(scope="module")
def rescat(work):
    torch.manual_seed(0)
    path = work / "rescat.onnx"
    torch.onnx.export(ResCat().eval(), torch.randn(1, 1, 16, 16), str(path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
                      opset_version=17, dynamo=False)
    return path


def _conv_out_channels(path: Path) -> dict[str, int]:
    m = onnx.load(str(path))
    inits = {t.name: list(t.dims) for t in m.graph.initializer}
    return {n.name: inits[n.input[1]][0] for n in m.graph.node if n.op_type == "Conv"}


@pytest.mark.slow
def test_structured_pruning_removes_channels_and_runs(cnn, work):
    src, _, ev = cnn
    out = work / "cnn.p50.onnx"
    r = prune(src, out, 0.5, eval_data=ev, labels="y", **FAST)
    before, after = _conv_out_channels(src), _conv_out_channels(out)
    assert sorted(after.values()) == sorted(c // 2 for c in before.values())    # shapes shrink
    assert r.after.params < 0.4 * r.before.params and r.after.flops < 0.4 * r.before.flops
    assert r.after.size < 0.4 * r.before.size
    data = dict(np.load(ev))
    y = gates.session(out, 1).run(None, {"x": data["x"]})[0]
    assert y.shape == (len(data["x"]), 10)                                       # still runs
    assert r.after.metric == pytest.approx(float(np.mean(y.argmax(1) == data["y"])))
    assert r.kept_layers and all("Gemm" in k for k in r.kept_layers)             # output layer
    lin = read_onnx_lineage(out)
    assert lin["step"] == "optimize.prune" and lin["prune"]["ratio"] == 0.5


@pytest.mark.slow
def test_residual_and_concat_pruned_consistently(rescat, work):
    out = work / "rescat.p.onnx"
    r = prune(rescat, out, 0.5, **FAST)
    ch = {c.name: c.after for c in r.layers}
    assert ch["c1/Conv"] == ch["c2/Conv"] < 32          # the residual add couples c1 and c2
    assert ch["c3/Conv"] < 16 and ch["c4/Conv"] < 16     # both concat branches pruned
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    assert gates.session(out, 1).run(None, {"x": x})[0].shape == (3, 10)
    m = onnx.load(str(out))
    fc = next(t for t in m.graph.initializer if list(t.dims)[:1] == [10] and len(t.dims) == 2)
    assert fc.dims[1] == ch["c3/Conv"] + ch["c4/Conv"]   # the Linear sees the concat's width


@pytest.mark.slow
def test_keep_is_honoured(rescat, work):
    r = prune(rescat, work / "rescat.keep.onnx", 0.5, keep=["/c3/Conv"], **FAST)
    ch = {c.name: c.after for c in r.layers}
    assert ch["c3/Conv"] == 16 and ch["c4/Conv"] < 16
    assert "c3/Conv" in r.kept_layers
    with pytest.raises(UsageError, match="no layer named"):
        prune(rescat, work / "x.onnx", 0.5, keep=["/nope/Conv"], **FAST)


@pytest.mark.slow
def test_unstructured_zeroes_weights_and_says_latency_does_not_drop(cnn, work):
    src, _, _ = cnn
    out = work / "cnn.u.onnx"
    r = prune(src, out, 0.6, structured=False, **FAST)
    assert r.after.params == r.before.params                       # shapes unchanged
    assert r.after.gzip_size < 0.8 * r.before.gzip_size            # zeros compress
    assert any("only zeroes weights" in w for w in r.warnings)
    w = [np.frombuffer(t.raw_data, np.float32) for t in onnx.load(str(out)).graph.initializer
         if len(t.dims) == 4]
    assert np.mean(np.concatenate(w) == 0) > 0.5


@pytest.mark.slow
def test_distillation_recovers_a_pruned_student(cnn, work):
    src, train, ev = cnn
    out = work / "cnn.p50d.onnx"
    r = prune(src, out, 0.5, distill=True, data=train, epochs=4, lr=3e-3, eval_data=ev,
              labels="y", **FAST)
    d = r.distill
    assert d["loss"] == "kl" and d["seed"] == 0 and d["history"]
    before, after = d["student_before"]["metric"], d["student_after"]["metric"]
    assert after >= before + 0.2, (before, after)               # fixed seed, wide margin
    assert after == pytest.approx(r.after.metric)
    assert d["student_after"]["params"] == d["student_before"]["params"] < d["teacher"]["params"]
    lin = read_onnx_lineage(out)
    assert lin["step"] == "optimize.prune+distill" and lin["distill"]["best_epoch"] >= 1
    # the result can then go through --quantize, and the lineage chain stays whole
    from edgeops.optimize.quantize import quantize

    q = quantize(out, work / "cnn.p50d.int8.onnx", "static", calibration=ev, eval_data=ev,
                 labels="y", max_drop=0.02, calib_method="minmax", **FAST)
    assert q.passed
    chain = read_onnx_lineage(work / "cnn.p50d.int8.onnx")
    assert chain["step"] == "optimize.quantize" and chain["parent"]["step"] == "optimize.prune+distill"
    r2 = edgeops("inspect", work / "cnn.p50d.int8.onnx")
    assert "optimize.prune+distill of cnn.onnx: ratio 0.5" in r2.stdout


@pytest.mark.slow
def test_distill_into_a_torchscript_student(cnn, work):
    src, train, ev = cnn
    torch.manual_seed(1)
    tiny = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))
    student = work / "tiny.pt"
    torch.jit.script(tiny).save(str(student))
    r = distill(src, work / "tiny.d.onnx", data=train, student=str(student), epochs=2,
                eval_data=ev, labels="y", **FAST)
    assert r.distill["student"] == str(student)
    assert r.after.params < 1000 and r.distill["student_after"]["metric"] >= \
        r.distill["student_before"]["metric"]


@pytest.mark.slow
def test_cli_prune_json_and_refusals(cnn, rescat, work):
    src, train, ev = cnn
    r = edgeops("optimize", rescat, "--prune", "0.3", "-o", work / "cli.onnx", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["structured"] and rep["after"]["params"] < rep["before"]["params"]
    for args, needle in [
        (["--distill"], "--distill needs --data"),
        (["--distill", "--data", train], "--student pruned needs --prune"),
        (["--prune", "1.5"], "between 0 and 1"),
        (["--prune", "0.5", "--quantize", "static"], "separate steps"),
        (["--distill", "--data", train, "--student", "width:2"], "width must be"),
    ]:
        r = edgeops("optimize", rescat, *args, "-o", work / "bad.onnx")
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


@pytest.mark.slow
def test_sklearn_and_coreml_refused(work):
    import coremltools as ct
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    from edgeops import samples

    pkl = next(s.path for s in samples.build_all(work / "s", ("sklearn",))
               if str(s.path).endswith((".pkl", ".joblib")))
    r = edgeops("optimize", pkl, "--prune", "0.5", "-o", work / "x.onnx")
    assert r.returncode == 2 and "scikit-learn" in r.stderr and "Traceback" not in r.stderr
    b = NeuralNetworkBuilder([("x", datatypes.Array(4))], [("y", datatypes.Array(2))])
    b.add_inner_product("fc", np.ones((2, 4)), np.zeros(2), 4, 2, True, "x", "y")
    ml = work / "tiny.mlmodel"
    ct.models.MLModel(b.spec).save(str(ml))
    r = edgeops("optimize", ml, "--prune", "0.5", "-o", work / "x.onnx")
    assert r.returncode == 2 and "Core ML" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_output_layer_behind_resize_is_protected(work):
    src = qm.seg_head(work / "seg.onnx")
    r = prune(src, work / "seg.p.onnx", 0.5, **FAST)
    assert "head/Conv" in r.kept_layers
    x = np.random.default_rng(0).random((2, 3, 32, 32), np.float32)
    assert gates.session(work / "seg.p.onnx", 1).run(None, {"image": x})[0].shape == (2, 5, 32, 32)
