"""The two gates every optimized model passes: an accuracy budget and a speed gate.

* Data: an .npz keyed by input name (or a folder of NAME.npy), samples on axis 0, with an
  optional labels array named by `labels_key`. `Dataset` slices it into feeds.
* Metric: top-1 accuracy against labels, or agreement / cosine with the fp32 model.
  All metrics are fractions in [0, 1]; a drop is `before - after` in the same unit.
* Speed: fp32 and candidates measured in one process, interleaved round-robin with the
  order rotated each round, so drift (thermal, frequency, a neighbour's load) hits every
  model alike. p50 of enough runs; a candidate is "faster" only above FASTER_THRESHOLD.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import UsageError
from ..formats.base import Signature

FASTER_THRESHOLD = 1.05     # below a 5 % gain, a "speedup" is within run-to-run noise here
SLOWER_THRESHOLD = 0.95

METRICS = ("auto", "accuracy", "agreement", "cosine")


def parse_drop(text: str | float) -> float:
    """'0.5%' -> 0.005; '0.005' -> 0.005. A bare number above 1 is refused as ambiguous."""
    s = str(text).strip()
    try:
        if s.endswith("%"):
            v = float(s[:-1]) / 100.0
        else:
            v = float(s)
            if v > 1:
                raise UsageError(f"--max-drop {s}: ambiguous; write a percentage such as {s}%")
    except ValueError:
        raise UsageError(f"--max-drop {s!r}: expected a percentage like 0.5% or a fraction "
                         "like 0.005") from None
    if not 0 <= v <= 1:
        raise UsageError(f"--max-drop {s}: must be between 0% and 100%")
    return v


# ----------------------------------------------------------------------------- data

@dataclass
class Dataset:
    """Model inputs with samples on axis 0, plus optional labels."""
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str                  # file name, "random (generated)", ...
    batch: int = 1               # rows per inference (the model's fixed batch, else chosen)
    fixed: bool = False          # the model only takes `batch` rows: a remainder is dropped

    @property
    def n(self) -> int:
        return int(next(iter(self.feeds.values())).shape[0])

    @property
    def n_used(self) -> int:
        return self.n - self.n % self.batch if self.fixed else self.n

    def batches(self, limit: int | None = None, full_only: bool = False,
                rows: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Batches of `rows` (default: the dataset's batch); the last may be short unless
        the model's batch is fixed or `full_only` (onnxruntime's histogram calibrators need
        equal batches)."""
        size = rows or self.batch
        n = self.n_used if limit is None else min(self.n_used, limit)
        for i in range(0, n, size):
            if (self.fixed or full_only) and i + size > n:
                break
            yield {k: v[i:i + size] for k, v in self.feeds.items()}

    def n_batches(self, limit: int | None = None) -> int:
        n = self.n_used if limit is None else min(self.n_used, limit)
        return n // self.batch if self.fixed else -(-n // self.batch)


def fixed_batch(signature: Signature) -> int | None:
    dims = [s.shape[0] for s in signature.inputs if s.shape]
    fixed = {d for d in dims if isinstance(d, int) and d > 0}
    return fixed.pop() if len(fixed) == 1 and all(isinstance(d, int) for d in dims) else None


def load_dataset(path: str | Path, signature: Signature, labels_key: str | None = None,
                 eval_batch: int = 32) -> Dataset:
    from ..verify import adapt_feeds, load_inputs

    raw = load_inputs(path)
    labels = None
    if labels_key is not None:
        if labels_key not in raw:
            raise UsageError(f"{path}: no array named {labels_key!r} for --labels "
                             f"(arrays: {', '.join(sorted(raw))})")
        labels = np.asarray(raw.pop(labels_key))
    feeds = adapt_feeds(raw, signature)
    ns = {k: v.shape[0] if v.ndim else 0 for k, v in feeds.items()}
    if len(set(ns.values())) != 1 or 0 in ns.values():
        raise UsageError(f"{path}: inputs must share the sample axis 0 (sizes {ns})")
    n = next(iter(ns.values()))
    if labels is not None and labels.shape[0] != n:
        raise UsageError(f"{path}: {labels.shape[0]} labels for {n} samples")
    fixed = fixed_batch(signature)
    batch = fixed if fixed else min(eval_batch, n)
    if n < batch:
        raise UsageError(f"{path}: {n} samples, but the model takes batches of {batch}")
    for spec in signature.inputs:
        arr = feeds[spec.name]
        if spec.shape and len(spec.shape) != arr.ndim:
            raise UsageError(f"{path}: {spec.name!r} has shape {list(arr.shape)}, the model "
                             f"expects rank {len(spec.shape)} {spec.shape} (samples on axis 0)")
    return Dataset(feeds=feeds, labels=labels, source=Path(path).name, batch=batch,
                   fixed=bool(fixed))


def random_dataset(signature: Signature, n: int = 64, seed: int = 0,
                   shapes: dict[str, tuple[int, ...]] | None = None) -> Dataset:
    """Seeded inputs from the signature (dynamic dims from `shapes`, else verify's default)."""
    from ..verify import make_inputs

    fixed = fixed_batch(signature)
    batch = fixed or 1
    parts = [make_inputs(signature, shapes=shapes, batch=batch, seed=seed + i)
             for i in range(max(1, n // batch))]
    feeds = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return Dataset(feeds=feeds, labels=None, source="random (generated)", batch=batch,
                   fixed=bool(fixed))


# ----------------------------------------------------------------------------- metric

@dataclass
class Outputs:
    """A model's outputs over a dataset, kept per batch: real models have outputs that do
    not stack (scalars, sequence-major tensors, a varying number of detections)."""
    batches: list[list[np.ndarray]]
    rows: list[int]


def _primary(outs: list[np.ndarray]) -> int:
    for i, o in enumerate(outs):
        if np.issubdtype(o.dtype, np.floating) and o.ndim >= 2:
            return i
    return 0


def pick_metric(requested: str, data: Dataset, ref: Outputs) -> str:
    if requested not in METRICS:
        raise UsageError(f"--metric {requested}: choose from {', '.join(METRICS)}")
    if requested == "accuracy" and data.labels is None:
        raise UsageError("--metric accuracy needs labels", hint="pass --labels KEY with --eval")
    if requested != "auto":
        return requested
    if data.labels is not None:
        return "accuracy"
    first = ref.batches[0]
    p = first[_primary(first)]
    if np.issubdtype(p.dtype, np.floating) and p.ndim == 2 and p.shape[1] > 1:
        return "agreement"
    return "cosine"


def _pred(o: np.ndarray, rows: int) -> np.ndarray | None:
    """Top-1 class per row (argmax over the last axis), or the values themselves for
    integer outputs; None when the output is not row-major."""
    if o.ndim == 0 or o.shape[0] != rows:
        return None
    if np.issubdtype(o.dtype, np.floating) and o.ndim >= 2 and o.shape[-1] > 1:
        return o.reshape(rows, -1, o.shape[-1]).argmax(-1).reshape(rows, -1)
    return o.reshape(rows, -1)


def collect_outputs(run: Callable[[dict], list[np.ndarray]], data: Dataset,
                    tick: Callable[[], None] | None = None) -> Outputs:
    out = Outputs([], [])
    for feeds in data.batches():
        out.batches.append([np.asarray(o) for o in run(feeds)])
        out.rows.append(int(next(iter(feeds.values())).shape[0]))
        if tick:
            tick()
    return out


def _cosines(a: np.ndarray, b: np.ndarray, rows: int) -> np.ndarray:
    """Per-row cosine when both are row-major, else one cosine for the whole batch."""
    if a.shape != b.shape:
        return np.zeros(rows)                   # e.g. a different number of detections
    per_row = a.ndim >= 1 and a.shape[0] == rows
    a2 = a.reshape(rows if per_row else 1, -1).astype(np.float64)
    b2 = b.reshape(rows if per_row else 1, -1).astype(np.float64)
    num = np.sum(a2 * b2, axis=1)
    den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-300),
                   np.where(np.all(a2 == b2, axis=1), 1.0, 0.0))
    return cos if per_row else np.repeat(cos, rows)


def score(metric: str, outs: Outputs, ref: Outputs, labels: np.ndarray | None) -> float:
    """Metric of a candidate's outputs over the dataset; `ref` are the fp32 outputs."""
    i = _primary(ref.batches[0])
    if metric in ("accuracy", "agreement"):
        hits, start = [], 0
        for ob, rb, rows in zip(outs.batches, ref.batches, outs.rows):
            pred = _pred(ob[i], rows)
            if metric == "accuracy":
                if pred is None:
                    raise UsageError(f"output {i} is not one row per sample "
                                     f"(shape {list(ob[i].shape)}); accuracy needs that")
                lab = np.asarray(labels[start:start + rows]).reshape(rows, -1)
                if lab.shape != pred.shape:
                    raise UsageError(f"labels of shape {list(labels.shape)} do not match "
                                     f"predictions {list(pred.shape)} of output {i}")
                hits.append(np.all(pred == lab, axis=1))
            else:
                want = _pred(rb[i], rows)
                if pred is None or want is None or pred.shape != want.shape:
                    hits.append(np.repeat(np.array_equal(ob[i], rb[i]), rows))
                else:
                    hits.append(np.all(pred == want, axis=1))
            start += rows
        return float(np.mean(np.concatenate(hits)))
    # cosine: mean per-sample cosine of the worst float output
    worst = 1.0
    for k, r0 in enumerate(ref.batches[0]):
        if not np.issubdtype(r0.dtype, np.floating):
            continue
        cos = np.concatenate([_cosines(ob[k], rb[k], rows)
                              for ob, rb, rows in zip(outs.batches, ref.batches, outs.rows)])
        worst = min(worst, float(np.mean(cos)))
    return worst


# ----------------------------------------------------------------------------- speed

@dataclass
class Timing:
    p50_ms: float
    p90_ms: float
    runs: int

    def to_dict(self) -> dict:
        return {"p50_ms": round(self.p50_ms, 4), "p90_ms": round(self.p90_ms, 4), "runs": self.runs}


@dataclass
class SpeedResult:
    timings: dict[str, Timing]
    threads: int
    baseline: str                    # the first model given: speedups are relative to it

    def speedup(self, name: str) -> float:
        return self.timings[self.baseline].p50_ms / self.timings[name].p50_ms


def verdict(speedup: float) -> str:
    if speedup >= FASTER_THRESHOLD:
        return "faster"
    if speedup <= SLOWER_THRESHOLD:
        return "SLOWER"
    return "not faster"


def session(path: str | Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


_LOADS_OK: set[tuple[str, int, int]] = set()


def probe_loads(path: str | Path, timeout: float = 300) -> None:
    """Create an onnxruntime session for PATH in a child process first: some invalid graphs
    crash session creation outright (a segfault, e.g. an fp16 LSTM), which would take this
    process, and every other result, down with it."""
    import subprocess
    import sys

    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    if key in _LOADS_OK:        # this exact file already loaded (fp16 probes before evaluating)
        return
    code = ("import sys, onnxruntime as ort; so = ort.SessionOptions(); so.log_severity_level = 3; "
            "ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider'])")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        if r.returncode < 0:
            tail = f"onnxruntime crashed (signal {-r.returncode}) loading it"
        raise RuntimeError(f"onnxruntime cannot load the result: {tail[:300]}")
    _LOADS_OK.add(key)


def measure_interleaved(models: dict[str, str | Path], feeds: dict[str, np.ndarray], threads: int = 1,
                        min_runs: int = 50, max_runs: int = 2000, seconds: float = 3.0,
                        warmup: int = 5) -> SpeedResult:
    """Round-robin latency of several models on the same feeds, in this process. The first
    model is the baseline of `SpeedResult.speedup`."""
    sess = {name: session(p, threads) for name, p in models.items()}
    names = list(sess)
    for _ in range(warmup):
        for n in names:
            sess[n].run(None, feeds)
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    r = 0
    while r < max_runs:
        took = time.perf_counter() - start
        # at least `seconds` and `min_runs`; a slow model stops at 10 runs or 10x `seconds`
        if r >= 10 and took >= seconds and (r >= min_runs or took >= 10 * seconds):
            break
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            sess[n].run(None, feeds)
            times[n].append(time.perf_counter() - t0)
        r += 1
    out = {n: Timing(p50_ms=1e3 * float(np.median(v)), p90_ms=1e3 * float(np.percentile(v, 90)),
                     runs=len(v)) for n, v in times.items()}
    return SpeedResult(timings=out, threads=threads, baseline=names[0])



def write_report(report, dst: Path, t_start: float) -> Path:
    """Stamp the elapsed time and write `report.to_dict()` as DST.edgeops.json."""
    import json

    report.seconds = time.perf_counter() - t_start
    from ..convert import REPORT_SUFFIX

    path = Path(dst).with_name(Path(dst).name + REPORT_SUFFIX)
    report.report_path = str(path)
    path.write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return path
