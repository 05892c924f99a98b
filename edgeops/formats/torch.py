"""PyTorch: TorchScript archives and torch.export `.pt2` programs; state dicts and pickled
modules are recognised only to be refused.

Covers: content detection of every file `torch.save`, `torch.jit.save` and
`torch.export.save` write (zip archives and the legacy non-zip pickle stream), loading,
signatures, a CPU runner and inspection of the two executable formats.

Does not cover: eager `nn.Module` objects saved with `torch.save(model)` (unpickling them
needs the user's class and runs arbitrary code), bare state dicts (weights without the
model's code), AOTInductor packages (compiled `.pt2` without an ExportedProgram), and
TorchScript methods other than `forward`.

Detection never imports torch: it reads the zip listing and walks pickles with
edgeops.safety's opcode scanner (nothing is unpickled). A cut-off archive has no zip
directory, so its local headers are read to say "truncated TorchScript archive".

Signatures. TorchScript keeps no shapes, except that a traced module saves its example
inputs (traced_inputs.pkl), read here with an unpickler that only describes tensors;
otherwise --shape is needed. A file written by edgeops' ONNX -> TorchScript converter
carries its ONNX names and dynamic dims in an extra file (SIGNATURE_EXTRA). A .pt2
carries shapes, dtypes and symbolic dims in its graph. Outputs are named output_0,
output_1 ... in flattening order, or by key for a top-level dict; the converters use the
same names, so verification matches outputs by name.

Safety: torch.jit.load runs only TorchScript, but torch.export.load unpickles some
payloads with weights_only=False, so a .pt2's embedded pickles pass the allow-list
first (or --trust-pickle).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import mmap
import os
import pickle
import pickletools
import re
import struct
import sys
import tempfile
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import EdgeopsError, FormatError, UnsafePickleError, first_line
from .base import FormatInfo, LoadOptions, Probe, Signature, TensorSpec

_NEED_CODE = ("weights only, the model's code is needed: export it with "
              "torch.jit.script/trace(model).save(...) or "
              "torch.export.save(torch.export.export(model, args), 'model.pt2')")

FORMATS = (
    FormatInfo("torchscript", "torch", "TorchScript archive", "torch",
               suffixes=(".pt", ".pth", ".torchscript")),
    FormatInfo("torch-export", "torch", "torch.export program (.pt2)", "torch",
               suffixes=(".pt2",)),
    FormatInfo("torch-state-dict", "torch", "PyTorch state dict (torch.save of tensors)", "torch",
               refused=_NEED_CODE),
    FormatInfo("torch-pickled-module", "torch",
               "pickled PyTorch module (torch.save(model))", "torch",
               refused="the pickle references the model's Python class, so the model's code "
                       "is needed too (and unpickling it would run that code): export it with "
                       "torch.jit.script/trace(model).save(...) or "
                       "torch.export.save(torch.export.export(model, args), 'model.pt2')"),
)

# A file written by edgeops' own converters carries its signature (names, dynamic dims)
# here, because a TorchScript schema knows neither output names nor shapes.
SIGNATURE_EXTRA = "edgeops_signature.json"

# torch's legacy (non-zip) serialization starts with this number pickled as a LONG1.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# ----------------------------------------------------------------------------- detection

# Globals a plain tensor container (state dict, checkpoint dict) may reference. Anything
# else -- torch.nn.modules.*, __main__.Net, a user's package -- means a pickled object
# whose class must be imported (and whose code runs) to load it.
_DATA_GLOBALS = {
    ("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"),
    ("torch.serialization", "_get_layout"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"), ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"), ("torch", "UntypedStorage"),
    ("_codecs", "encode"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
}
_DATA_BUILTINS = {"set", "frozenset", "dict", "list", "tuple", "int", "float", "complex",
                  "bool", "str", "bytes", "bytearray", "slice"}


def _is_data_global(module: str, name: str) -> bool:
    if (module, name) in _DATA_GLOBALS:
        return True
    if module in ("builtins", "__builtin__"):
        return name in _DATA_BUILTINS
    if module == "torch._utils" and name.startswith("_rebuild_"):
        return True
    if module == "torch" and (name.endswith("Storage") or name in _TORCH_DTYPES):
        return True
    return False


_TORCH_DTYPES = {"float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64",
                 "uint8", "bool", "complex64", "complex128", "float", "double", "half", "long",
                 "int", "short", "cfloat", "cdouble", "float8_e4m3fn", "float8_e5m2"}


def _pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """(module, name) of every global the pickle(s) reference; nothing is unpickled."""
    from ..safety import scan_pickle  # the one opcode scanner (edgeops.safety)

    return scan_pickle(bytes(data)).globals


def _classify_pickle(globs: list[tuple[str, str]]) -> str:
    if all(_is_data_global(m, n) for m, n in globs):
        return "torch-state-dict"
    return "torch-pickled-module"


def _zip_root(names: list[str]) -> str | None:
    roots = {n.split("/", 1)[0] for n in names if "/" in n}
    return roots.pop() if len(roots) == 1 else None


def detect(probe: Probe) -> str | None:
    if probe.is_dir or not probe.head:
        return None
    if probe.is_zip:
        names = probe.zip_names
        if not names:
            _raise_if_truncated_torch_zip(probe)
            return None
        root = _zip_root(names)
        first = _first_entry(probe.head)
        if root is not None and first is not None and first.split("/", 1)[0] != root:
            # The listing belongs to a zip stored *inside* this one (a .pt2 keeps its
            # sample inputs as a torch.save zip): the outer directory was cut off.
            _raise_if_truncated_torch_zip(probe)
            return None
        if root is None:
            return None
        nameset = set(names)
        if f"{root}/data.pkl" in nameset and any(n.startswith(f"{root}/code/") for n in names):
            return "torchscript"
        if f"{root}/archive_format" in nameset:
            try:
                kind = probe.zip_read(f"{root}/archive_format", 64).strip()
            except (zipfile.BadZipFile, OSError, KeyError) as exc:
                raise FormatError(f"{probe.path}: truncated or corrupt torch .pt2 archive") from exc
            if kind == b"pt2" and any(re.fullmatch(re.escape(root) + r"/models/[^/]+\.json", n)
                                      for n in names):
                return "torch-export"
            return None
        if f"{root}/data.pkl" in nameset and (f"{root}/version" in nameset
                                              or f"{root}/byteorder" in nameset):
            try:
                data = probe.zip_read(f"{root}/data.pkl", 256 << 20)
                return _classify_pickle(_pickle_globals(data))
            except Exception:
                # a data.pkl pickletools cannot walk is still a torch.save archive: refuse it
                return "torch-state-dict"
        return None
    if probe.is_pickle and _is_legacy_torch(probe.head):
        return _classify_legacy(probe.path)
    return None


def _is_legacy_torch(head: bytes) -> bool:
    # PROTO 2, LONG1 with 10 bytes, the magic number little-endian
    return head[:4] == b"\x80\x02\x8a\x0a" and \
        int.from_bytes(head[4:14], "little", signed=True) == _LEGACY_MAGIC


def _classify_legacy(path: Path) -> str:
    # Stream: magic, protocol version, sys info, then the object itself, the storage keys,
    # and raw tensor bytes (where the scan stops).
    try:
        with open(path, "rb") as f:
            for _ in range(3):
                for op, _arg, _pos in pickletools.genops(f):
                    if op.name == "STOP":
                        break
            return _classify_pickle(_pickle_globals(f.read(64 << 20)))
    except Exception:
        return "torch-state-dict"


_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


def _first_entry(head: bytes) -> str | None:
    """Name of the zip entry whose local header starts the file."""
    if head[:4] != b"PK\x03\x04" or len(head) < _LOCAL_HEADER.size:
        return None
    nlen = _LOCAL_HEADER.unpack_from(head, 0)[9]
    try:
        return head[_LOCAL_HEADER.size:_LOCAL_HEADER.size + nlen].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _raise_if_truncated_torch_zip(probe: Probe) -> None:
    """A cut-off zip has no central directory; the local headers still name the entries."""
    names = []
    try:
        with open(probe.path, "rb") as fh, \
                mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos = 0
            while len(names) < 4096:
                pos = mm.find(b"PK\x03\x04", pos)
                if pos < 0 or pos + _LOCAL_HEADER.size > len(mm):
                    break
                nlen = _LOCAL_HEADER.unpack_from(mm, pos)[9]
                raw = mm[pos + _LOCAL_HEADER.size: pos + _LOCAL_HEADER.size + nlen]
                with contextlib.suppress(UnicodeDecodeError):
                    name = raw.decode("utf-8")
                    if name.isprintable() and "/" in name:
                        names.append(name)
                pos += 4
    except (OSError, ValueError):
        return
    if not names:
        return
    # tensor bytes may contain the header signature by chance: trust the usual root
    root = Counter(n.split("/", 1)[0] for n in names).most_common(1)[0][0]
    names = [n for n in names if n.startswith(root + "/")]
    what = None
    if any(n.startswith(f"{root}/code/") for n in names) or f"{root}/constants.pkl" in names:
        what = "TorchScript archive"
    elif any(n.startswith((f"{root}/models/", f"{root}/data/weights/", f"{root}/archive_format"))
             for n in names):
        what = "torch .pt2 archive"
    elif f"{root}/data.pkl" in names or any(re.fullmatch(re.escape(root) + r"/data/\d+", n)
                                            for n in names):
        what = "torch archive (TorchScript or torch.save)"
    if what:
        raise FormatError(f"{probe.path}: truncated or corrupt {what} "
                          f"({probe.size} bytes, the zip directory is missing)")


# ----------------------------------------------------------------------------- quiet

@contextlib.contextmanager
def quiet():
    """Silence what torch and onnxscript print while exporting or loading.

    The TorchScript ONNX exporter logs the whole IR graph from C++ on every failure and
    the dynamo exporter prints progress lines; a library must not print, so file
    descriptors 1 and 2 go to a temporary file for the duration (Python-level streams,
    warnings and logging are silenced too).
    """
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
    saved: list[int] = []
    tmp = tempfile.TemporaryFile()
    try:
        try:
            saved = [os.dup(1), os.dup(2)]
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
        except OSError:
            for fd in saved:
                os.close(fd)
            saved = []
        previous = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                yield
        finally:
            logging.disable(previous)
    finally:
        if saved:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        tmp.close()


# ----------------------------------------------------------------------------- load / save

def _torch():
    from ..extras import require

    return require("torch", "torch", "PyTorch models")



def _refuse(path: Path, fmt: str) -> None:
    from . import get_format

    info = get_format(fmt)
    if info.refused:
        raise FormatError(f"{path}: {info.description}: {info.refused}")


def _zip_listing(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def _read_extra(path: Path, name: str) -> bytes | None:
    names = _zip_listing(path)
    root = _zip_root(names)
    if root is None or f"{root}/extra/{name}" not in names:
        return None
    with zipfile.ZipFile(path) as z:
        return z.read(f"{root}/extra/{name}")


def load(path: Path, fmt: str = "torchscript", opts: LoadOptions | None = None):
    """The ScriptModule (on CPU) or the ExportedProgram."""
    path = Path(path)
    opts = opts or LoadOptions()
    _refuse(path, fmt)
    torch = _torch()
    if fmt == "torchscript":
        if not _zip_listing(path):
            raise FormatError(f"{path}: truncated or corrupt TorchScript archive")
        try:
            with quiet():
                m = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise FormatError(f"{path}: truncated or corrupt TorchScript archive: "
                              f"{first_line(exc)}") from exc
        return m.eval()
    if fmt == "torch-export":
        if not opts.trust_pickle:
            _check_pt2_pickles(path)
        try:
            with quiet():
                return torch.export.load(str(path))
        except Exception as exc:
            raise FormatError(f"{path}: cannot load torch.export program: {first_line(exc)}") from exc
    raise FormatError(f"{path}: not a torch format: {fmt}")


def _check_pt2_pickles(path: Path) -> None:
    """Refuse a .pt2 whose embedded pickles reach beyond tensor data.

    torch.export.load unpickles weights and constants marked use_pickle, and the sample
    inputs, with weights_only=False (see torch/export/pt2_archive/_package.py): a crafted
    .pt2 could run code. Plain exports store raw tensor bytes and a tensor-only pickle.
    """
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        root = _zip_root(names) or ""
        suspects = [n for n in names if "/sample_inputs/" in n or n.endswith(".pkl")]
        for cfg in (n for n in names if n.endswith(("weights_config.json", "constants_config.json"))):
            try:
                config = json.loads(z.read(cfg)).get("config", {})
            except ValueError as exc:
                raise FormatError(f"{path}: corrupt .pt2 archive ({cfg})") from exc
            folder = cfg.rsplit("/", 1)[0]
            for meta in config.values():
                if isinstance(meta, dict) and meta.get("use_pickle"):
                    suspects.append(f"{folder}/{meta.get('path_name')}")
        for name in suspects:
            if name not in names:
                continue
            data = z.read(name)
            bad = [g for g in _blob_globals(data) if not _is_data_global(*g)]
            if bad:
                shown = ", ".join(f"{m}.{n}" for m, n in bad[:3])
                raise UnsafePickleError(
                    f"{path}: the .pt2 archive holds a pickle ({name[len(root) + 1:]}) that "
                    f"references {shown}; it was not loaded",
                    hint="load it only if you trust its author (--trust-pickle)")


def _blob_globals(data: bytes) -> list[tuple[str, str]]:
    # a use_pickle payload is itself a torch.save zip; a .pkl entry is a bare pickle
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            out = []
            for n in inner.namelist():
                if n.endswith(".pkl"):
                    out += _pickle_globals(inner.read(n))
            return out
    if data[:1] == b"\x80":
        return _pickle_globals(data)
    return []


def save(obj, path: Path, fmt: str = "torchscript", extra: dict[str, bytes] | None = None) -> None:
    torch = _torch()
    path = Path(path)
    if fmt == "torchscript":
        if not isinstance(obj, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
            obj = torch.jit.script(obj)
        torch.jit.save(obj, str(path), _extra_files=extra or {})
    elif fmt == "torch-export":
        torch.export.save(obj, str(path))
    else:
        raise FormatError(f"cannot save torch format {fmt!r}")


# ----------------------------------------------------------------------------- signature

def np_dtype(torch_dtype) -> str:
    return str(torch_dtype).replace("torch.", "")


def _forward_args(m, path: Path) -> list:
    schema = m.forward.schema
    args = list(schema.arguments)[1:]  # skip self, whatever the author named it
    out = []
    for a in args:
        t = str(a.type)
        if "Tensor" in t and "[" not in t.replace("Optional[Tensor]", ""):
            if t.startswith("Optional") and a.has_default_value():
                continue
            out.append(a)
        elif a.has_default_value():
            continue
        else:
            raise FormatError(f"{path}: forward takes a non-tensor argument {a.name!r} ({t}); "
                              "edgeops feeds tensors only",
                              hint="wrap the model so that forward takes tensors only")
    return out


def _user_shape(opts: LoadOptions, name: str, n_inputs: int):
    if name in opts.shapes:
        return tuple(opts.shapes[name])
    if "*" in opts.shapes and n_inputs == 1:
        return tuple(opts.shapes["*"])
    return None


def _stored_signature(path: Path) -> Signature | None:
    raw = _read_extra(path, SIGNATURE_EXTRA)
    if not raw:
        return None
    try:
        return Signature.from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        return None


def _traced_inputs(path: Path) -> list[tuple[tuple[int, ...], str]] | None:
    """Shapes and dtypes of the example inputs a traced module saved (traced_inputs.pkl).

    Read with an unpickler that only knows how to describe a tensor: no storage is
    loaded and no other global is resolved. (torch.jit.load(_restore_shapes=True) would
    re-run the trace instead.)
    """
    names = _zip_listing(path)
    root = _zip_root(names)
    if root is None or f"{root}/traced_inputs.pkl" not in names:
        return None
    with zipfile.ZipFile(path) as z:
        data = z.read(f"{root}/traced_inputs.pkl")

    class _Describe(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return lambda storage, offset, size, *a: ("tensor", tuple(size), storage)
            if module == "torch" and name.endswith("Storage"):
                return name
            if (module, name) == ("collections", "OrderedDict"):
                return dict
            if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
                return lambda value, _tag: value
            raise pickle.UnpicklingError(f"{module}.{name} is not read here")

        def persistent_load(self, pid):
            # ('storage', storage_type, key, location, numel): keep the type only
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
        if not (isinstance(t, tuple) and len(t) == 3 and t[0] == "tensor"):
            return None  # nested or non-tensor example inputs: not described here
        kind = t[2] if isinstance(t[2], str) else "FloatStorage"
        out.append((t[1], _STORAGE_DTYPES.get(kind, "float32")))
    return out


_STORAGE_DTYPES = {"FloatStorage": "float32", "DoubleStorage": "float64",
                   "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
                   "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
                   "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}


def _torchscript_signature(path: Path, opts: LoadOptions, m=None) -> Signature:
    stored = _stored_signature(path)
    if stored is not None:
        ins = tuple(TensorSpec(s.name, s.dtype, _user_shape(opts, s.name, len(stored.inputs))
                               or s.shape) for s in stored.inputs)
        return Signature(ins, stored.outputs)
    m = m if m is not None else load(path, "torchscript", opts)
    args = _forward_args(m, path)
    traced = _traced_inputs(path)
    if traced is not None and len(traced) != len(args):
        traced = None
    names = list(opts.input_names) if opts.input_names and len(opts.input_names) == len(args) \
        else [a.name for a in args]
    specs = []
    for i, (a, name) in enumerate(zip(args, names)):
        shape, dtype = traced[i] if traced else (None, "float32")
        shape = _user_shape(opts, name, len(args)) or _user_shape(opts, a.name, len(args)) or shape
        if shape is None:
            raise FormatError(f"{path}: TorchScript has no input shapes: pass --shape "
                              f"{name}=1,3,224,224",
                              hint="one --shape per input; a traced module (torch.jit.trace) "
                                   "records its example inputs' shapes")
        specs.append(TensorSpec(name, dtype, tuple(shape)))
    outputs = _probe_outputs(m, specs)
    if outputs is None:
        n = _schema_output_count(m)
        outputs = tuple(TensorSpec(f"output_{i}", "float32", None) for i in range(n))
    return Signature(tuple(specs), outputs)


def _schema_output_count(m) -> int:
    rets = m.forward.schema.returns
    if len(rets) == 1:
        t = str(rets[0].type)
        if t.startswith("Tuple[") and t.count("Tensor") == t.count(",") + 1:
            return t.count("Tensor")
    return max(len(rets), 1)


def _probe_outputs(m, specs) -> tuple[TensorSpec, ...] | None:
    """Output names, dtypes and shapes from one forward pass on zeros (shapes are known)."""
    torch = _torch()
    try:
        args = [torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in specs]
        with torch.no_grad(), quiet():
            out = m(*args)
        flat = flatten_outputs(out)
    except Exception:
        return None
    return tuple(TensorSpec(k, np_dtype(v.dtype), tuple(v.shape)) for k, v in flat)


def flatten_outputs(out, names: list[str] | None = None) -> list[tuple[str, object]]:
    """Tensor / tuple / list / dict of tensors -> [(name, tensor)] in ONNX export order.

    Names are output_0, output_1 ... except a top-level dict of tensors, whose keys are
    used; `names`, when given, overrides them position by position.
    """
    torch = _torch()
    leaves: list[tuple[str | None, object]] = []

    def walk(x, key=None):
        if isinstance(x, torch.Tensor):
            leaves.append((key, x))
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, str(k) if out is x else None)
        elif isinstance(x, (tuple, list)):
            for v in x:
                walk(v)
        elif x is None:
            return
        else:
            leaves.append((None, torch.as_tensor(x)))

    walk(out)
    result = []
    for i, (k, v) in enumerate(leaves):
        if names and i < len(names):
            k = names[i]
        result.append((k or f"output_{i}", v))
    return result


def _export_specs(ep, path: Path, opts: LoadOptions) -> Signature:
    from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

    nodes = {n.name: n for n in ep.graph.nodes}
    ins, outs = [], []
    user_inputs = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    for spec in user_inputs:
        if not isinstance(spec.arg, TensorArgument):
            raise FormatError(f"{path}: the exported program takes a non-tensor input "
                              f"{spec.arg!r}; edgeops feeds tensors only")
        ins.append(_fake_spec(spec.arg.name, nodes[spec.arg.name].meta.get("val"), opts,
                              len(user_inputs)))
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    vals = []
    for spec, node in zip(ep.graph_signature.output_specs, out_node.args[0]):
        if spec.kind == OutputKind.USER_OUTPUT:
            vals.append(node.meta.get("val") if hasattr(node, "meta") else None)
    names = _output_names(ep, len(vals))
    outs = [_fake_spec(n, v, LoadOptions(), 0) for n, v in zip(names, vals)]
    return Signature(tuple(ins), tuple(outs))


def _output_names(ep, n: int) -> list[str]:
    """Same names flatten_outputs gives at run time: a top-level dict's keys, else output_i."""
    spec = ep.call_spec.out_spec if ep.call_spec else None
    try:
        if spec is not None and spec.type is dict and len(spec.context) == n \
                and all(c.num_leaves == 1 and c.num_children == 0 for c in spec.children()):
            return [str(k) for k in spec.context]
    except Exception:
        pass
    return [f"output_{i}" for i in range(n)]


def _fake_spec(name: str, val, opts: LoadOptions, n_inputs: int) -> TensorSpec:
    user = _user_shape(opts, name, n_inputs) if n_inputs else None
    if val is None or not hasattr(val, "shape"):
        return TensorSpec(name, "float32", user)
    dims = []
    for d in val.shape:
        # a SymInt is a dynamic dim: keep its symbol's name (int() would specialise it)
        dims.append(int(d) if isinstance(d, int) else str(d))
    return TensorSpec(name, np_dtype(val.dtype), user or tuple(dims))


def signature(path: Path, fmt: str = "torchscript", opts: LoadOptions | None = None) -> Signature:
    path = Path(path)
    opts = opts or LoadOptions()
    _refuse(path, fmt)
    if fmt == "torchscript":
        return _torchscript_signature(path, opts)
    return _export_specs(load(path, fmt, opts), path, opts)


# ----------------------------------------------------------------------------- runner

class TorchRunner:
    """forward() under no_grad on CPU; outputs flattened to named numpy arrays."""

    def __init__(self, path: Path, fmt: str, opts: LoadOptions):
        self.torch = _torch()
        self.fmt = fmt
        obj = load(path, fmt, opts)
        if fmt == "torchscript":
            self.module = obj
            self.signature = _torchscript_signature(path, opts, obj)
        else:
            self.signature = _export_specs(obj, path, opts)
            with quiet():
                self.module = obj.module()
        self._in_names = [s.name for s in self.signature.inputs]
        self._out_names = [s.name for s in self.signature.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        if all(n in feeds for n in self._in_names):
            arrays = [feeds[n] for n in self._in_names]
        elif len(feeds) == len(self._in_names):
            arrays = list(feeds.values())
        else:
            raise FormatError(f"inputs {sorted(feeds)} do not match the model's inputs "
                              f"{self._in_names}")
        args = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        try:
            with torch.no_grad():
                out = self.module(*args)
        except Exception as exc:
            shapes = ", ".join(f"{n}{list(a.shape)}" for n, a in zip(self._in_names, arrays))
            raise EdgeopsError(f"the torch model failed to run on {shapes}: "
                               f"{first_line(exc)}") from exc
        flat = flatten_outputs(out, self._out_names)
        return {k: v.detach().cpu().numpy() for k, v in flat}


def runner(path: Path, fmt: str = "torchscript", opts: LoadOptions | None = None):
    return TorchRunner(Path(path), fmt, opts or LoadOptions())


# ----------------------------------------------------------------------------- inspect

def _float_numel(tensors) -> int:
    return int(sum(t.numel() for t in tensors if hasattr(t, "is_floating_point")
                   and t.is_floating_point()))


def inspect(path: Path, fmt: str = "torchscript", opts: LoadOptions | None = None) -> dict:
    """Weights (floating-point parameters, buffers, constants), modules and ops.

    The signature is left to `signature()` (inspect_model asks for it separately, and a
    scripted module without --shape has none)."""
    path = Path(path)
    opts = opts or LoadOptions()
    torch = _torch()
    obj = load(path, fmt, opts)
    ops: dict[str, int] = {}
    if fmt == "torchscript":
        breakdown = {"parameters": _float_numel(obj.parameters()),
                     "buffers": _float_numel(obj.buffers())}
        skip = {"prim::Constant", "prim::GetAttr", "prim::ListConstruct", "prim::ListUnpack",
                "prim::TupleConstruct", "prim::TupleUnpack", "prim::NumToTensor"}
        try:
            graph = obj.inlined_graph  # submodule calls inlined: the ops that really run
        except Exception:
            graph = obj.graph
        for n in graph.nodes():
            if n.kind() not in skip:
                ops[n.kind()] = ops.get(n.kind(), 0) + 1
        names = _zip_listing(path)
        root = _zip_root(names)
        facts = {"modules": len(list(obj.modules())),
                 "traced": bool(root and f"{root}/traced_inputs.pkl" in names)}
    else:
        breakdown = {"state_dict": _float_numel(obj.state_dict.values()),
                     "constants": _float_numel(v for v in obj.constants.values()
                                               if isinstance(v, torch.Tensor))}
        for n in obj.graph.nodes:
            if n.op == "call_function":
                key = str(n.target)
                ops[key] = ops.get(key, 0) + 1
        sig = _export_specs(obj, path, LoadOptions())
        facts = {"dynamic_dims": sorted({d for s in sig.inputs for d in (s.shape or ())
                                          if isinstance(d, str)})}
    return {
        "params": sum(breakdown.values()),
        "params_breakdown": breakdown,
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "torch_version": torch.__version__,
        **facts,
    }
