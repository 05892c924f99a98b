"""The real-model tier: every command on every third-party model of the corpus.

`pytest -m realmodels` (CI runs it: ./dev fetches the corpus into $EDGEOPS_CORPUS, cached
like the venv). For each model of the manifest (plus the traits no shipped file has, derived
from them: initializers listed as inputs, Constant-node weights) the real CLI runs `inspect`,
`convert` to every target the conversion matrix offers, `optimize --quantize auto`, `bench`,
`bench --predict` and `registry add` + `bundle build` + `bundle verify --health`, and asserts:

* no traceback and never exit 70 (internal error), whatever the model;
* every refusal is one line that names the reason (exit 2 or 3), every parity breach exit 1
  with its reason;
* every success is checked here, independently of edgeops' report: the result is loaded
  with its own runtime (onnxruntime, torch.jit, LiteRT, TensorFlow) and run on the manifest's
  feed next to the source in *its* own runtime; Core ML results (no runtime on Linux) must
  say "not executed".
What each model gave is collected and printed as one table at the end of the session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeops import corpus

pytestmark = pytest.mark.realmodels

EDGEOPS = [sys.executable, "-m", "edgeops"]
TARGETS = {  # what `edgeops formats` offers from each corpus format (the matrix test pins it)
    "onnx": ("torchscript", "tflite", "savedmodel", "mlpackage"),
    "tflite": ("onnx",),
    "h5": ("onnx", "mlpackage"),
    "pickle": ("onnx",),
    "torchscript": ("onnx", "mlpackage"),
}
SUFFIX = {"torchscript": ".pt", "tflite": ".tflite", "savedmodel": ".savedmodel", "onnx": ".onnx",
          "mlpackage": ".mlpackage"}
RESULTS: list[tuple[str, str, str]] = []           # (model, step, outcome) for the summary


def _models() -> list[corpus.CorpusModel]:
    try:
        return corpus.load()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc), allow_module_level=True)
        return []


MODELS = _models()
ONNX = [m for m in MODELS if m.format == "onnx"]


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("realmodels")
    home = d / "home"
    home.mkdir()
    return d


@pytest.fixture(scope="session")
def derived(work) -> dict[str, corpus.CorpusModel]:
    """The traits no shipped file has, made from small real models."""
    out = {}
    for base in ("pulsevad-2k", "oww-embedding", "ort-mul-1"):
        m = corpus.get(base)
        for trait in ("inits-as-inputs", "constant-weights"):
            x = corpus.derive(m, trait, work)
            out[x.name] = x
    return out


def edgeops(work: Path, *args, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, EDGEOPS_HOME=str(work / "home"), PYTHONWARNINGS="ignore",
               TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([*EDGEOPS, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def outcome(r: subprocess.CompletedProcess, what: str) -> str:
    """Assert the contract every command keeps on any input; return a one-word outcome."""
    blob = r.stdout + r.stderr
    assert "Traceback (most recent call last)" not in blob, f"{what}: traceback\n{blob[-3000:]}"
    assert r.returncode != 70, f"{what}: internal error\n{r.stderr[-2000:]}"
    assert r.returncode in (0, 1, 2, 3), f"{what}: exit {r.returncode}\n{blob[-2000:]}"
    if r.returncode in (2, 3):
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, f"{what}: a refusal must be one error line\n{r.stderr[-2000:]}"
        assert len(errors[0]) > len("error: ") + 15, f"{what}: the refusal names no reason: {errors[0]}"
        return f"refused ({errors[0][len('error: '):][:90]})"
    return "ok" if r.returncode == 0 else "gate"


# ----------------------------------------------------------------------------- running models
# independent of edgeops: each format in its own runtime

def run_onnx(path: Path, feed: dict, literal: bool = False) -> list[np.ndarray]:
    """onnxruntime; LITERAL runs the graph without optimisations: a quantized graph's own
    arithmetic, which its fused int8 kernels only approximate."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if literal:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    return s.run(None, dict(zip(names, feed.values())) if set(names) != set(feed) else feed)


def run_tflite(path: Path, feed: dict) -> list[np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    sigs = it.get_signature_list()
    if sigs:
        key = next(iter(sigs))
        runner = it.get_signature_runner(key)
        names = sigs[key]["inputs"]
        args = dict(zip(names, feed.values())) if set(names) != set(feed) else feed
        out = runner(**{k: np.ascontiguousarray(v) for k, v in args.items()})
        return [np.asarray(out[k]) for k in sigs[key]["outputs"]]
    det = it.get_input_details()
    for d, v in zip(det, feed.values()):
        it.resize_tensor_input(d["index"], list(np.shape(v)))
    it.allocate_tensors()
    for d, v in zip(det, feed.values()):
        it.set_tensor(d["index"], np.ascontiguousarray(v, dtype=d["dtype"]))
    it.invoke()
    return [it.get_tensor(d["index"]) for d in it.get_output_details()]


def run_torchscript(path: Path, feed: dict) -> list[np.ndarray]:
    import torch

    m = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        out = m(*[torch.from_numpy(np.ascontiguousarray(v)) for v in feed.values()])
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o.numpy() for o in outs]


def run_savedmodel(path: Path, feed: dict) -> list[np.ndarray]:
    import tensorflow as tf

    fn = tf.saved_model.load(str(path)).signatures["serving_default"]
    names = list(fn.structured_input_signature[1])
    args = dict(zip(names, feed.values())) if set(names) != set(feed) else feed
    out = fn(**{k: tf.constant(v) for k, v in args.items()})
    return [np.asarray(out[k]) for k in sorted(out)]


def run_h5(path: Path, feed: dict) -> list[np.ndarray]:
    import keras

    class LSTM(keras.layers.LSTM):            # Keras 2 configs carry time_major
        def __init__(self, *a, time_major=None, **kw):
            super().__init__(*a, **kw)

    try:
        model = keras.models.load_model(str(path), compile=False, custom_objects={"LSTM": LSTM})
    except ValueError:              # Keras 3 cannot rebuild some Keras 2.2 files: tf-keras can
        import tf_keras

        model = tf_keras.models.load_model(str(path), compile=False)
    out = model(*[np.asarray(v) for v in feed.values()])
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


RUN = {"onnx": run_onnx, "tflite": run_tflite, "torchscript": run_torchscript,
       "savedmodel": run_savedmodel, "h5": run_h5}


def close(ref: list[np.ndarray], got: list[np.ndarray], what: str, loose: float = 1e-3) -> None:
    """Same outputs up to a tolerance scaled to each output's magnitude: a sanity check of
    an edgeops PASSED, deliberately not edgeops' own rule. Outputs are paired by shape when
    the counts match (converters may reorder them)."""
    assert len(ref) == len(got), f"{what}: {len(ref)} outputs vs {len(got)}"
    pending = list(got)
    for r in ref:
        r = np.asarray(r)
        match = next((g for g in pending if np.asarray(g).size == r.size), None)
        assert match is not None, f"{what}: no output like {r.shape} in {[np.shape(g) for g in pending]}"
        pending.remove(match)
        g = np.asarray(match).reshape(r.shape)
        if r.dtype.kind in "iub":
            assert np.mean(r == g) >= 0.99, f"{what}: integer outputs differ"
            continue
        scale = max(1.0, float(np.nanmax(np.abs(r))) if r.size else 1.0)
        err = float(np.nanmax(np.abs(r.astype(np.float64) - g.astype(np.float64)))) if r.size else 0.0
        assert err <= loose * scale, f"{what}: max abs {err:.3g} at output scale {scale:.3g}"


# ----------------------------------------------------------------------------- tests

def _all():
    return [pytest.param(m.name, id=m.name) for m in MODELS]


def _model(name: str, derived) -> corpus.CorpusModel:
    return derived[name] if "+" in name else corpus.get(name)


@pytest.mark.parametrize("name", _all())
def test_inspect(name, work):
    m = corpus.get(name)
    r = edgeops(work, "inspect", m.path, "--json")
    got = outcome(r, f"inspect {name}")
    RESULTS.append((name, "inspect", got))
    if got == "ok":
        info = json.loads(r.stdout)
        assert info["format"] and info["sha256"]


# onnx2tf writes the SavedModel and the TFLite file in one conversion: the tier runs the
# tflite route for every ONNX model it can afford and the savedmodel route on small ones; the
# three models onnx2tf needs 1-3.5 minutes for (per route, measured here) run in
# benchmarks/real_models.py, which converts every model to every target.
ONNX2TF_SLOW = {"ddddocr-common-det": "190 s", "lac-encoder": "75 s", "oww-hey-mycroft": "55 s"}
SAVEDMODEL_IN_TIER = {"pulsevad-2k", "ort-mul-1", "oww-melspectrogram", "oww-timer"}


def _conversions():
    out = []
    for m in MODELS:
        for t in TARGETS[m.format]:
            marks = ()
            if t in ("tflite", "savedmodel") and m.name in ONNX2TF_SLOW:
                marks = pytest.mark.skip(reason=f"onnx2tf takes {ONNX2TF_SLOW[m.name]} on it; "
                                                "benchmarks/real_models.py converts it")
            elif t == "savedmodel" and m.name not in SAVEDMODEL_IN_TIER:
                marks = pytest.mark.skip(reason="same onnx2tf conversion as its tflite route")
            out.append(pytest.param(m.name, t, id=f"{m.name}->{t}", marks=marks))
    return out


def convert_like_the_cli(src: Path, out: Path, target: str, shapes: dict, trust_pickle: bool):
    """edgeops.convert in this process (frameworks imported once for the whole tier), with the
    CLI's error boundary: an EdgeopsError is a one-line refusal with its exit code, anything
    else would be exit 70 and fails the test. Returns (exit code, report or message)."""
    from edgeops.convert import convert
    from edgeops.errors import EdgeopsError

    try:
        rep = convert(src, out, to=target, shapes=shapes, trust_pickle=trust_pickle)
    except EdgeopsError as exc:
        assert "\n" not in exc.message and len(exc.message) > 15, exc.message
        return exc.exit_code, exc.message
    return (1 if rep.status == "failed" else 0), rep


# routes that convert with parity on this stack (benchmarks/real_models.py, 2026-12-07)
MUST_CONVERT = {
    ("ethnicolr-census2010-ln", "onnx"), ("ethnicolr-nc-voter-name", "onnx"), ("ethnicolr-fl-fullname-2022", "onnx"),
    ("ddddocr-common", "torchscript"), ("ddddocr-common-det", "torchscript"), ("nudenet-320n", "torchscript"),
    ("lac-encoder", "torchscript"), ("oww-melspectrogram", "torchscript"), ("oww-embedding", "torchscript"),
    ("oww-hey-mycroft", "torchscript"), ("oww-timer", "torchscript"), ("flashvad-stream", "torchscript"),
    ("pulsevad-2k", "torchscript"), ("pulsevad-2k-jit", "onnx"), ("mp-palm-detection-lite", "onnx"),
    ("mp-hand-landmark-lite", "onnx"), ("mp-pose-landmark-full", "onnx"), ("oww-melspectrogram-tfl", "onnx"),
    ("oww-embedding-tfl", "onnx"), ("oww-hey-jarvis-tfl", "onnx"),
}


@pytest.mark.parametrize("name,target", _conversions())
def test_convert(name, target, work):
    m = corpus.get(name)
    out = work / "convert" / f"{name}{SUFFIX[target]}"
    out.parent.mkdir(exist_ok=True)
    shapes = m.shapes
    if m.format in ("tflite", "onnx"):
        from edgeops.formats import signature

        shapes = m.shapes_for(signature(m.path))
    code, rep = convert_like_the_cli(m.path, out, target,
                                     {k: tuple(v) for k, v in shapes.items() if v},
                                     trust_pickle=m.format == "pickle")
    got = "ok" if code == 0 else "gate" if code == 1 else f"refused ({rep[:90]})"
    RESULTS.append((name, f"-> {target}", got + (f" ({rep.message[:80]})" if code == 1 else "")))
    assert code in (0, 1, 2, 3)
    if (name, target) in MUST_CONVERT:      # measured to convert: a refusal now is a regression
        assert code == 0, f"{name} -> {target} converted before and now does not: {rep if code else ''}"
    if code == 1:
        assert rep.status == "failed" and rep.message, "a parity breach must say why"
    if code != 0:
        return
    if target == "mlpackage":
        # no Core ML runtime on Linux: the spec was validated, never called PASSED
        assert rep.status == "not-executed" and "Core ML" in rep.message
        import coremltools as ct

        ct.models.MLModel(str(out), skip_model_load=True)
        return
    assert rep.status == "passed"
    assert rep.shapes_checked and rep.shapes_checked[0]["result"] == "passed"
    if m.format not in RUN:
        return
    feed = corpus.feed(m)
    quantized = m.format == "onnx" and _is_quantized(m.path)
    ref = run_onnx(m.path, feed, literal=True) if quantized else RUN[m.format](m.path, feed)
    close(ref, RUN[target](out, feed), f"{name} -> {target}",
          loose=1e-3 if not quantized else 5e-2)


def _is_quantized(path: Path) -> bool:
    import onnx

    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    return bool(ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger",
                       "MatMulInteger", "DynamicQuantizeLinear"})


@pytest.mark.parametrize("name", [pytest.param(m.name, id=m.name) for m in ONNX] +
                         [pytest.param(n, id=n) for n in ("pulsevad-2k+inits-as-inputs",
                                                          "pulsevad-2k+constant-weights",
                                                          "oww-embedding+inits-as-inputs",
                                                          "oww-embedding+constant-weights",
                                                          "ort-mul-1+inits-as-inputs",
                                                          "ort-mul-1+constant-weights")])
def test_quantize_auto(name, work, derived):
    m = _model(name, derived)
    d = work / "quant" / name
    d.mkdir(parents=True, exist_ok=True)
    base = corpus.get(name.split("+")[0])
    feeds = corpus.samples(base, 24)
    corpus.save_stacked(feeds[:16], d / "calib.npz")
    corpus.save_stacked(feeds[16:], d / "eval.npz")
    out = d / "q.onnx"
    r = edgeops(work, "optimize", m.path, "--quantize", "auto", "--calibration", d / "calib.npz",
                "--eval", d / "eval.npz", "--calib-method", "minmax", "--min-seconds", "0.5",
                "-o", out, "--json", timeout=1500)
    got = outcome(r, f"quantize {name}")
    rep = json.loads(r.stdout) if r.returncode in (0, 1) else None
    RESULTS.append((name, "quantize auto", got if rep is None else f"{got}: kept {rep['chosen']}"))
    if rep is None:
        return
    written = Path(rep["output"] or rep["rejected_output"])
    import onnx

    onnx.checker.check_model(str(written))
    ref, q = run_onnx(m.path, feeds[20]), run_onnx(written, feeds[20])
    for a, b in zip(ref, q):                # runs, same shapes, finite, close in direction
        assert a.shape == b.shape and np.all(np.isfinite(b))
        if a.dtype.kind == "f" and a.size > 1 and np.linalg.norm(a) > 0:
            cos = float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
            assert cos > 0.9, f"{name}: quantized output cosine {cos:.3f}"
    if rep["passed"] and rep["chosen"] != "fp32":
        v = next(x for x in rep["variants"] if x["name"] == rep["chosen"])
        assert v["within_budget"] and v["p50_ms"] > 0


@pytest.mark.parametrize("name", [pytest.param(m.name, id=m.name) for m in ONNX])
def test_bench_measured_and_predicted(name, work):
    m = corpus.get(name)
    r = edgeops(work, "bench", m.path, "--runs", "20", "--warmup", "3", "--json", *m.shape_args())
    got = outcome(r, f"bench {name}")
    if got == "ok":
        rep = json.loads(r.stdout)
        assert rep["mode"] == "measured" and rep["measurement"]["latency_ms"]["p50"] > 0
        run_onnx(m.path, corpus.feed(m))              # the model really runs here
    p = edgeops(work, "bench", m.path, "--target", "rpi4", "--predict", "--json", *m.shape_args())
    pgot = outcome(p, f"bench --predict {name}")
    RESULTS.append((name, "bench / predict", f"{got} / {pgot}"))
    if pgot == "ok":
        pred = json.loads(p.stdout)["prediction"]
        lo, hi = pred["interval_ms"]
        assert 0 < lo <= pred["p50_ms"] <= hi
        # a confident number only when no compute node's shape is unknown (else exit 2)
        assert not [n for n in pred["unknown_nodes"] if n in {t.get("name") for t in pred["top_nodes"]}]


@pytest.fixture(scope="session")
def signer(work):
    r = edgeops(work, "keys", "generate", "ci")
    assert r.returncode == 0, r.stderr
    r = edgeops(work, "trust", "init", "--key", "ci")
    assert r.returncode == 0, r.stderr
    return "ci"


@pytest.mark.parametrize("name", [pytest.param(m.name, id=m.name) for m in ONNX])
def test_registry_and_bundle(name, work, signer):
    m = corpus.get(name)
    slug = name.replace("+", "-")
    r = edgeops(work, "registry", "add", m.path, "--name", slug, "--json")
    got = outcome(r, f"registry add {name}")
    if got != "ok":
        RESULTS.append((name, "bundle", got))
        return
    ver = json.loads(r.stdout)["version"]
    out = work / "bundles" / f"{slug}.bundle"
    out.parent.mkdir(exist_ok=True)
    b = edgeops(work, "bundle", "build", f"{slug}:{ver}", "--target", "rpi4", "--key", signer,
                "-o", out, "--json", *m.shape_args())
    bgot = outcome(b, f"bundle build {name}")
    RESULTS.append((name, "bundle", bgot))
    if bgot != "ok":
        return
    v = edgeops(work, "bundle", "verify", out, "--target", "rpi4", "--health", "--json")
    assert v.returncode == 0, v.stdout[-2000:] + v.stderr[-2000:]
    assert json.loads(v.stdout)["health"]["passed"]


def test_summary(request):
    """Print what every model gave (runs last: the file's last test)."""
    if not RESULTS:
        pytest.skip("no real-model results in this session")
    width = max(len(n) for n, _, _ in RESULTS)
    lines = [f"{n:<{width}}  {s:<18} {o}" for n, s, o in RESULTS]
    print("\nreal-model tier:\n" + "\n".join(lines))
