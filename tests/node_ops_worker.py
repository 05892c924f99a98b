"""Worker for test_node_ops.py: ONNX's one-operator node tests through edgeops' ONNX -> torch
path (normalisation, opset move, onnx2torch + edgeops' converters, torch.jit.trace), one JSON
line per case. Run as a child process (a case can abort torch); START says where to resume.

    python tests/node_ops_worker.py START
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np


def main() -> None:
    import onnx
    import torch
    from onnx import numpy_helper
    from onnx.backend.test.loader import load_model_tests

    from edgeops.agent.ort import session
    from edgeops.convert.torch import onnx_to_module
    from edgeops.errors import EdgeopsError, first_line

    warnings.simplefilter("ignore")
    start = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    cases = sorted(load_model_tests(kind="node"), key=lambda c: c.name)
    for k, case in enumerate(cases):
        if k < start:
            continue
        rec = {"i": k, "name": case.name}
        try:
            model = case.model if isinstance(case.model, onnx.ModelProto) else onnx.load(case.model)
            op = model.graph.node[0].op_type if model.graph.node else "?"
            rec["op"] = op
            rec["opset"] = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                               default=0)
            if not case.data_sets:
                rec["result"] = "no data"
                print(json.dumps(rec), flush=True)
                continue
            inputs, expected = case.data_sets[0]
            names = [i.name for i in model.graph.input
                     if i.name not in {t.name for t in model.graph.initializer}]
            if len(names) != len(inputs) or any(not isinstance(x, np.ndarray) for x in inputs) \
                    or any(not isinstance(x, np.ndarray) for x in expected) \
                    or any(x.dtype.kind in "OUS" for x in list(inputs) + list(expected)):
                rec["result"] = "not tensors"       # sequences / optionals: not a tensor model
                print(json.dumps(rec), flush=True)
                continue
            feeds = dict(zip(names, inputs))
            try:
                net = onnx_to_module(model, feeds)
            except EdgeopsError as exc:
                rec["result"] = "refused"
                rec["why"] = exc.message[:200]
                print(json.dumps(rec), flush=True)
                continue
            except Exception as exc:  # noqa: BLE001 - an unwrapped converter error is a bug
                rec["result"] = "error"
                rec["why"] = f"{type(exc).__name__}: {first_line(exc, 200)}"
                print(json.dumps(rec), flush=True)
                continue
            try:
                with torch.no_grad():
                    out = net(*[torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
            except Exception as exc:  # noqa: BLE001 - convert's parity check reports this
                rec["result"] = "caught"
                rec["why"] = f"the converted module fails to run: {first_line(exc, 160)}"
                print(json.dumps(rec), flush=True)
                continue
            outs = out if isinstance(out, (list, tuple)) else [out]
            got = [o.detach().numpy() if hasattr(o, "detach") else np.asarray(o) for o in outs]
            try:
                ref = session(model.SerializeToString()).run(None, feeds)
            except Exception:  # noqa: BLE001 - onnxruntime lacks the op: parity could not run
                ref = None
            rec["result"] = _judge(got, expected, ref)
        except Exception as exc:  # noqa: BLE001
            rec["result"] = "error"
            rec["why"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        print(json.dumps(rec), flush=True)


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.size != b.size:
        return False
    a = a.reshape(b.shape)
    if b.dtype.kind in "fc":
        return bool(np.allclose(a.astype(np.float64), b.astype(np.float64), atol=1e-4, rtol=1e-3,
                                equal_nan=True))
    return bool(np.array_equal(a, b))


def _judge(got, expected, ref) -> str:
    """pass: matches ONNX's expected outputs. Otherwise: would edgeops' parity check (against
    onnxruntime) have caught it? caught / unverifiable (onnxruntime cannot run it) / wrong
    (matches onnxruntime, differs from the expected: onnxruntime's answer)."""
    if len(got) == len(expected) and all(_same(g, e) for g, e in zip(got, expected)):
        return "pass"
    if ref is None:
        return "unverifiable"
    if len(got) == len(ref) and all(_same(g, r) for g, r in zip(got, ref)):
        return "agrees with onnxruntime, not with the expected outputs"
    return "caught"


if __name__ == "__main__":
    main()
