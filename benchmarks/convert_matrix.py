"""Convert a real small model along every route and print one row per route.

    python benchmarks/convert_matrix.py [--only FAMILY ...] [--json]

For every sample model (edgeops.samples: scikit-learn, Keras 2/3, TF SavedModel and
frozen GraphDef, TorchScript, torch.export, ONNX) and every target format the planner
reaches (onnx, torchscript, tflite, savedmodel, mlpackage, mlmodel), it runs `edgeops.convert.convert` --
which verifies every hop -- and prints: status, the route, the worst max abs error over
the hops (and end to end), and wall-clock seconds including verification.

Core ML results show "not-executed": Core ML has no runtime on Linux, so those rows are
validated specs, not parity. Timing is single-run wall clock on a shared 2-core machine:
read it as an order of magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from edgeops import convert as C  # noqa: E402
from edgeops.errors import EdgeopsError  # noqa: E402
from edgeops.samples import BUILDERS, build_all  # noqa: E402

TARGETS = ("onnx", "torchscript", "tflite", "savedmodel", "mlpackage", "mlmodel")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(BUILDERS), default=list(BUILDERS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeops-bench-"))
    t0 = time.perf_counter()
    samples = build_all(work / "src", tuple(args.only))
    print(f"built {len(samples)} sample models in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    rows = []
    for s in samples:
        for tgt in TARGETS:
            if tgt == s.format:
                continue
            try:
                route = C.plan(s.format, tgt)
            except EdgeopsError:
                continue
            out = work / "out" / f"{s.name}-{tgt}{C.suffix_for(tgt)}"
            t = time.perf_counter()
            try:
                rep = C.convert(s.path, out, to=tgt, shapes=s.shapes, inputs=s.inputs)
                errs = [h.parity.max_abs for h in rep.hops if h.parity.max_abs is not None]
                if rep.end_to_end and rep.end_to_end.max_abs is not None:
                    errs.append(rep.end_to_end.max_abs)
                status, err, note = rep.status, (max(errs) if errs else None), rep.message
            except EdgeopsError as exc:
                status, err, note = "refused", None, exc.message
            rows.append({"model": s.name, "from": s.format, "to": tgt,
                         "route": " -> ".join([route[0].source] + [e.target for e in route]),
                         "status": status, "max_abs": err,
                         "seconds": round(time.perf_counter() - t, 2),
                         "inputs": "real" if s.inputs else "generated", "note": note[:90]})
            print(f"  {s.name} -> {tgt}: {status}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    hdr = f"{'model':<20} {'route':<46} {'status':<13} {'max abs':>9} {'sec':>6}  inputs"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        err = "-" if r["max_abs"] is None else f"{r['max_abs']:.2e}"
        print(f"{r['model']:<20} {r['route']:<46} {r['status']:<13} {err:>9} {r['seconds']:>6.1f}  "
              f"{r['inputs']}{'  ' + r['note'] if r['status'] not in ('passed',) and r['note'] else ''}")
    ok = sum(r["status"] == "passed" for r in rows)
    ne = sum(r["status"] == "not-executed" for r in rows)
    print(f"\n{len(rows)} routes: {ok} passed parity, {ne} Core ML (validated, not executable on "
          f"this OS), {len(rows) - ok - ne} failed/refused")
    print("\nbaseline: the converter alone, as a user would call it, on the same sample files")
    for name, (status, detail) in baselines(samples, work).items():
        print(f"  {name:<50} {status:<9} {detail}")
    return 0


def baselines(samples, work: Path) -> dict[str, tuple[str, str]]:
    """What the underlying tools do by default, without edgeops' route and checks."""
    out: dict[str, tuple[str, str]] = {}
    by_name = {s.name: s for s in samples}
    if "keras3_cnn_h5" in by_name:
        try:
            import keras
            import tf2onnx

            m = keras.saving.load_model(by_name["keras3_cnn_h5"].path, compile=False)
            tf2onnx.convert.from_keras(m, opset=17)
            out["tf2onnx.convert.from_keras(Keras 3 .h5)"] = ("ok", "")
        except Exception as exc:
            out["tf2onnx.convert.from_keras(Keras 3 .h5)"] = (
                "FAILS", f"{type(exc).__name__}: {str(exc)[:60]} (edgeops: passed, via tf.function)")
    if "sk_rf" in by_name:
        import joblib
        import numpy as np
        import onnxruntime as ort
        import skl2onnx
        from skl2onnx.common.data_types import FloatTensorType

        rf = joblib.load(by_name["sk_rf"].path)
        onx = skl2onnx.convert_sklearn(rf, initial_types=[("X", FloatTensorType([None, 64]))])
        sess = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
        res = sess.run(None, {"X": np.zeros((2, 64), np.float32)})
        out["skl2onnx.convert_sklearn(RandomForest), defaults"] = (
            "unchecked", f"probabilities come back as {type(res[1]).__name__} of "
                         f"{type(res[1][0]).__name__} (ZipMap), and nothing compares them with "
                         "scikit-learn (edgeops: tensors, checked on real data)")
    return out


if __name__ == "__main__":
    sys.exit(main())
