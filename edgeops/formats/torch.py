"""PyTorch: TorchScript archives and torch.export programs (.pt2); state dicts and
pickled nn.Modules are recognised and refused (the model's code is needed).

Detection reads the zip listing and, for plain torch.save archives, walks data.pkl's
opcodes without unpickling it. torch is imported only to load or run a model.

Shapes: TorchScript keeps no input shapes, except a traced module, which saves its
example inputs (traced_inputs.pkl); those are read without unpickling anything foreign
(tensor shapes only). Otherwise `--shape` is needed. A .pt2 carries shapes and dtypes
in its graph. Outputs are named output_0, output_1, ... in flattening order.

Not covered: TorchScript modules whose forward takes non-tensor arguments, and
pickled whole modules (torch.save(model)): loading those runs the user's code.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import zipfile
from pathlib import Path

import numpy as np

from ..errors import FormatError
from ..extras import require
from .base import FormatInfo, LoadOptions, Probe, Signature, TensorSpec

_SAVE_ADVICE = ("save it with torch.jit.trace(model, example).save('model.pt') or "
                "torch.jit.script(model).save(...), or torch.export.save("
                "torch.export.export(model, args), 'model.pt2')")

FORMATS = (
    FormatInfo("torchscript", "torch", "TorchScript archive", "torch",
               suffixes=(".pt", ".pth", ".torchscript")),
    FormatInfo("torch-export", "torch", "torch.export program (.pt2)", "torch", suffixes=(".pt2",)),
    FormatInfo("torch-state-dict", "torch", "PyTorch state dict", "torch",
               refused="weights only, the model's code is needed: " + _SAVE_ADVICE),
    FormatInfo("torch-pickled-module", "torch", "pickled PyTorch nn.Module (torch.save(model))",
               "torch", refused="loading it needs (and runs) the model's Python code: " + _SAVE_ADVICE),
)

# torch.save's legacy (non-zip) format starts with a pickled magic number
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_DATA_GLOBALS = ("torch._utils", "collections", "builtins", "_codecs", "torch._tensor",
                 "numpy", "torch.serialization")


def _root_entries(names: list[str]) -> tuple[str, set[str]]:
    root = names[0].split("/", 1)[0] if names else ""
    return root, {n.split("/", 1)[1] for n in names if "/" in n}


def _pickle_globals(data: bytes) -> list[tuple[str, str]]:
    from ..safety import scan_pickle

    return scan_pickle(data).globals


def _state_dict_or_module(globs: list[tuple[str, str]]) -> str:
    for mod, name in globs:
        if mod == "torch" and name.endswith("Storage"):
            continue
        if mod.startswith("torch.nn") or not (mod == "torch" or mod.startswith(_DATA_GLOBALS)):
            return "torch-pickled-module"
    return "torch-state-dict"


def detect(probe: Probe) -> str | None:
    if probe.is_dir:
        return None
    if probe.head.startswith(_LEGACY_MAGIC):
        data = probe.path.read_bytes()
        try:  # the second and third pickles: protocol version, then the object
            buf = io.BytesIO(data)
            for _ in range(2):
                for _op in pickletools.genops(buf):
                    pass
            rest = data[buf.tell():]
            return _state_dict_or_module(_pickle_globals(rest))
        except Exception:
            return "torch-state-dict"
    if not probe.is_zip:
        return None
    names = probe.zip_names
    if not names:
        return None
    root, entries = _root_entries(names)
    if "archive_format" in entries:
        try:
            if probe.zip_read(f"{root}/archive_format", 64).strip() == b"pt2":
                return "torch-export"
        except (KeyError, zipfile.BadZipFile):
            pass
    if "data.pkl" in entries and any(e.startswith("code/") for e in entries) and "constants.pkl" in entries:
        return "torchscript"
    if "data.pkl" in entries and ("byteorder" in entries or any(e.startswith("data/") for e in entries)):
        try:
            return _state_dict_or_module(_pickle_globals(probe.zip_read(f"{root}/data.pkl", 64 << 20)))
        except Exception:
            return "torch-state-dict"
    return None


# ----------------------------------------------------------------------------- load

def load(path: Path, fmt: str, opts: LoadOptions | None = None):
    torch = require("torch")
    try:
        if fmt == "torch-export":
            return torch.export.load(str(path))
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        what = "torch.export archive" if fmt == "torch-export" else "TorchScript archive"
        raise FormatError(f"{path}: cannot load the {what} (truncated or corrupt?): "
                          f"{_first_line(exc)}") from exc


def save(obj, path: Path, fmt: str) -> None:
    torch = require("torch")
    if fmt == "torch-export":
        torch.export.save(obj, str(path))
    else:
        torch.jit.save(obj, str(path))


def _dtype_name(torch_dtype) -> str:
    return str(torch_dtype).replace("torch.", "")


def _traced_input_shapes(path: Path) -> list[tuple[tuple[int, ...], str]] | None:
    """Shapes/dtypes of the example inputs a traced module saved (traced_inputs.pkl).

    The pickle is read with an unpickler that knows only how to describe a tensor (no
    storage is loaded and no other global is resolved)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            root, entries = _root_entries(names)
            if "traced_inputs.pkl" not in entries:
                return None
            data = z.read(f"{root}/traced_inputs.pkl")
    except (zipfile.BadZipFile, OSError, KeyError):
        return None

    class _Describe(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return lambda storage, offset, size, *a: (tuple(size), storage)
            if module == "torch" and name.endswith("Storage"):
                return name[:-len("Storage")].lower()
            if (module, name) == ("collections", "OrderedDict"):
                return dict
            if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
                return lambda value, _tag: value
            raise pickle.UnpicklingError(f"{module}.{name}")

        def persistent_load(self, pid):
            # ('storage', storage_type, key, location, numel): keep only the type
            return pid[1] if isinstance(pid, tuple) and len(pid) > 1 else None

    try:
        obj = _Describe(io.BytesIO(data)).load()
    except Exception:
        return None
    inputs = obj.get("forward") if isinstance(obj, dict) else None
    if not isinstance(inputs, (tuple, list)):
        return None
    out = []
    for t in inputs:
        if not (isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], tuple)):
            return None
        storage = t[1]
        dtype = {"float": "float32", "double": "float64", "half": "float16", "long": "int64",
                 "int": "int32", "bool": "bool", "byte": "uint8", "char": "int8"}.get(
                     storage if isinstance(storage, str) else "float", "float32")
        out.append((t[0], dtype))
    return out


def _torchscript_signature(path: Path, module, opts: LoadOptions) -> Signature:
    schema = module.forward.schema
    args = [a for a in schema.arguments if a.name != "self"]
    for a in args:
        if "Tensor" not in str(a.type):
            raise FormatError(f"{path}: forward() takes {a.name}: {a.type}; edgeops runs "
                              "TorchScript modules whose inputs are tensors")
    names = [a.name for a in args]
    traced = _traced_input_shapes(path) if not opts.shapes else None
    specs = []
    for i, name in enumerate(names):
        shape = opts.shapes.get(name) or (opts.shapes.get("*") if len(names) == 1 else None)
        dtype = "float32"
        if shape is None and traced and i < len(traced):
            shape, dtype = traced[i]
        if shape is None:
            raise FormatError(f"{path}: TorchScript carries no input shape for {name!r}",
                              hint=f"pass --shape {name}=1,3,224,224 (one per input)")
        specs.append(TensorSpec(name, dtype, tuple(shape)))
    returns = schema.returns
    n_out = 1
    if len(returns) == 1:
        rtype = str(returns[0].type)
        if rtype.startswith("Tuple[") or rtype.startswith("("):
            n_out = len(returns[0].type.elements())
        elif rtype != "Tensor":
            n_out = -1
    if n_out < 0:  # list/dict outputs: count them by running once
        torch = require("torch")
        from ..verify import make_inputs

        feeds = make_inputs(Signature(tuple(specs), ()))
        with torch.no_grad():
            n_out = len(_flatten(module(*[torch.from_numpy(feeds[s.name]) for s in specs])))
    outs = tuple(TensorSpec(f"output_{i}", "float32", None) for i in range(n_out))
    return Signature(tuple(specs), outs)


def _export_signature(ep) -> Signature:
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    specs = []
    for name in ep.graph_signature.user_inputs:
        val = placeholders[name].meta.get("val")
        shape = tuple(d if isinstance(d, int) else str(d) for d in val.shape) if val is not None else None
        specs.append(TensorSpec(name, _dtype_name(val.dtype) if val is not None else "float32", shape))
    outs = []
    for i, spec in enumerate(ep.graph_signature.output_specs):
        if str(spec.kind).endswith("USER_OUTPUT"):
            outs.append(TensorSpec(f"output_{len(outs)}", "float32", None))
    return Signature(tuple(specs), tuple(outs))


def signature(path: Path, fmt: str, opts: LoadOptions | None = None) -> Signature:
    return runner(path, fmt, opts).signature


def _flatten(out) -> list:
    torch = require("torch")
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in out for t in _flatten(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    raise FormatError(f"the model returned a {type(out).__name__}; edgeops compares tensors")


class TorchRunner:
    def __init__(self, path: Path, fmt: str, opts: LoadOptions):
        self.torch = require("torch")
        obj = load(path, fmt, opts)
        if fmt == "torch-export":
            self.signature = _export_signature(obj)
            self.module = obj.module()
        else:
            self.module = obj.eval()
            self.signature = _torchscript_signature(path, obj, opts)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        args = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in self.signature.inputs]
        with torch.no_grad():
            outs = _flatten(self.module(*args))
        return {f"output_{i}": t.detach().cpu().numpy() for i, t in enumerate(outs)}


def runner(path: Path, fmt: str, opts: LoadOptions | None = None) -> TorchRunner:
    return TorchRunner(Path(path), fmt, opts or LoadOptions())


def inspect(path: Path, fmt: str, opts: LoadOptions | None = None) -> dict:
    obj = load(path, fmt, opts)
    if fmt == "torch-export":
        tensors = list(obj.state_dict.values()) + [t for t in obj.constants.values()
                                                   if hasattr(t, "is_floating_point")]
        nodes = sum(1 for n in obj.graph.nodes if n.op == "call_function")
        info = {"nodes": nodes}
    else:
        tensors = list(obj.parameters()) + list(obj.buffers())
        info = {"modules": sum(1 for _ in obj.modules())}
    info["params"] = int(sum(t.numel() for t in tensors if t.is_floating_point()))
    return info


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
