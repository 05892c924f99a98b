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
from dataclasses import dataclass, field
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

LAYOUTS = ("stacked", "batched", "files", "generated")


@dataclass
class Dataset:
    """Model inputs for calibration and evaluation, as runnable feeds, plus optional labels.

    Three layouts are read (`load_dataset` decides from the model's input ranks, and the
    report says which it took):
      stacked   a sample axis in front of every input, (N, *input shape): each sample is one
                inference as is, so state inputs, scalars and any batch layout just work;
      batched   samples concatenated on each input's batch axis (axis 0, or where the model
                names its batch dim: a GRU state [1, batch, 64] is concatenated on axis 1),
                sliced into feeds of `batch` rows; inputs without a batch axis are shared;
      files     a folder of per-sample .npz files, each keyed by input name.
    `generated` is seeded random inputs (the report says so).
    """
    chunks: list[dict[str, np.ndarray]]   # runnable feeds, in sample order
    rows: list[int]                       # samples in each chunk (labels follow this order)
    labels: np.ndarray | None
    source: str                           # file name, "random (generated)", ...
    layout: str                           # one of LAYOUTS
    description: str = ""                 # how the data was read, for reports
    axes: dict[str, int | None] = field(default_factory=dict)   # batch axis per input (batched)
    dropped: int = 0                      # samples left out (a fixed batch's remainder)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}")
        if len(self.chunks) != len(self.rows) or not self.chunks:
            raise ValueError("a dataset needs at least one feed and a row count per feed")

    @property
    def n(self) -> int:
        return int(sum(self.rows))

    @property
    def n_used(self) -> int:
        return self.n

    @property
    def batch(self) -> int:
        return self.rows[0]

    def batches(self, limit: int | None = None, full_only: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Feeds in order, up to `limit` samples; `full_only` drops a last feed with fewer
        rows than the first (onnxruntime's histogram calibrators need equal batches)."""
        seen = 0
        for chunk, rows in zip(self.chunks, self.rows):
            if limit is not None and seen >= limit:
                return
            if full_only and rows != self.rows[0]:
                return
            seen += rows
            yield chunk

    def n_batches(self, limit: int | None = None) -> int:
        return sum(1 for _ in self.batches(limit))

    def small(self, limit: int, rows: int = 4) -> list[dict[str, np.ndarray]]:
        """Feeds of at most `rows` samples covering about `limit` samples (sensitivity
        ranking keeps every intermediate tensor: small feeds bound memory)."""
        out, seen = [], 0
        for chunk, n in zip(self.chunks, self.rows):
            if seen >= limit:
                break
            if self.layout == "batched" and n > rows and self._splittable():
                for i in range(0, n, rows):
                    if seen >= limit:
                        break
                    out.append(self._slice(chunk, i, min(n, i + rows)))
                    seen += min(n, i + rows) - i
            else:
                out.append(chunk)
                seen += n
        return out

    def one(self) -> dict[str, np.ndarray]:
        """One inference's feed (one sample, or the model's fixed batch): what latency is
        measured on."""
        chunk = self.chunks[0]
        if self.layout == "batched" and self.rows[0] > 1 and self._splittable():
            return self._slice(chunk, 0, 1)
        return chunk

    def _splittable(self) -> bool:
        return any(a is not None for a in self.axes.values())

    def _slice(self, chunk: dict, lo: int, hi: int) -> dict[str, np.ndarray]:
        out = {}
        for k, v in chunk.items():
            ax = self.axes.get(k)
            out[k] = v if ax is None else np.take(v, np.arange(lo, hi), axis=ax)
        return out

    @property
    def feeds(self) -> dict[str, np.ndarray]:
        """Every input with all samples concatenated on axis 0 (what training needs)."""
        names = list(self.chunks[0])
        bad = [k for k in names if self.axes.get(k, 0) not in (0,) and self.layout == "batched"]
        try:
            if bad:
                raise ValueError
            return {k: np.concatenate([c[k] for c in self.chunks], axis=0) for k in names}
        except ValueError:
            raise UsageError(f"{self.source}: this needs every input with its samples on axis 0 "
                             f"({self.description})") from None


def fixed_batch(signature: Signature) -> int | None:
    dims = [s.shape[0] for s in signature.inputs if s.shape]
    fixed = {d for d in dims if isinstance(d, int) and d > 0}
    return fixed.pop() if len(fixed) == 1 and all(isinstance(d, int) for d in dims) else None


def batch_axes(signature: Signature) -> dict[str, int | None]:
    """Each input's batch axis: where it carries the dim name that the first input carries
    on axis 0 (a GRU state [1, batch, 64] has it on axis 1); else axis 0 when the input has
    a dynamic or size-1 first dim; None for scalars and inputs with no batch axis."""
    batch_name = None
    for s in signature.inputs:
        if s.shape and isinstance(s.shape[0], str):
            batch_name = s.shape[0]
            break
    out: dict[str, int | None] = {}
    for s in signature.inputs:
        if not s.shape:
            out[s.name] = None if s.shape == () else 0
            continue
        if batch_name is not None and batch_name in s.shape:
            out[s.name] = list(s.shape).index(batch_name)
        elif not isinstance(s.shape[0], int) or s.shape[0] == 1 or batch_name is None:
            out[s.name] = 0
        else:
            out[s.name] = None
    return out


def _layout(arrays: dict[str, np.ndarray], signature: Signature, where: str) -> str:
    """'stacked' or 'batched', from the ranks of the data against the model's inputs."""
    votes = {}
    for spec in signature.inputs:
        a = arrays[spec.name]
        if spec.shape is None:
            continue
        r = len(spec.shape)
        if a.ndim == r + 1:
            votes[spec.name] = "stacked"
        elif a.ndim == r:
            votes[spec.name] = "batched"
        else:
            raise UsageError(f"{where}: {spec.name!r} has shape {list(a.shape)}; the model takes "
                             f"rank {r} {list(spec.shape)}, so the data must be rank {r + 1} "
                             f"(samples stacked on a new axis 0) or rank {r} (samples "
                             "concatenated on the batch axis)")
    kinds = set(votes.values())
    if len(kinds) > 1:
        shown = ", ".join(f"{k}: {v}" for k, v in votes.items())
        raise UsageError(f"{where}: the inputs disagree on the layout ({shown}); stack every "
                         "input on a new axis 0, or concatenate every input on its batch axis")
    return kinds.pop() if kinds else "batched"


def _shape_text(arrays: dict[str, np.ndarray], drop_first: bool) -> str:
    return ", ".join(f"{k} {list(v.shape[1:] if drop_first else v.shape)}" for k, v in arrays.items())


def load_dataset(path: str | Path, signature: Signature, labels_key: str | None = None,
                 eval_batch: int = 32) -> Dataset:
    """An .npz keyed by input name, a folder of NAME.npy, or a folder of per-sample .npz
    files; the layout (see Dataset) is decided from the ranks and stated in `description`."""
    from ..verify import adapt_feeds, load_inputs

    p = Path(path)
    if p.is_dir() and not list(p.glob("*.npy")) and list(p.glob("*.npz")):
        return _load_files(p, signature, labels_key)
    raw = load_inputs(p)
    labels = None
    if labels_key is not None:
        if labels_key not in raw:
            raise UsageError(f"{path}: no array named {labels_key!r} for --labels "
                             f"(arrays: {', '.join(sorted(raw))})")
        labels = np.asarray(raw.pop(labels_key))
    feeds = adapt_feeds(raw, signature)
    layout = _layout(feeds, signature, str(path))
    if layout == "stacked":
        ns = {k: v.shape[0] for k, v in feeds.items()}
        if len(set(ns.values())) != 1:
            raise UsageError(f"{path}: stacked inputs must hold the same number of samples "
                             f"on axis 0 (sizes {ns})")
        n = next(iter(ns.values()))
        if n == 0:
            raise UsageError(f"{path}: no samples")
        # np.asarray: a stacked scalar input indexes to a numpy scalar, which onnxruntime refuses
        chunks = [{k: np.asarray(v[i]) for k, v in feeds.items()} for i in range(n)]
        axes = batch_axes(signature)
        rows = [_rows(c, axes) for c in chunks]
        desc = (f"stacked: {n} samples on a new axis 0, each one inference of "
                f"{_shape_text(feeds, True)}")
        return _with_labels(Dataset(chunks, rows, None, p.name, "stacked", desc, axes), labels, str(path))

    axes = batch_axes(signature)
    sizes = {k: v.shape[axes[k]] for k, v in feeds.items() if axes.get(k) is not None and v.ndim}
    if len(set(sizes.values())) != 1:
        where = {k: f"{sizes[k]} on axis {axes[k]}" for k in sizes}
        raise UsageError(f"{path}: inputs must hold the same number of samples on their batch "
                         f"axis ({where})" if sizes else
                         f"{path}: no input has a batch axis to hold samples; stack the samples "
                         "on a new axis 0 (shape (N, *input shape))")
    n = next(iter(sizes.values()))
    if n == 0:
        raise UsageError(f"{path}: no samples")
    fixed = fixed_batch(signature)
    batch = fixed if fixed else min(eval_batch, n)
    if n < batch:
        raise UsageError(f"{path}: {n} samples, but the model takes batches of {batch}")
    used = n - n % batch if fixed else n
    ds = Dataset([{}], [1], None, p.name, "batched", axes=axes)
    chunks = [ds._slice(feeds, i, min(used, i + batch)) for i in range(0, used, batch)]
    rows = [min(used, i + batch) - i for i in range(0, used, batch)]
    off_axis = {k: a for k, a in axes.items() if a not in (0, None)}
    shared = [k for k, a in axes.items() if a is None]
    desc = f"batched: {n} samples concatenated on the batch axis"
    if off_axis:
        desc += " (" + ", ".join(f"{k} on axis {a}" for k, a in off_axis.items()) + ")"
    if shared:
        desc += f"; shared by every feed: {', '.join(shared)}"
    ds = Dataset(chunks, rows, None, p.name, "batched", desc, axes, dropped=n - used)
    if labels is not None and labels.shape[0] == n and used < n:
        labels = labels[:used]
    return _with_labels(ds, labels, str(path))


def _rows(feed: dict[str, np.ndarray], axes: dict[str, int | None]) -> int:
    """Samples in one inference's feed: the size of the first batch axis (1 without one)."""
    for k, a in axes.items():
        v = feed.get(k)
        if a is not None and v is not None and v.ndim > a:
            return int(v.shape[a])
    return 1


def _with_labels(ds: Dataset, labels: np.ndarray | None, where: str) -> Dataset:
    if labels is not None:
        if labels.ndim == 0 or labels.shape[0] != ds.n:
            got = labels.shape[0] if labels.ndim else "a scalar"
            raise UsageError(f"{where}: {got} labels for {ds.n} samples")
        ds.labels = labels
    return ds


def _load_files(folder: Path, signature: Signature, labels_key: str | None) -> Dataset:
    from ..verify import adapt_feeds, load_inputs

    files = sorted(folder.glob("*.npz"))
    axes = batch_axes(signature)
    chunks, labels = [], []
    for f in files:
        raw = load_inputs(f)
        if labels_key is not None:
            if labels_key not in raw:
                raise UsageError(f"{f}: no array named {labels_key!r} for --labels")
            labels.append(np.atleast_1d(raw.pop(labels_key)))
        feed = adapt_feeds(raw, signature)
        for spec in signature.inputs:
            if spec.shape is not None and feed[spec.name].ndim != len(spec.shape):
                raise UsageError(f"{f}: {spec.name!r} has shape {list(feed[spec.name].shape)}, "
                                 f"the model takes rank {len(spec.shape)} {list(spec.shape)} "
                                 "(one sample per file)")
        chunks.append(feed)
    rows = [_rows(c, axes) for c in chunks]
    desc = f"files: {len(files)} per-sample .npz files, each one inference"
    ds = Dataset(chunks, rows, None, folder.name, "files", desc, axes)
    return _with_labels(ds, np.concatenate(labels) if labels else None, str(folder))


def random_dataset(signature: Signature, n: int = 64, seed: int = 0,
                   shapes: dict[str, tuple[int, ...]] | None = None) -> Dataset:
    """Seeded inputs from the signature (dynamic dims from `shapes`, else verify's default),
    one inference per sample."""
    from ..verify import make_inputs

    batch = fixed_batch(signature) or 1
    axes = batch_axes(signature)
    chunks = [make_inputs(signature, shapes=shapes, batch=batch, seed=seed + i)
              for i in range(max(1, n // batch))]
    return Dataset(chunks, [_rows(c, axes) for c in chunks], None, "random (generated)",
                   "generated", "generated: seeded random inputs from the signature", axes)


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
    for feeds, rows in zip(data.batches(), data.rows):
        out.batches.append([np.asarray(o) for o in run(feeds)])
        out.rows.append(rows)
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
    from ..agent.ort import session as ort_session

    return ort_session(path, threads)


_LOADS_OK: set[tuple[str, int, int, str]] = set()

_PROBE = """
import sys
import numpy as np, onnxruntime as ort
try:
    so = ort.SessionOptions(); so.log_severity_level = 3
    s = ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider'])
    if len(sys.argv) > 2:
        with np.load(sys.argv[2], allow_pickle=False) as z:
            feeds = {k: z[k] for k in z.files}
        s.run(None, feeds)
except Exception as e:
    print('@probe-error ' + ' '.join((str(e) or type(e).__name__).split()), file=sys.stderr)
    sys.exit(1)
"""


def probe(path: str | Path, feeds: str | Path | None = None, timeout: float = 300) -> str | None:
    """Create an onnxruntime session for PATH in a child process (and run the .npz FEEDS
    through it, when given): some invalid graphs crash onnxruntime outright (a segfault, e.g.
    an fp16 LSTM), which would take this process, and every other result, down with it.
    Returns None when it loads (and runs), else why not, in one line."""
    import subprocess
    import sys

    from ..agent.ort import describe

    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size, str(feeds or ""))
    if key in _LOADS_OK:        # this exact file already passed (fp16 probes before evaluating)
        return None
    args = [sys.executable, "-c", _PROBE, str(path)] + ([str(feeds)] if feeds else [])
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"onnxruntime did not load{' and run' if feeds else ''} it within {timeout:.0f} s"
    if r.returncode != 0:
        if r.returncode < 0:
            return f"onnxruntime crashed (signal {-r.returncode}) {'running' if feeds else 'loading'} it"
        lines = [ln[len("@probe-error "):] for ln in r.stderr.splitlines()
                 if ln.startswith("@probe-error ")]
        return describe(Exception(lines[-1] if lines else f"exit code {r.returncode}"), 2000)
    _LOADS_OK.add(key)
    return None


def probe_loads(path: str | Path, timeout: float = 300) -> None:
    """`probe` that raises RuntimeError with the reason."""
    why = probe(path, timeout=timeout)
    if why:
        raise RuntimeError(f"onnxruntime cannot load the result: {why}")


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


def profile_nodes(path: str | Path, feeds: dict[str, np.ndarray], runs: int = 30,
                  threads: int = 1) -> dict[str, dict]:
    """Per-node time from onnxruntime's own profiler, averaged over RUNS after warm-up:
    {node name: {"op": op type, "us": mean microseconds per run}}. Node names are those of the
    optimized graph onnxruntime executes (fused nodes carry their fused names)."""
    import json
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgeops-prof-") as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "p")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(5):
            sess.run(None, feeds)
        start = time.perf_counter()
        n = 0
        while n < runs or (time.perf_counter() - start < 0.5 and n < 20 * runs):
            sess.run(None, feeds)
            n += 1
        trace = json.loads(Path(sess.end_profiling()).read_text())
    out: dict[str, dict] = {}
    for ev in trace:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        name = ev["name"][: -len("_kernel_time")]
        rec = out.setdefault(name, {"op": ev.get("args", {}).get("op_name", "?"), "us": 0.0,
                                    "calls": 0})
        rec["us"] += float(ev.get("dur", 0))
        rec["calls"] += 1
    total_runs = n + 5
    for rec in out.values():
        rec["us"] = rec["us"] / total_runs
        rec["calls"] = rec["calls"] / total_runs
    return out


def by_op(profile: dict[str, dict]) -> dict[str, float]:
    """Microseconds per run by op type, largest first."""
    acc: dict[str, float] = {}
    for rec in profile.values():
        acc[rec["op"]] = acc.get(rec["op"], 0.0) + rec["us"]
    return dict(sorted(acc.items(), key=lambda kv: -kv[1]))
