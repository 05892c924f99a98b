"""PyTorch <-> ONNX: TorchScript and torch.export programs to ONNX, ONNX to TorchScript.

- TorchScript -> ONNX uses the TorchScript exporter (dynamo=False): the dynamo exporter
  refuses ScriptModules. The batch dimension is exported as dynamic.
- .pt2 -> ONNX uses the dynamo exporter (needs onnxscript), asked for opset 17 so the
  result can go on to onnx2torch.
- ONNX -> TorchScript is onnx2torch + torch.jit.trace. onnx2torch has no converter for
  opset >= 18 ReduceMean, Reshape(allowzero=1), Cast-21, or the ai.onnx.ml domain (every
  scikit-learn export): those are refused up front, naming the op.

onnx2torch imports torchvision for two ops (NonMaxSuppression, RoiAlign), and PyPI's
torchvision is a CUDA build that does not import beside CPU torch. `_import_onnx2torch`
shims torchvision for the import only; models that use those two ops are refused.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import types
import warnings
from pathlib import Path

import numpy as np

from ..errors import ConversionError
from ..extras import require
from ..formats import torch as torch_fmt
from .context import ConvertContext

DEFAULT_OPSET = 17
_TORCHVISION_OPS = {"NonMaxSuppression", "RoiAlign"}


@contextlib.contextmanager
def _quiet():
    """The exporters print warnings, version-converter tracebacks and progress lines for
    things edgeops handles itself (the verified opset is in the report)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export",
                                              "torch._dynamo", "torch.fx", "onnx_ir")]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    buf = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _example_args(ctx: ConvertContext, torch) -> tuple:
    return tuple(torch.from_numpy(np.ascontiguousarray(ctx.sample_inputs[s.name]))
                 for s in ctx.source_signature.inputs)


def _unsupported(exc: BaseException) -> str | None:
    m = re.search(r"operator '?([\w:.]+)'? to ONNX opset", str(exc))
    return m.group(1) if m else None


def torchscript_to_onnx(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    torch = require("torch")
    module = torch_fmt.load(src, "torchscript", ctx.load).eval()
    ins = [s.name for s in ctx.source_signature.inputs]
    outs = [s.name for s in ctx.source_signature.outputs]
    opset = ctx.opset or DEFAULT_OPSET
    dyn = {n: {0: "batch"} for n in ins + outs}
    try:
        with _quiet():
            torch.onnx.export(module, _example_args(ctx, torch), str(dst), input_names=ins,
                              output_names=outs, opset_version=opset, dynamo=False,
                              dynamic_axes=dyn)
    except Exception as exc:
        op = _unsupported(exc)
        if op:
            raise ConversionError(f"torch.onnx cannot export {op} at opset {opset}",
                                  hint="try another --opset, or replace the op in the model") from exc
        raise ConversionError(f"torch.onnx (TorchScript exporter) failed: {_first_line(exc)}") from exc
    return {"tool": f"torch {torch.__version__} (TorchScript exporter)", "opset": opset}


def exported_to_onnx(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    torch = require("torch")
    require("onnxscript", "torch", "the dynamo ONNX exporter")
    ep = torch_fmt.load(src, "torch-export", ctx.load)
    outs = [s.name for s in ctx.source_signature.outputs]
    opset = ctx.opset or DEFAULT_OPSET
    note = ""
    try:
        with _quiet():
            prog = torch.onnx.export(ep, (), input_names=[s.name for s in ctx.source_signature.inputs],
                                     output_names=outs, opset_version=opset, dynamo=True,
                                     verbose=False)
    except Exception as exc:
        op = _unsupported(exc)
        raise ConversionError(
            f"torch.onnx (dynamo exporter) cannot export {op}" if op else
            f"torch.onnx (dynamo exporter) failed: {_first_line(exc)}") from exc
    prog.save(str(dst))
    import onnx

    got = {o.domain or "ai.onnx": o.version for o in onnx.load(str(dst), load_external_data=False).opset_import}
    if got.get("ai.onnx") != opset:
        note = f"exporter wrote opset {got.get('ai.onnx')} (asked {opset})"
    return {"tool": f"torch {torch.__version__} (dynamo exporter)", "opset": got.get("ai.onnx"),
            **({"note": note} if note else {})}


# ----------------------------------------------------------------------------- ONNX -> torch

def _import_onnx2torch():
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"]
    require("torch")
    try:
        import torchvision  # noqa: F401  (a working torchvision needs no shim)
    except Exception:
        sys.modules.pop("torchvision", None)
        stub = types.ModuleType("torchvision")
        ops = types.ModuleType("torchvision.ops")

        def _missing(*a, **k):
            raise ConversionError("this model needs torchvision (NonMaxSuppression/RoiAlign), "
                                  "which is not installed beside CPU torch")
        ops.nms = ops.roi_align = ops.box_convert = _missing
        stub.ops = ops
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, ops
        try:
            return require("onnx2torch", "torch")
        finally:
            # the stub served the import only; nothing else should find it
            if sys.modules.get("torchvision") is stub:
                del sys.modules["torchvision"], sys.modules["torchvision.ops"]
    return require("onnx2torch", "torch")


def _precheck(model) -> None:
    """Refuse, by name, what onnx2torch is known not to convert."""
    from onnx import helper

    opsets = {o.domain or "": o.version for o in model.opset_import}
    for o in model.opset_import:
        if o.domain not in ("", "ai.onnx"):
            if any(n.domain == o.domain for n in model.graph.node):
                raise ConversionError(
                    f"onnx2torch has no converters for the {o.domain} domain "
                    f"({'scikit-learn models' if o.domain == 'ai.onnx.ml' else 'custom ops'})",
                    hint="keep this model in ONNX: run it with onnxruntime")
    version = opsets.get("", 1)
    for n in model.graph.node:
        if n.op_type in _TORCHVISION_OPS:
            raise ConversionError(f"onnx2torch needs torchvision for {n.op_type}, which is not "
                                  "installed beside CPU torch")
        if n.op_type == "ReduceMean" and version >= 18:
            raise ConversionError(f"onnx2torch cannot convert ReduceMean at opset {version}",
                                  hint="export the ONNX at opset 17 (--opset 17)")
        if n.op_type == "Reshape" and any(a.name == "allowzero" and helper.get_attribute_value(a)
                                          for a in n.attribute):
            raise ConversionError("onnx2torch cannot convert Reshape with allowzero=1",
                                  hint="export the ONNX at opset 17 (--opset 17)")
        if n.op_type == "Cast" and version >= 21:
            raise ConversionError(f"onnx2torch cannot convert Cast at opset {version}",
                                  hint="export the ONNX at opset 17 (--opset 17)")


def onnx_to_torchscript(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    torch = require("torch")
    import onnx

    model = onnx.load(str(src))
    _precheck(model)
    onnx2torch = _import_onnx2torch()
    try:
        with _quiet():
            net = onnx2torch.convert(model).eval()
    except NotImplementedError as exc:
        m = re.search(r"operation_type='(\w+)', version=(\d+)", str(exc))
        what = f"{m.group(1)} (opset {m.group(2)})" if m else _first_line(exc)
        raise ConversionError(f"onnx2torch has no converter for {what}",
                              hint="export the ONNX at opset 17 (--opset 17)") from exc
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"onnx2torch failed: {_first_line(exc)}") from exc
    args = _example_args(ctx, torch)
    try:
        with torch.no_grad(), _quiet():
            traced = torch.jit.trace(net, args, check_trace=False)
    except Exception as exc:
        raise ConversionError(f"torch.jit.trace of the onnx2torch module failed: {_first_line(exc)}") from exc
    traced.save(str(dst))
    return {"tool": f"onnx2torch {_version('onnx2torch')} + torch.jit.trace (torch {torch.__version__})",
            "traced_shapes": {k: list(v.shape) for k, v in ctx.sample_inputs.items()}}


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
