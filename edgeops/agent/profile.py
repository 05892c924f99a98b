"""What telemetry measures, as pure functions shared by `bundle build` (the reference profile),
the device runtime (recording) and the host (analysis). numpy + standard library only (the agent
package's rule).

Latency: a fixed histogram, 20 log-spaced buckets per decade from 1 us to 100 s (161 upper bounds
plus an overflow bucket). Every window, device and version uses the same bounds, so histograms
merge by adding counts; a quantile is read back within one bucket (+-6 %).

Drift: every tensor is reduced to at most 64 features per sample, chosen from its per-sample
shape when the profile is built and kept in the profile:
    element   <= 64 values per sample: each value is a feature (tabular data)
    channel   rank >= 3 with <= 64 channels on axis 1: the mean of each channel (images, audio)
    group     otherwise: the means of 64 equal runs of the flattened sample
    label     integer outputs (class ids): the class distribution (reference classes + "other")
    argmax    float outputs [batch, K] whose rows are probabilities: the distribution of the argmax
Numeric features get 10 quantile bins from the reference data; a value that holds >= 5 % of the
samples (ReLU zeros, a clipped sensor) gets a bin of its own, and a constant gets "below", "at"
and "above" bins. The profile stores the inner edges and the reference share of each bin.
Non-finite values are not binned (they are counted as errors). PSI per feature with
1e-4 smoothing; Evidently's bands: < 0.1 stable, 0.1-0.25 moderate, > 0.25 drifted.
"""

from __future__ import annotations

import bisect
import math

import numpy as np

PER_DECADE = 20
BOUNDS = [1e-6 * 10 ** (i / PER_DECADE) for i in range(8 * PER_DECADE + 1)]   # seconds, 1 us .. 100 s
MAX_FEATURES = 64
BINS = 10
MAX_CLASSES = 1000
EPS = 1e-4
PSI_WARN, PSI_ALERT = 0.1, 0.25
MIN_DRIFT_SAMPLES = 200     # fewer samples than this: PSI is reported, no alert (10-bin noise ~ 9/n)


# ------------------------------------------------------------------ latency histogram
def bucket(seconds: float) -> int:
    return bisect.bisect_left(BOUNDS, seconds)


def merge_hist(into: dict, other: dict) -> dict:
    for k, n in other.items():
        into[int(k)] = into.get(int(k), 0) + int(n)
    return into


def quantile(hist: dict, q: float) -> float | None:
    """The q-quantile (seconds) of a bucket histogram {index: count}, interpolated geometrically
    inside its bucket; None when empty."""
    items = sorted((int(k), int(n)) for k, n in hist.items() if int(n) > 0)
    total = sum(n for _, n in items)
    if not total:
        return None
    rank = q * total
    seen = 0
    for k, n in items:
        if seen + n >= rank:
            hi = BOUNDS[k] if k < len(BOUNDS) else BOUNDS[-1] * 10 ** (1 / PER_DECADE)
            lo = BOUNDS[k - 1] if k > 0 else hi / 10 ** (1 / PER_DECADE)
            frac = min(1.0, max(0.0, (rank - seen) / n))
            return lo * (hi / lo) ** frac
        seen += n
    return BOUNDS[-1]


# ------------------------------------------------------------------ features
def _per_sample(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 0:
        return a.reshape(1, 1)
    if a.ndim == 1:
        return a.reshape(-1, 1)
    return a.reshape(a.shape[0], -1)


def choose(arr: np.ndarray, labels: bool = False) -> dict:
    """The reduction for a tensor, from a reference batch ARR (axis 0 = samples)."""
    a = np.asarray(arr)
    flat = _per_sample(a)
    per = flat.shape[1]
    if a.dtype.kind in "iub" and labels and per == 1:
        return {"mode": "label", "features": 1}
    if labels and a.dtype.kind == "f" and a.ndim == 2 and 2 <= per <= MAX_CLASSES and a.size:
        rows = a.astype(np.float64)
        if rows.min() >= 0 and rows.max() <= 1 and np.allclose(rows.sum(1), 1, atol=1e-3):
            return {"mode": "argmax", "features": 1, "classes": per}
    if per <= MAX_FEATURES:
        return {"mode": "element", "features": per, "per_sample": per}
    if a.ndim >= 3 and a.shape[1] <= MAX_FEATURES:
        return {"mode": "channel", "features": int(a.shape[1])}
    return {"mode": "group", "features": MAX_FEATURES}


def reduce(arr, spec: dict) -> np.ndarray | None:
    """ARR (axis 0 = samples) as a (samples, features) float64 array by SPEC; None when ARR does
    not fit the spec (e.g. another per-sample size for `element`)."""
    a = np.asarray(arr)
    mode = spec["mode"]
    if mode == "label":
        return _per_sample(a)[:, :1].astype(np.float64)
    if mode == "argmax":
        if a.ndim != 2 or a.shape[1] != spec["classes"]:
            return None
        return np.argmax(a, axis=1).astype(np.float64).reshape(-1, 1)
    if mode == "element":
        flat = _per_sample(a)
        if flat.shape[1] != spec["per_sample"]:
            return None
        return flat.astype(np.float64)
    if mode == "channel":
        if a.ndim < 3 or a.shape[1] != spec["features"]:
            return None
        return a.reshape(a.shape[0], a.shape[1], -1).mean(axis=-1).astype(np.float64)
    flat = _per_sample(a)
    per = flat.shape[1]
    g = min(spec["features"], per)
    if g != spec["features"]:
        return None
    idx = (np.arange(g) * per) // g
    sums = np.add.reduceat(flat if flat.dtype.kind == "f" else flat.astype(np.float64), idx, axis=1)
    return sums.astype(np.float64) / np.diff(np.append(idx, per))


def build(arr, labels: bool = False) -> dict:
    """The reference profile of one tensor from reference data ARR (axis 0 = samples)."""
    a = np.asarray(arr)
    spec = choose(a, labels)
    x = reduce(a, spec)
    n = x.shape[0]
    prof = {**spec, "dtype": str(a.dtype), "shape": [int(s) for s in a.shape[1:]], "samples": int(n)}
    if a.dtype.kind in "fiub" and a.size:
        af = a.astype(np.float64)
        fin = af[np.isfinite(af)]            # -inf log-probabilities or an fp16 overflow: not in the stats
        if fin.size:
            prof.update(mean=float(fin.mean()), std=float(fin.std()), min=float(fin.min()), max=float(fin.max()))
        if fin.size != af.size:
            prof["nonfinite"] = int(af.size - fin.size)
    if spec["mode"] == "label":
        vals, counts = np.unique(x[:, 0], return_counts=True)
        order = np.argsort(-counts)[:MAX_FEATURES]
        classes = sorted(float(vals[i]) for i in order)
        prof["classes"] = classes
        hist = class_counts(x, prof)
        prof["ref"] = [_shares(hist)]
        return prof
    if spec["mode"] == "argmax":
        prof["ref"] = [_shares(class_counts(x, prof))]
        return prof
    edges, ref = [], []
    for f in range(x.shape[1]):
        col = x[:, f]
        col = col[np.isfinite(col)]
        if col.size == 0:
            e = []
        elif col.min() == col.max():
            c = float(col.min())       # a constant: below, at, above it (a move either way shows)
            e = [c, float(np.nextafter(c, np.inf))]
        else:
            e = set(float(q) for q in np.quantile(col, np.arange(1, BINS) / BINS))
            # a value holding >= 5 % of the samples (ReLU zeros, a clipped sensor) gets a bin of its own
            vals, counts = np.unique(col, return_counts=True)
            for val in vals[counts >= 0.05 * col.size]:
                e.add(float(val))
                e.add(float(np.nextafter(val, np.inf)))
            e = sorted(e)
        edges.append(e)
    prof["edges"] = edges
    counts = bin_counts(x, prof)
    prof["ref"] = [_shares(c) for c in counts]
    return prof


def _edge_matrix(prof: dict) -> np.ndarray:
    m = prof.get("_matrix")
    if m is None:
        edges = prof["edges"]
        width = max((len(e) for e in edges), default=0)
        m = np.full((len(edges), max(width, 1)), np.inf)
        for i, e in enumerate(edges):
            m[i, :len(e)] = e
        prof["_matrix"] = m     # a cache; never serialized (profile_json drops it)
    return m


def nbins(prof: dict) -> list[int]:
    if prof["mode"] == "label":
        return [len(prof["classes"]) + 1]
    if prof["mode"] == "argmax":
        return [prof["classes"]]
    return [len(e) + 1 for e in prof["edges"]]


def class_counts(x: np.ndarray, prof: dict) -> list[int]:
    if prof["mode"] == "argmax":
        return np.bincount(x[:, 0].astype(np.int64), minlength=prof["classes"])[:prof["classes"]].tolist()
    if not len(x):
        return [0] * (len(prof["classes"]) + 1)
    classes = prof["classes"]
    pos = np.searchsorted(classes, x[:, 0])
    hit = (pos < len(classes)) & (np.take(np.asarray(classes + [np.nan]), np.minimum(pos, len(classes))) == x[:, 0])
    idx = np.where(hit, pos, len(classes))
    return np.bincount(idx[np.isfinite(x[:, 0])], minlength=len(classes) + 1).tolist()


def bin_counts(x: np.ndarray, prof: dict) -> list[list[int]]:
    """Counts per feature and bin of reduced samples X (samples, features)."""
    if prof["mode"] in ("label", "argmax"):
        return [class_counts(x, prof)]
    m = _edge_matrix(prof)
    f, w = m.shape
    b = (x[:, :, None] >= m[None, :, :]).sum(axis=2)        # (samples, features): bin per feature
    idx = (np.arange(f) * (w + 1))[None, :] + b
    ok = np.isfinite(x)             # NaN and inf are errors (counted as such), not a bin
    flat = np.bincount(idx[ok], minlength=f * (w + 1)).reshape(f, w + 1)
    return [flat[i, :k].tolist() for i, k in enumerate(nbins(prof))]


def _shares(counts) -> list[float]:
    total = float(sum(counts))
    return [c / total if total else 0.0 for c in counts]


def psi(ref: list[float], counts: list[int]) -> float | None:
    """Population stability index of observed COUNTS against reference shares REF."""
    total = float(sum(counts))
    if not total or len(ref) != len(counts):
        return None
    s = 0.0
    for p, c in zip(ref, counts):
        q = max(c / total, EPS)
        p = max(p, EPS)
        s += (q - p) * math.log(q / p)
    return s


def tensor_psi(prof: dict, counts: list[list[int]]) -> dict:
    vals = {i: v for i, v in enumerate(psi(r, c) for r, c in zip(prof["ref"], counts)) if v is not None}
    if not vals:
        return {"psi": None, "psi_mean": None, "feature": None}
    worst = max(vals, key=vals.__getitem__)           # the feature's own index
    return {"psi": vals[worst], "psi_mean": sum(vals.values()) / len(vals), "feature": worst}


def band(value: float | None) -> str | None:
    if value is None:
        return None
    return "drifted" if value > PSI_ALERT else "moderate" if value > PSI_WARN else "stable"


def merge_counts(into: list[list[int]] | None, other: list[list[int]]) -> list[list[int]]:
    if into is None:
        return [list(c) for c in other]
    for a, b in zip(into, other):
        for i, n in enumerate(b):
            a[i] += n
    return into


def profile_json(profiles: dict) -> dict:
    """Profiles without their caches (for manifests and records)."""
    return {k: {kk: vv for kk, vv in p.items() if not kk.startswith("_")} for k, p in profiles.items()}


def psi_between(before: list[float], after: list[float]) -> float | None:
    """PSI of the AFTER distribution against BEFORE (both counts over the same bins)."""
    tb, ta = float(sum(before)), float(sum(after))
    if not tb or not ta or len(before) != len(after):
        return None
    s = 0.0
    for b, a in zip(before, after):
        p, q = max(b / tb, EPS), max(a / ta, EPS)
        s += (q - p) * math.log(q / p)
    return s
