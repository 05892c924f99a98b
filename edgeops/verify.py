"""THE parity check: run the same inputs through two runnables and compare the outputs
(the comparison rule itself is `edgeops.agent.compare`, shared with devices).

convert, optimize, bundle health checks and on-device smoke tests all call `verify`.
It reports max abs / rel error, cosine similarity, top-1 agreement for classifier-like
outputs and exact agreement for integer outputs, and never reports "passed" for
anything it has not executed (see `not_executed`).

What it does not do: pick a task metric (accuracy against labels lives with optimize),
or time anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .agent.compare import (DEFAULT_TOLERANCE, TIE_GAP, OutputParity, ParityReport,  # noqa: F401
                            compare, compare_arrays, not_executed, tolerance_for)
from .errors import UsageError
from .formats.base import Runner, Signature, TensorSpec

DEFAULT_BATCH = 2      # dynamic first dimension
DEFAULT_DYNAMIC = 16   # any other dynamic dimension


# ----------------------------------------------------------------------------- inputs

def parse_shapes(items: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """Parse --shape values: "x=1,3,224,224" or "x:1x3x224x224"; a bare "1,3,224,224"
    (no name) applies to the only input and is stored under the key "*". The name ends at
    the last "=" (else the last ":"), so names holding colons ("onnx::Flatten_0",
    "serving_default_x:0") stay whole."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items:
        sep = "=" if "=" in item else ":" if ":" in item else ""
        name, dims = item.rsplit(sep, 1) if sep else ("*", item)
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            raise UsageError(f"bad --shape {item!r}", hint="use NAME=1,3,224,224") from None
        if not shape or any(d <= 0 for d in shape):
            raise UsageError(f"bad --shape {item!r}: dimensions must be positive integers")
        out[name or "*"] = shape
    return out


def _concrete_shape(spec: TensorSpec, shapes: dict[str, tuple[int, ...]], batch: int,
                    dynamic: int) -> tuple[int, ...]:
    if spec.name in shapes:
        return shapes[spec.name]
    if "*" in shapes:
        return shapes["*"]
    if spec.shape is None:
        raise UsageError(f"input {spec.name!r} has unknown rank",
                         hint=f"pass --shape {spec.name}=1,3,224,224 or --inputs data.npz")
    return tuple(
        d if isinstance(d, int) and d > 0 else (batch if i == 0 else dynamic)
        for i, d in enumerate(spec.shape)
    )


def make_inputs(signature: Signature, shapes: dict[str, tuple[int, ...]] | None = None,
                seed: int = 0, batch: int = DEFAULT_BATCH,
                dynamic: int = DEFAULT_DYNAMIC) -> dict[str, np.ndarray]:
    """Inputs generated from a signature: dtype- and range-aware, deterministic.

    Floats are standard normal; integer inputs named like masks get ones, other integers
    0..9 (small enough to be valid ids for any embedding table of 10+ rows, and any
    class/position index); bools are random. A --shape naming no input is refused: a typo
    would otherwise fall back to a generated shape without a word.
    """
    shapes = dict(shapes or {})
    names = [s.name for s in signature.inputs]
    for k in list(shapes):
        # a TF tensor name for a signature input, or a Keras layer name for the input Keras
        # made in front of it (a Sequential model without an InputLayer names it LAYER_input)
        for short in (k.removesuffix(":0").removeprefix("serving_default_"), k + "_input"):
            if k not in names and short in names and short not in shapes:
                shapes[short] = shapes.pop(k)
                break
    unknown = [k for k in shapes if k != "*" and k not in names]
    if unknown:
        raise UsageError(f"--shape {unknown[0]}: the model has no input named {unknown[0]!r}",
                         hint=f"its inputs are: {', '.join(names)}")
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        shape = _concrete_shape(spec, shapes, batch, dynamic)
        dt = spec.dtype
        lname = spec.name.lower()
        if dt in ("float16", "float32", "float64", "bfloat16"):
            arr = rng.standard_normal(shape).astype(np.float32 if dt == "bfloat16" else dt)
        elif dt.startswith(("int", "uint")):
            if "mask" in lname:
                arr = np.ones(shape, dtype=dt)
            else:
                arr = rng.integers(0, 10, size=shape).astype(dt)
        elif dt == "bool":
            arr = rng.random(shape) < 0.5
        else:
            raise UsageError(f"cannot generate inputs of dtype {dt!r} for {spec.name!r}",
                             hint="pass real inputs with --inputs data.npz")
        feeds[spec.name] = arr
    return feeds


def load_inputs(path: str | Path, signature: Signature | None = None) -> dict[str, np.ndarray]:
    """Real inputs: an .npz keyed by input name, or a folder of NAME.npy files."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.npy"))
        if not files:
            raise UsageError(f"{p}: no .npy files in the folder")
        data = {f.stem: np.load(f, allow_pickle=False) for f in files}
    elif p.is_file():
        try:
            loaded = np.load(p, allow_pickle=False)
            if isinstance(loaded, np.ndarray):   # a single .npy: the model's only input
                data = {p.stem: loaded}
            else:
                with loaded:  # members load lazily: object arrays fail here
                    data = {k: loaded[k] for k in loaded.files}
        except (ValueError, OSError, EOFError) as exc:
            raise UsageError(f"{p}: not a readable .npz/.npy file ({exc})") from None
    else:
        raise UsageError(f"{p}: no such inputs file or folder")
    if signature is not None:
        data = adapt_feeds(data, signature)
    return data


def adapt_feeds(feeds: dict[str, np.ndarray], signature: Signature) -> dict[str, np.ndarray]:
    """Map feeds onto a signature's inputs: by name when all names match, else by position.
    Casts to the declared dtype when it differs (e.g. float64 data into a float32 model)."""
    specs = signature.inputs
    names = [s.name for s in specs]
    if all(n in feeds for n in names):
        picked = [feeds[n] for n in names]
    elif len(feeds) == len(specs):
        picked = list(feeds.values())
    else:
        raise UsageError(
            f"inputs {sorted(feeds)} do not match the model's inputs {names}",
            hint="name the arrays in the .npz after the model's inputs (see 'edgeops inspect')")
    out = {}
    for spec, arr in zip(specs, picked):
        arr = np.asarray(arr)
        if spec.dtype not in ("str", "object", "bfloat16") and not spec.dtype.startswith(("onnx:", "seq", "map")):
            try:
                want = np.dtype(spec.dtype)
            except TypeError:
                want = arr.dtype
            if arr.dtype != want:
                arr = arr.astype(want)
        out[spec.name] = arr
    return out


# ----------------------------------------------------------------------------- run + compare
# The comparison itself (compare, compare_arrays, the report types) lives in the device agent
# package, standard library + numpy, so a device checks its health vectors with exactly the
# code the host verified them with.

QUANT_STEPS = 2          # a quantized output may differ by this many steps
NOISE_MARGIN = 1.25      # a float output may differ by this x its runtime's own spread


@dataclass
class SourceReference:
    """What a conversion's result is compared with, when the source's own runtime cannot be
    held to the default fp32 tolerance (see source_reference)."""
    tolerances: dict[str, tuple[float, float]]     # output -> (atol, rtol)
    outputs: dict[str, np.ndarray]                 # the reference outputs to compare with
    notes: list[str]
    quantized: bool = False


def source_reference(fmt: str, path: str | Path, feeds: dict[str, np.ndarray],
                     ref_out: dict[str, np.ndarray], atol: float, rtol: float,
                     opts=None) -> SourceReference | None:
    """Tolerances a source's own numerics justify, measured, instead of fp32's defaults.
    None when the defaults stand.

    Every format with a `reference_runner` (onnxruntime without graph optimisations, LiteRT's
    reference kernels instead of XNNPack) runs the source a second time:
    * quantized source (int8 QDQ/QLinear ONNX, int8 TFLite): fused int8 kernels round
      differently from the graph's literal arithmetic, and the differences compound through
      layers (onnxruntime's two runs of one QDQ graph disagree by tens of output steps). A
      converter reproduces the literal arithmetic, so that becomes the reference, held to
      QUANT_STEPS x the output's quantization step; the default runtime's distance from it
      is noted.
    * float source: its two kernel sets disagree by accumulation order; where that spread
      exceeds the fp32 tolerance (a 256x256 mask with values to 1330 from a TFLite pose model
      differs by 0.32 between XNNPack and the reference kernels), an output is held to
      NOISE_MARGIN x the spread measured here, and the note says so."""
    from . import formats as F

    mod = F.module_for(fmt)
    ref_runner = getattr(mod, "reference_runner", None)
    if ref_runner is None:
        return None
    steps_of = getattr(mod, "quantization", None)
    steps = steps_of(Path(path), fmt, opts) if steps_of else {}
    try:
        lit_runner = ref_runner(Path(path), fmt, opts)
        literal = lit_runner.run(adapt_feeds(feeds, lit_runner.signature))
    except Exception:  # noqa: BLE001 - no second opinion: the defaults stand
        return None
    spread = {}
    for k, v in literal.items():
        if k in ref_out and np.shape(v) == np.shape(ref_out[k]) and np.asarray(v).dtype.kind == "f":
            d = np.abs(np.asarray(v, np.float64) - np.asarray(ref_out[k], np.float64))
            spread[k] = float(np.nanmax(d)) if d.size else 0.0
    tol, notes = {}, []
    if steps:
        for k, step in steps.items():
            s = spread.get(k, 0.0)
            tol[k] = (QUANT_STEPS * step, 0.0)
            notes.append(f"{k}: quantized source, checked against its literal arithmetic "
                         f"(reference kernels) within {QUANT_STEPS} steps of {step:.4g}; its "
                         f"default runtime's fused int8 kernels differ from that by {s:.4g} "
                         f"({s / step:.0f} steps) here")
        return SourceReference(tol, literal, notes, quantized=True)
    for k, s in spread.items():
        if NOISE_MARGIN * s > atol:
            tol[k] = (NOISE_MARGIN * s, rtol)
            notes.append(f"{k}: the source's own runtime differs by {s:.3g} between its kernels "
                         f"(default vs reference) here: atol {NOISE_MARGIN * s:.3g} instead of "
                         f"{atol:g}")
    return SourceReference(tol, ref_out, notes) if tol else None


def run_on(runner: Runner, feeds: dict[str, np.ndarray], generated: bool) -> dict[str, np.ndarray]:
    """RUNNER on FEEDS; a model that fails on them is one UsageError naming the failing node
    and, for generated inputs, the values that were guessed (an integer scalar such as a
    sample rate that must be 8000 or 16000 cannot be guessed) and how to give real ones."""
    from .agent.ort import describe, failing_node
    from .errors import EdgeopsError

    try:
        return runner.run(adapt_feeds(feeds, runner.signature))
    except EdgeopsError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own failure, one line
        node = failing_node(exc)
        where = f" at node {node[1]!r} ({node[0]})" if node else ""
        why = describe(exc, 200)
        if " Status Message: " in why:
            why = why.split(" Status Message: ", 1)[1]
        if not generated:
            raise UsageError(f"the model fails on the given inputs{where}: {why}",
                             hint="check the inputs' shapes, dtypes and value ranges") from exc
        guessed = [f"{k}={np.asarray(v).reshape(-1)[0].item()!r}" for k, v in feeds.items()
                   if np.asarray(v).dtype.kind in "iub" and np.asarray(v).size <= 4]
        note = (f"; generated integer values are a guess ({', '.join(guessed)})" if guessed else "")
        raise UsageError(f"the model fails on generated inputs{where}: {why}{note}",
                         hint="pass real inputs with --inputs data.npz (keyed by input name), "
                              "or concrete shapes with --shape NAME=D1,D2,...") from exc


def batch_size(inputs: dict[str, np.ndarray]) -> int:
    for v in inputs.values():
        return int(v.shape[0]) if np.ndim(v) else 1
    return 0


def verify(ref: Runner, cand: Runner, inputs: dict[str, np.ndarray],
           atol: float | None = None, rtol: float | None = None,
           ref_outputs: dict[str, np.ndarray] | None = None,
           input_source: str = "generated") -> ParityReport:
    """Run `inputs` through both runners (each gets the inputs mapped onto its own
    signature) and compare. `ref_outputs` skips re-running the reference."""
    if ref_outputs is None:
        ref_outputs = ref.run(adapt_feeds(inputs, ref.signature))
    cand_outputs = cand.run(adapt_feeds(inputs, cand.signature))
    return compare(ref_outputs, cand_outputs, atol, rtol, batch_size(inputs), input_source)
