"""Delta transfers: content-defined chunks, so a new bundle is sent as the chunks the device
does not already hold (in an installed slot or an earlier bundle) plus references to those it
does, and reassembled on the device in bounded memory.

Why not the fastcdc package: the agent may import only the standard library, numpy,
onnxruntime and cryptography (a device has nothing else), and fastcdc's pure-Python path hashes
bytes one at a time in a Python loop (a few MB/s on a Cortex-A class core, minutes for a 50 MB
model). Here the boundary test is a polynomial hash of a sliding 64-byte window computed with
numpy over 1 MiB blocks (uint64 arithmetic wraps mod 2**64, exactly what the hash needs), so
host and device run the same code at numpy speed, and memory is bounded by the block size.

Chunks: a boundary follows byte i when hash(window ending at i) has its top MASK_BITS bits
zero (average 2**MASK_BITS bytes), with MIN/MAX chunk sizes; the same content gives the same
boundaries wherever it sits in a file, so a model inside a tar bundle and the same model file
in a slot share their chunks. Each chunk is named by its sha256.

A delta file: b"EODELTA1", a 4-byte big-endian header length, a JSON header
{"size", "sha256", "ops": [[sha256, length, literal_offset or -1], ...]}, then the literal
bytes. The device copies each referenced chunk from where it holds it (re-hashing it), writes
literals as they come, checks the whole result's sha256, and only then renames it into place.
The install transaction verifies the bundle afterwards as always: a bad delta cannot install.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

WINDOW = 64
MASK_BITS = 16                  # average chunk 64 KiB
MIN_CHUNK = 16 << 10
MAX_CHUNK = 256 << 10
BLOCK = 1 << 20                 # numpy works on 1 MiB at a time: ~70 MB peak on the device
MAGIC = b"EODELTA1"
_Q = np.uint64(0x100000001B3)   # odd: invertible mod 2**64


def _powers(n: int, base: np.uint64) -> np.ndarray:
    out = np.empty(n, np.uint64)
    out[0] = 1
    if n > 1:
        out[1:] = base
        with np.errstate(over="ignore"):
            out = np.cumprod(out, dtype=np.uint64)
    return out


_QINV = np.uint64(pow(int(_Q), -1, 1 << 64))
_TABLES: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """q^j and q^-j for j < n (computed once per size)."""
    if n not in _TABLES:
        _TABLES.clear()
        _TABLES[n] = (_powers(n, _Q), _powers(n, _QINV))
    return _TABLES[n]


def _candidates(data: np.ndarray, prev_tail: np.ndarray) -> np.ndarray:
    """Offsets (into DATA, exclusive ends) where the window hash says 'boundary'. PREV_TAIL is
    the previous block's last WINDOW-1 bytes, so windows straddle blocks."""
    buf = np.concatenate([prev_tail, data]).astype(np.uint64)
    n = len(buf)
    if n < WINDOW:
        return np.empty(0, np.int64)
    qp, inv = _tables(n)
    with np.errstate(over="ignore"):
        s = np.cumsum(buf * qp, dtype=np.uint64)                  # S[i] = sum b[j] q^j
        s_prev = np.concatenate([np.zeros(WINDOW, np.uint64), s[:-WINDOW]])
        # window ending at i: (S[i] - S[i-W]) / q^(i-W+1), as a multiplication by q^-(i-W+1)
        h = (s[WINDOW - 1:] - s_prev[WINDOW - 1:]) * inv[:n - WINDOW + 1]
    ends = np.nonzero((h >> np.uint64(64 - MASK_BITS)) == 0)[0] + (WINDOW - 1) + 1 - len(prev_tail)
    return ends[ends > 0]


def chunks(path: str | Path):
    """Yield (offset, length, sha256 hex) of PATH's content-defined chunks, in order."""
    with open(path, "rb") as f:
        start, pos = 0, 0
        tail = np.empty(0, np.uint8)
        h = hashlib.sha256()
        while True:
            raw = f.read(BLOCK)
            if not raw:
                break
            data = np.frombuffer(raw, np.uint8)
            cuts = _candidates(data, tail) + pos         # absolute exclusive ends
            consumed = pos
            for cut in cuts.tolist():
                if cut - start < MIN_CHUNK:
                    continue
                while cut - start > MAX_CHUNK:           # no boundary for too long: force one
                    forced = start + MAX_CHUNK
                    h.update(raw[consumed - pos:forced - pos])
                    yield start, MAX_CHUNK, h.hexdigest()
                    h, start, consumed = hashlib.sha256(), forced, forced
                h.update(raw[consumed - pos:cut - pos])
                yield start, cut - start, h.hexdigest()
                h, start, consumed = hashlib.sha256(), cut, cut
            end = pos + len(raw)
            while end - start > MAX_CHUNK:
                forced = start + MAX_CHUNK
                h.update(raw[consumed - pos:forced - pos])
                yield start, MAX_CHUNK, h.hexdigest()
                h, start, consumed = hashlib.sha256(), forced, forced
            h.update(raw[consumed - pos:])
            tail = data[-(WINDOW - 1):] if len(data) >= WINDOW - 1 else np.concatenate([tail, data])[-(WINDOW - 1):]
            pos = end
        if pos > start:
            yield start, pos - start, h.hexdigest()


def index(paths, cache: str | Path | None = None) -> dict[str, tuple[str, int, int]]:
    """sha256 -> (path, offset, length) over the chunks of PATHS (first holder wins). With
    CACHE (a JSON file), each file's chunk list is kept under (size, mtime_ns) and reused while
    the file is unchanged, so listing what a device holds costs a read, not a hash pass; a
    stale or unreadable cache is simply recomputed (apply re-hashes every chunk it uses anyway)."""
    old: dict = {}
    if cache is not None:
        try:
            old = json.loads(Path(cache).read_text())
        except (OSError, ValueError):
            old = {}
    new: dict = {}
    out: dict[str, tuple[str, int, int]] = {}
    for p in paths:
        try:
            st = os.stat(p)
            key = [st.st_size, st.st_mtime_ns]
            hit = old.get(str(p))
            if isinstance(hit, dict) and hit.get("key") == key and isinstance(hit.get("chunks"), list):
                lst = hit["chunks"]
            else:
                lst = [[sha, off, n] for off, n, sha in chunks(p)]
        except OSError:
            continue
        new[str(p)] = {"key": key, "chunks": lst}
        for sha, off, n in lst:
            out.setdefault(sha, (str(p), off, n))
    if cache is not None and new != old:
        tmp = Path(f"{cache}.{os.getpid()}.tmp")      # concurrent listings each write their own
        try:
            tmp.write_text(json.dumps(new, separators=(",", ":")))
            os.replace(tmp, cache)
        except OSError:
            pass
    return out


PROBE_BYTES = 8 << 20


def make(new: str | Path, have: set[str], out: str | Path, *, min_reuse: float = 0.0) -> dict | None:
    """Write a delta of NEW against the chunk names HAVE (what the device holds) to OUT.
    Returns {size, sha256, chunks, reused, literal_bytes, delta_bytes}; or None as soon as the
    first PROBE_BYTES reuse less than MIN_REUSE of their bytes (an unrelated model: the whole
    upload starts without paying for hashing the rest)."""
    new = Path(new)
    ops, literal = [], 0
    whole = hashlib.sha256()
    lit_path = Path(str(out) + ".lit")
    seen, total = 0, new.stat().st_size
    with open(new, "rb") as src, open(lit_path, "wb") as lit:
        for off, n, sha in chunks(new):
            src.seek(off)
            data = src.read(n)
            whole.update(data)
            if sha in have:
                ops.append([sha, n, -1])
            else:
                ops.append([sha, n, literal])
                lit.write(data)
                literal += n
            seen += n
            if min_reuse and PROBE_BYTES <= seen < total and seen - literal < min_reuse * seen:
                lit.close()
                lit_path.unlink(missing_ok=True)
                return None
    header = json.dumps({"size": new.stat().st_size, "sha256": whole.hexdigest(), "ops": ops},
                        separators=(",", ":")).encode()
    with open(out, "wb") as f:
        f.write(MAGIC + struct.pack(">I", len(header)) + header)
        with open(lit_path, "rb") as lit:
            for block in iter(lambda: lit.read(1 << 20), b""):
                f.write(block)
    lit_path.unlink()
    return {"size": new.stat().st_size, "sha256": whole.hexdigest(), "chunks": len(ops),
            "reused": sum(1 for o in ops if o[2] < 0), "literal_bytes": literal,
            "delta_bytes": Path(out).stat().st_size}


class DeltaError(Exception):
    pass


def apply(delta: str | Path, sources, out: str | Path, expect_sha256: str | None = None,
          cache: str | Path | None = None) -> dict:
    """Rebuild the file a delta describes from SOURCES (files on this device) into OUT, through
    OUT.part; every reused chunk is re-hashed, the whole is checked before the rename. Memory:
    one chunk at a time."""
    delta, out = Path(delta), Path(out)
    part = out.with_name(out.name + ".part")
    with open(delta, "rb") as d:
        head = d.read(len(MAGIC) + 4)
        if len(head) != len(MAGIC) + 4 or head[:len(MAGIC)] != MAGIC:
            raise DeltaError(f"{delta} is not an edgeops delta")
        (hlen,) = struct.unpack(">I", head[len(MAGIC):])
        if hlen > 64 << 20:
            raise DeltaError("delta header too large")
        try:
            header = json.loads(d.read(hlen))
            ops, size, want = header["ops"], int(header["size"]), header["sha256"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DeltaError(f"delta header unreadable: {exc}") from None
        if expect_sha256 is not None and want != expect_sha256:
            raise DeltaError(f"the delta builds {want[:12]}…, not the expected {expect_sha256[:12]}…")
        base = len(MAGIC) + 4 + hlen
        have = index(sources, cache) if any(o[2] < 0 for o in ops) else {}
        whole = hashlib.sha256()
        try:
            _rebuild(d, base, ops, have, part, whole)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        written = sum(o[1] for o in ops)
    if written != size or whole.hexdigest() != want:
        part.unlink(missing_ok=True)
        raise DeltaError("the rebuilt file does not match the delta's sha256")
    os.replace(part, out)
    return {"size": size, "sha256": want, "reused_bytes": sum(o[1] for o in ops if o[2] < 0)}


def _rebuild(d, base: int, ops, have: dict, part: Path, whole) -> None:
    with open(part, "wb") as o:
        for sha, n, lit_off in ops:
            if lit_off < 0:
                where = have.get(sha)
                if where is None:
                    raise DeltaError(f"chunk {sha[:12]}… is not on this device any more")
                with open(where[0], "rb") as s:
                    s.seek(where[1])
                    data = s.read(where[2])
            else:
                d.seek(base + lit_off)
                data = d.read(n)
            if len(data) != n or hashlib.sha256(data).hexdigest() != sha:
                raise DeltaError(f"chunk {sha[:12]}… does not match its name (a changed source or a bad delta)")
            o.write(data)
            whole.update(data)
        o.flush()
        os.fsync(o.fileno())
