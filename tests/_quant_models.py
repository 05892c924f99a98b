"""Small real models for the quantization tests, trained on scikit-learn's bundled digits.

* `mlp`: a 64-64-32-10 MLP (weights from sklearn's MLPClassifier) written as ONNX by hand,
  optionally with its first weight in a `Constant` node and its last layer inside an `If`
  body (the layouts real exported models use), or with a *planted sensitive layer*: one unit
  of the second hidden layer scaled up 10^4 and scaled back down in the next layer. fp32 is
  unchanged (ReLU is positively homogeneous), but the huge unit eats the whole int8 range of
  that activation, so every other unit rounds to zero and accuracy collapses. Keeping fc2
  and fc3 in float fixes it; fc1 can stay int8.
* `cnn`: a small torch CNN on 32x32 upscaled digits (Conv-heavy: dynamic int8 of its Conv
  layers goes through ConvInteger, which is slower than float on x86).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from edgeops.samples import train_classifier


@lru_cache(maxsize=None)
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    return x, y


def write_data(dir: Path, image: bool = False, name: str = "x") -> tuple[Path, Path]:
    """calib.npz (300 training samples) and eval.npz (the last 397 samples, with labels y)."""
    x, y = digits()
    if image:
        x = np.kron(x.reshape(-1, 8, 8), np.ones((4, 4), np.float32))[:, None]
    calib, ev = dir / "calib.npz", dir / "eval.npz"
    np.savez(calib, **{name: x[:300]})
    np.savez(ev, **{name: x[1400:], "y": y[1400:]})
    return calib, ev


@lru_cache(maxsize=None)
def _mlp_weights():
    from sklearn.neural_network import MLPClassifier

    x, y = digits()
    clf = MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=400, random_state=0)
    clf.fit(x[:1400], y[:1400])
    w1, w2, w3 = (w.astype(np.float32) for w in clf.coefs_)
    b1, b2, b3 = (b.astype(np.float32) for b in clf.intercepts_)
    return w1, b1, w2, b2, w3, b3


def mlp(path: Path, plant: bool = False, constant: bool = False, subgraph: bool = False,
        outer: bool = False) -> Path:
    """outer: the If's then-branch reads its weight from the main graph (outer scope), as
    exported Loop/If bodies often do."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1, b1, w2, b2, w3, b3 = (a.copy() for a in _mlp_weights())
    if plant:
        x, _ = digits()
        h2 = np.maximum(np.maximum(x[:1400] @ w1 + b1, 0) @ w2 + b2, 0)
        u = int(np.argmax(h2.mean(0)))          # the busiest unit of hidden layer 2
        w2[:, u] *= 1e4
        b2[u] *= 1e4
        w3[u, :] /= 1e4
    nodes = []
    inits = [numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(b2, "b2")]
    if constant:
        nodes.append(helper.make_node("Constant", [], ["w1"], name="w1_const",
                                      value=numpy_helper.from_array(w1, "w1_value")))
    else:
        inits.append(numpy_helper.from_array(w1, "w1"))
    nodes += [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
              helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
              helper.make_node("Relu", ["h1"], ["g"], name="relu1"),
              helper.make_node("MatMul", ["g", "w2"], ["g0"], name="fc2"),
              helper.make_node("Add", ["g0", "b2"], ["g1"], name="fc2_bias"),
              helper.make_node("Relu", ["g1"], ["h"], name="relu2")]
    if subgraph:
        def branch(tag: str):
            inner = [numpy_helper.from_array(b3, f"b3_{tag}")]
            if outer and tag == "then":
                inits.append(numpy_helper.from_array(w3, "w3_then"))
            else:
                inner.append(numpy_helper.from_array(w3, f"w3_{tag}"))
            return helper.make_graph(
                [helper.make_node("MatMul", ["h", f"w3_{tag}"], [f"o_{tag}"], name=f"fc3_{tag}"),
                 helper.make_node("Add", [f"o_{tag}", f"b3_{tag}"], [f"z_{tag}"], name=f"fc3_bias_{tag}")],
                f"branch_{tag}", [],
                [helper.make_tensor_value_info(f"z_{tag}", TensorProto.FLOAT, ["N", 10])], inner)
        inits.append(numpy_helper.from_array(np.array(-1.0, np.float32), "minus_one"))
        nodes += [helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
                  helper.make_node("Greater", ["s", "minus_one"], ["cond"], name="cond"),
                  helper.make_node("If", ["cond"], ["logits"], name="branch",
                                   then_branch=branch("then"), else_branch=branch("else"))]
    else:
        inits += [numpy_helper.from_array(w3, "w3"), numpy_helper.from_array(b3, "b3")]
        nodes += [helper.make_node("MatMul", ["h", "w3"], ["o"], name="fc3"),
                  helper.make_node("Add", ["o", "b3"], ["logits"], name="fc3_bias")]
    g = helper.make_graph(nodes, "mlp",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def no_weights(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "noweights",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def cnn(path: Path, epochs: int = 3) -> Path:
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    x, y = digits()
    xi = torch.tensor(np.kron(x.reshape(-1, 8, 8), np.ones((4, 4), np.float32))[:, None])

    def block(i, o, s):
        return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    m = nn.Sequential(*block(1, 16, 1), *block(16, 32, 2), *block(32, 64, 2), *block(64, 64, 1),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    train_classifier(m, xi[:1400].numpy(), y[:1400], epochs, 3e-3)
    torch.onnx.export(m, xi[:1], str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}}, opset_version=17,
                      dynamo=False)
    return path


def speech_lstm(path: Path) -> Path:
    """Conv1d front end + bidirectional LSTM + Linear over time (a CTC-style speech model)."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)

    class Speech(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(40, 64, 3, padding=1)
            self.lstm = nn.LSTM(64, 64, batch_first=True, bidirectional=True)
            self.fc = nn.Linear(128, 30)

        def forward(self, x):
            h, _ = self.lstm(torch.relu(self.conv(x)).transpose(1, 2))
            return self.fc(h)

    torch.onnx.export(Speech().eval(), (torch.randn(1, 40, 50),), str(path), input_names=["feats"],
                      output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"feats": {0: "B", 2: "T"}, "logits": {0: "B", 1: "T"}})
    return path


def seg_head(path: Path) -> Path:
    """Depthwise-separable block with squeeze-excite and a residual, then a 1x1 head whose
    output is upsampled by Resize: the head feeds the graph output through a non-compute op."""
    import torch
    import torch.nn as nn
    F = nn.functional

    torch.manual_seed(0)

    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, 2, 1)
            self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
            self.pw = nn.Conv2d(16, 16, 1)
            self.se1, self.se2 = nn.Linear(16, 4), nn.Linear(4, 16)
            self.head = nn.Conv2d(16, 5, 1)

        def forward(self, x):
            h = F.hardswish(self.stem(x))
            r = h
            h = self.pw(F.hardswish(self.dw(h)))
            w = torch.sigmoid(self.se2(torch.relu(self.se1(h.mean((2, 3))))))
            h = h * w[:, :, None, None] + r
            return F.interpolate(self.head(h), scale_factor=2.0, mode="bilinear", align_corners=False)

    torch.onnx.export(Seg().eval(), (torch.randn(1, 3, 32, 32),), str(path), input_names=["image"],
                      output_names=["mask"], opset_version=17, dynamo=False,
                      dynamic_axes={"image": {0: "B"}, "mask": {0: "B"}})
    return path
