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
_NO_CONVERTER_HINT = ("onnx2torch has no converter for it; keep the model in ONNX (onnxruntime "
                      "runs it), or convert the original network from its framework")



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


def _ort_outputs(path: Path, feeds: dict[str, np.ndarray], literal: bool = False) -> list[np.ndarray]:
    from ..agent.ort import session

    sess = session(path, optimization="disabled" if literal else "all")
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
    """onnx2torch, imported without torchvision (see the module docstring), with edgeops'
    converters for the ops it lacks (LSTM, GRU, Q/DQ: onnx2torch_ops.py) registered."""
    mod = _import_onnx2torch_raw()
    from . import onnx2torch_ops

    onnx2torch_ops.register()
    return mod


def _import_onnx2torch_raw():
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
            raise ConversionError("onnx2torch cannot convert Reshape with allowzero=1 on a "
                                  "computed shape", hint=_NO_CONVERTER_HINT)
        try:
            get_converter(operation_type=n.op_type, version=opsets.get(dom, 1), domain=dom)
        except NotImplementedError:
            label = f"{n.op_type} at opset {opsets.get(dom, 1)}"
            if label not in missing:
                missing.append(label)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ConversionError(f"onnx2torch cannot convert {shown} (no converter at this or any "
                              "opset edgeops could move the model to)", hint=_NO_CONVERTER_HINT)


def _covered(ops: set[str], opset: int) -> list[str]:
    """Ops onnx2torch has no converter for at OPSET (their schema's version at that opset)."""
    from onnx2torch.node_converters.registry import get_converter

    missing = []
    for op in sorted(ops):
        try:
            get_converter(operation_type=op, version=opset, domain="")
        except NotImplementedError:
            missing.append(op)
    return missing


def _same_signature(a, b) -> bool:
    return (sorted(a.attributes) == sorted(b.attributes)
            and [i.name for i in a.inputs] == [i.name for i in b.inputs]
            and [o.name for o in a.outputs] == [o.name for o in b.outputs])


def _bridge_type_only_versions(ops: set[str], opset: int) -> list[str]:
    """Newer opsets re-version many ops only to admit new element types (int4, float8,
    bfloat16): same attributes, same inputs and outputs. Where onnx2torch has a converter
    for an earlier version with the same signature, it is registered for the newer one too
    (the conversion's parity check then decides, as for every op). Returns what was bridged."""
    from onnx import defs
    from onnx2torch.node_converters.registry import add_converter, get_converter

    bridged = []
    for op in sorted(ops):
        try:
            schema = defs.get_schema(op, opset, "")
            get_converter(operation_type=op, version=opset, domain="")
            continue
        except NotImplementedError:
            pass
        except Exception:  # noqa: BLE001 - no such op in the default domain
            continue
        cur = schema
        while cur.since_version > 1:
            try:
                prev = defs.get_schema(op, cur.since_version - 1, "")
            except Exception:  # noqa: BLE001
                break
            if not _same_signature(prev, schema):
                break
            try:
                conv = get_converter(operation_type=op, version=prev.since_version, domain="")
            except NotImplementedError:
                cur = prev
                continue
            try:
                add_converter(operation_type=op, version=schema.since_version)(conv)
            except ValueError:
                pass                        # registered by an earlier call
            bridged.append(f"{op}-{schema.since_version} as {op}-{prev.since_version}")
            break
    return bridged


def _dynamic_clips(model) -> int:
    """Clip with a computed min/max (e.g. a dB floor of max(x) - 80) -> Min(Max(x, lo), hi),
    which onnx2torch converts (its Clip needs constant bounds). Same values by definition."""
    from onnx import helper

    g = model.graph
    consts = {t.name for t in g.initializer}
    out, changed = [], 0
    for n in g.node:
        extra = [i for i in n.input[1:] if i and i not in consts]
        if n.op_type != "Clip" or n.domain not in ("", "ai.onnx") or not extra:
            out.append(n)
            continue
        x, lo, hi = (list(n.input) + ["", ""])[:3]
        cur = x
        if lo:
            mid = f"{n.output[0]}__clip_lo"
            out.append(helper.make_node("Max", [cur, lo], [mid], name=f"{n.name or 'Clip'}_max"))
            cur = mid
        if hi:
            out.append(helper.make_node("Min", [cur, hi], [n.output[0]], name=f"{n.name or 'Clip'}_min"))
        else:
            out.append(helper.make_node("Identity", [cur], [n.output[0]], name=f"{n.name or 'Clip'}_id"))
        changed += 1
    if changed:
        del g.node[:]
        g.node.extend(out)
    return changed


def _fold_weight_dequantize(model) -> int:
    """DequantizeLinear of an initializer (an int8 weight in a QDQ model) -> the float
    initializer it computes, so onnx2torch's Conv/Gemm see constant weights; the values are
    exactly what the node would give: (q - zero_point) * scale, per axis when the scale is."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    keep, folded = [], 0
    for n in g.node:
        ins = [i for i in n.input if i]
        if n.op_type != "DequantizeLinear" or not all(i in inits for i in ins):
            keep.append(n)
            continue
        q = numpy_helper.to_array(inits[ins[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[ins[1]]).astype(np.float32)
        zp = numpy_helper.to_array(inits[ins[2]]).astype(np.float32) if len(ins) > 2 else 0.0
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if np.ndim(scale) == 1 and scale.size > 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
            zp = np.reshape(zp, shape) if np.ndim(zp) else zp
        g.initializer.append(numpy_helper.from_array(((q - zp) * scale).astype(np.float32),
                                                     n.output[0]))
        folded += 1
    if folded:
        del g.node[:]
        g.node.extend(keep)
    return folded


def _outputs_through_identity(model) -> int:
    """A graph output produced by a multi-output node (a GRU's Y_h) gets its own Identity:
    onnx2torch returns the node's whole output tuple for such an output instead of the one
    tensor. Names stay: the node now writes NAME__o and the Identity writes NAME."""
    from onnx import helper

    g = model.graph
    outs = {o.name for o in g.output}
    added = []
    for n in g.node:
        if len([o for o in n.output if o]) < 2:
            continue
        for k, o in enumerate(n.output):
            if o in outs:
                inner = f"{o}__o"
                for c in g.node:
                    for j, i in enumerate(c.input):
                        if i == o:
                            c.input[j] = inner
                n.output[k] = inner
                added.append(helper.make_node("Identity", [inner], [o], name=f"{o}__identity"))
    g.node.extend(added)
    return len(added)


def prepare_for_onnx2torch(model, feeds: dict[str, np.ndarray] | None = None):
    """The model normalised for onnx2torch, checked against the original with onnxruntime on
    FEEDS: (model, notes). Steps (each noted when it changed something): initializers out of
    the inputs, every Constant to an initializer, onnxslim (constant folding, dead nodes,
    shape inference), computed Clip bounds as Min/Max, and the default-domain opset moved to
    the nearest one onnx2torch covers for every op (onnx's version converter, then edgeops'
    own 18 -> 17 rewrite). A normalised model that computes anything else is refused."""
    from .. import normalize

    original = copy.deepcopy(model)
    m = copy.deepcopy(model)
    notes: list[str] = []
    if normalize.initializers_out_of_inputs(m):
        notes.append("initializers removed from the graph inputs")
    moved = normalize.constants_to_initializers(m)
    if moved:
        notes.append(f"{moved} Constant nodes made initializers")
    try:
        import onnxslim

        before = len(m.graph.node)
        with torch_fmt.quiet():
            slim = onnxslim.slim(copy.deepcopy(m))
        if slim is not None and (not feeds or normalize.verify_same(m, slim, [feeds]) is None):
            if len(slim.graph.node) != before:
                notes.append(f"onnxslim {_version('onnxslim')}: {before} -> {len(slim.graph.node)} nodes "
                             "(constants folded, dead nodes removed)")
            m = slim
            normalize.constants_to_initializers(m)
    except ImportError:
        notes.append("onnxslim not installed: constants not folded")
    except Exception as exc:  # noqa: BLE001 - slimming is an improvement, never a requirement
        notes.append(f"onnxslim failed ({first_line(exc, 120)}); continued without it")
    dq = _fold_weight_dequantize(m)
    if dq:
        notes.append(f"{dq} DequantizeLinear of int8 weights folded into float initializers")
    clips = _dynamic_clips(m)
    if clips:
        notes.append(f"{clips} Clip with computed bounds as Min/Max")
    if _outputs_through_identity(m):
        notes.append("graph outputs of multi-output nodes given their own Identity")
    _tidy(m)
    have = _default_opset(m)
    ops = {n.op_type for n in _walk_nodes(m.graph) if n.domain in ("", "ai.onnx")}
    bridged = _bridge_type_only_versions(ops, have)
    if bridged:
        notes.append("converted with the converter of an earlier version whose inputs, outputs "
                     "and attributes are the same (the newer one only admits more types): " +
                     ", ".join(bridged))
    if _covered(ops, have):
        import onnx

        newest = onnx.defs.onnx_opset_version()
        for target in list(range(have - 1, 6, -1)) + list(range(have + 1, newest + 1)):
            if _covered(ops, target):
                continue
            moved_m, why = normalize.convert_opset(m, target, [feeds] if feeds else [])
            if moved_m is None and have == 18 and target == 17:
                moved_m, why = _downgrade(m, 17, feeds or {})
            if moved_m is not None:
                notes.append(f"opset {have} -> {target} (onnx2torch covers every op there; "
                             "same outputs under onnxruntime)")
                m = moved_m
                break
            notes.append(f"opset {target} tried: {why}")
    if feeds:
        why = normalize.verify_same(original, m, [feeds])
        if why and why.startswith(normalize.SOURCE_FAILS):
            notes.append(f"the normalisation is not verified: {why}")
        elif why:
            raise ConversionError(f"normalising the model for onnx2torch changed it: {why}")
    return m, notes


def onnx_to_module(model, feeds: dict[str, np.ndarray] | None = None,
                   notes: list[str] | None = None):
    """onnx2torch: an ONNX ModelProto -> a torch module (an fx GraphModule whose Conv/Linear/
    BatchNorm are real torch layers), after `prepare_for_onnx2torch` (checked on FEEDS when
    given; its notes are appended to NOTES), with unsupported ops refused by name."""
    require("torch", what="ONNX -> torch")
    from ..formats import onnx as onnx_fmt

    onnx2torch = _import_onnx2torch()
    model, steps = prepare_for_onnx2torch(model, feeds)
    if notes is not None:
        notes.extend(steps)
    _precheck(model, onnx2torch)
    ins = [s.name for s in onnx_fmt.signature_of(model).inputs]
    keep_names = all(n.isidentifier() for n in ins)
    try:
        with torch_fmt.quiet():
            return onnx2torch.convert(model, save_input_names=keep_names).eval()
    except NotImplementedError as exc:
        m = re.search(r"operation_type='([^']+)', version=(\d+)", str(exc))
        what = f"{m.group(1)} (opset {m.group(2)})" if m else first_line(exc)
        raise ConversionError(f"onnx2torch cannot convert {what}", hint=_NO_CONVERTER_HINT) from exc
    except EdgeopsError:
        raise
    except KeyError as exc:
        name = exc.args[0] if exc.args else "?"
        raise ConversionError(f"onnx2torch needs {name!r} as a constant (an initializer), but the "
                              "model computes it or takes it as an input",
                              hint="keep the model in ONNX (onnxruntime runs it)") from exc
    except Exception as exc:
        raise ConversionError(f"onnx2torch failed: {first_line(exc)}") from exc


def onnx_to_torchscript(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    torch = require("torch", what="ONNX -> TorchScript")
    from ..formats import onnx as onnx_fmt
    from . import shapes as S

    model = onnx_fmt.load(Path(src))
    onnx_sig = onnx_fmt.signature_of(model)
    ins = [s.name for s in onnx_sig.inputs]
    args = _example_args(ctx, ins, torch)
    named = {n: a.numpy() for n, a in zip(ins, args)}
    notes: list[str] = []
    net = onnx_to_module(model, named, notes)
    try:
        with torch.no_grad(), torch_fmt.quiet():
            traced = torch.jit.trace(net, args, check_trace=False)
    except EdgeopsError:
        raise
    except Exception as exc:
        raise ConversionError(f"torch.jit.trace of the onnx2torch module failed: "
                              f"{first_line(exc)}") from exc

    # The ONNX names and dims travel inside the file. A dim stays dynamic only where the
    # traced module gives the ONNX model's answers at another size (batch 1 when traced at 2,
    # a larger height/width/length); a dim that does not generalise is fixed at the traced
    # size and the report says so.
    fixed: dict[str, set[int]] = {}
    alts = S.alternatives(onnx_sig, named)
    atols = [ctx.tolerances.get(s.name, (1e-4, 1e-3)) for s in onnx_sig.outputs] \
        if ctx.tolerances else None          # quantized source: against its literal arithmetic
    verdicts = _agrees_at(traced, Path(src), [S.reshape_feeds(named, a) for _, a in alts],
                          ins, torch, ctx.workdir, atols)
    checked = []
    for (label, alt), verdict in zip(alts, verdicts):
        checked.append({"shapes": {k: list(v) for k, v in alt.items()}, "result": verdict,
                        "what": label})
        if verdict not in ("same outputs", "source fails"):
            for k, shp in alt.items():
                for ax, (a, b) in enumerate(zip(shp, named[k].shape)):
                    if a != b:
                        fixed.setdefault(k, set()).add(ax)
    in_specs = tuple(
        TensorSpec(s.name, s.dtype, tuple(
            int(named[s.name].shape[i]) if (isinstance(d, int) or i in fixed.get(s.name, ())) else d
            for i, d in enumerate(s.shape)) if s.shape is not None else tuple(named[s.name].shape))
        for s in onnx_sig.inputs)
    out_specs = tuple(TensorSpec(s.name, s.dtype, s.shape if not fixed or (
        s.shape is not None and all(isinstance(d, int) for d in s.shape)) else None)
        for s in onnx_sig.outputs)
    stored = Signature(in_specs, out_specs).to_dict()
    torch_fmt.save(traced, Path(dst), "torchscript",
                   extra={torch_fmt.SIGNATURE_EXTRA: json.dumps(stored).encode()})
    info = {"tool": f"torch {torch.__version__} / onnx2torch {_version('onnx2torch')} "
                    "(+ torch.jit.trace)",
            "opset": _default_opset(model),
            "traced_shapes": {k: list(v.shape) for k, v in named.items()},
            "shapes_checked_by_converter": checked}
    if notes:
        info["normalised"] = notes
    if fixed:
        info["note"] = ("fixed at the traced shape (the trace gives other answers elsewhere): " +
                        ", ".join(f"{k} axis {sorted(v)}" for k, v in fixed.items()))
    return info


_AGREE = """
import json, sys
import numpy as np, torch
mod = torch.jit.load(sys.argv[1], map_location="cpu")
names = json.loads(sys.argv[2])
tols = json.loads(sys.argv[3])
for path in sys.argv[4:]:
    with np.load(path, allow_pickle=False) as z:
        feeds = {k: z[k] for k in z.files}
    ref = [feeds.pop(f"__ref{i}") for i in range(len([k for k in feeds if k.startswith("__ref")]))]
    try:
        with torch.no_grad():
            out = mod(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names])
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        mine = [o.numpy() for o in outs if isinstance(o, torch.Tensor)]
        same = len(mine) == len(ref) and all(
            a.shape == b.shape and (np.allclose(a, b, atol=t[0], rtol=t[1], equal_nan=True)
                                    if a.dtype.kind in "fc" else
                                    bool(np.all(np.abs(a.astype(np.int64) - b.astype(np.int64)) <= max(t[0], 0))))
            for a, b, t in zip(mine, ref, tols))
        print(json.dumps("same outputs" if same else "different outputs"), flush=True)
    except Exception as exc:
        print(json.dumps("fails: " + " ".join(str(exc).split())[:160]), flush=True)
"""


def _agrees_at(module, onnx_path: Path, feeds_list: list[dict[str, np.ndarray]],
               names: list[str], torch, workdir: Path,
               tolerances: list[tuple[float, float]] | None = None) -> list[str]:
    """For each feed dict: 'same outputs', 'source fails', or what went wrong running MODULE
    against the ONNX model (onnxruntime). The module runs in a child process: a traced graph
    run at a shape it did not record can corrupt memory (an LSTM whose initial state was
    traced at batch 1 and is run at batch 3 aborts torch) instead of raising."""
    import json
    import subprocess
    import sys

    out: list[str | None] = [None] * len(feeds_list)
    files: list[tuple[int, Path]] = []
    mpath = workdir / "agree.pt"
    module.save(str(mpath))
    for i, feeds in enumerate(feeds_list):
        try:
            ref = _ort_outputs(onnx_path, feeds, literal=tolerances is not None)
        except Exception:  # noqa: BLE001 - the source itself refuses these shapes
            out[i] = "source fails"
            continue
        f = workdir / f"agree{i}.npz"
        np.savez(f, **feeds, **{f"__ref{k}": r for k, r in enumerate(ref)})
        files.append((i, f))
    while files:
        tols = tolerances or [(1e-4, 1e-3)] * 64
        r = subprocess.run([sys.executable, "-c", _AGREE, str(mpath), json.dumps(names),
                            json.dumps([list(t) for t in tols]), *[str(f) for _, f in files]],
                           capture_output=True, text=True, timeout=600)
        got = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
        for (i, _), verdict in zip(files, got):
            out[i] = verdict
        if len(got) < len(files):            # the child died on the next one
            i, _ = files[len(got)]
            out[i] = f"crashes torch (exit {r.returncode})"
            files = files[len(got) + 1:]
        else:
            files = []
    return [v or "not run" for v in out]
