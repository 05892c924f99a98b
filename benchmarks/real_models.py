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
convert: every route `edgeops formats` offers from the model's format, status and max abs.
predict: `bench --predict` on the calibrated `host` profile against a measured p50 here.
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


# ----------------------------------------------------------------------------- main

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
        if args.json:
            print(json.dumps(out, indent=2, default=str))
        else:
            if "quant" in out:
                print_quant(out["quant"])
            print("\ntargets")
            for t, ok, v in out["targets"]:
                print(f"  [{'met' if ok else 'MISSED'}] {t}: {v}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
