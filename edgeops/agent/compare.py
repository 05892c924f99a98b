"""THE output comparison: one rule for convert, optimize, bundle health checks and devices.

Standard library + numpy only, so the device agent runs the same code as the host
(`edgeops.verify` re-exports it; `agent/health.py` calls it). Rules:

* floats: elementwise `|cand - ref| <= atol + rtol * |ref|` (numpy.allclose's rule, the
  reference on the right); NaN in the same place on both sides is equal, NaN on one side
  only fails; +-inf must match exactly.
* integers, bools, strings: exact agreement per row, except label flips that sit on a
  probability tie (top-2 within TIE_GAP) of a [N, C] float output of the same model; an
  integer output given a tolerance of at least 1 (whole quantization steps) is compared as
  numbers.
* shapes must match; shapes that differ only by size-1 axes ([1, 2] vs [2]) hold the same
  values in the same order and pass, with a note.
* outputs are paired by name, else by position; when that pairing fails, by value (each
  candidate output is tried against every reference output of a compatible shape) and
  the permutation found is reported -- so a converter that wrote its outputs in another
  order is diagnosed as such instead of as "shape [2,172,264] vs [2,172,88]".

Not covered: choosing tolerances for a converter (the caller passes them), running models.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

import numpy as np

# (atol, rtol) by dtype. Elementwise rule, as numpy.allclose: |a - b| <= atol + rtol * |ref|.
DEFAULT_TOLERANCE: dict[str, tuple[float, float]] = {
    "float64": (1e-6, 1e-5),
    "float32": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
TIE_GAP = 1e-4         # a label flip is a tie when the top-2 probabilities are this close
MAX_PERMUTED = 7       # value matching tries every permutation up to this many outputs


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
    atol: float | None = None             # the tolerance this output was held to
    rtol: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ParityReport:
    status: str                     # "passed" | "failed" | "not-executed"
    atol: float | None = None
    rtol: float | None = None
    outputs: list[OutputParity] = field(default_factory=list)
    n_inputs: int = 0               # batch size of the inputs used
    input_source: str = "generated"  # "generated" (seeded) or the --inputs path
    reason: str = ""
    # reference output name -> candidate output name, when the outputs were paired by value
    # because the names (or positions) paired them wrongly
    permutation: dict[str, str] | None = None
    checked_at: list[dict] = field(default_factory=list)   # extra input shapes verified

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
        known = set(OutputParity.__dataclass_fields__)
        outs = [OutputParity(**{k: v for k, v in o.items() if k in known})
                for o in d.get("outputs", [])]
        keys = {"status", "atol", "rtol", "n_inputs", "input_source", "reason", "permutation",
                "checked_at"}
        return cls(outputs=outs, **{k: v for k, v in d.items() if k in keys})


def not_executed(reason: str) -> ParityReport:
    """A report for a model that could not be run here (e.g. Core ML on Linux)."""
    # the summary says "not executed: <reason>"; a reason already saying so would repeat it
    return ParityReport(status="not-executed", reason=reason.removeprefix("not executed: "))


def tolerance_for(dtype: str, atol: float | None = None, rtol: float | None = None) -> tuple[float, float]:
    da, dr = DEFAULT_TOLERANCE.get(dtype, DEFAULT_TOLERANCE["float32"])
    return (da if atol is None else atol, dr if rtol is None else rtol)


# ----------------------------------------------------------------------------- one output

def _squeeze_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.size == b.size and [d for d in a.shape if d != 1] == [d for d in b.shape if d != 1]


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def compare_arrays(ref: np.ndarray, cand: np.ndarray, atol: float | None = None,
                   rtol: float | None = None, *, name: str = "output",
                   candidate_name: str | None = None,
                   ref_all: dict[str, np.ndarray] | None = None) -> OutputParity:
    """Compare one candidate array with its reference (the rules in the module docstring).
    `ref_all` (every reference output) lets a label flip on a probability tie be forgiven."""
    rn, cn = name, candidate_name or name
    r, c = np.asarray(ref), np.asarray(cand)
    note = ""
    if r.shape != c.shape:
        if not _squeeze_equal(r, c):
            return OutputParity(rn, cn, list(r.shape), r.dtype.name, False,
                                note=f"shape {list(r.shape)} vs {list(c.shape)}")
        note = f"shape {list(r.shape)} vs {list(c.shape)} (same values after squeeze)"
        c = c.reshape(r.shape)

    # quantized integer outputs given a tolerance of whole steps: compared as numbers
    if (r.dtype.kind in "iu" and c.dtype.kind in "iu" and atol is not None and atol >= 1):
        diff = np.abs(r.astype(np.int64) - c.astype(np.int64))
        bad = diff > atol
        return OutputParity(rn, cn, list(r.shape), r.dtype.name, not bad.any(),
                            max_abs=float(diff.max()) if diff.size else 0.0,
                            mean_abs=float(diff.mean()) if diff.size else 0.0,
                            agreement=float((diff == 0).mean()) if diff.size else 1.0,
                            violations=int(bad.sum()), note=note, atol=atol, rtol=0.0)

    # labels, ids, strings: exact agreement, with near-ties in a probability output forgiven
    if not _is_float(r) or not _is_float(c):
        if r.dtype.kind in "USO" or c.dtype.kind in "USO":
            eq = r.astype(str) == c.astype(str)
        else:
            eq = r == c
        eq = np.atleast_1d(eq)
        if eq.size == 0:                     # empty outputs agree when their shapes do
            return OutputParity(rn, cn, list(r.shape), r.dtype.name, True, agreement=1.0,
                                note=note)
        flat_eq = eq.reshape(len(eq), -1).all(axis=1) if eq.ndim > 1 else eq
        mism = np.flatnonzero(~flat_eq)
        ties = _ties(mism, ref_all or {}) if mism.size else 0
        agreement = float(flat_eq.mean()) if flat_eq.size else 1.0
        ok = mism.size == ties
        if ties:
            note = (note + "; " if note else "") + f"{ties} label flip(s) at probability ties"
        return OutputParity(rn, cn, list(r.shape), r.dtype.name, ok, agreement=agreement,
                            ties=int(ties), violations=int(mism.size - ties), note=note)

    a_tol, r_tol = tolerance_for(r.dtype.name, atol, rtol)
    r64, c64 = r.astype(np.float64), c.astype(np.float64)
    nan_r, nan_c = np.isnan(r64), np.isnan(c64)
    if (nan_r != nan_c).any():
        return OutputParity(rn, cn, list(r.shape), r.dtype.name, False, atol=a_tol, rtol=r_tol,
                            violations=int((nan_r != nan_c).sum()),
                            note=f"NaN in {int((nan_r != nan_c).sum())} position(s) on one side only")
    both = ~nan_r
    with np.errstate(invalid="ignore", over="ignore"):     # inf - inf: judged just below
        diff = np.where(both, np.abs(r64 - c64), 0.0)
    inf_mismatch = both & ~np.isfinite(diff) & (r64 != c64)
    diff = np.where(np.isfinite(diff), diff, 0.0)
    bad = (diff > a_tol + r_tol * np.abs(np.where(both & np.isfinite(r64), r64, 0.0))) | inf_mismatch
    denom = np.maximum(np.abs(r64), 1e-12)
    rel = np.where(both & np.isfinite(r64), diff / denom, 0.0)
    fin = both & np.isfinite(r64) & np.isfinite(c64)
    fr, fc = np.where(fin, r64, 0).ravel(), np.where(fin, c64, 0).ravel()
    nr, nc = np.linalg.norm(fr), np.linalg.norm(fc)
    cosine = float(fr @ fc / (nr * nc)) if nr > 0 and nc > 0 else (1.0 if nr == nc else 0.0)
    top1 = None
    if r.ndim == 2 and r.shape[1] > 1 and r.shape[0] > 0:
        top1 = float((np.nan_to_num(r64).argmax(axis=1) == np.nan_to_num(c64).argmax(axis=1)).mean())
    return OutputParity(
        rn, cn, list(r.shape), r.dtype.name, not bad.any(),
        max_abs=float(diff.max()) if diff.size else 0.0,
        max_rel=float(rel.max()) if rel.size else 0.0,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        cosine=cosine, top1_agreement=top1, violations=int(bad.sum()), note=note,
        atol=a_tol, rtol=r_tol)


def _ties(rows: np.ndarray, ref_all: dict[str, np.ndarray]) -> int:
    """How many mismatching rows sit on a probability tie in some [N, C] float output."""
    for arr in ref_all.values():
        arr = np.asarray(arr)
        if arr.ndim == 2 and arr.shape[1] > 1 and _is_float(arr):
            if rows.max(initial=-1) >= arr.shape[0]:
                continue
            top2 = np.sort(arr[rows], axis=1)[:, -2:]
            return int((top2[:, 1] - top2[:, 0] <= TIE_GAP).sum())
    return 0


# ----------------------------------------------------------------------------- all outputs

def _closeness(p: OutputParity) -> float:
    """Lower is closer: 0 for a pass, else the share of violating elements (1 + for a shape
    or NaN mismatch), used to rank value matches."""
    if p.passed:
        return 0.0
    if p.max_abs is None and p.agreement is None:
        return 2.0
    n = max(int(np.prod(p.shape)) if p.shape else 1, 1)
    return min(1.0, p.violations / n) + (0.0 if p.cosine is None else (1 - p.cosine) * 1e-3)


def _by_value(ref: dict, cand: dict, tol_of) -> tuple[dict[str, str], list[OutputParity]] | None:
    """The pairing of reference and candidate outputs that makes every pair pass, or None."""
    rnames, cnames = list(ref), list(cand)
    if len(rnames) != len(cnames) or not rnames:
        return None
    table: dict[tuple[str, str], OutputParity] = {}
    for rn in rnames:
        for cn in cnames:
            a, b = np.asarray(ref[rn]), np.asarray(cand[cn])
            if a.shape == b.shape or _squeeze_equal(a, b):
                table[rn, cn] = compare_arrays(a, b, *tol_of(rn), name=rn, candidate_name=cn,
                                               ref_all=ref)
    if len(rnames) <= MAX_PERMUTED:
        for perm in itertools.permutations(cnames):
            pairs = list(zip(rnames, perm))
            if all((p in table and table[p].passed) for p in pairs):
                return dict(pairs), [table[p] for p in pairs]
        return None
    used: set[str] = set()
    out = []
    for rn in rnames:       # many outputs: greedy, first passing candidate
        cn = next((c for c in cnames if c not in used and (rn, c) in table
                   and table[rn, c].passed), None)
        if cn is None:
            return None
        used.add(cn)
        out.append(table[rn, cn])
    return {p.name: p.candidate_name for p in out}, out


def compare(ref_out: dict[str, np.ndarray], cand_out: dict[str, np.ndarray],
            atol: float | None = None, rtol: float | None = None,
            n_inputs: int = 0, input_source: str = "generated",
            tolerances: dict[str, tuple[float | None, float | None]] | None = None) -> ParityReport:
    """Compare two output dicts: paired by name, else by position, else by value (see the
    module docstring). `tolerances` overrides (atol, rtol) per reference output name."""
    tolerances = tolerances or {}

    def tol_of(rn: str) -> tuple[float | None, float | None]:
        a, r = tolerances.get(rn, (None, None))
        return (atol if a is None else a, rtol if r is None else r)

    if all(k in cand_out for k in ref_out):
        pairs, how = [(k, k) for k in ref_out], "name"
    elif len(ref_out) == len(cand_out):
        pairs, how = list(zip(ref_out, cand_out)), "position"
    else:
        pairs, how = [(k, k) for k in ref_out if k in cand_out], "name"
    results = [compare_arrays(ref_out[rn], cand_out[cn], *tol_of(rn), name=rn, candidate_name=cn,
                              ref_all=ref_out) for rn, cn in pairs]
    missing = [k for k in ref_out if k not in {rn for rn, _ in pairs}]
    ok = all(o.passed for o in results) and not missing
    permutation = None
    reason = ""
    if not ok:
        found = _by_value(ref_out, cand_out, tol_of)
        if found is not None:
            mapping, matched = found
            moved = {rn: cn for rn, cn in mapping.items() if (rn, cn) not in pairs}
            permutation = mapping
            shown = ", ".join(f"{rn!r} is in candidate {cn!r}" for rn, cn in moved.items())
            if how == "name":
                # the names claim one thing and the values another: a converter bug that must
                # be repaired (or refused), never passed
                reason = f"outputs are permuted: by value, {shown}"
                results = matched
            else:
                results, ok = matched, True
                reason = f"outputs paired by value ({shown})"
    if not ok and not reason:
        if missing:
            reason = f"outputs missing in candidate: {missing}"
        else:
            o = next(o for o in results if not o.passed)
            reason = f"output {o.name!r}: " + (o.note or f"{o.violations} element(s) outside tolerance")
    return ParityReport("passed" if ok else "failed", atol, rtol, results, n_inputs,
                        input_source, reason, permutation)
