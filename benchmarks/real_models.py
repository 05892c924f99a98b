"""edgeops on real third-party models (the corpus), side by side with the tools a user would
otherwise reach for, in one run.

    python benchmarks/real_models.py [--only NAME,...] [--sections quant,convert,predict]
                                     [--seconds 2] [--json]

Models: every model in $EDGEOPS_CORPUS (tests/corpus/fetch.sh; ./dev fetches it), plus the
traits no shipped file has, derived from them (initializers listed as inputs, Constant-node
weights; edgeops.corpus.DERIVED). Data: each model's own manifest feed, 48 samples
(edgeops.corpus.samples: random fills reseeded, streaming states fed back, ids randomised),
32 for calibration and 16 for evaluation. No package ships labels, so accuracy is agreement
(classifier-like outputs) or cosine with the fp32 model on the 16 evaluation samples.

quant: per float ONNX model, side by side
  edgeops auto    `optimize --quantize auto` (static, dynamic, fp16; 1 % budget), what it keeps
  edgeops static  `optimize --quantize static`
  ort static      onnxruntime.quantization.quantize_static with its defaults, same 32 feeds
  ort dynamic     onnxruntime.quantization.quantize_dynamic with its defaults
  nncf            nncf.quantize on the ONNX model with its defaults, same 32 feeds (the bench
                  extra installs nncf; if it cannot be imported the column says so)
  columns: runs? (loads and runs the eval feeds), size ratio, p50 ratio against fp32 (every
  variant of a model timed in this process, interleaved round-robin, batch of the feed,
  1 thread), metric against fp32.
convert: every route the conversion matrix offers from the model's format (onnx2tf routes
  included, which the test tier leaves to this script for time): passed / FAILED / refused /
  not executed (Core ML), max abs, seconds, how many shapes the result was checked at.
predict: `targets calibrate host` (its own EDGEOPS_HOME), then `bench --predict` on every
  loadable ONNX model against `bench` measuring it here (1 thread, p50): error and whether the
  predicted interval holds the measurement.
Targets from the issue are printed as met / MISSED at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime

from edgeops import corpus
from edgeops.optimize import gates

BUDGET = 0.01
N_CALIB, N_EVAL = 32, 16


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- baselines

class _Reader:
    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def ort_static(src: Path, out: Path, feeds: list[dict]) -> Path:
    from onnxruntime.quantization import quantize_static

    quantize_static(str(src), str(out), _Reader(feeds))
    return out


def ort_dynamic(src: Path, out: Path, feeds: list[dict]) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(src), str(out))
    return out


def nncf_ptq(src: Path, out: Path, feeds: list[dict]) -> Path:
    import nncf
    import onnx

    q = nncf.quantize(onnx.load(str(src)), nncf.Dataset(feeds), subset_size=len(feeds))
    onnx.save(q, str(out))
    return out


def edgeops_mode(mode: str):
    def run(src: Path, out: Path, feeds: list[dict], d: Path) -> tuple[Path, dict]:
        from edgeops.optimize.quantize import quantize

        r = quantize(src, out, mode, calibration=d / "calib.npz", eval_data=d / "eval.npz",
                     max_drop=BUDGET, measure_seconds=1.0)
        path = Path(r.output or r.rejected_output)
        return path, {"chosen": r.chosen, "passed": r.passed, "failure": r.failure,
                      "fallback": len(r.variant(r.chosen).fallback_nodes) if r.chosen != "fp32" else 0,
                      "reason": getattr(r, "speed_reason", None)}
    return run


def _one_line(exc: BaseException) -> str:
    from edgeops.agent.ort import describe

    return f"{type(exc).__name__}: {describe(exc, 160)}"


# ----------------------------------------------------------------------------- quantization

def quant_model(m: corpus.CorpusModel, work: Path, seconds: float) -> dict:
    d = work / m.name
    d.mkdir(parents=True, exist_ok=True)
    feeds = corpus.samples(m, N_CALIB + N_EVAL)
    corpus.save_stacked(feeds[:N_CALIB], d / "calib.npz")
    corpus.save_stacked(feeds[N_CALIB:], d / "eval.npz")
    calib, evals = feeds[:N_CALIB], feeds[N_CALIB:]
    rows: dict[str, dict] = {}
    files: dict[str, Path] = {"fp32": m.path}
    makers = {"edgeops auto": edgeops_mode("auto"), "edgeops static": edgeops_mode("static"),
              "ort static": ort_static, "ort dynamic": ort_dynamic, "nncf": nncf_ptq}
    for label, make in makers.items():
        t0 = time.perf_counter()
        out = d / f"{label.replace(' ', '-')}.onnx"
        info: dict = {}
        try:
            got = make(m.path, out, calib, d) if label.startswith("edgeops") else make(m.path, out, calib)
            if isinstance(got, tuple):
                got, info = got
            sess = gates.session(got, 1)
            outs = [sess.run(None, f) for f in evals]
            rows[label] = {"runs": True, "path": got, "outs": outs, **info}
            files[label] = got
        except Exception as exc:  # noqa: BLE001 - a baseline that fails is a result
            rows[label] = {"runs": False, "error": _one_line(exc), **info}
        rows[label]["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"  {m.name}: {label}: {'runs' if rows[label]['runs'] else rows[label]['error']} "
            f"({rows[label]['seconds']} s)")
    from edgeops.formats.onnx import signature

    data = gates.load_dataset(d / "eval.npz", signature(m.path))     # rows as edgeops counts them
    ref = gates.session(m.path, 1)
    ref_o = gates.Outputs([ref.run(None, f) for f in evals], data.rows)
    metric = gates.pick_metric("auto", data, ref_o)
    speed = gates.measure_interleaved(files, feeds[N_CALIB], seconds=seconds * len(files))
    fp32_size = m.path.stat().st_size
    result = {"model": m.name, "metric": metric, "fp32_p50_ms": speed.timings["fp32"].p50_ms,
              "rows": {}}
    for label, r in rows.items():
        row = {k: v for k, v in r.items() if k not in ("outs", "path")}
        if r["runs"]:
            row["metric"] = gates.score(metric, gates.Outputs(r["outs"], data.rows), ref_o, None)
            row["size_ratio"] = Path(r["path"]).stat().st_size / fp32_size
            row["p50_ratio"] = speed.timings[label].p50_ms / speed.timings["fp32"].p50_ms
            row["p50_ms"] = speed.timings[label].p50_ms
        result["rows"][label] = row
    return result


def conv_models(models: list[corpus.CorpusModel]) -> set[str]:
    """Models where convolutions carry at least half the FLOPs (edgeops' own per-node count,
    bench.estimate.analyze, at the manifest feed's shapes): the int8 latency target's set."""
    from edgeops.bench import estimate

    out = set()
    for m in models:
        a = estimate.analyze(str(m.path), m.shapes)
        flops = {}
        for n in a.nodes:
            if n.status == "run":
                flops[n.op_class] = flops.get(n.op_class, 0) + n.flops * n.count
        total = sum(flops.values())
        if total and (flops.get("conv", 0) + flops.get("depthwise", 0)) / total >= 0.5:
            out.add(m.name)
    return out


# ----------------------------------------------------------------------------- convert

TARGETS = {"onnx": ("torchscript", "tflite", "savedmodel", "mlpackage"), "tflite": ("onnx",),
           "h5": ("onnx", "mlpackage"), "pickle": ("onnx",), "torchscript": ("onnx", "mlpackage")}


def convert_model(m: corpus.CorpusModel, work: Path) -> list[dict]:
    """Every route the matrix offers from M's format, in this process behind the CLI's error
    boundary: passed / FAILED (parity) / refused (one line) / not executed (Core ML)."""
    from edgeops.convert import convert, suffix_for
    from edgeops.errors import EdgeopsError
    from edgeops.formats import signature

    rows = []
    shapes = m.shapes
    if m.format in ("onnx", "tflite"):
        try:
            shapes = m.shapes_for(signature(m.path))
        except EdgeopsError:
            pass
    shapes = {k: tuple(v) for k, v in shapes.items() if v}
    for t in TARGETS[m.format]:
        out = work / "convert" / f"{m.name}{suffix_for(t) or '.' + t}"
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        row = {"model": m.name, "target": t}
        try:
            rep = convert(m.path, out, to=t, shapes=shapes, trust_pickle=m.format == "pickle")
            row.update(status=rep.status, max_abs=rep.hops[-1].parity.max_abs,
                       message=rep.message, shapes=len(rep.shapes_checked),
                       route=" -> ".join(rep.route),
                       tolerance_notes=sum(len((h.info or {}).get("tolerances", [])) for h in rep.hops))
        except EdgeopsError as exc:
            row.update(status="refused", message=exc.message)
        except Exception as exc:  # noqa: BLE001 - would be exit 70: a bug, counted as such
            row.update(status="INTERNAL ERROR", message=_one_line(exc))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"  {m.name} -> {t}: {row['status']} ({row['seconds']} s) {row.get('message', '')[:90]}")
        rows.append(row)
    return rows


def print_convert(rows: list[dict]) -> None:
    print("\nconversions (every route the matrix offers; parity against the source on the "
          "manifest feed, plus every other shape the result declares)")
    print(f"{'model':<28}{'target':<13}{'status':<15}{'max abs':>10}{'s':>7}  note")
    for r in rows:
        mx = "" if r.get("max_abs") is None else f"{r['max_abs']:.2e}"
        note = r.get("message", "")[:80] if r["status"] != "passed" else \
            (f"{r['shapes']} shapes checked" + (", measured tolerance" if r.get("tolerance_notes") else ""))
        print(f"{r['model']:<28}{r['target']:<13}{r['status']:<15}{mx:>10}{r['seconds']:>7.1f}  {note}")


def convert_targets(rows: list[dict]) -> list[tuple[str, bool, str]]:
    bad = [f"{r['model']} -> {r['target']}" for r in rows if r["status"] == "INTERNAL ERROR"]
    ok = sum(r["status"] in ("passed", "not-executed") for r in rows)
    reverse = [r for r in rows if r["target"] in ("torchscript",)]
    rev_ok = sum(r["status"] == "passed" for r in reverse)
    return [("no conversion ends in an internal error", not bad, ", ".join(bad) or "none"),
            ("conversions verified (passed; Core ML: validated, not executable here)", True,
             f"{ok}/{len(rows)}"),
            ("ONNX -> TorchScript passes on real models (was 0 of 6)", rev_ok >= 6,
             f"{rev_ok}/{len(reverse)}")]


# ----------------------------------------------------------------------------- predict

def predict_models(models: list[corpus.CorpusModel], work: Path) -> list[dict]:
    """Calibrate `host` here (its own EDGEOPS_HOME), then predict each model at 1 thread and
    measure it with `edgeops bench` (2 s): the prediction error against the measurement."""
    import os

    from edgeops.bench import calibrate as cal
    from edgeops.bench.measure import Settings, bench
    from edgeops.errors import EdgeopsError

    os.environ["EDGEOPS_HOME"] = str(work / "home")
    log("[predict] calibrating host (the 22-model suite, 3 rounds)")
    cal.calibrate("host", threads=1)
    rows = []
    for m in models:
        row = {"model": m.name}
        try:
            p = bench(m.path, settings=Settings(threads=1, shapes=m.shapes), target="host",
                      predict=True).prediction
            meas = bench(m.path, settings=Settings(threads=1, shapes=m.shapes, min_seconds=2.0))
            pred = p.get("p50_ms", p.get("mean_ms"))
            got = meas.measurement["latency_ms"]["p50"]
            row.update(predicted_ms=pred, measured_ms=got, error=pred / got - 1,
                       interval=p["interval_ms"],
                       inside=p["interval_ms"][0] <= got <= p["interval_ms"][1])
        except EdgeopsError as exc:
            row.update(refused=exc.message)
        log(f"  {m.name}: {row}")
        rows.append(row)
    return rows


def print_predict(rows: list[dict]) -> None:
    print("\nprediction on the calibrated host profile vs a measurement here (1 thread, p50)")
    print(f"{'model':<22}{'predicted ms':>14}{'measured ms':>13}{'error':>9}  interval")
    for r in rows:
        if "refused" in r:
            print(f"{r['model']:<22}{'refused: ' + r['refused'][:90]}")
            continue
        lo, hi = r["interval"]
        print(f"{r['model']:<22}{r['predicted_ms']:>14.3f}{r['measured_ms']:>13.3f}"
              f"{100 * r['error']:>+8.1f}%  {lo:.3f}-{hi:.3f} {'(holds it)' if r['inside'] else '(MISSES)'}")


def predict_targets(rows: list[dict]) -> list[tuple[str, bool, str]]:
    done = [r for r in rows if "error" in r]
    within = [r for r in done if abs(r["error"]) <= 0.10]
    share = len(within) / len(done) if done else 0.0
    inside = sum(r["inside"] for r in done)
    return [("prediction within +-10 % for >= 90 % of corpus models (1 thread, this machine)",
             share >= 0.9, f"{len(within)}/{len(done)} ({100 * share:.0f} %)"),
            ("the predicted interval holds the measurement", inside == len(done),
             f"{inside}/{len(done)}")]


# ----------------------------------------------------------------------------- main

def loadable_onnx(only: set[str] | None) -> list[corpus.CorpusModel]:
    """Every ONNX corpus model onnxruntime loads (a broken file is nobody's benchmark)."""
    out = []
    for m in corpus.load():
        if m.format != "onnx" or (only and m.name not in only):
            continue
        try:
            gates.session(m.path, 1)
        except Exception:  # noqa: BLE001
            continue
        out.append(m)
    return out


def quant_models(only: set[str] | None, work: Path) -> list[corpus.CorpusModel]:
    from edgeops.optimize import graph
    import onnx

    out = []
    for m in corpus.load():
        if m.format != "onnx" or (only and m.name not in only):
            continue
        model = onnx.load(str(m.path), load_external_data=False)
        if graph.quantized_op_count(model):
            continue                      # already quantized: edgeops refuses, rightly
        try:
            gates.session(m.path, 1)
        except Exception:  # noqa: BLE001 - a broken file (oww-hey-jarvis) is nobody's baseline
            continue
        out.append(m)
    return out


def print_quant(results: list[dict]) -> None:
    print("\nquantization (1 thread; p50 and size as a ratio of fp32; metric vs fp32 on 16 "
          "held-out feeds)")
    print(f"{'model':<22}{'variant':<16}{'runs':>5}{'size x':>8}{'p50 x':>8}{'metric':>9}  notes")
    for r in results:
        for label, row in r["rows"].items():
            if row["runs"]:
                note = ""
                if "chosen" in row:
                    note = f"-> {row['chosen']}" + ("" if row["passed"] else " (gate FAILED)")
                    if row.get("fallback"):
                        note += f", {row['fallback']} nodes float"
                print(f"{r['model']:<22}{label:<16}{'yes':>5}{row['size_ratio']:>8.2f}"
                      f"{row['p50_ratio']:>8.2f}{100 * row['metric']:>8.2f}%  {note}")
            else:
                print(f"{r['model']:<22}{label:<16}{'NO':>5}{'':>8}{'':>8}{'':>9}  {row['error'][:90]}")


def quant_targets(results: list[dict], convs: set[str]) -> list[tuple[str, bool, str]]:
    out = []
    runs = [r for r in results if r["rows"]["edgeops static"]["runs"]]
    out.append(("edgeops static runs on every float corpus model", len(runs) == len(results),
                f"{len(runs)}/{len(results)}"))
    worse = []
    for r in results:
        a = r["rows"]["edgeops auto"]
        for base in ("ort static", "ort dynamic", "nncf"):
            b = r["rows"][base]
            if not b["runs"]:
                continue
            if not a["runs"]:
                worse.append(f"{r['model']} vs {base}: edgeops does not run")
            elif a["p50_ratio"] <= b["p50_ratio"] * 1.03 and a["metric"] < b["metric"] - 1e-4:
                worse.append(f"{r['model']} vs {base}: metric {a['metric']:.4f} < {b['metric']:.4f}")
            elif a["p50_ratio"] > b["p50_ratio"] * 1.03 and a["metric"] <= b["metric"] + 1e-4:
                worse.append(f"{r['model']} vs {base}: slower ({a['p50_ratio']:.2f} vs "
                             f"{b['p50_ratio']:.2f}) and not more accurate")
    out.append(("edgeops auto >= ORT defaults and NNCF (accuracy at equal or lower latency)",
                not worse, "; ".join(worse) or "every model"))
    ratios = [r["rows"]["edgeops auto"]["p50_ratio"] for r in results
              if r["model"] in convs and r["rows"]["edgeops auto"]["runs"]]
    med = float(np.median(ratios)) if ratios else float("nan")
    out.append(("median int8 latency <= 0.8x fp32 on the convolutional models",
                bool(ratios) and med <= 0.8, f"{med:.2f}x over {len(ratios)} models"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated corpus model names")
    ap.add_argument("--sections", default="quant,convert,predict")
    ap.add_argument("--seconds", type=float, default=2.0, help="timing seconds per variant")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    onnxruntime.set_default_logger_severity(3)     # the baselines' sessions: no warning spam
    only = set(args.only.split(",")) if args.only else None
    sections = set(args.sections.split(","))
    work = Path(tempfile.mkdtemp(prefix="edgeops-realbench-"))
    out: dict = {"targets": []}
    try:
        if "quant" in sections:
            models = quant_models(only, work)
            res = []
            for m in models:
                log(f"[quant] {m.name}")
                res.append(quant_model(m, work, args.seconds))
            out["quant"] = res
            out["targets"] += quant_targets(res, conv_models(models))
        if "convert" in sections:
            rows = []
            for m in corpus.load():
                if only and m.name not in only:
                    continue
                log(f"[convert] {m.name}")
                rows += convert_model(m, work)
            out["convert"] = rows
            out["targets"] += convert_targets(rows)
        if "predict" in sections:
            out["predict"] = predict_models(loadable_onnx(only), work)
            out["targets"] += predict_targets(out["predict"])
        if args.json:
            print(json.dumps(out, indent=2, default=str))
        else:
            if "quant" in out:
                print_quant(out["quant"])
            if "convert" in out:
                print_convert(out["convert"])
            if "predict" in out:
                print_predict(out["predict"])
            print("\ntargets")
            for t, ok, v in out["targets"]:
                print(f"  [{'met' if ok else 'MISSED'}] {t}: {v}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
