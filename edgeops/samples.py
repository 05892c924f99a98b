"""Small reference models in every source format, built on the spot with the real frameworks.

Used by the conversion-matrix tests, `benchmarks/convert_matrix.py` and the demo, so that
every converter edge is exercised on a model its framework really wrote. Models are tiny
(8x8 single-channel images, the shape of scikit-learn's bundled digits) so that a whole
matrix runs in a minute or two on two cores. Frameworks are imported inside each builder.

Not a model zoo: nothing here is meant for accuracy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .extras import require

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass
class Sample:
    name: str
    format: str
    path: Path
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # --shape values needed
    inputs: Path | None = None                                        # real inputs (.npz)


def digits(n: int = 64):
    """Real data shipped with scikit-learn: (X float32 [n, 64] in 0..1, y)."""
    datasets = require("sklearn.datasets", "sklearn")
    X, y = datasets.load_digits(return_X_y=True)
    return (X[:n] / 16.0).astype(np.float32), y[:n]


# ----------------------------------------------------------------------------- sklearn

def sklearn_models(d: Path) -> list[Sample]:
    joblib = require("joblib", "sklearn")
    ens = require("sklearn.ensemble", "sklearn")
    lin = require("sklearn.linear_model", "sklearn")
    pipe = require("sklearn.pipeline", "sklearn")
    pre = require("sklearn.preprocessing", "sklearn")
    datasets = require("sklearn.datasets", "sklearn")

    X, y = datasets.load_digits(return_X_y=True)
    X = X.astype(np.float32)
    Xd, yd = datasets.load_diabetes(return_X_y=True)
    out = []
    models = {
        "sk_rf": ens.RandomForestClassifier(n_estimators=10, max_depth=6, random_state=0).fit(X, y),
        "sk_logreg": lin.LogisticRegression(max_iter=300).fit(X / 16, y),
        "sk_pipeline": pipe.make_pipeline(pre.StandardScaler(), lin.LogisticRegression(max_iter=300)).fit(X, y),
    }
    for name, m in models.items():
        p = d / f"{name}.joblib"
        joblib.dump(m, p)
        np.savez(d / f"{name}_inputs.npz", X=X[:100] / (16 if name == "sk_logreg" else 1))
        out.append(Sample(name, "sklearn", p, inputs=d / f"{name}_inputs.npz"))
    gbr = ens.GradientBoostingRegressor(n_estimators=20, max_depth=3, random_state=0).fit(Xd, yd)
    p = d / "sk_gbr.pkl"
    joblib.dump(gbr, p)
    np.savez(d / "sk_gbr_inputs.npz", X=Xd[:100].astype(np.float32))
    out.append(Sample("sk_gbr", "sklearn", p, inputs=d / "sk_gbr_inputs.npz"))
    return out


# ----------------------------------------------------------------------------- torch

def train_classifier(model, x: np.ndarray, y: np.ndarray, epochs: int, lr: float,
                     batch: int = 64, seed: int = 0, cosine: bool = False):
    """Seeded Adam + cross-entropy minibatch training of a torch classifier on numpy data
    (tests and benchmarks train their small real models with it). Returns it in eval mode."""
    torch = require("torch")
    nn = torch.nn
    torch.manual_seed(seed)
    xt, yt = torch.tensor(x), torch.tensor(y)
    n = len(xt)
    opt = torch.optim.Adam(model.parameters(), lr)
    steps = epochs * -(-n // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
            if sched is not None:
                sched.step()
    return model.eval()


def _torch_cnn():
    torch = require("torch")
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10))
    # non-trivial BatchNorm statistics, so folding errors would show
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def torch_models(d: Path) -> list[Sample]:
    torch = require("torch")
    nn = torch.nn
    x = torch.from_numpy(digits(2)[0].reshape(2, 1, 8, 8))
    out = []
    cnn = _torch_cnn()
    p = d / "torch_cnn.pt"
    torch.jit.trace(cnn, x).save(str(p))
    out.append(Sample("torch_cnn_traced", "torchscript", p, shapes={"*": (2, 1, 8, 8)}))
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    p = d / "torch_mlp_scripted.pt"
    torch.jit.script(mlp).save(str(p))
    out.append(Sample("torch_mlp_scripted", "torchscript", p, shapes={"*": (2, 64)}))
    p = d / "torch_cnn.pt2"
    torch.export.save(torch.export.export(cnn, (x,)), str(p))
    out.append(Sample("torch_cnn_export", "torch-export", p))
    return out


def onnx_models(d: Path) -> list[Sample]:
    """ONNX written by torch's exporter at opset 17 (the route onnx2torch supports)."""
    torch = require("torch")
    x = torch.from_numpy(digits(2)[0].reshape(2, 1, 8, 8))
    p = d / "torch_cnn_opset17.onnx"
    torch.onnx.export(_torch_cnn(), (x,), str(p), input_names=["x"], output_names=["logits"],
                      opset_version=17, dynamo=False,
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return [Sample("onnx_cnn", "onnx", p)]


# ----------------------------------------------------------------------------- tensorflow

def _keras_cnn(keras):
    keras.utils.set_random_seed(0)
    layers = keras.layers
    return keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        layers.Conv2D(8, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
        layers.MaxPooling2D(), layers.Flatten(), layers.Dense(10)])


def _keras_mlp(keras):
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((64,), name="features"),
                             keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])


def keras_models(d: Path) -> list[Sample]:
    keras = require("keras", "tensorflow")
    out = []
    cnn = _keras_cnn(keras)
    cnn.save(d / "keras3_cnn.h5")
    out.append(Sample("keras3_cnn_h5", "keras-h5", d / "keras3_cnn.h5"))
    cnn.save(d / "keras3_cnn.keras")
    out.append(Sample("keras3_cnn_v3", "keras-v3", d / "keras3_cnn.keras"))
    mlp = _keras_mlp(keras)
    mlp.save(d / "keras3_mlp.keras")
    out.append(Sample("keras3_mlp_v3", "keras-v3", d / "keras3_mlp.keras"))
    tfk = require("tf_keras", "tensorflow")
    k2 = _keras_cnn(tfk)
    k2.save(str(d / "keras2_cnn.h5"))
    out.append(Sample("keras2_cnn_h5", "keras-h5", d / "keras2_cnn.h5"))
    return out


def tensorflow_models(d: Path) -> list[Sample]:
    tf = require("tensorflow")
    keras = require("keras", "tensorflow")
    out = []
    sm = d / "tf_savedmodel"
    cnn = _keras_cnn(keras)
    cnn.export(str(sm), verbose=False)
    out.append(Sample("tf_savedmodel", "savedmodel", sm))

    # a frozen GraphDef, the TF1-style deployment artifact
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    mlp = _keras_mlp(keras)
    fn = tf.function(lambda x: mlp(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, 64], tf.float32, name="x"))
    frozen = convert_variables_to_constants_v2(fn)
    p = d / "tf_frozen.pb"
    p.write_bytes(frozen.graph.as_graph_def().SerializeToString())
    out.append(Sample("tf_frozen_graphdef", "graphdef", p))

    # a TFLite flatbuffer written by TensorFlow's own converter
    import contextlib
    import io

    conv = tf.lite.TFLiteConverter.from_keras_model(mlp)
    p = d / "tf_mlp.tflite"
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the exported signature
        p.write_bytes(conv.convert())
    out.append(Sample("tflite_mlp", "tflite", p))
    return out


BUILDERS = {
    "sklearn": sklearn_models,
    "torch": torch_models,
    "onnx": onnx_models,
    "keras": keras_models,
    "tensorflow": tensorflow_models,
}


def build_all(d: Path, families: tuple[str, ...] = tuple(BUILDERS)) -> list[Sample]:
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    out: list[Sample] = []
    for fam in families:
        out += BUILDERS[fam](d)
    return out


def load_model(path: Path, width: int, seed: int = 0) -> Path:
    """A model whose cost is set by WIDTH, for load and latency-gate demos and tests:
    x[32, 1024] -> MatMul [1024, WIDTH] -> Relu -> MatMul [WIDTH, 8] -> Softmax. Width 16 costs
    ~0.03 ms of one core here, width 1024 ~2.4 ms."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((1024, width)) / 32).astype(np.float32), "w")
    w2 = numpy_helper.from_array((rng.standard_normal((width, 8)) / np.sqrt(width)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["z"]), helper.make_node("Softmax", ["z"], ["y"], axis=-1)]
    g = helper.make_graph(nodes, "load", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 1024])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 8])], [w, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path
