"""FLOPs of an ONNX model from shape inference (multiply-adds x 2, compute ops only).

Conv / ConvTranspose / Gemm / MatMul dominate the cost of the models edgeops prunes;
element-wise ops are ignored (they are memory-bound and a few percent of the FLOPs).
Dynamic dims are fixed first: the batch to 1, others from `shapes` or 1.
"""

from __future__ import annotations

import numpy as np


def _fix_inputs(model, shapes: dict[str, tuple[int, ...]] | None):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        want = (shapes or {}).get(vi.name)
        dims = vi.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if want is not None and i < len(want):
                d.dim_value = int(want[i])
            elif not d.HasField("dim_value") or d.dim_value <= 0:
                d.dim_value = 1
    return m


def model_flops(model, shapes: dict[str, tuple[int, ...]] | None = None) -> int | None:
    """FLOPs of one inference at batch 1; None when shapes cannot be inferred."""
    import onnx

    try:
        m = onnx.shape_inference.infer_shapes(_fix_inputs(model, shapes))
    except Exception:  # noqa: BLE001 - FLOPs are informative; no FLOPs is said as "?"
        return None
    dims: dict[str, list[int]] = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            dims[vi.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
    for t in m.graph.initializer:
        dims[t.name] = list(t.dims)
    total = 0
    for n in m.graph.node:
        out = dims.get(n.output[0]) if n.output else None
        if not out or 0 in out:
            continue
        if n.op_type in ("Conv", "ConvTranspose"):
            w = dims.get(n.input[1])
            if not w:
                continue
            # Conv: out elements x (Cin/groups x kernel); ConvTranspose: in elements x (Cout/g x k)
            k = int(np.prod(w[1:]))
            if n.op_type == "Conv":
                total += 2 * int(np.prod(out)) * k
            else:
                x = dims.get(n.input[0])
                if x:
                    total += 2 * int(np.prod(x)) * int(np.prod(w[1:]))
        elif n.op_type in ("Gemm", "MatMul"):
            a = dims.get(n.input[0])
            if not a:
                continue
            trans_a = any(at.name == "transA" and at.i for at in n.attribute)
            kdim = a[-2] if (n.op_type == "Gemm" and trans_a) else a[-1]
            total += 2 * int(np.prod(out)) * int(kdim)
    return total

