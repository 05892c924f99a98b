"""Shared vocabulary of the format plugins: tensor specs, signatures, runners, probes.

Every format module (onnx, sklearn, keras, tensorflow, torch, coreml, other) exposes the
same verbs -- see `edgeops/formats/__init__.py` for the contract. This module holds only
plain data types and the content probe; it imports no framework.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np

Dim = int | str | None  # int = fixed, str = named dynamic dim, None = unknown


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64", "bool", "str" ...
    shape: tuple[Dim, ...] | None  # None = rank unknown

    def __post_init__(self):
        if not self.name:
            raise ValueError("TensorSpec needs a name")

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype,
                "shape": None if self.shape is None else list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        shape = d.get("shape")
        return cls(d["name"], d["dtype"], None if shape is None else tuple(shape))

    def shape_str(self) -> str:
        if self.shape is None:
            return "?"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict) -> "Signature":
        return cls(tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in d["outputs"]))


class Runner(Protocol):
    """Anything that turns named numpy inputs into named numpy outputs.

    verify, bench, quantize and the on-device health check all use this one interface.
    """

    signature: Signature

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class FormatInfo:
    id: str                 # graph node id used by the planner, e.g. "torchscript"
    family: str             # module under edgeops.formats, e.g. "torch"
    description: str
    extra: str | None       # optional dependency group needed to load/run it
    suffixes: tuple[str, ...] = ()  # conventional names, used only to pick --to from -o
    is_dir: bool = False
    refused: str | None = None  # detected but refused: the reason shown to the user


@dataclass
class LoadOptions:
    """Options that format loaders and runners may need."""

    trust_pickle: bool = False
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    input_names: tuple[str, ...] | None = None   # frozen GraphDef / TorchScript hints
    output_names: tuple[str, ...] | None = None


PICKLE_PROTOCOL_BYTES = {b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"}
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


class Probe:
    """Cheap, cached facts about a path's content, shared by all detectors.

    Detection reads content, never the extension: the suffix is only used by the CLI
    to guess the *target* format of an output path.
    """

    HEAD = 4096

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @cached_property
    def exists(self) -> bool:
        return self.path.exists()

    @cached_property
    def is_dir(self) -> bool:
        return self.path.is_dir()

    @cached_property
    def size(self) -> int:
        return self.path.stat().st_size if self.path.is_file() else 0

    @cached_property
    def head(self) -> bytes:
        if not self.path.is_file():
            return b""
        with open(self.path, "rb") as f:
            return f.read(self.HEAD)

    @cached_property
    def is_zip(self) -> bool:
        return self.head[:4] == b"PK\x03\x04" or (self.path.is_file() and zipfile.is_zipfile(self.path))

    @cached_property
    def zip_names(self) -> list[str]:
        if not self.is_zip:
            return []
        try:
            with zipfile.ZipFile(self.path) as z:
                return z.namelist()
        except (zipfile.BadZipFile, OSError):
            return []

    def zip_read(self, name: str, limit: int = 1 << 20) -> bytes:
        with zipfile.ZipFile(self.path) as z, z.open(name) as f:
            return f.read(limit)

    @cached_property
    def is_hdf5(self) -> bool:
        # HDF5 allows a user block: the signature may sit at 0, 512, 1024, 2048 ...
        if not self.path.is_file():
            return False
        with open(self.path, "rb") as f:
            off = 0
            while off <= min(self.size, 1 << 20):
                f.seek(off)
                if f.read(8) == HDF5_MAGIC:
                    return True
                off = 512 if off == 0 else off * 2
        return False

    @cached_property
    def is_pickle(self) -> bool:
        return self.head[:2] in PICKLE_PROTOCOL_BYTES

    @cached_property
    def proto_fields(self) -> dict[int, int] | None:
        """Top-level protobuf field numbers -> wire type, or None if not a protobuf.

        Reads the whole file but decodes only the top-level tags, so it is cheap and
        tells ONNX (1:varint, 7:graph, 8:opset), Core ML (1:varint, 2:description,
        field >= 200 model type) and TF GraphDef (1:NodeDef messages) apart.
        """
        fields, complete = self.proto_prefix
        return fields if complete else None

    @cached_property
    def proto_prefix(self) -> tuple[dict[int, int], bool]:
        """(top-level fields seen, walk completed) -- see scan_protobuf_prefix. Streams the
        file and seeks over payloads, so a 2 GB model costs a few reads, not 2 GB of RAM."""
        if not self.path.is_file() or self.size == 0:
            return {}, False
        with open(self.path, "rb") as f:
            return scan_protobuf_file(f, self.size)

    def sha256(self) -> str:
        return sha256_path(self.path)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def scan_protobuf(buf: bytes) -> dict[int, int] | None:
    """Walk the top-level tags of a serialized protobuf message.

    Returns {field_number: wire_type} or None when the bytes are not a well-formed
    message (including a truncated one). See `scan_protobuf_prefix` for the fields
    seen before a failure.
    """
    fields, complete = scan_protobuf_prefix(buf)
    return fields if complete else None


def scan_protobuf_prefix(buf: bytes, max_fields: int = 1_000_000) -> tuple[dict[int, int], bool]:
    """Like scan_protobuf, but returns (fields seen so far, whether the walk completed).

    A truncated file parses cleanly up to the cut, so the prefix still tells what kind
    of message it was -- which lets detection say "truncated ONNX" instead of "unknown".
    """
    return scan_protobuf_file(io.BytesIO(buf), len(buf), max_fields)


def _read_varint(f) -> int | None:
    result = shift = 0
    while shift <= 63:
        b = f.read(1)
        if not b:
            return None
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
    return None


def scan_protobuf_file(f, size: int, max_fields: int = 1_000_000) -> tuple[dict[int, int], bool]:
    """scan_protobuf_prefix over an open binary file, seeking over field payloads."""
    fields: dict[int, int] = {}
    for _ in range(max_fields):
        pos = f.tell()
        if pos == size:
            return fields, True
        key = _read_varint(f)
        if key is None:
            return fields, False
        num, wt = key >> 3, key & 7
        if num == 0 or wt not in (0, 1, 2, 5):
            return fields, False
        if wt == 0:
            if _read_varint(f) is None:
                return fields, False
            end = f.tell()
        elif wt == 2:
            ln = _read_varint(f)
            if ln is None:
                return fields, False
            end = f.tell() + ln
        else:
            end = f.tell() + (8 if wt == 1 else 4)
        if fields.get(num, wt) != wt:
            return fields, False
        fields[num] = wt  # recorded even when cut off: the tag itself was intact
        if end > size:
            return fields, False
        f.seek(end)
    return fields, False


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (sorted relative paths + contents)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def path_size(path: str | Path) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size

