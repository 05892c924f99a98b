"""THE parity check: run the same inputs through two runnables and compare the outputs.

convert, optimize, bundle health checks and on-device smoke tests all call `verify`.
It reports max abs / rel error, cosine similarity, top-1 agreement for classifier-like
outputs and exact agreement for integer outputs, and never reports "passed" for
anything it has not executed (see `not_executed`).

What it does not do: pick a task metric (accuracy against labels lives with optimize),
or time anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import UsageError
from .formats.base import Runner, Signature, TensorSpec

# (atol, rtol) by dtype. Elementwise rule, as numpy.allclose: |a - b| <= atol + rtol * |ref|.
DEFAULT_TOLERANCE: dict[str, tuple[float, float]] = {
    "float64": (1e-6, 1e-5),
    "float32": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
DEFAULT_BATCH = 2      # dynamic first dimension
DEFAULT_DYNAMIC = 16   # any other dynamic dimension
TIE_GAP = 1e-4         # a label flip is a tie when the top-2 probabilities are this close



# ----------------------------------------------------------------------------- inputs

def parse_shapes(items: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """Parse --shape values: "x=1,3,224,224" or "x:1x3x224x224"; a bare "1,3,224,224"
    (no name) applies to the only input and is stored under the key "*"."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.replace(":", "=").rpartition("=")
        if not sep:
            name, dims = "*", item
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
    class/position index); bools are random.
    """
    shapes = shapes or {}
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


# ----------------------------------------------------------------------------- reports

@dataclass
class OutputParity:
    name: str
    candidate_name: str
    shape: list[int]
    dtype: str
    passed: bool
    max_abs: float | None = None
    max_rel: float | None = None
    mean_abs: float | None = None
    cosine: float | None = None
    top1_agreement: float | None = None   # classifier-like float outputs [N, C]
    agreement: float | None = None        # integer / label / string outputs: exact match share
    ties: int = 0                         # label flips explained by near-equal probabilities
    violations: int = 0                   # elements outside atol + rtol*|ref|
    note: str = ""


@dataclass
class ParityReport:
    status: str                     # "passed" | "failed" | "not-executed"
    atol: float | None = None
    rtol: float | None = None
    outputs: list[OutputParity] = field(default_factory=list)
    n_inputs: int = 0               # batch size of the inputs used
    input_source: str = "generated"  # "generated" (seeded) or the --inputs path
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def executed(self) -> bool:
        return self.status != "not-executed"

    @property
    def max_abs(self) -> float | None:
        vals = [o.max_abs for o in self.outputs if o.max_abs is not None]
        return max(vals) if vals else None

    @property
    def min_cosine(self) -> float | None:
        vals = [o.cosine for o in self.outputs if o.cosine is not None]
        return min(vals) if vals else None

    def summary(self) -> str:
        if self.status == "not-executed":
            return f"not executed: {self.reason}"
        parts = [self.status.upper()]
        if self.max_abs is not None:
            parts.append(f"max abs {self.max_abs:.2e}")
        if self.min_cosine is not None:
            parts.append(f"cosine {self.min_cosine:.6f}")
        agree = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        agree += [o.agreement for o in self.outputs if o.agreement is not None]
        if agree:
            parts.append(f"agreement {100 * min(agree):.1f}%")
        if self.reason:
            parts.append(self.reason)
        return ", ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_abs"] = self.max_abs
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ParityReport":
        outs = [OutputParity(**o) for o in d.get("outputs", [])]
        keys = {"status", "atol", "rtol", "n_inputs", "input_source", "reason"}
        return cls(outputs=outs, **{k: v for k, v in d.items() if k in keys})


def not_executed(reason: str) -> ParityReport:
    """A report for a model that could not be run here (e.g. Core ML on Linux)."""
    # the summary says "not executed: <reason>"; a reason already saying so would repeat it
    return ParityReport(status="not-executed", reason=reason.removeprefix("not executed: "))


# ----------------------------------------------------------------------------- compare

def tolerance_for(dtype: str, atol: float | None = None, rtol: float | None = None) -> tuple[float, float]:
    da, dr = DEFAULT_TOLERANCE.get(dtype, DEFAULT_TOLERANCE["float32"])
    return (da if atol is None else atol, dr if rtol is None else rtol)


def _match_outputs(ref: dict, cand: dict) -> list[tuple[str, str]]:
    if all(k in cand for k in ref):
        return [(k, k) for k in ref]
    if len(ref) == len(cand):
        return list(zip(ref, cand))
    common = [k for k in ref if k in cand]
    if common:
        return [(k, k) for k in common]
    raise ValueError(f"outputs do not correspond: reference {list(ref)} vs candidate {list(cand)}")


def _squeeze_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.size == b.size and [d for d in a.shape if d != 1] == [d for d in b.shape if d != 1]


def _compare_one(rn: str, cn: str, r: np.ndarray, c: np.ndarray, atol: float | None,
                 rtol: float | None, ref_all: dict[str, np.ndarray]) -> OutputParity:
    r, c = np.asarray(r), np.asarray(c)
    note = ""
    if r.shape != c.shape:
        if not _squeeze_equal(r, c):
            return OutputParity(rn, cn, list(r.shape), r.dtype.name, False,
                                note=f"shape {list(r.shape)} vs {list(c.shape)}")
        note = f"shape {list(r.shape)} vs {list(c.shape)} (same values after squeeze)"
        c = c.reshape(r.shape)

    # labels, ids, strings: exact agreement, with near-ties in a probability output forgiven
    if not np.issubdtype(r.dtype, np.floating) or not np.issubdtype(c.dtype, np.floating):
        if r.dtype.kind in "USO" or c.dtype.kind in "USO":
            eq = r.astype(str) == c.astype(str)
        else:
            eq = r == c
        flat_eq = eq.reshape(len(eq), -1).all(axis=1) if eq.ndim > 1 else eq
        mism = np.flatnonzero(~flat_eq) if eq.ndim else np.flatnonzero(~np.atleast_1d(eq))
        ties = _ties(mism, ref_all) if mism.size else 0
        agreement = float(flat_eq.mean()) if np.size(flat_eq) else 1.0
        ok = mism.size == ties
        if ties:
            note = (note + "; " if note else "") + f"{ties} label flip(s) at probability ties"
        return OutputParity(rn, cn, list(r.shape), r.dtype.name, ok, agreement=agreement,
                            ties=int(ties), violations=int(mism.size - ties), note=note)

    a_tol, r_tol = tolerance_for(r.dtype.name, atol, rtol)
    r64, c64 = r.astype(np.float64), c.astype(np.float64)
    nan_r, nan_c = np.isnan(r64), np.isnan(c64)
    if (nan_r != nan_c).any():
        return OutputParity(rn, cn, list(r.shape), r.dtype.name, False,
                            note=f"NaN in {int((nan_r != nan_c).sum())} position(s) on one side only")
    both = ~nan_r
    diff = np.where(both, np.abs(r64 - c64), 0.0)
    inf_mismatch = both & ~np.isfinite(diff) & (r64 != c64)
    diff = np.where(np.isfinite(diff), diff, 0.0)
    bad = (diff > a_tol + r_tol * np.abs(np.where(both, r64, 0.0))) | inf_mismatch
    denom = np.maximum(np.abs(r64), 1e-12)
    rel = np.where(both & np.isfinite(r64), diff / denom, 0.0)
    fr, fc = np.where(both, r64, 0).ravel(), np.where(both, c64, 0).ravel()
    nr, nc = np.linalg.norm(fr), np.linalg.norm(fc)
    cosine = float(fr @ fc / (nr * nc)) if nr > 0 and nc > 0 else (1.0 if nr == nc else 0.0)
    top1 = None
    if r.ndim == 2 and r.shape[1] > 1:
        top1 = float((r64.argmax(axis=1) == c64.argmax(axis=1)).mean())
    return OutputParity(
        rn, cn, list(r.shape), r.dtype.name, not bad.any(),
        max_abs=float(diff.max()) if diff.size else 0.0,
        max_rel=float(rel.max()) if rel.size else 0.0,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        cosine=cosine, top1_agreement=top1, violations=int(bad.sum()), note=note)


def _ties(rows: np.ndarray, ref_all: dict[str, np.ndarray]) -> int:
    """How many mismatching rows sit on a probability tie in some [N, C] float output."""
    for arr in ref_all.values():
        arr = np.asarray(arr)
        if arr.ndim == 2 and arr.shape[1] > 1 and np.issubdtype(arr.dtype, np.floating):
            if rows.max(initial=-1) >= arr.shape[0]:
                continue
            top2 = np.sort(arr[rows], axis=1)[:, -2:]
            return int((top2[:, 1] - top2[:, 0] <= TIE_GAP).sum())
    return 0


def compare(ref_out: dict[str, np.ndarray], cand_out: dict[str, np.ndarray],
            atol: float | None = None, rtol: float | None = None,
            n_inputs: int = 0, input_source: str = "generated") -> ParityReport:
    """Compare two output dicts. Outputs are matched by name, else by position."""
    try:
        pairs = _match_outputs(ref_out, cand_out)
    except ValueError as exc:
        return ParityReport("failed", atol, rtol, [], n_inputs, input_source, str(exc))
    results = [_compare_one(rn, cn, ref_out[rn], cand_out[cn], atol, rtol, ref_out)
               for rn, cn in pairs]
    missing = [k for k in ref_out if k not in {rn for rn, _ in pairs}]
    ok = all(o.passed for o in results) and not missing
    reason = f"outputs missing in candidate: {missing}" if missing else ""
    failed = [o for o in results if not o.passed]
    if failed and not reason:
        o = failed[0]
        reason = f"output {o.name!r}: " + (o.note or f"{o.violations} element(s) outside tolerance")
    return ParityReport("passed" if ok else "failed", atol, rtol, results, n_inputs,
                        input_source, reason)


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
