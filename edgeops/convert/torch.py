"""PyTorch <-> ONNX: TorchScript and torch.export programs to ONNX, ONNX to TorchScript.

- TorchScript -> ONNX: the TorchScript exporter (`dynamo=False`); the dynamo exporter
  refuses ScriptModules. Dims the signature marks dynamic stay dynamic; a scripted (not
  traced) module also gets a dynamic batch dim, checked here at a second batch size and
  dropped if the exported graph does not generalise.
- .pt2 -> ONNX: the dynamo exporter (needs onnxscript). It implements opset >= 18 only
  (asked for 17 it writes 18 and its own down-conversion fails on ReduceMean), so the
  result is brought down to opset 17 here when every op allows it -- onnx2torch and
  older runtimes need <= 17 -- and kept at 18 with a note otherwise.
- ONNX -> TorchScript: onnx2torch + torch.jit.trace. What onnx2torch cannot convert
  (any op/version missing from its registry: opset >= 18 ReduceMean, Cast-21, the
  ai.onnx.ml domain of every scikit-learn export, Reshape(allowzero=1)) is refused up
  front, by name. The ONNX names and dynamic dims are saved inside the TorchScript file
  (an extra file, see edgeops.formats.torch.SIGNATURE_EXTRA).

onnx2torch imports torchvision for two ops (NonMaxSuppression, RoiAlign) and PyPI's
torchvision is a CUDA build that does not import beside CPU torch: `_import_onnx2torch`
shims it for the import only, and models using those two ops are refused.

Not covered: training-mode export, custom ONNX domains, TorchScript methods other than
forward.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import types
from pathlib import Path

import numpy as np

from ..errors import ConversionError, EdgeopsError, first_line
from ..extras import require
from ..formats import torch as torch_fmt
from ..formats.base import Signature, TensorSpec
from ..formats.onnx import walk_nodes as _walk_nodes
from .context import ConvertContext

DEFAULT_OPSET = 17
_TORCHVISION_OPS = {"NonMaxSuppression", "RoiAlign"}
_OPSET_HINT = "export the ONNX at opset 17 (--opset 17), which onnx2torch covers"



def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _example_args(ctx: ConvertContext, names: list[str], torch) -> tuple:
    feeds = ctx.sample_inputs
    if not all(n in feeds for n in names) and len(feeds) == len(names):
        feeds = dict(zip(names, feeds.values()))  # user inputs named otherwise: by position
    try:
        return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names)
    except KeyError as exc:
        raise ConversionError(f"no sample input for {exc.args[0]!r}; the exporter needs one "
                              "example per input") from None


def _other_batch(args: tuple, torch) -> tuple | None:
    """The same examples at batch size + 1 (first row repeated), to test a dynamic batch."""
    if not args or any(a.dim() == 0 for a in args):
        return None
    return tuple(torch.cat([a, a[:1]], 0) for a in args)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc":
        return bool(np.allclose(a, b, atol=1e-4, rtol=1e-3, equal_nan=True))
    return bool(np.array_equal(a, b))


def _ort_outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from ..agent.ort import session

    sess = session(path)
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, feeds.values())))


# ----------------------------------------------------------------------------- TorchScript -> ONNX

_UNSUPPORTED = re.compile(r"operator '([^']+)' to ONNX opset version (\d+)")


def _dynamic_axes(sig: Signature, batch: bool) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for spec in sig.inputs:
        dims = {i: (d if isinstance(d, str) else f"{spec.name}_dim{i}")
                for i, d in enumerate(spec.shape or ()) if not isinstance(d, int)}
        if batch and spec.shape:
            dims.setdefault(0, "batch")
        if dims:
            axes[spec.name] = dims
    if any(0 in d for d in axes.values()):
        first = next(d[0] for d in axes.values() if 0 in d)
        for spec in sig.outputs:
            if spec.shape is None or len(spec.shape) >= 1:
                axes[spec.name] = {0: first}
    return axes


def torchscript_to_onnx(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    torch = require("torch", what="TorchScript export")
    module = torch_fmt.load(src, "torchscript", ctx.load)
    sig = ctx.source_signature
    ins = [s.name for s in sig.inputs]
    outs = [s.name for s in sig.outputs]
    opset = ctx.opset or DEFAULT_OPSET
    args = _example_args(ctx, ins, torch)
    module = _tuple_outputs(module, args, torch)

    # A scripted module is code, so its batch size is free; a traced one may have baked
    # the example's batch into reshapes, so only dims the signature calls dynamic move.
    force = ctx.options.get("dynamic_batch")
    recorded = torch_fmt._traced_inputs(src) is not None or \
        torch_fmt._stored_signature(src) is not None
    guess_batch = (not recorded) if force is None else bool(force)

    def export(batch: bool) -> dict:
        axes = _dynamic_axes(sig, batch)
        try:
            with torch_fmt.quiet():
                torch.onnx.export(module, args, str(dst), input_names=ins, output_names=outs,
                                  opset_version=opset, dynamo=False, dynamic_axes=axes or None,
                                  do_constant_folding=True)
        except Exception as exc:
            m = _UNSUPPORTED.search(str(exc))
            if m:
                raise ConversionError(
                    f"torch.onnx cannot export operator {m.group(1)} at opset {m.group(2)}",
                    hint="try a newer --opset, or replace that op in the model") from exc
            raise ConversionError(f"torch.onnx (TorchScript exporter) failed: "
                                  f"{first_line(exc)}") from exc
        return axes

    axes = export(guess_batch)
    note = ""
    if guess_batch and force is None and any(0 in d for d in axes.values()):
        if not _batch_generalises(module, dst, args, torch):
            axes = export(False)
            note = (f"batch size fixed at {args[0].shape[0]}: the exported graph did not "
                    "give the same results at another batch size")
    info = {"tool": f"torch {torch.__version__} (torch.onnx TorchScript exporter)",
            "opset": opset,
            "dynamic_dims": {k: sorted(set(v.values())) for k, v in axes.items() if k in ins}}
    if note:
        info["note"] = note
    return info


def _tuple_outputs(module, args: tuple, torch):
    """A module returning a dict or list, wrapped to return a flat tuple.

    The TorchScript exporter cannot export prim::DictConstruct / ListConstruct outputs.
    The wrapper is traced around a call of the scripted forward, so the module's own
    graph (control flow included) is kept; only the flattening is traced.
    """
    ret = " ".join(str(r.type) for r in module.forward.schema.returns)
    if "Dict" not in ret and "List" not in ret:
        return module

    class _Flat(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *xs):
            return tuple(t for _, t in torch_fmt.flatten_outputs(self.inner(*xs)))

    try:
        with torch.no_grad(), torch_fmt.quiet():
            return torch.jit.trace(_Flat(module), args, strict=False, check_trace=False)
    except Exception as exc:
        raise ConversionError(f"cannot flatten the module's {ret} output for export: "
                              f"{first_line(exc)}") from exc


def _batch_generalises(module, onnx_path: Path, args: tuple, torch,
                       onnx_is_reference: bool = False) -> bool:
    """Do `module` and the exported ONNX still agree at another batch size?"""
    other = _other_batch(args, torch)
    if other is None:
        return False
    try:
        with torch.no_grad(), torch_fmt.quiet():
            mine = [t.numpy() for _, t in torch_fmt.flatten_outputs(module(*other))]
            theirs = _ort_outputs(onnx_path, {str(i): a.numpy() for i, a in enumerate(other)})
    except Exception:
        return False
    # _close measures against its second argument
    pairs = zip(theirs, mine) if onnx_is_reference else zip(mine, theirs)
    return len(mine) == len(theirs) and all(_close(a, b) for a, b in pairs)


# ----------------------------------------------------------------------------- .pt2 -> ONNX

_NO_ONNX_FN = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'")


def exported_to_onnx(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    torch = require("torch", what="torch.export programs")
    require("onnxscript", "torch", "the dynamo ONNX exporter")
    ep = torch_fmt.load(src, "torch-export", ctx.load)
    sig = ctx.source_signature
    ins = [s.name for s in sig.inputs]
    outs = [s.name for s in sig.outputs]
    asked = ctx.opset
    args = _example_args(ctx, ins, torch)
    try:
        with torch_fmt.quiet():
            prog = torch.onnx.export(ep, args, input_names=ins, output_names=outs,
                                     opset_version=max(asked or 18, 18), dynamo=True,
                                     verbose=False, optimize=True)
    except Exception as exc:
        m = _NO_ONNX_FN.search(str(exc)) or _NO_ONNX_FN.search(repr(exc.__cause__))
        if m:
            raise ConversionError(f"torch.onnx (dynamo exporter) has no ONNX function for "
                                  f"operator {m.group(1)}",
                                  hint="replace that op in the model") from exc
        raise ConversionError(f"torch.onnx (dynamo exporter) failed: {first_line(exc)}") from exc
    model = prog.model_proto
    got = _default_opset(model)
    note = ""
    down = None
    if asked is None or asked < got:
        target = asked or DEFAULT_OPSET
        down, why = _downgrade(model, target, {n: a.numpy() for n, a in zip(ins, args)})
        if down is not None:
            model = down
        elif asked is not None:
            raise ConversionError(f"the dynamo exporter writes opset {got} and this model cannot "
                                  f"be brought down to opset {asked}: {why}",
                                  hint="leave --opset out to keep the exporter's opset")
        else:
            note = f"kept opset {got} (opset {target} was not possible: {why})"
    if down is None:
        _tidy(model)  # _downgrade tidies what it returns
    _save_onnx(model, dst)
    info = {"tool": f"torch {torch.__version__} (torch.onnx dynamo exporter) / onnxscript "
                    f"{_version('onnxscript')}",
            "opset": _default_opset(model)}
    if got != info["opset"]:
        info["exported_opset"] = got
    if note:
        info["note"] = note
    return info


def _save_onnx(model, dst: Path) -> None:
    from ..formats import onnx as onnx_fmt

    onnx_fmt.save(model, Path(dst))


def _default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# Ops whose opset-18 form differs from 17 only in ways handled below.
_REDUCE_AXES_INPUT = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare",
                      "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp"}


def _downgrade(model, target: int, feeds: dict[str, np.ndarray]):
    """Opset 18 -> 17 (and lower through onnx's version converter); (model, None) or
    (None, reason). The result is checked against the opset-18 model on the sample inputs.

    onnx's own 18 -> 17 adapter leaves ReduceMean's noop_with_empty_axes attribute
    behind (an invalid model), hence this small rewrite of the ops that changed in 18.
    """
    import onnx
    from onnx import helper

    if _default_opset(model) != 18:
        return None, f"the exporter wrote opset {_default_opset(model)}"
    if model.functions:
        return None, "the model holds ONNX functions"
    m = copy.deepcopy(model)
    g = m.graph
    consts = _constants(g)
    for n in g.node:
        if n.domain not in ("", "ai.onnx"):
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            return None, f"{n.op_type} holds a subgraph"
        try:
            since = onnx.defs.get_schema(n.op_type, 18, "").since_version
            onnx.defs.get_schema(n.op_type, 17, "")
        except Exception:
            return None, f"{n.op_type} does not exist before opset 18"
        if since < 18:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type in _REDUCE_AXES_INPUT:
            axes = None
            if len(n.input) > 1 and n.input[1]:
                if n.input[1] not in consts:
                    return None, f"{n.op_type} has computed axes"
                axes = [int(v) for v in np.asarray(consts[n.input[1]]).reshape(-1)]
            if attrs.get("noop_with_empty_axes", 0) and not axes:
                return None, f"{n.op_type} with noop_with_empty_axes=1"
            keep = [a for a in n.attribute if a.name != "noop_with_empty_axes"]
            del n.attribute[:]
            n.attribute.extend(keep)
            if axes:
                n.attribute.append(helper.make_attribute("axes", axes))
            del n.input[1:]
        elif n.op_type == "Split":
            keep = [a for a in n.attribute if a.name != "num_outputs"]
            del n.attribute[:]
            n.attribute.extend(keep)
        elif n.op_type == "Pad":
            if len(n.input) > 3 and n.input[3]:
                return None, "Pad with an axes input"
        elif n.op_type == "Resize":
            if attrs.get("antialias", 0) or "axes" in attrs or \
                    attrs.get("keep_aspect_ratio_policy", b"stretch") not in (b"stretch", "stretch"):
                return None, "Resize with opset-18 attributes"
            # the exporter spells out the defaults of the new attributes: drop them
            keep = [a for a in n.attribute if a.name not in ("antialias", "keep_aspect_ratio_policy")]
            del n.attribute[:]
            n.attribute.extend(keep)
        elif n.op_type in ("ScatterElements", "ScatterND"):
            if attrs.get("reduction", b"none") in (b"max", b"min", "max", "min"):
                return None, f"{n.op_type} with reduction=max/min"
        elif n.op_type == "LpPool":
            if attrs.get("ceil_mode", 0):
                return None, "LpPool with ceil_mode"
        else:
            return None, f"{n.op_type} changed in opset 18"
    _tidy(m)
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 17
    try:
        if target < 17:
            m = onnx.version_converter.convert_version(m, target)
        onnx.checker.check_model(m, full_check=True)
    except Exception as exc:
        return None, f"the converted model is invalid ({first_line(exc)})"
    # same outputs as the exporter's own model, or it is not used
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        a, b = Path(d) / "a.onnx", Path(d) / "b.onnx"
        onnx.save(model, str(a))
        onnx.save(m, str(b))
        try:
            ra, rb = _ort_outputs(a, feeds), _ort_outputs(b, feeds)
        except Exception as exc:
            return None, f"onnxruntime rejects the converted model ({first_line(exc)})"
    if len(ra) != len(rb) or not all(_close(x, y) for x, y in zip(ra, rb)):
        return None, "the converted model computes different outputs"
    return m, None


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return consts


def _tidy(model) -> int:
    """Semantics-preserving clean-ups, in place; returns how many Reshapes changed.

    - Reshape(allowzero=1) with a constant shape holding no 0 means the same as
      allowzero=0; the dynamo exporter writes it for every flatten/view, and onnx2torch
      refuses allowzero=1.
    - initializers nothing reads any more (e.g. ReduceMean axes moved to an attribute).
    """
    g = model.graph
    consts = _constants(g)
    changed = 0
    for n in g.node:
        if n.op_type != "Reshape" or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            continue
        az = [a for a in n.attribute if a.name == "allowzero"]
        if az and az[0].i == 1 and n.input[1] in consts and \
                0 not in np.asarray(consts[n.input[1]]).reshape(-1).tolist():
            n.attribute.remove(az[0])
            changed += 1
    used = {i for n in _walk_nodes(g) for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)
    return changed


# ----------------------------------------------------------------------------- ONNX -> TorchScript

def _import_onnx2torch():
    """Import onnx2torch without torchvision (see the module docstring)."""
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"]
    require("torch")
    try:
        import torchvision  # noqa: F401  (a working torchvision needs no shim)
        return require("onnx2torch", "torch", "ONNX -> TorchScript")
    except Exception:
        for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")
                     or k == "onnx2torch" or k.startswith("onnx2torch.")]:
            del sys.modules[name]
    stub = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")

    def _missing(*_a, **_k):
        raise ConversionError("this model needs torchvision (NonMaxSuppression / RoiAlign), "
                              "which is not installed beside CPU torch")

    ops.nms = ops.roi_align = ops.box_convert = _missing
    stub.ops = ops
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, ops
    try:
        return require("onnx2torch", "torch", "ONNX -> TorchScript")
    finally:
        # the stub served the import only; nothing else may take it for torchvision
        if sys.modules.get("torchvision") is stub:
            del sys.modules["torchvision"]
        if sys.modules.get("torchvision.ops") is ops:
            del sys.modules["torchvision.ops"]


def _torchvision_works() -> bool:
    mod = sys.modules.get("torchvision")
    return mod is not None and getattr(mod, "__file__", None) is not None


def _precheck(model, onnx2torch) -> None:
    """Refuse, by name, what onnx2torch cannot convert, before it half-converts."""
    from onnx import helper
    from onnx2torch.node_converters.registry import get_converter

    opsets = {(o.domain if o.domain != "ai.onnx" else ""): o.version for o in model.opset_import}
    missing: list[str] = []
    for n in _walk_nodes(model.graph):
        dom = n.domain if n.domain != "ai.onnx" else ""
        if dom not in ("",):
            what = "scikit-learn models" if dom == "ai.onnx.ml" else "custom ops"
            raise ConversionError(
                f"onnx2torch has no converters for the {dom} domain (op {n.op_type}; {what})",
                hint="keep this model in ONNX and run it with onnxruntime")
        if n.op_type in _TORCHVISION_OPS and not _torchvision_works():
            raise ConversionError(f"onnx2torch needs torchvision for {n.op_type}, which is not "
                                  "installed beside CPU torch")
        if n.op_type == "Reshape" and any(a.name == "allowzero" and helper.get_attribute_value(a)
                                          for a in n.attribute):
            raise ConversionError("onnx2torch cannot convert Reshape with allowzero=1",
                                  hint=_OPSET_HINT)
        try:
            get_converter(operation_type=n.op_type, version=opsets.get(dom, 1), domain=dom)
        except NotImplementedError:
            label = f"{n.op_type} at opset {opsets.get(dom, 1)}"
            if label not in missing:
                missing.append(label)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        opset = opsets.get("", 1)
        hint = _OPSET_HINT if opset > 17 else (
            "onnx2torch has no converter for this op at any opset; keep the model in ONNX, or "
            "work on the original network in its framework")
        raise ConversionError(f"onnx2torch cannot convert {shown}", hint=hint)


def onnx_to_module(model):
    """onnx2torch: an ONNX ModelProto -> a torch module (an fx GraphModule whose Conv/Linear/
    BatchNorm are real torch layers), with unsupported ops refused by name."""
    require("torch", what="ONNX -> torch")
    from ..formats import onnx as onnx_fmt

    _tidy(model)
    onnx2torch = _import_onnx2torch()
    _precheck(model, onnx2torch)
    ins = [s.name for s in onnx_fmt.signature_of(model).inputs]
    keep_names = all(n.isidentifier() for n in ins)
    try:
        with torch_fmt.quiet():
            return onnx2torch.convert(model, save_input_names=keep_names).eval()
    except NotImplementedError as exc:
        m = re.search(r"operation_type='([^']+)', version=(\d+)", str(exc))
        what = f"{m.group(1)} (opset {m.group(2)})" if m else first_line(exc)
        raise ConversionError(f"onnx2torch cannot convert {what}", hint=_OPSET_HINT) from exc
    except EdgeopsError:
        raise
    except Exception as exc:
        raise ConversionError(f"onnx2torch failed: {first_line(exc)}") from exc


def onnx_to_torchscript(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    torch = require("torch", what="ONNX -> TorchScript")
    from ..formats import onnx as onnx_fmt

    model = onnx_fmt.load(Path(src))
    net = onnx_to_module(model)
    onnx_sig = onnx_fmt.signature_of(model)
    ins = [s.name for s in onnx_sig.inputs]
    args = _example_args(ctx, ins, torch)
    try:
        with torch.no_grad(), torch_fmt.quiet():
            traced = torch.jit.trace(net, args, check_trace=False)
    except EdgeopsError:
        raise
    except Exception as exc:
        raise ConversionError(f"torch.jit.trace of the onnx2torch module failed: "
                              f"{first_line(exc)}") from exc

    # The ONNX names and dims travel inside the file; dims stay dynamic only if the traced
    # module really gives the same answers at another batch size.
    dynamic = any(s.shape and not isinstance(s.shape[0], int) for s in onnx_sig.inputs)
    if dynamic and not _batch_generalises(traced, Path(src), args, torch, onnx_is_reference=True):
        dynamic = False
    in_specs = tuple(
        TensorSpec(s.name, s.dtype, tuple(
            d if (dynamic and not isinstance(d, int)) else int(a.shape[i])
            for i, d in enumerate(s.shape)) if s.shape is not None else tuple(a.shape))
        for s, a in zip(onnx_sig.inputs, args))
    out_specs = tuple(TensorSpec(s.name, s.dtype, s.shape if dynamic or (
        s.shape is not None and all(isinstance(d, int) for d in s.shape)) else None)
        for s in onnx_sig.outputs)
    stored = Signature(in_specs, out_specs).to_dict()
    torch_fmt.save(traced, Path(dst), "torchscript",
                   extra={torch_fmt.SIGNATURE_EXTRA: json.dumps(stored).encode()})
    info = {"tool": f"torch {torch.__version__} / onnx2torch {_version('onnx2torch')} "
                    "(+ torch.jit.trace)",
            "opset": _default_opset(model),
            "traced_shapes": {s.name: list(a.shape) for s, a in zip(onnx_sig.inputs, args)}}
    if not dynamic and any(s.shape and not all(isinstance(d, int) for d in s.shape)
                           for s in onnx_sig.inputs):
        info["note"] = "dynamic dims fixed at the traced shapes (the trace did not generalise)"
    return info


