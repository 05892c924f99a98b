"""Keras models: full-model HDF5 (.h5, written by Keras 2 / tf-keras or Keras 3) and the
Keras 3 `.keras` zip. Detection, loading, signature, an eager runner and inspection.

Covered: functional and Sequential models, and subclassed models whose classes are
registered in the running process. Refused: weights-only files (`save_weights`), which
have no architecture. Not covered: the TF SavedModel directory written by Keras 2's
`model.save(dir)` -- that is a SavedModel and belongs to `formats.tensorflow`.

Loading uses Keras 3 (`keras.saving.load_model`), which reads files written by both Keras
generations; a tf-keras file Keras 3 cannot read falls back to tf_keras. Lambda layers
carry marshalled Python bytecode, i.e. loading them runs code: they are refused before
any loader sees the file unless the user trusts it (`LoadOptions.trust_pickle`).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .. import extras
from ..errors import FormatError, UnsafePickleError, first_line
from .base import FormatInfo, LoadOptions, Probe, Signature, TensorSpec

FORMATS = (
    FormatInfo("keras-h5", "keras", "Keras full model (HDF5)", "tensorflow",
               suffixes=(".h5", ".hdf5")),
    FormatInfo("keras-v3", "keras", "Keras 3 model (.keras zip)", "tensorflow",
               suffixes=(".keras",)),
    FormatInfo("keras-h5-weights", "keras", "Keras weights-only HDF5 file", "tensorflow",
               refused="weights only (no model architecture in the file): the model's code is "
                       "needed. Save the full model with model.save('model.h5') or "
                       "model.save('model.keras')"),
)

_V3_MEMBERS = ("config.json", "metadata.json")


# ----------------------------------------------------------------------------- detect

def detect(probe: Probe) -> str | None:
    if probe.is_dir:
        return None
    if probe.is_hdf5:
        return _detect_h5(probe)
    if probe.is_zip:
        return _detect_v3(probe)
    return None


def _attr_str(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _attr_str(value.item())
    return str(value)


def _open_h5(path: Path):
    h5py = extras.require("h5py", what="reading Keras .h5 files")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise FormatError(f"{path}: HDF5 file is truncated or corrupt ({first_line(exc)})") from exc


def _detect_h5(probe: Probe) -> str | None:
    with _open_h5(probe.path) as f:
        try:
            attrs = set(f.attrs.keys())
            keys = set(f.keys())
        except (OSError, RuntimeError, KeyError) as exc:
            raise FormatError(f"{probe.path}: HDF5 file is truncated or corrupt "
                              f"({first_line(exc)})") from exc
    if "model_config" in attrs:
        return "keras-h5"
    # Keras 2 `save_weights('w.h5')`: layer names at the root, one group per layer.
    if "layer_names" in attrs:
        return "keras-h5-weights"
    # Keras 3 (and tf-keras 2.16+) `save_weights('x.weights.h5')`: groups "layers"/"vars"
    # and no attributes; the same layout is the model.weights.h5 inside a .keras zip.
    if "model_weights" not in keys and keys & {"layers", "vars", "_layer_checkpoint_dependencies"}:
        return "keras-h5-weights"
    return None


def _detect_v3(probe: Probe) -> str | None:
    names = set(probe.zip_names)
    if names:
        if not all(m in names for m in _V3_MEMBERS):
            return None
        try:
            meta = json.loads(probe.zip_read("metadata.json"))
        except (ValueError, KeyError, OSError):
            return None
        return "keras-v3" if isinstance(meta, dict) and "keras_version" in meta else None
    # A cut-off zip has no central directory, so no names; but the first local header
    # still names the first member, and Keras writes metadata.json/config.json first.
    head = probe.head
    if head[:4] == b"PK\x03\x04" and len(head) >= 30:
        n = int.from_bytes(head[26:28], "little")
        first = head[30:30 + n].decode("utf-8", "replace")
        if first in _V3_MEMBERS:
            raise FormatError(f"{probe.path}: Keras .keras archive is truncated or corrupt "
                              f"(no zip directory after {probe.size} bytes)")
    return None


# ----------------------------------------------------------------------------- load

def _read_config(path: Path, fmt: str) -> tuple[dict | None, dict]:
    """(model config, facts about the writer) straight from the file, without Keras."""
    facts: dict = {}
    if fmt == "keras-h5":
        with _open_h5(path) as f:
            try:
                raw = f.attrs.get("model_config")
                for k in ("keras_version", "backend"):
                    if k in f.attrs:
                        facts[k] = _attr_str(f.attrs[k])
            except (OSError, RuntimeError) as exc:
                raise FormatError(f"{path}: HDF5 file is truncated or corrupt "
                                  f"({first_line(exc)})") from exc
        text = _attr_str(raw) if raw is not None else None
    else:
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                text = z.read("config.json").decode("utf-8", "replace")
                facts.update(json.loads(z.read("metadata.json")))
        except (zipfile.BadZipFile, KeyError, OSError, ValueError) as exc:
            raise FormatError(f"{path}: Keras .keras archive is truncated or corrupt "
                              f"({first_line(exc)})") from exc
    try:
        config = json.loads(text) if text else None
    except ValueError as exc:
        raise FormatError(f"{path}: the Keras model config is not valid JSON") from exc
    return config, facts


def _lambda_layers(config) -> list[str]:
    """Names of Lambda layers in a model config (nested models included)."""
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if node.get("class_name") == "Lambda":
                cfg = node.get("config") or {}
                found.append(str(cfg.get("name") or node.get("name") or "lambda"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)
    return found


_UNKNOWN_PATTERNS = (
    re.compile(r"Could not locate (?:class|function) '([^']+)'"),
    re.compile(r"Unknown (?:layer|object|class|activation|loss|metric)[^:]*: '?([\w.>]+)'?"),
    re.compile(r"'([\w.>]+)' is not a registered"),
)


def _custom_object_name(text: str) -> str | None:
    for pat in _UNKNOWN_PATTERNS:
        m = pat.search(text)
        if m:
            return m.group(1)
    return None


def load(path: Path, fmt: str | None = None, opts: LoadOptions | None = None):
    """The Keras model object (Keras 3, or tf_keras for old files Keras 3 cannot read)."""
    return _load(Path(path), fmt or detect(Probe(path)), opts or LoadOptions())[0]


def _load(path: Path, fmt: str, opts: LoadOptions):
    """(model, loader description)."""
    if fmt not in ("keras-h5", "keras-v3"):
        raise FormatError(f"{path}: not a loadable Keras model (format {fmt!r})")
    config, facts = _read_config(path, fmt)
    lambdas = _lambda_layers(config)
    if lambdas and not opts.trust_pickle:
        raise UnsafePickleError(
            f"{path}: Lambda layer(s) {', '.join(lambdas[:3])} hold marshalled Python code; "
            "loading the model would run it",
            hint="pass --trust-pickle (trust_pickle=True) only if you trust the file's origin")
    keras = extras.require("keras", what="loading Keras models")
    with _conventional_name(path, fmt) as p:
        try:
            model = keras.saving.load_model(str(p), compile=False, safe_mode=not opts.trust_pickle)
            return model, f"keras {keras.__version__}"
        except Exception as exc:  # Keras raises ValueError/TypeError/KeyError/OSError ...
            first = exc
        # Keras 3 reads nearly every tf-keras .h5; some old layer configs only tf_keras knows.
        if fmt == "keras-h5" and not facts.get("keras_version", "").startswith("3"):
            try:
                tf_keras = extras.require("tf_keras", what="loading Keras 2 .h5 files")
                model = tf_keras.models.load_model(str(p), compile=False)
                return model, f"tf_keras {tf_keras.__version__}"
            except Exception:
                pass  # report Keras 3's error: it is the primary loader
    raise _load_error(path, first) from first


@contextmanager
def _conventional_name(path: Path, fmt: str):
    """Keras picks its reader from the file suffix; detection went by content, so a
    model saved as "model.bin" gets a temporary symlink (or copy) named model.h5/.keras."""
    want = (".keras",) if fmt == "keras-v3" else (".h5", ".hdf5")
    if path.suffix.lower() in want:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="edgeops-keras-") as tmp:
        link = Path(tmp) / f"model{want[0]}"
        try:
            link.symlink_to(path.resolve())
        except OSError:  # no symlinks (Windows without privilege)
            shutil.copyfile(path, link)
        yield link


def _load_error(path: Path, exc: BaseException) -> FormatError:
    text = str(exc)
    name = _custom_object_name(text)
    if name:
        return FormatError(
            f"{path}: the model uses the custom object {name!r}, which is not registered; "
            "a custom object's Python code is needed to load it",
            hint="import the module defining it (decorated with "
                 "@keras.saving.register_keras_serializable()) before loading, or export the "
                 "model to ONNX/SavedModel where it was built")
    if isinstance(exc, OSError) or "truncated" in text or "unable to" in text.lower():
        return FormatError(f"{path}: Keras file is truncated or corrupt ({first_line(exc)})")
    return FormatError(f"{path}: Keras cannot load the model: {first_line(exc)}")


def save(model, path: Path, fmt: str = "keras-v3") -> None:
    # Keras picks the writer from the suffix, so write under the right one and move.
    suffix = ".keras" if fmt == "keras-v3" else ".h5"
    path = Path(path)
    if path.suffix == suffix:
        model.save(str(path))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / f"model{suffix}"
        model.save(str(tmp_path))
        shutil.move(str(tmp_path), str(path))


# ----------------------------------------------------------------------------- signature

def _dtype_name(dt) -> str:
    name = getattr(dt, "name", dt)
    try:
        return np.dtype(str(name)).name
    except TypeError:
        return str(name)


def _shape(shape) -> tuple | None:
    try:
        dims = list(shape)
    except TypeError:  # unknown rank
        return None
    out = []
    for d in dims:
        d = getattr(d, "value", d)  # tf.Dimension in old tf-keras
        out.append(None if d is None else int(d))
    return tuple(out)


def input_names(model) -> list[str]:
    names = [getattr(t, "name", None) or f"input_{i}" for i, t in enumerate(model.inputs)]
    # tf-keras symbolic tensors may carry graph suffixes ("x:0"); keep the layer name
    return _unique([n.split(":")[0] for n in names])


def output_names(model) -> list[str]:
    """Names of the model's outputs: the producing layers' names, as Keras reports them.

    Keras 3 Sequential has no `output_names`, and its output tensors are named
    `keras_tensor_N`, so fall back to the layer in the tensor's history.
    """
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != len(model.outputs):
        names = []
        for i, t in enumerate(model.outputs):
            hist = getattr(t, "_keras_history", None)
            layer = getattr(hist, "operation", None) or getattr(hist, "layer", None)
            names.append(getattr(layer, "name", None) or f"output_{i}")
    return _unique([str(n) for n in names])


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            n = f"{n}_{seen[n]}"
        seen.setdefault(n, 0)
        out.append(n)
    return out


def _embedding_inputs(model) -> set[int]:
    """Positions of model inputs that feed an Embedding layer directly. Such inputs are token
    ids whatever dtype the file declares (Keras 2 Sequential models without an InputLayer
    declare float32; Embedding casts to int), so they are int32 in the signature and
    generated inputs are valid ids, not normal floats."""
    out = set()
    ids = {id(t): i for i, t in enumerate(model.inputs)}
    for layer in getattr(model, "layers", []):
        if type(layer).__name__ != "Embedding":
            continue
        try:
            got = layer.input
        except Exception:  # noqa: BLE001 - a layer used twice has no single input
            continue
        for t in (got if isinstance(got, (list, tuple)) else [got]):
            if id(t) in ids:
                out.add(ids[id(t)])
    layers = [la for la in getattr(model, "layers", []) if type(la).__name__ != "InputLayer"]
    if not out and len(model.inputs) == 1 and layers and type(layers[0]).__name__ == "Embedding":
        out.add(0)              # Sequential: its first layer reads the only input
    return out


def signature_of(model) -> Signature:
    if not getattr(model, "inputs", None) or not getattr(model, "outputs", None):
        raise FormatError("the Keras model has no defined inputs/outputs (a subclassed model "
                          "that was never built); save it after calling it once")
    ids = _embedding_inputs(model)
    ins = tuple(TensorSpec(n, "int32" if i in ids and _dtype_name(t.dtype).startswith("float")
                           else _dtype_name(t.dtype), _shape(t.shape))
                for i, (n, t) in enumerate(zip(input_names(model), model.inputs)))
    outs = tuple(TensorSpec(n, _dtype_name(t.dtype), _shape(t.shape))
                 for n, t in zip(output_names(model), model.outputs))
    return Signature(ins, outs)


def signature(path: Path, fmt: str = "keras-h5", opts: LoadOptions | None = None) -> Signature:
    return signature_of(load(path, fmt, opts))


# ----------------------------------------------------------------------------- runner

def _as_list(out) -> list:
    if isinstance(out, dict):
        return list(out.values())
    if isinstance(out, (list, tuple)):
        return list(out)
    return [out]


def input_packer(model):
    """A function packing a list of inputs (in `model.inputs` order) the way the model
    was built: a single tensor, a list, or a dict. Keras 3 warns -- and may mis-route
    inputs -- when the structure differs, e.g. for a tf-keras file whose single input is
    a one-element list. Built eagerly, so the returned function is plain enough for
    autograph to trace inside a tf.function."""
    struct = getattr(model, "_inputs_struct", None)  # Keras 3 Functional
    if struct is not None:
        keras = extras.require("keras")
        pack = keras.tree.pack_sequence_as
        n = len(keras.tree.flatten(struct))
        if n == len(model.inputs):
            return lambda args: pack(struct, list(args))
    return lambda args: list(args) if len(args) > 1 else args[0]


def call_model(model, args: list, training: bool = False, packer=None):
    """Call a Keras model with inputs in `model.inputs` order (see input_packer)."""
    packer = packer or input_packer(model)
    return model(packer(args), training=training)


class KerasRunner:
    """The Keras model called eagerly with training=False (BatchNorm/Dropout in inference)."""

    def __init__(self, model, loader: str = ""):
        self.model = model
        self.loader = loader
        self.signature = signature_of(model)
        self._in = [s.name for s in self.signature.inputs]
        self._out = [s.name for s in self.signature.outputs]
        self._pack = input_packer(model)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self._in if n not in feeds]
        if missing:
            raise FormatError(f"missing input(s) {missing}; the model takes {self._in}")
        args = [np.asarray(feeds[s.name], dtype=s.dtype) if s.dtype != "str" else feeds[s.name]
                for s in self.signature.inputs]
        out = call_model(self.model, args, packer=self._pack)
        arrays = [np.asarray(getattr(t, "numpy", lambda t=t: t)()) for t in _as_list(out)]
        return dict(zip(self._out, arrays))


def runner(path: Path, fmt: str = "keras-h5", opts: LoadOptions | None = None) -> KerasRunner:
    model, loader = _load(Path(path), fmt, opts or LoadOptions())
    return KerasRunner(model, loader)


# ----------------------------------------------------------------------------- inspect

def inspect(path: Path, fmt: str = "keras-h5", opts: LoadOptions | None = None) -> dict:
    path = Path(path)
    _config, facts = _read_config(path, fmt)
    model, loader = _load(path, fmt, opts or LoadOptions())
    sig = signature_of(model)
    layer_types: dict[str, int] = {}
    for layer in model.layers:
        k = type(layer).__name__
        layer_types[k] = layer_types.get(k, 0) + 1
    return {
        "params": int(model.count_params()),
        "layers": len(model.layers),
        "layer_types": dict(sorted(layer_types.items(), key=lambda kv: -kv[1])),
        "model_class": type(model).__name__,
        "written_by": {k: facts[k] for k in ("keras_version", "backend", "date_saved") if k in facts},
        "loaded_with": loader,
        "inputs": [s.to_dict() for s in sig.inputs],
        "outputs": [s.to_dict() for s in sig.outputs],
    }
