"""Tiny TensorFlow / Keras models for tests, written to a given path.

Plain functions, no pytest: the Keras/TF tests and the Core ML tests both use them.
Every builder seeds its weights, gives BatchNormalization non-trivial statistics (so
inference-mode BN is really exercised) and returns the path it wrote. The file is
written under the path's own name even when the suffix is not the conventional one
(e.g. "model.bin"), to test detection by content.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

IMG = (16, 16, 3)   # CNN input (NHWC, batch excluded)
FEATURES = 8        # MLP input width
CLASSES = 4


def _save(model, path: Path, suffix: str) -> Path:
    path = Path(path)
    if path.suffix == suffix:
        model.save(str(path))
        return path
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / f"model{suffix}"
        model.save(str(tmp_path))
        shutil.move(str(tmp_path), str(path))
    return path


def _suffix(path: Path, default: str) -> str:
    return Path(path).suffix if Path(path).suffix in (".h5", ".keras") else default


def _randomize_bn(model, layers_mod, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers_mod.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            n = gamma.shape
            layer.set_weights([rng.uniform(0.5, 1.5, n).astype("float32"),
                               rng.normal(0, 0.1, n).astype("float32"),
                               rng.normal(0, 0.2, n).astype("float32"),
                               rng.uniform(0.5, 2.0, n).astype("float32")])


# ----------------------------------------------------------------------------- Keras 3

def keras3_mlp(path, fmt_suffix: str | None = None):
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((FEATURES,), name="features")
    x = keras.layers.Dense(16, activation="relu", name="hidden")(inp)
    out = keras.layers.Dense(CLASSES, activation="softmax", name="probs")(x)
    model = keras.Model(inp, out, name="mlp")
    return _save(model, path, fmt_suffix or _suffix(path, ".keras"))


def _keras_cnn(k, name: str):
    inp = k.Input(IMG, name="image")
    x = k.layers.Conv2D(4, 3, padding="same", name="conv1")(inp)
    x = k.layers.BatchNormalization(name="bn1")(x)
    x = k.layers.ReLU(name="relu1")(x)
    x = k.layers.MaxPooling2D(2, name="pool1")(x)
    x = k.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = k.layers.GlobalAveragePooling2D(name="gap")(x)
    out = k.layers.Dense(CLASSES, name="logits")(x)
    model = k.Model(inp, out, name=name)
    _randomize_bn(model, k.layers)
    return model


def keras3_cnn(path, fmt_suffix: str | None = None):
    import keras

    keras.utils.set_random_seed(0)
    return _save(_keras_cnn(keras, "cnn"), path, fmt_suffix or _suffix(path, ".keras"))


def keras3_two_io(path, fmt_suffix: str | None = None):
    """Two inputs, two outputs (order and names must survive conversion)."""
    import keras

    keras.utils.set_random_seed(0)
    a = keras.Input((FEATURES,), name="a")
    b = keras.Input((3,), name="b")
    x = keras.layers.Concatenate(name="cat")([a, b])
    h = keras.layers.Dense(6, activation="tanh", name="h")(x)
    score = keras.layers.Dense(1, name="score")(h)
    probs = keras.layers.Dense(CLASSES, activation="softmax", name="class_probs")(h)
    model = keras.Model([a, b], [score, probs], name="two_io")
    return _save(model, path, fmt_suffix or _suffix(path, ".keras"))


def keras3_sequential(path, fmt_suffix: str | None = None):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(5, activation="relu"),
                              keras.layers.Dense(2)], name="seq")
    return _save(model, path, fmt_suffix or _suffix(path, ".keras"))


# ----------------------------------------------------------------------------- tf-keras (Keras 2)

def tfkeras_mlp_h5(path):
    import tensorflow as tf
    import tf_keras

    tf.random.set_seed(0)
    inp = tf_keras.Input((FEATURES,), name="features")
    x = tf_keras.layers.Dense(16, activation="relu", name="hidden")(inp)
    out = tf_keras.layers.Dense(CLASSES, activation="softmax", name="probs")(x)
    return _save(tf_keras.Model(inp, out, name="mlp"), path, ".h5")


def tfkeras_cnn_h5(path):
    import tensorflow as tf
    import tf_keras

    tf.random.set_seed(0)
    return _save(_keras_cnn(tf_keras, "cnn"), path, ".h5")


# ----------------------------------------------------------------------------- TF graphs

def _module(tf):
    class Small(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(0)
            self.k = tf.Variable(rng.normal(0, 0.3, (3, 3, 3, 4)).astype("float32"), name="k")
            self.w = tf.Variable(rng.normal(0, 0.3, (4, CLASSES)).astype("float32"), name="w")
            self.b = tf.Variable(rng.normal(0, 0.1, (CLASSES,)).astype("float32"), name="b")

        @tf.function(input_signature=[tf.TensorSpec([None, *IMG], tf.float32, name="x")])
        def __call__(self, x):
            y = tf.nn.relu(tf.nn.conv2d(x, self.k, 1, "SAME"))
            y = tf.reduce_mean(y, axis=[1, 2])
            return {"logits": tf.matmul(y, self.w) + self.b}

    return Small()


def saved_model(directory, signatures: bool = True):
    """A tf.Module SavedModel with a serving_default signature (input "x", output "logits")."""
    import tensorflow as tf

    m = _module(tf)
    sigs = {"serving_default": m.__call__.get_concrete_function()} if signatures else {}
    if not signatures:
        # a signature under another name, to check the error lists it
        sigs = {"predict": m.__call__.get_concrete_function()}
    tf.saved_model.save(m, str(directory), signatures=sigs)
    return Path(directory)


def frozen_graphdef(path, fn=None, spec=None):
    """A frozen GraphDef (variables folded into constants) of a small conv net, or of
    `fn` traced with `spec`. Input tensor "x", output "Identity"."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    if fn is None:
        m = _module(tf)
        concrete = m.__call__.get_concrete_function()
    else:
        concrete = tf.function(fn).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(concrete)
    Path(path).write_bytes(frozen.graph.as_graph_def().SerializeToString())
    return Path(path)


def keras3_export(directory):
    """A Keras 3 CNN exported as an inference SavedModel (`model.export`)."""
    import keras

    keras.utils.set_random_seed(0)
    model = _keras_cnn(keras, "cnn")
    model.export(str(directory), verbose=False)
    return Path(directory)


def unsupported_op_graphdef(path):
    """A frozen GraphDef using Igamma, an op tf2onnx has no ONNX mapping for."""
    import tensorflow as tf

    return frozen_graphdef(path, fn=lambda x: tf.math.igamma(x, x + 1.0) * 2.0,
                           spec=tf.TensorSpec([None, 4], tf.float32, name="x"))


def unsupported_op_saved_model(directory):
    import tensorflow as tf

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def __call__(self, x):
            return {"y": tf.math.lgamma(x) + 1.0}

    m = M()
    tf.saved_model.save(m, str(directory), signatures={"serving_default": m.__call__.get_concrete_function()})
    return Path(directory)
