"""edgeops quantization against plain onnxruntime, side by side, in one run.

    python benchmarks/quantize.py [--models cnn transformer] [--seconds 5] [--threads 1] [--json]

Two models are trained here, on scikit-learn's bundled digits (1797 8x8 images; 1400 for
training, the last 397 held out for evaluation, the first 300 training images for
calibration):
  * cnn: 5 Conv-BN-ReLU blocks (32-64-64-128-128 channels) on digits upscaled to 32x32;
  * transformer: a 2-layer pre-norm encoder (d=128, 4 heads, FFN 256; 400k parameters)
    reading each image as 8 tokens of 8 pixels.
Each is exported to ONNX (opset 17) and compared as:
  * fp32: the exported model in onnxruntime;
  * ort static / ort dynamic: onnxruntime.quantization.quantize_static / quantize_dynamic
    with default settings, the calls a user would otherwise make;
  * edgeops static / dynamic / fp16 / auto: `edgeops.optimize.quantize.quantize` with a
    0.5 % accuracy budget.
Latency: batch 1, every variant of a model timed in the same process, interleaved
round-robin (gates.measure_interleaved), p50 over at least --seconds seconds. Accuracy:
top-1 on the 397 held-out digits. The targets from the issue are checked at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeops.optimize import gates
from edgeops.samples import train_classifier
from edgeops.optimize.quantize import quantize

BUDGET = 0.005


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _train(model, x, y, epochs: int, lr: float):
    return train_classifier(model, x[:1400], y[:1400], epochs, lr, cosine=True)


def build_cnn(d: Path):
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    img, y = digits()
    x = np.kron(img, np.ones((4, 4), np.float32))[:, None]            # 1x32x32

    def block(i, o, s):
        return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    m = nn.Sequential(*block(1, 32, 1), *block(32, 64, 2), *block(64, 64, 1),
                      *block(64, 128, 2), *block(128, 128, 1),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
    _train(m, x, y, epochs=12, lr=3e-3)
    path = d / "cnn.onnx"
    torch.onnx.export(m, torch.tensor(x[:1]), str(path), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
                      opset_version=17, dynamo=False)
    return path, x, y



def build_transformer(d: Path):
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    img, y = digits()
    x = img                                                           # 8 tokens x 8 pixels

    class Block(nn.Module):
        """Pre-norm encoder block written out (torch's fused fast path does not export)."""

        def __init__(self, dim=128, heads=4, ff=256):
            super().__init__()
            self.heads, self.dk = heads, dim // heads
            self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.ff = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim))

        def forward(self, h):
            b, t, c = h.shape
            q, k, v = self.qkv(self.n1(h)).reshape(b, t, 3, self.heads, self.dk).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-2, -1) / self.dk ** 0.5, dim=-1)
            h = h + self.proj((att @ v).transpose(1, 2).reshape(b, t, c))
            return h + self.ff(self.n2(h))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 128)
            self.pos = nn.Parameter(torch.zeros(1, 8, 128))
            self.blocks = nn.Sequential(Block(), Block())
            self.norm = nn.LayerNorm(128)
            self.head = nn.Linear(128, 10)

        def forward(self, t):
            h = self.blocks(self.embed(t) + self.pos)
            return self.head(self.norm(h).mean(1))

    m = _train(Encoder(), x, y, epochs=40, lr=2e-3)
    path = d / "transformer.onnx"
    torch.onnx.export(m, torch.tensor(x[:1]), str(path), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
                      opset_version=17, dynamo=False)
    return path, x, y


BUILDERS = {"cnn": build_cnn, "transformer": build_transformer}


def plain_ort(src: Path, d: Path, calib: np.ndarray) -> dict[str, Path]:
    """What a user would otherwise run: the two documented calls, default arguments."""
    import contextlib
    import io
    import logging

    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    out = {"ort static": d / f"{src.stem}.ort-static.onnx",
           "ort dynamic": d / f"{src.stem}.ort-dynamic.onnx"}
    logging.disable(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(src), str(out["ort static"]), Reader())
        quantize_dynamic(str(src), str(out["ort dynamic"]))
    logging.disable(logging.NOTSET)
    return out


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    out = gates.session(path, 1).run(None, {"x": x})[0]
    return float(np.mean(out.argmax(1) == y))


def bench_model(name: str, d: Path, seconds: float, threads: int) -> dict:
    t0 = time.perf_counter()
    src, x, y = BUILDERS[name](d)
    print(f"[{name}] trained and exported in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    np.savez(d / "calib.npz", x=x[:300])
    np.savez(d / "eval.npz", x=x[1400:], y=y[1400:])
    files: dict[str, Path] = {"fp32": src}
    files.update(plain_ort(src, d, x[:300]))
    reports = {}
    for mode in ("static", "dynamic", "fp16", "auto"):
        t0 = time.perf_counter()
        out = d / f"{name}.edgeops-{mode}.onnx"
        r = quantize(src, out, mode, calibration=d / "calib.npz", eval_data=d / "eval.npz",
                     labels="y", max_drop=BUDGET, threads=threads, measure_seconds=1.0)
        files[f"edgeops {mode}"] = Path(r.output or r.rejected_output)
        reports[mode] = r
        print(f"[{name}] edgeops {mode}: {r.variant(r.chosen).name}, "
              f"{'passed' if r.passed else 'FAILED: ' + str(r.failure)} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    speed = gates.measure_interleaved(files, {"x": x[1400:1401]}, threads=threads,
                                      seconds=seconds * len(files))
    ex, ey = x[1400:], y[1400:]
    base_acc = accuracy(src, ex, ey)
    rows = []
    for label, path in files.items():
        t = speed.timings[label]
        acc = accuracy(path, ex, ey)
        row = {"variant": label, "size": path.stat().st_size,
               "size_ratio": path.stat().st_size / src.stat().st_size,
               "p50_ms": t.p50_ms, "p90_ms": t.p90_ms, "runs": t.runs,
               "speedup": speed.speedup(label), "accuracy": acc, "drop": base_acc - acc}
        if label.startswith("edgeops"):
            r = reports[label.split()[1]]
            v = r.variant(r.chosen)
            row.update({"chosen": v.name, "passed": r.passed, "fallback_nodes": len(v.fallback_nodes),
                        "settings": v.settings})
        rows.append(row)
    return {"model": name, "threads": threads, "eval_samples": int(len(ey)), "rows": rows}


def targets(results: list[dict]) -> list[tuple[str, bool, str]]:
    out = []
    for res in results:
        rows = {r["variant"]: r for r in res["rows"]}
        auto = rows["edgeops auto"]
        if res["model"] == "cnn":
            out.append(("cnn: edgeops auto >= 1.8x faster than fp32", auto["speedup"] >= 1.8,
                        f"{auto['speedup']:.2f}x"))
        out.append((f"{res['model']}: edgeops auto size <= 0.3x", auto["size_ratio"] <= 0.3,
                    f"{auto['size_ratio']:.2f}x ({auto.get('chosen')})"))
        out.append((f"{res['model']}: edgeops auto accuracy drop <= 0.5 %", auto["drop"] <= BUDGET,
                    f"{100 * auto['drop']:.2f} points"))
        for plain in ("ort static", "ort dynamic"):
            p = rows[plain]
            # "never worse in accuracy than the plain defaults at equal or better latency"
            if auto["p50_ms"] <= p["p50_ms"] * 1.02:
                ok = auto["accuracy"] >= p["accuracy"]
                out.append((f"{res['model']}: auto accuracy >= {plain} (auto is as fast or faster)",
                            ok, f"{100 * auto['accuracy']:.2f}% vs {100 * p['accuracy']:.2f}%"))
            else:
                out.append((f"{res['model']}: auto vs {plain}", True,
                            f"{plain} is faster ({p['p50_ms']:.3f} vs {auto['p50_ms']:.3f} ms) "
                            f"at {100 * p['accuracy']:.2f}% vs {100 * auto['accuracy']:.2f}%"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", choices=sorted(BUILDERS), default=["cnn", "transformer"])
    ap.add_argument("--seconds", type=float, default=3.0, help="timing seconds per variant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeops-qbench-"))
    try:
        results = []
        for name in args.models:
            d = work / name
            d.mkdir()
            results.append(bench_model(name, d, args.seconds, args.threads))
        checks = targets(results)
        if args.json:
            print(json.dumps({"results": results,
                              "targets": [{"target": t, "met": ok, "value": v} for t, ok, v in checks],
                              "cpu": os.uname().machine}, indent=2, default=str))
        else:
            for res in results:
                print(f"\n{res['model']} ({res['threads']} thread, batch 1, accuracy on "
                      f"{res['eval_samples']} held-out digits)")
                print(f"{'variant':<17}{'size KB':>9}{'x size':>8}{'p50 ms':>9}{'speedup':>9}"
                      f"{'accuracy':>10}{'drop':>8}  notes")
                for r in res["rows"]:
                    note = ""
                    if "chosen" in r:
                        note = f"-> {r['chosen']}" + ("" if r["passed"] else " (gate FAILED)")
                        if r["fallback_nodes"]:
                            note += f", {r['fallback_nodes']} nodes float"
                    print(f"{r['variant']:<17}{r['size'] / 1024:>9.1f}{r['size_ratio']:>8.2f}"
                          f"{r['p50_ms']:>9.3f}{r['speedup']:>8.2f}x{100 * r['accuracy']:>9.2f}%"
                          f"{100 * r['drop']:>7.2f}  {note}")
            print("\ntargets")
            for t, ok, v in checks:
                print(f"  [{'met' if ok else 'MISSED'}] {t}: {v}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
