"""The one unsafe-load gate for pickles (scikit-learn pickles and joblib files).

A pickle runs code when it is loaded: any global it names can be called with any
arguments. edgeops therefore
  1. scans the opcodes first, without unpickling (`scan_pickle`), and refuses any global
     outside the allow-list -- before a single object is built; and
  2. loads with a restricted unpickler (`safe_load`) whose `find_class` enforces the same
     allow-list, so whatever the static scan could not reach (joblib writes raw array
     bytes between opcodes, which stops a static walk) is still checked before it can run.
A refused global is never resolved, let alone called.

The allow-list: scikit-learn classes (and numpy ufuncs they hold, e.g. a
FunctionTransformer(np.log1p)), numpy's array/dtype/scalar reconstructors and random
generator state, scipy.sparse matrices, joblib's array wrappers, and a few builtins that
only build data. Everything else -- os.system, subprocess, builtins.eval/exec/getattr/
__import__, functools.partial, any user module -- is refused unless the user says
--trust-pickle. scikit-learn *functions* are not allowed (a fitted estimator pickles
its classes, not calls), with the few data-building exceptions listed below.

Not covered: torch archives (edgeops.formats.torch checks those itself: torch's own
loader has a weights_only mode) and Keras Lambda layers (edgeops.formats.keras).
"""

from __future__ import annotations

import bz2
import gzip
import importlib
import io
import lzma
import pickle
import pickletools
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FormatError, UnsafePickleError

# exact (module, name) pairs that only rebuild data
_SAFE_BUILTINS = {"set", "frozenset", "slice", "complex", "bytearray", "bytes", "dict", "list",
                  "tuple", "object", "int", "float", "str", "bool", "range"}
ALLOWED_EXACT: set[tuple[str, str]] = {
    *{("builtins", n) for n in _SAFE_BUILTINS},
    *{("__builtin__", n) for n in _SAFE_BUILTINS},   # protocol 0/2 pickles from Python 2
    ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("copyreg", "_reconstructor"),           # rebuilds objects of an (allow-listed) class
    ("copy_reg", "_reconstructor"),
    ("_codecs", "encode"),                   # how protocol 2 stores bytes
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy.random._pickle", "__bit_generator_ctor"),
    ("numpy.random._pickle", "__randomstate_ctor"),
    ("numpy.random._pickle", "__generator_ctor"),
    ("joblib.numpy_pickle", "NumpyArrayWrapper"),
    ("joblib.numpy_pickle_compat", "NDArrayWrapper"),
    ("joblib.numpy_pickle_compat", "ZNDArrayWrapper"),
    ("datetime", "datetime"), ("datetime", "date"), ("datetime", "timedelta"),
}
# modules whose *classes* (and numpy ufuncs) may be named; resolved by importing the
# installed module, never anything from the pickle
CLASS_MODULE_PREFIXES = ("sklearn.", "scipy.sparse.", "numpy.dtypes", "numpy.random.")
UFUNC_MODULES = ("numpy", "numpy.core.umath", "numpy._core.umath", "scipy.special")
# names that resolve to classes but must never be built from a pickle
DENY_EXACT = {("numpy", "memmap"), ("numpy", "DataSource"), ("numpy.lib.npyio", "DataSource")}

TORCH_GLOBAL_PREFIXES = ("torch.", "torch")

MAX_SHOWN = 4


@dataclass
class ScanResult:
    globals: list[tuple[str, str]] = field(default_factory=list)   # in order of appearance
    complete: bool = True        # False when the static walk stopped early (joblib raw data)
    error: str = ""

    @property
    def modules(self) -> set[str]:
        return {m for m, _ in self.globals}

    def references(self, prefix: str) -> bool:
        return any(m == prefix or m.startswith(prefix + ".") for m, _ in self.globals)


# ----------------------------------------------------------------------------- reading

_MAGICS = (
    (b"\x1f\x8b", gzip.decompress),
    (b"BZh", bz2.decompress),
    (b"\xfd7zXZ", lzma.decompress),
    (b"]\x00\x00", lzma.decompress),
)


def decompressed(data: bytes) -> bytes:
    """joblib's compressed files (gzip, bz2, xz, lzma, zlib) -> the raw pickle stream."""
    for magic, fn in _MAGICS:
        if data.startswith(magic):
            return fn(data)
    # joblib's zlib files start with the zlib header 0x78 (no pickle does: 0x78 is 'x')
    if data[:1] == b"x" and len(data) > 2 and (data[0] * 256 + data[1]) % 31 == 0:
        try:
            return zlib.decompress(data)
        except zlib.error:
            return data
    return data


def head_decompressed(head: bytes) -> bytes:
    """Best-effort decompression of the first bytes only (for cheap detection)."""
    try:
        if head.startswith(b"\x1f\x8b"):
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head)
        if head[:1] == b"x" and len(head) > 2 and (head[0] * 256 + head[1]) % 31 == 0:
            return zlib.decompressobj().decompress(head)
        if head.startswith(b"BZh"):
            return bz2.BZ2Decompressor().decompress(head)
        if head.startswith((b"\xfd7zXZ", b"]\x00\x00")):
            return lzma.LZMADecompressor().decompress(head)
    except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError):
        return b""
    return head


def looks_like_pickle(head: bytes) -> bool:
    """Protocol 2-5 start with PROTO; protocol 0/1 are recognised by parsing a few ops."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return True
    if head[:1] not in (b"c", b"(", b"]", b"}", b"i", b"I", b"S", b"V", b"N", b")"):
        return False
    try:
        ops = 0
        for op, _, _ in pickletools.genops(io.BytesIO(head)):
            ops += 1
            if op.name in ("GLOBAL", "INST", "REDUCE", "STOP") or ops >= 4:
                return True
    except Exception:
        return ops >= 3
    return False


# ----------------------------------------------------------------------------- static scan

_MARK = object()


def scan_pickle(source: bytes | str | Path, head_only: bool = False) -> ScanResult:
    """Collect every global a pickle references, by walking its opcodes (never loading).

    STACK_GLOBAL takes its module and name from the stack, so the walk simulates the
    stack (including memo PUT/GET) well enough to resolve them; a name that cannot be
    resolved statically is reported as ("?", "?") and is therefore never allowed.
    Several concatenated pickles are scanned in turn.
    """
    if isinstance(source, (str, Path)):
        data = Path(source).read_bytes()
    else:
        data = source
    data = decompressed(data)
    result = ScanResult()
    buf = io.BytesIO(data)
    while buf.tell() < len(data):
        start = buf.tell()
        try:
            _scan_one(buf, result)
        except Exception as exc:  # raw bytes (joblib arrays) or a truncated stream
            result.complete = False
            result.error = f"{type(exc).__name__}: {exc}"[:200]
            break
        if buf.tell() == start:
            break
        # joblib's raw array data may follow a complete pickle; stop if it isn't a pickle
        rest = data[buf.tell():buf.tell() + 64]
        if rest and not looks_like_pickle(rest):
            break
        if head_only:
            break
    return result


def _scan_one(buf: io.BytesIO, result: ScanResult) -> None:
    stack: list = []
    memo: dict = {}
    for op, arg, _pos in pickletools.genops(buf):
        name = op.name
        if name == "MARK":
            stack.append(_MARK)
            continue
        if name in ("GLOBAL", "INST"):
            mod, _, attr = str(arg).partition(" ")
            result.globals.append((mod, attr))
        if name == "STACK_GLOBAL":
            attr = stack.pop() if stack else None
            mod = stack.pop() if stack else None
            if isinstance(mod, str) and isinstance(attr, str):
                result.globals.append((mod, attr))
            else:
                result.globals.append(("?", "?"))
            stack.append(object())
            continue
        if name in ("MEMOIZE",):
            memo[len(memo)] = stack[-1] if stack else None
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1] if stack else None
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg))
            continue
        if name == "STOP":
            return
        before = op.stack_before
        if pickletools.markobject in before:
            while stack and stack[-1] is not _MARK:
                stack.pop()
            if stack:
                stack.pop()
            for _ in range(before.index(pickletools.markobject)):
                if stack:
                    stack.pop()
        else:
            for _ in before:
                if stack:
                    stack.pop()
        for _ in op.stack_after:
            stack.append(arg if isinstance(arg, str) else object())


# ----------------------------------------------------------------------------- policy

def is_allowed(module: str, name: str, allow_extra: tuple[tuple[str, str], ...] = ()) -> bool:
    """True when (module, name) may be looked up while unpickling."""
    key = (module, name)
    if key in DENY_EXACT or "." in name and name.split(".")[0] in ("__builtins__",):
        return False
    if key in ALLOWED_EXACT or key in allow_extra:
        return True
    if module.startswith(CLASS_MODULE_PREFIXES) or module in UFUNC_MODULES:
        obj = _resolve(module, name)
        if obj is None:
            return False
        if isinstance(obj, type):
            return module.startswith(CLASS_MODULE_PREFIXES) or _is_numpy_scalar_type(obj)
        return _is_ufunc(obj)
    return False


def _resolve(module: str, name: str):
    if not module.replace(".", "").replace("_", "").isalnum() or "." in name or name.startswith("__"):
        return None
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    return getattr(mod, name, None)


def _is_ufunc(obj) -> bool:
    import numpy as np

    return isinstance(obj, np.ufunc)


def _is_numpy_scalar_type(obj) -> bool:
    import numpy as np

    return issubclass(obj, np.generic)


def unsafe_globals(scan: ScanResult, allow_extra: tuple[tuple[str, str], ...] = ()) -> list[str]:
    bad: list[str] = []
    for mod, name in scan.globals:
        if not is_allowed(mod, name, allow_extra):
            label = f"{mod}.{name}" if mod != "?" else "a global built at load time"
            if label not in bad:
                bad.append(label)
    return bad


def _refusal(path: Path, bad: list[str]) -> UnsafePickleError:
    shown = ", ".join(bad[:MAX_SHOWN]) + (f" and {len(bad) - MAX_SHOWN} more" if len(bad) > MAX_SHOWN else "")
    return UnsafePickleError(
        f"refusing to load {path.name}: it references {shown} (not on the allow-list); "
        "a pickle runs code when it is loaded",
        hint="if you trust this file, pass --trust-pickle")


def require_safe_pickle(path: str | Path, trust: bool = False,
                        allow_extra: tuple[tuple[str, str], ...] = ()) -> ScanResult:
    """Static check: raise UnsafePickleError if the pickle names anything off the list."""
    path = Path(path)
    try:
        scan = scan_pickle(path)
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise FormatError(f"{path}: cannot read the pickle ({exc})") from exc
    if not trust:
        bad = unsafe_globals(scan, allow_extra)
        if bad:
            raise _refusal(path, bad)
    return scan


def safe_load(path: str | Path, trust: bool = False,
              allow_extra: tuple[tuple[str, str], ...] = ()):
    """Load a pickle or joblib file behind both checks (static scan, then a restricted
    unpickler). With trust=True it is a plain joblib.load."""
    path = Path(path)
    require_safe_pickle(path, trust, allow_extra)
    from .extras import require

    joblib = require("joblib", "sklearn")
    if trust:
        return joblib.load(path)
    from joblib import numpy_pickle as npk

    class _Restricted(npk.NumpyUnpickler):
        def find_class(self, module, name):  # noqa: D401 - pickle API
            if not is_allowed(module, name, allow_extra):
                raise _refusal(path, [f"{module}.{name}"])
            return super().find_class(module, name)

    try:
        with open(path, "rb") as f, npk._validate_fileobject_and_memmap(f, str(path), None) as (fobj, _):
            if isinstance(fobj, str):
                raise FormatError(f"{path}: joblib files older than joblib 0.10 are not supported")
            return _Restricted(str(path), fobj, True).load()
    except (UnsafePickleError, FormatError):
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise FormatError(f"{path}: pickle is truncated or corrupt ({type(exc).__name__}: "
                          f"{str(exc)[:120]})") from exc
