"""Structured pruning, with and without distillation, against the original CNN, in one run.

    python benchmarks/prune_distill.py [--ratios 0.3 0.5 0.7] [--epochs 60] [--seconds 3] [--json]

The CNN is the one benchmarks/quantize.py trains (5 Conv-BN-ReLU blocks, 32-64-64-128-128
channels, digits upscaled to 32x32; 1400 training images, 397 held out). For each ratio:
`edgeops.optimize.prune.prune` alone, and with `distill=True` (1200 training images as
unlabeled distillation data, early stopping on the other 200 training images). Then the
original and every result are timed interleaved in one process (batch 1, 1 thread) and
scored on the 397 held-out digits, which neither training nor early stopping saw. Prints params, FLOPs, size, p50, latency ratio and accuracy, then the
issue's targets: latency <= 0.6x the original at ratio 0.5, and accuracy within 1 point of
the original after distillation.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize import accuracy, build_cnn  # noqa: E402  (the same trained CNN)

from edgeops.optimize import gates  # noqa: E402
from edgeops.optimize.prune import prune, stats_of  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.3, 0.5, 0.7])
    ap.add_argument("--epochs", type=int, default=60, help="at most; early stopping, patience 5")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seconds", type=float, default=3.0, help="timing seconds per model")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeops-pbench-"))
    try:
        t0 = time.perf_counter()
        src, x, y = build_cnn(work)
        print(f"[cnn] trained and exported in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        # distillation data: 1200 training images (unlabeled); early stopping: the other 200
        # training images (labeled); the reported accuracy: the 397 held-out test images,
        # which training and early stopping never see
        np.savez(work / "train.npz", x=x[:1200])
        np.savez(work / "val.npz", x=x[1200:1400], y=y[1200:1400])
        files = {"original": src}
        info = {}
        for ratio in args.ratios:
            for dist in (False, True):
                label = f"prune {ratio:g}" + (" + distill" if dist else "")
                out = work / f"p{ratio:g}{'d' if dist else ''}.onnx"
                t0 = time.perf_counter()
                r = prune(src, out, ratio, distill=dist, data=work / "train.npz" if dist else None,
                          epochs=args.epochs, lr=args.lr, eval_data=work / "val.npz",
                          labels="y", measure_seconds=0.5)
                files[label] = out
                info[label] = {"seconds": time.perf_counter() - t0,
                               "epochs_run": r.distill["epochs_run"] if r.distill else None,
                               "best_epoch": r.distill["best_epoch"] if r.distill else None}
                print(f"[cnn] {label}: {info[label]['seconds']:.0f} s", file=sys.stderr)
        speed = gates.measure_interleaved(files, {"x": x[1400:1401]}, threads=1,
                                          seconds=args.seconds * len(files))
        ex, ey = x[1400:], y[1400:]
        rows = []
        for label, path in files.items():
            st = stats_of(path, None)
            t = speed.timings[label]
            rows.append({"model": label, "params": st.params, "flops": st.flops, "size": st.size,
                         "p50_ms": t.p50_ms, "runs": t.runs,
                         "latency_ratio": t.p50_ms / speed.timings["original"].p50_ms,
                         "accuracy": accuracy(path, ex, ey), **info.get(label, {})})
        base = rows[0]
        checks = []
        half = next((r for r in rows if r["model"] == "prune 0.5"), None)
        if half:
            checks.append(("latency at ratio 0.5 <= 0.6x the original", half["latency_ratio"] <= 0.6,
                           f"{half['latency_ratio']:.2f}x"))
        for r in rows:
            if r["model"].endswith("distill"):
                drop = base["accuracy"] - r["accuracy"]
                checks.append((f"{r['model']}: accuracy within 1 point of the original",
                               drop <= 0.01, f"{100 * r['accuracy']:.2f}% vs {100 * base['accuracy']:.2f}% "
                               f"({100 * drop:+.2f} points drop)"))
        if args.json:
            print(json.dumps({"rows": rows, "targets": [{"target": c, "met": ok, "value": v}
                                                        for c, ok, v in checks]}, indent=2))
        else:
            print(f"\ncnn, 1 thread, batch 1, accuracy on {len(ey)} held-out digits")
            print(f"{'model':<22}{'params':>10}{'MFLOPs':>9}{'size KB':>9}{'p50 ms':>9}"
                  f"{'x latency':>11}{'accuracy':>10}  notes")
            for r in rows:
                note = (f"{r['epochs_run']} epochs (best {r['best_epoch']})"
                        if r.get("epochs_run") else "")
                print(f"{r['model']:<22}{r['params']:>10,}{r['flops'] / 1e6:>9.1f}"
                      f"{r['size'] / 1024:>9.1f}{r['p50_ms']:>9.3f}{r['latency_ratio']:>10.2f}x"
                      f"{100 * r['accuracy']:>9.2f}%  {note}")
            print("\ntargets")
            for c, ok, v in checks:
                print(f"  [{'met' if ok else 'MISSED'}] {c}: {v}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
