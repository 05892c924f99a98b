"""The one unsafe-load gate for pickles: scikit-learn pickles, joblib files, torch pickles.

A pickle runs code when it is loaded: any global it names can be called with any
arguments. edgeops therefore never unpickles a file the user has not trusted before
checking it, in two independent ways:

  1. `scan_pickle` walks the opcodes with pickletools.genops (nothing is built, imported
     from the file, or called) and simulates the unpickler's stack and memo, so it
     knows every global the stream names -- also the ones STACK_GLOBAL assembles from
     strings pushed earlier or fetched back from the memo. It follows joblib's format:
     raw array bytes that joblib writes after each NumpyArrayWrapper are skipped (their
     size comes from the wrapper's shape and dtype), and object arrays, which joblib
     writes as a nested pickle, are scanned as such. Compressed joblib files (zlib, gzip,
     bz2, xz, lzma; lz4 when installed) are decompressed first, with the same magic
     bytes joblib uses. Anything the walk cannot resolve statically -- a STACK_GLOBAL
     whose strings are not constants, a call to an object built at load time (callable
     instances), a joblib wrapper used in an unexpected way -- is reported as unresolved
     and is therefore never allowed.
  2. `safe_load` then unpickles *the very bytes it scanned* (no second read of the file)
     with a joblib unpickler whose find_class enforces the same allow-list, as a second
     line in case the static walk and the real unpickler ever disagree.

`require_safe_pickle` (the static check alone) is the generic API other families use:
the torch module passes its own globals through `allow_extra`.

Not covered: torch zip archives as a whole (edgeops.formats.torch walks their data.pkl
with `scan_pickle`), Keras Lambda layers (edgeops.formats.keras), joblib files written
before joblib 0.10 (arrays in side files, which joblib loads with allow_pickle=True:
refused unless trusted).
"""

from __future__ import annotations

import _compat_pickle
import bz2
import copyreg
import io
import lzma
import pickletools
import re
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .errors import FormatError, UnsafePickleError

# ----------------------------------------------------------------------------- the allow-list
#
# Every entry is something a fitted estimator's pickle really names, and each only
# rebuilds data: calling it with attacker-chosen arguments builds an object, it does not
# run code, touch files or import modules named by the pickle.

_DATA_BUILTINS = ("set", "frozenset", "slice", "complex", "bytearray", "bytes", "dict", "list",
                  "tuple", "int", "float", "str", "bool", "range",
                  "object")  # object: the base class copyreg._reconstructor is given

ALLOWED_EXACT: frozenset[tuple[str, str]] = frozenset({
    *{("builtins", n) for n in _DATA_BUILTINS},
    # containers; defaultdict calls its factory, which itself had to pass this list
    ("collections", "OrderedDict"), ("collections", "defaultdict"),
    # protocol 0/1 object rebuild: base.__new__(cls) for a cls that itself passed the list
    ("copyreg", "_reconstructor"),
    # how protocol 2 stores bytes: str.encode with a codec *name* (codec modules are
    # looked up inside the `encodings` package only)
    ("_codecs", "encode"),
    # numpy arrays, dtypes and scalars, both spellings (numpy 1 wrote numpy.core, numpy 2
    # writes numpy._core); they copy bytes into a new array and run nothing
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    # numpy random generator state (random_state=np.random.RandomState(0) and friends):
    # they look a bit generator up by name in numpy's own table, or call a class that
    # itself passed this list
    ("numpy.random._pickle", "__bit_generator_ctor"),
    ("numpy.random._pickle", "__randomstate_ctor"),
    ("numpy.random._pickle", "__generator_ctor"),
    # joblib's in-stream array wrapper: joblib reads the array's bytes from the stream
    # itself (the scan skips them); see DENY_EXACT for the older side-file wrappers
    ("joblib.numpy_pickle", "NumpyArrayWrapper"),
    # scikit-learn's Cython helpers for KD/ball trees and distance metrics:
    # `def newObj(obj): return obj.__new__(obj)` -- an empty instance of a listed class
    ("sklearn.neighbors._ball_tree", "newObj"), ("sklearn.neighbors._kd_tree", "newObj"),
    ("sklearn.metrics._dist_metrics", "newObj"),
    ("datetime", "datetime"), ("datetime", "date"), ("datetime", "time"),
    ("datetime", "timedelta"), ("datetime", "timezone"),
})

# Modules whose *classes* may be named. The class is looked up in the installed package
# (never from the pickle) and must be defined in exactly that module, so a class merely
# imported into scikit-learn (subprocess.Popen, say) does not pass. Constructing a
# scikit-learn class stores parameters; its methods run only when edgeops calls predict.
CLASS_MODULE_PREFIXES = ("sklearn.", "scipy.sparse.", "numpy.random.", "numpy.dtypes")
# Cython's generated `__pyx_unpickle_<Class>(type, checksum, state)` checks a checksum,
# makes `<Class>.__new__(type)` and assigns typed fields: allowed in these packages.
PYX_UNPICKLE_PREFIXES = ("sklearn.", "numpy.random.")
# numpy/scipy ufuncs (FunctionTransformer(np.log1p), expit) and numpy scalar types
# (dtype=np.float64): pure functions of their array arguments.
UFUNC_MODULES = ("numpy", "numpy.core.umath", "numpy._core.umath", "scipy.special")
UFUNC_MODULE_PREFIXES = ("scipy.special.",)

# Refused even though a rule above would let them through.
DENY_EXACT: frozenset[tuple[str, str]] = frozenset({
    ("numpy", "memmap"),                      # opens a file named by the pickle
    ("numpy.lib.npyio", "DataSource"), ("numpy", "DataSource"),
    # joblib < 0.10 side-file wrappers: joblib reads a file named by the pickle, and
    # NDArrayWrapper does so with np.load(allow_pickle=True) -- a second, unscanned pickle
    ("joblib.numpy_pickle_compat", "NDArrayWrapper"),
    ("joblib.numpy_pickle_compat", "ZNDArrayWrapper"),
    # callable helpers that run whatever function they are handed
    ("sklearn.utils.parallel", "Parallel"), ("sklearn.utils.parallel", "_FuncWrapper"),
})
# scikit-learn's test helpers and mocks are not model parts; importing test modules has
# side effects (pytest fixtures), so they are not even looked up.
_DENY_MODULE_PARTS = {"tests", "conftest", "_testing", "_mocking"}

UNRESOLVED = ("?", "?")
MAX_SHOWN = 4
_NAW = ("joblib.numpy_pickle", "NumpyArrayWrapper")


# ----------------------------------------------------------------------------- scan result

@dataclass
class ScanResult:
    """What a pickle stream references, found without loading it."""

    globals: list[tuple[str, str]] = field(default_factory=list)   # in order of appearance
    unresolved: list[str] = field(default_factory=list)  # why some reference stayed unknown
    complete: bool = True        # False when the walk stopped early (truncated, corrupt, limit)
    error: str = ""              # why it stopped
    pickles: int = 0             # complete pickle streams seen (joblib nests some)
    arrays: int = 0              # joblib raw arrays skipped
    compression: str = ""        # "", "zlib", "gzip", "bz2", "xz", "lzma", "lz4"

    @property
    def modules(self) -> set[str]:
        return {m for m, _ in self.globals}

    def references(self, prefix: str) -> bool:
        return any(m == prefix or m.startswith(prefix + ".") for m, _ in self.globals)


class _ScanStop(Exception):
    """The walk cannot go on (corrupt stream, or a construct it cannot follow)."""


# ----------------------------------------------------------------------------- decompression

# joblib's own magic numbers (joblib.compressor); a file joblib would decompress is
# decompressed here the same way, so the scan sees what joblib.load will read.
_PREFIXES = (
    (b"\x1f\x8b", "gzip"), (b"\x78", "zlib"), (b"BZ", "bz2"),
    (b"\xfd\x37\x7a\x58\x5a", "xz"), (b"\x5d\x00", "lzma"), (b"\x04\x22\x4d\x18", "lz4"),
)
_CHUNK = 16 << 20


def compression_of(head: bytes) -> str:
    if head.startswith(b"ZF"):
        return "joblib-zfile"
    for magic, name in _PREFIXES:
        if head.startswith(magic):
            return name
    return ""


def _new_decompressor(kind: str):
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if kind == "zlib":
        return zlib.decompressobj()
    if kind == "bz2":
        return bz2.BZ2Decompressor()
    return lzma.LZMADecompressor(lzma.FORMAT_AUTO)


def decompress(data: bytes, limit: int | None = None) -> tuple[bytes, str, bool]:
    """(raw pickle bytes, compression name, cut short) for a possibly compressed file.

    Raises FormatError for a truncated stream or a codec that is not installed. With a
    `limit` (detection), at most that many bytes come out and a truncated stream is not
    an error: the caller only reads a prefix of the file.
    """
    kind = compression_of(data[:8])
    if not kind:
        return (data[:limit] if limit else data), "", bool(limit and len(data) > limit)
    if kind == "joblib-zfile":
        raise FormatError("joblib file written before joblib 0.9.3 (ZF header): not supported",
                          hint="load it with that joblib version and save it again")
    if kind == "lz4":
        try:
            import lz4.frame  # optional, as in joblib
        except ImportError as exc:
            raise FormatError("lz4-compressed joblib file, but lz4 is not installed",
                              hint="pip install lz4") from exc
        out = lz4.frame.decompress(data)
        return (out[:limit] if limit else out), kind, bool(limit and len(out) > limit)
    out, total, rest = [], 0, data
    try:
        while rest:
            d = _new_decompressor(kind)
            buf = rest
            while not d.eof:
                if kind in ("gzip", "zlib"):
                    chunk = d.decompress(buf, _CHUNK)
                    buf = d.unconsumed_tail
                    starved = not buf and not chunk
                else:
                    chunk = d.decompress(buf, _CHUNK)
                    buf = b""
                    starved = d.needs_input
                out.append(chunk)
                total += len(chunk)
                if limit and total >= limit:
                    return b"".join(out)[:limit], kind, True
                if starved and not d.eof:
                    if limit:   # detection reads a prefix of the file: keep what it gave
                        return b"".join(out), kind, True
                    raise EOFError("compressed stream ended before its end marker")
            rest = d.unused_data
            # joblib reads one stream; a second one of the same kind is scanned too
            # (more than joblib reads is safe), anything else after it is ignored
            if compression_of(rest[:8]) != kind:
                break
    except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError) as exc:
        raise FormatError(f"{kind}-compressed file is truncated or corrupt ({exc})") from exc
    return b"".join(out), kind, False


def head_decompressed(head: bytes) -> bytes:
    """Best-effort decompression of a file's first bytes (for cheap detection)."""
    kind = compression_of(head[:8])
    if not kind:
        return head
    if kind in ("joblib-zfile", "lz4"):
        return b""
    try:
        return _new_decompressor(kind).decompress(head)
    except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError):
        return b""


def looks_like_pickle(head: bytes) -> bool:
    """Protocol 2-5 start with PROTO; protocol 0/1 are recognised by parsing a few ops."""
    if head[:1] == b"\x80":
        return head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if head[:1] not in (b"c", b"(", b"]", b"}", b"i", b"I", b"S", b"V", b"N", b")", b"L", b"F"):
        return False
    ops = 0
    try:
        for op, _, _ in pickletools.genops(io.BytesIO(head)):
            ops += 1
            if op.name == "STOP" or ops >= 8:
                return True
    except Exception:
        return ops >= 4
    return False


# ----------------------------------------------------------------------------- static walk

class _Mark:
    __repr__ = lambda self: "MARK"  # noqa: E731


class _Unknown:
    """A value the walk does not model (persistent ids, buffers, ...)."""


class _Global:
    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    @property
    def key(self) -> tuple[str, str]:
        return (self.module, self.name)


class _Call:
    """The result of calling a global (REDUCE, NEWOBJ, INST, OBJ); BUILD states merge in."""

    __slots__ = ("func", "args", "state", "attrs")

    def __init__(self, func: _Global, args):
        self.func, self.args, self.state, self.attrs = func, args, None, {}


_MARK = _Mark()
_MAX_DEPTH = 32   # nested joblib object arrays


def _py3_name(module: str, name: str, proto: int) -> tuple[str, str]:
    """The name the real unpickler resolves: Python 2 names are mapped when proto < 3."""
    if proto < 3:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            return _compat_pickle.NAME_MAPPING[(module, name)]
        if module in _compat_pickle.IMPORT_MAPPING:
            return _compat_pickle.IMPORT_MAPPING[module], name
    return module, name


def scan_pickle(source: bytes | bytearray | str | Path, limit: int | None = None) -> ScanResult:
    """Collect every global a pickle (or joblib file) references, by walking its opcodes.

    Several concatenated pickles are scanned in turn; trailing non-pickle bytes (torch's
    legacy raw storages) end the walk. `limit` bounds how many (decompressed) bytes are
    read, for cheap detection; a cut stream is reported with complete=False.
    Never raises for bad content: truncation and corruption are reported in the result.
    """
    result = ScanResult()
    try:
        data, result.compression, cut = _read(source, limit)
    except FormatError as exc:
        result.complete, result.error = False, exc.message
        return result
    _scan_bytes(data, result)
    if cut:
        result.complete = False
        result.error = result.error or f"stopped after {limit} bytes"
    return result


def _read(source, limit: int | None) -> tuple[bytes, str, bool]:
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            if limit and compression_of(f.read(8)):
                limit_in = limit * 8   # compressed: read enough to inflate to the limit
            else:
                limit_in = limit or -1
            f.seek(0)
            raw = f.read(limit_in)
    else:
        raw = bytes(source)
    return decompress(raw, limit)


def _scan_bytes(data: bytes, result: ScanResult) -> None:
    buf = io.BytesIO(data)
    while buf.tell() < len(data):
        start = buf.tell()
        try:
            _scan_one(buf, data, result, 0)
        except Exception as exc:  # corrupt or truncated: genops and the walk both land here
            result.complete = False
            result.error = f"{type(exc).__name__} at byte {buf.tell()}: {exc}"[:240]
            return
        if buf.tell() == start:
            return
        rest = data[buf.tell():buf.tell() + 64]
        if rest and not looks_like_pickle(rest):
            return   # trailing raw data, not another pickle


def _raw_pair(data: bytes, pos: int) -> tuple[str, str]:
    """GLOBAL/INST's two text lines, read from the raw bytes (pickletools joins them with
    a space, which would make 'a b' + 'c' and 'a' + 'b c' look alike)."""
    end1 = data.index(b"\n", pos + 1)
    end2 = data.index(b"\n", end1 + 1)
    return data[pos + 1:end1].decode("utf-8"), data[end1 + 1:end2].decode("utf-8")


def _scan_one(buf: io.BytesIO, data: bytes, result: ScanResult, depth: int) -> None:
    stack: list = []
    memo: dict = {}
    proto = 0

    def pop():
        if not stack or stack[-1] is _MARK:
            raise _ScanStop("stack underflow")
        return stack.pop()

    def pop_mark() -> list:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1:]
                del stack[i:]
                return items
        raise _ScanStop("no MARK on the stack")

    def record(module: str, name: str) -> _Global:
        module, name = _py3_name(module, name, proto)
        result.globals.append((module, name))
        return _Global(module, name)

    def unresolved(why: str):
        result.globals.append(UNRESOLVED)
        result.unresolved.append(why)

    def call(func, args):
        if not isinstance(func, _Global):
            # legit pickles call globals; calling an object built at load time (a
            # callable instance of an allowed class) cannot be judged statically
            unresolved("a call to an object built at load time")
            return _Unknown()
        if func.key != _NAW and not (func.key == ("copyreg", "_reconstructor") and args
                                     and _is_naw(args[0])) and _contains_naw(args):
            unresolved("joblib's array wrapper passed to " + ".".join(func.key))
        obj = _Call(func, args)
        return obj

    for op, arg, pos in pickletools.genops(buf):
        name = op.name
        if name == "PROTO":
            proto = arg
        elif name in ("FRAME", "READONLY_BUFFER"):
            pass
        elif name == "STOP":
            result.pickles += 1
            return
        elif name == "MARK":
            stack.append(_MARK)
        elif name == "GLOBAL":
            stack.append(record(*_raw_pair(data, pos)))
        elif name == "INST":
            g = record(*_raw_pair(data, pos))
            stack.append(call(g, tuple(pop_mark())))
        elif name == "STACK_GLOBAL":
            attr, mod = pop(), pop()
            if type(mod) is str and type(attr) is str:
                stack.append(record(mod, attr))
            else:
                unresolved("a global whose name is computed at load time")
                stack.append(_Unknown())
        elif name in ("EXT1", "EXT2", "EXT4"):
            key = copyreg._inverted_registry.get(arg)
            if key:
                stack.append(record(*key))
            else:
                unresolved(f"extension code {arg}")
                stack.append(_Unknown())
        elif name == "REDUCE":
            args = pop()
            stack.append(call(pop(), args if isinstance(args, tuple) else (args,)))
        elif name == "NEWOBJ":
            args = pop()
            stack.append(call(pop(), args if isinstance(args, tuple) else (args,)))
        elif name == "NEWOBJ_EX":
            kwargs, args = pop(), pop()
            stack.append(call(pop(), (args, kwargs)))
        elif name == "OBJ":
            items = pop_mark()
            if not items:
                raise _ScanStop("OBJ without a class")
            stack.append(call(items[0], tuple(items[1:])))
        elif name == "BUILD":
            state = pop()
            if not stack or stack[-1] is _MARK:
                raise _ScanStop("BUILD without an object")
            inst = stack[-1]
            if isinstance(inst, _Call):
                inst.state = state
                if _is_naw_instance(inst):
                    if not isinstance(state, dict):
                        raise _ScanStop("joblib array wrapper with a non-dict state")
                    inst.attrs.update(state)
                    # joblib's unpickler now reads the array right here, from the stream
                    _skip_joblib_array(buf, data, inst.attrs, result, depth)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if not stack or stack[-1] is _MARK:
                raise _ScanStop("PUT on an empty stack")
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            if not stack or stack[-1] is _MARK:
                raise _ScanStop("MEMOIZE on an empty stack")
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise _ScanStop(f"memo key {arg} missing")
            stack.append(memo[arg])
        elif name == "POP":
            if not stack:
                raise _ScanStop("POP on an empty stack")
            stack.pop()
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            if not stack or stack[-1] is _MARK:
                raise _ScanStop("DUP on an empty stack")
            stack.append(stack[-1])
        elif name in ("NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2",
                      "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT", "STRING", "BINSTRING",
                      "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
                      "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"):
            stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}.get(name, arg))
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = [pop() for _ in range(n)][::-1]
            stack.append(tuple(items))
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "LIST":
            stack.append(list(pop_mark()))
        elif name == "APPEND":
            v = pop()
            if stack and isinstance(stack[-1], list):
                stack[-1].append(v)
        elif name == "APPENDS":
            items = pop_mark()
            if stack and isinstance(stack[-1], list):
                stack[-1].extend(items)
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "DICT":
            items = pop_mark()
            stack.append(_dict(items))
        elif name == "SETITEM":
            v, k = pop(), pop()
            if stack and isinstance(stack[-1], dict):
                _setitem(stack[-1], k, v)
        elif name == "SETITEMS":
            items = pop_mark()
            if stack and isinstance(stack[-1], dict):
                for k, v in zip(items[::2], items[1::2]):
                    _setitem(stack[-1], k, v)
        elif name == "BINPERSID":
            pop()
            stack.append(_Unknown())
        else:
            # EMPTY_SET, ADDITEMS, FROZENSET, PERSID, NEXT_BUFFER, ...: the generic stack
            # effect from pickletools' own opcode table
            before = op.stack_before
            if pickletools.markobject in before:
                pop_mark()
                before = before[:before.index(pickletools.markobject)]
            for _ in before:
                pop()
            for _ in op.stack_after:
                stack.append(_Unknown())
    raise _ScanStop("pickle ended without STOP")


def _dict(items: list) -> dict:
    d: dict = {}
    for k, v in zip(items[::2], items[1::2]):
        _setitem(d, k, v)
    return d


def _setitem(d: dict, k, v) -> None:
    try:
        d[k] = v
    except TypeError:   # unhashable symbolic key: the walk does not need it
        pass


def _is_naw(x) -> bool:
    return isinstance(x, _Global) and x.key == _NAW


def _is_naw_instance(inst: _Call) -> bool:
    if inst.func.key == _NAW:
        return True
    # protocol 0/1: copyreg._reconstructor(NumpyArrayWrapper, object, None)
    return inst.func.key == ("copyreg", "_reconstructor") and bool(inst.args) and _is_naw(inst.args[0])


def _contains_naw(x, depth: int = 0) -> bool:
    if _is_naw(x):
        return True
    if depth > 8:
        return False
    if isinstance(x, (tuple, list)):
        return any(_contains_naw(i, depth + 1) for i in x)
    if isinstance(x, dict):
        return any(_contains_naw(i, depth + 1) for i in (*x.keys(), *x.values()))
    return False


def _skip_joblib_array(buf: io.BytesIO, data: bytes, state: dict, result: ScanResult,
                       depth: int) -> None:
    """Step over the array joblib wrote after a NumpyArrayWrapper (joblib's read_array)."""
    shape = state.get("shape")
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise _ScanStop("joblib array wrapper with a shape the scan cannot read")
    itemsize, hasobject = _dtype_facts(state.get("dtype"), 0)
    if hasobject:
        # object arrays are a nested pickle; joblib unpickles it with the same find_class
        if depth >= _MAX_DEPTH:
            raise _ScanStop("joblib object arrays nested too deeply")
        _scan_one(buf, data, result, depth + 1)
    else:
        if state.get("numpy_array_alignment_bytes") is not None:
            pad = buf.read(1)
            if not pad:
                raise _ScanStop("joblib array padding missing")
            buf.seek(pad[0], io.SEEK_CUR)
        count = 1
        for d in shape:
            count *= d
        buf.seek(count * itemsize, io.SEEK_CUR)
        if buf.tell() > len(data):
            raise _ScanStop("joblib array data is truncated")
    result.arrays += 1


_DTYPE_STR = re.compile(r"[|<>=]?[A-Za-z?][A-Za-z0-9]{0,7}(\[[0-9]*[A-Za-z]{0,3}\])?")


def _dtype_facts(d, depth: int) -> tuple[int, bool]:
    """(itemsize, hasobject) of a pickled numpy dtype, read from its constructor string
    and state; refuses anything it cannot read with certainty."""
    import numpy as np

    if not (isinstance(d, _Call) and d.func.key == ("numpy", "dtype") and d.args
            and isinstance(d.args[0], str) and _DTYPE_STR.fullmatch(d.args[0]) and depth < 8):
        raise _ScanStop("joblib array wrapper with a dtype the scan cannot read")
    try:
        base = np.dtype(d.args[0])   # a type string only: builds a descriptor, runs nothing
    except TypeError as exc:
        raise _ScanStop(f"unknown dtype {d.args[0]!r}") from exc
    itemsize, hasobject = base.itemsize, base.kind == "O"
    state = d.state
    if state is not None:
        if not (isinstance(state, tuple) and len(state) >= 8):
            raise _ScanStop("dtype with an unreadable state")
        subarray, fields, elsize, flags = state[2], state[4], state[5], state[7]
        if not (type(elsize) is int and elsize in (-1, itemsize) and type(flags) is int):
            raise _ScanStop("dtype whose state disagrees with its type string")
        if subarray is not None:
            if not (isinstance(subarray, tuple) and len(subarray) == 2):
                raise _ScanStop("dtype with an unreadable subarray")
            hasobject = hasobject or _dtype_facts(subarray[0], depth + 1)[1]
        if fields is not None:
            if not isinstance(fields, dict):
                raise _ScanStop("dtype with unreadable fields")
            for spec in fields.values():
                if not (isinstance(spec, tuple) and spec):
                    raise _ScanStop("dtype with unreadable fields")
                hasobject = hasobject or _dtype_facts(spec[0], depth + 1)[1]
        if bool(flags & 1) != hasobject:   # NPY_ITEM_REFCOUNT: numpy's "holds objects"
            raise _ScanStop("dtype whose object flag disagrees with its fields")
    return itemsize, hasobject


# ----------------------------------------------------------------------------- policy

def _normalize_extra(allow_extra) -> tuple[frozenset, tuple[str, ...]]:
    """allow_extra items: ("module", "name"), "module.name", or a prefix "module." / "module.*"."""
    exact, prefixes = set(), []
    for item in allow_extra:
        if isinstance(item, tuple):
            exact.add(item)
        elif item.endswith(".*") or item.endswith("."):
            prefixes.append(item.rstrip("*"))
        else:
            mod, _, name = item.rpartition(".")
            exact.add((mod, name))
    return frozenset(exact), tuple(prefixes)


def is_allowed(module: str, name: str, allow_extra=()) -> bool:
    """True when (module, name) -- as the unpickler resolves it -- may be looked up."""
    if (module, name) == UNRESOLVED or (module, name) in DENY_EXACT:
        return False
    if allow_extra:
        exact, prefixes = _normalize_extra(allow_extra)
        in_prefix = any(module == p[:-1] or module.startswith(p) for p in prefixes)
        if (module, name) in exact or in_prefix and _plain_name(name):
            return True
    return _allowed(module, name)


def _plain_name(name: str) -> bool:
    # a dotted name is an attribute chain (pickle protocol 4 qualnames): never allowed
    return name.isidentifier() and not name.startswith("__")


@lru_cache(maxsize=4096)
def _allowed(module: str, name: str) -> bool:
    if (module, name) in ALLOWED_EXACT:
        return True
    if not module.replace(".", "").replace("_", "").isalnum() or set(module.split(".")) & _DENY_MODULE_PARTS:
        return False
    if name.startswith("__pyx_unpickle_") and module.startswith(PYX_UNPICKLE_PREFIXES):
        fn = _resolve(module, name, dunder=True)
        cls = _resolve(module, name[len("__pyx_unpickle_"):])
        return (fn is not None and "cython_function" in type(fn).__name__
                and isinstance(cls, type) and cls.__module__ == module)
    if not _plain_name(name):
        return False
    if module.startswith(CLASS_MODULE_PREFIXES):
        obj = _resolve(module, name)
        if isinstance(obj, type) and obj.__module__ == module:
            return True
    if module in UFUNC_MODULES or module.startswith(UFUNC_MODULE_PREFIXES):
        import numpy as np

        obj = _resolve(module, name)
        if isinstance(obj, np.ufunc):
            return True
        if module == "numpy" and isinstance(obj, type) and issubclass(obj, np.generic):
            return True
    return False


def _resolve(module: str, name: str, dunder: bool = False):
    """Look a name up in the *installed* package (only for modules on the list)."""
    if not (name.isidentifier() and (dunder or not name.startswith("__"))):
        return None
    import importlib
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # numpy.core.* shims warn on access
            mod = importlib.import_module(module)
            return getattr(mod, name, None)
    except Exception:
        return None


def unsafe_globals(scan: ScanResult, allow_extra=()) -> list[str]:
    """Human labels of the references off the allow-list, first occurrence first."""
    bad: list[str] = []
    reasons = iter(scan.unresolved)
    for mod, name in scan.globals:
        if (mod, name) == UNRESOLVED:
            label = next(reasons, "a global built at load time")
        elif not is_allowed(mod, name, allow_extra):
            label = f"{mod}.{name}"
        else:
            continue
        if label not in bad:
            bad.append(label)
    return bad


# ----------------------------------------------------------------------------- the gate

def _refusal(path: Path, bad: list[str]) -> UnsafePickleError:
    shown = ", ".join(bad[:MAX_SHOWN]) + (f" and {len(bad) - MAX_SHOWN} more" if len(bad) > MAX_SHOWN else "")
    return UnsafePickleError(
        f"refusing to load {path.name}: it references {shown} (not on the allow-list); "
        "a pickle runs code when it is loaded",
        hint="if you trust this file, pass --trust-pickle")


def _check(path: Path, data: bytes, trust: bool, allow_extra) -> tuple[ScanResult, bytes]:
    """Decompress and scan `data` (the file's bytes); returns the scan and the raw stream."""
    try:
        raw, kind, _ = decompress(data)
    except FormatError as exc:
        raise FormatError(f"{path}: {exc.message}", hint=exc.hint) from exc
    scan = ScanResult(compression=kind)
    _scan_bytes(raw, scan)
    if trust:
        return scan, raw
    bad = unsafe_globals(scan, allow_extra)
    if bad:
        raise _refusal(path, bad)
    if not scan.complete:
        # what the walk could not reach, it cannot vouch for; a real unpickler would stop
        # at the same byte, except joblib, which reads raw array bytes by itself
        raise FormatError(f"{path}: pickle is truncated or corrupt ({scan.error}); "
                          "nothing was loaded",
                          hint="if you trust this file, --trust-pickle loads it without the check")
    if scan.pickles == 0:
        raise FormatError(f"{path}: not a pickle")
    return scan, raw


def require_safe_pickle(path: str | Path, trust: bool = False, allow_extra=()) -> ScanResult:
    """Static check only: raise UnsafePickleError if the pickle names anything off the list.

    Nothing is unpickled. With trust=True the file is scanned but never refused.
    `allow_extra`: more globals for this caller, as ("module", "name"), "module.name" or
    "module." prefixes (the torch family passes its tensor-rebuild globals this way).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return _check(path, data, trust, allow_extra)[0]


_SKLEARN_VERSION = re.compile(rb"_sklearn_version.{1,8}?(\d+\.\d+(?:\.\d+)?)", re.S)


def _load_failure(path: Path, exc: BaseException) -> FormatError:
    """A pickle that does not load. When scikit-learn wrote it and the installed one differs
    (classes move and disappear between releases), say which versions."""
    what = f"{type(exc).__name__}: {str(exc)[:160]}"
    written = None
    try:
        raw, _, _ = decompress(path.read_bytes())
        m = _SKLEARN_VERSION.search(raw)
        written = m.group(1).decode() if m else None
    except Exception:  # noqa: BLE001 - the version is a bonus
        pass
    if written and isinstance(exc, (AttributeError, ModuleNotFoundError, ImportError)):
        try:
            from importlib.metadata import version

            have = version("scikit-learn")
        except Exception:  # noqa: BLE001
            have = "?"
        if have != written:
            return FormatError(f"{path}: written by scikit-learn {written}, which this "
                               f"scikit-learn {have} cannot rebuild ({what})",
                               hint=f"load it with scikit-learn=={written} and re-save it, or "
                                    "convert it to ONNX there")
    return FormatError(f"{path}: cannot load the pickle ({what})")


def safe_load(path: str | Path, trust: bool = False, allow_extra=()):
    """Load a pickle or joblib file behind both checks: the static scan, then joblib's
    unpickler restricted to the same allow-list, over the same bytes. trust=True is a
    plain joblib.load."""
    path = Path(path)
    from .extras import require

    joblib = require("joblib", "sklearn")
    if trust:
        try:
            return joblib.load(path)
        except Exception as exc:
            raise _load_failure(path, exc) from exc
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    _, raw = _check(path, data, False, allow_extra)
    from joblib import numpy_pickle as npk

    class _Restricted(npk.NumpyUnpickler):
        def find_class(self, module, name):  # noqa: D401 - pickle API
            mapped = _py3_name(module, name, self.proto) if self.fix_imports else (module, name)
            if not is_allowed(*mapped, allow_extra):
                raise _refusal(path, [".".join(mapped)])
            return super().find_class(module, name)

    try:
        try:
            unpickler = _Restricted(str(path), io.BytesIO(raw), True)
        except TypeError:   # a joblib whose unpickler signature changed: static check only
            return joblib.load(io.BytesIO(raw))
        return unpickler.load()
    except (UnsafePickleError, FormatError):
        raise
    except Exception as exc:   # unpickling raises almost anything on bad data
        raise FormatError(f"{path}: pickle is truncated or corrupt ({type(exc).__name__}: "
                          f"{str(exc)[:160]})") from exc
