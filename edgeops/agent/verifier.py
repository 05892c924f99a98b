"""Bundle and trust-root verification: the code that decides whether a device may install a bundle.

Runs on the device as well as on the build machine, so it uses the standard library and
`cryptography` only and imports nothing from edgeops (edgeops.bundle imports it, never the
reverse). Covers:
  - the archive: a plain ustar file written by `tar_header`/`write_archive` below, read by our own
    parser (not tarfile) so every header byte is checked. Refused: links, devices, fifos,
    directories, PAX/GNU extensions and sparse members (the tar form of a decompression bomb),
    `..`/absolute/odd names, duplicates (also case-folded), entries larger than the file or
    the limits, compressed input, non-canonical headers, padding or trailing bytes.
  - metadata: canonical JSON (sorted keys, no whitespace; the file must equal its own
    re-encoding, so no byte can change without the signed bytes changing), duplicate keys
    and NaN refused.
  - trust: a root (TUF-style) lists Ed25519 keys (key id = sha256 of the raw public key) and
    two roles with thresholds: `root` signs the next root, `bundle` signs bundles. A new root
    must be version N+1 and signed by a threshold of the old root's root keys AND of its own.
  - the bundle: threshold of distinct trusted bundle-key signatures over the manifest, then
    expiry (freeze), target, counter and version against the installed ones (rollback), and
    every payload file's size and sha256 against the manifest (tampering, mix-and-match).
Not covered: running the model (edgeops.agent.health), slots and install (the fleet agent).

Two tiers, as in python-tuf: `verify_bundle` returns a VerifyResult that never raises for a bad
bundle; `VerifyResult.require()` raises BundleRefused with the reasons.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

SCHEMA_VERSION = 1
MAX_COUNTER = 2**53 - 1      # exact in every JSON reader; a bundle at 2**63 could block updates forever
BUNDLE_TYPE = "edgeops.bundle"
ROOT_TYPE = "edgeops.root"
MANIFEST = "manifest.json"
ROOTS_DIR = "roots/"
PAYLOAD_DIR = "payload/"
ROOT_FILE = "root.json"
BLOCK = 512
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
SEMVER = re.compile(r"(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})")
HEX64 = re.compile(r"[0-9a-f]{64}")
SIG_HEX = re.compile(r"[0-9a-f]{128}")      # lowercase only: one encoding per signature
OCTAL = re.compile(rb"[0-7]{1,12}")
ROOT_NAME = re.compile(r"roots/([1-9]\d{0,6})\.root\.json")
# names a bundle may contain: a conservative portable set (no spaces, no backslashes, no ':')
NAME_OK = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
                    b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}


class BundleRefused(Exception):
    """A bundle or trust root that must not be used. `failures` lists every reason found."""

    def __init__(self, failures: list["Failure"]):
        self.failures = failures
        super().__init__("; ".join(f.message for f in failures))


class TrustError(Exception):
    """The trusted root itself is missing, unreadable, not self-signed, or expired."""


@dataclass(frozen=True)
class Failure:
    code: str       # archive | unsafe-entry | metadata | root | signature | expired | target | rollback | files
    message: str

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


class Refused(Exception):
    """One reason to refuse (raised inside the verifier and by update_root / parse_root)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.failure = Failure(code, message)


@dataclass(frozen=True)
class Limits:
    max_bundle_bytes: int = 16 << 30
    max_entry_bytes: int = (8 << 30) - 1     # ustar's 11 octal digits
    max_metadata_bytes: int = 16 << 20       # manifest.json (reference vectors are files, not JSON)
    max_root_bytes: int = 1 << 20
    max_roots: int = 1000
    max_entries: int = 10_000
    max_name_bytes: int = 255


# ----------------------------------------------------------------------------- canonical JSON

def canonical(obj) -> bytes:
    """The one byte encoding that is signed: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name):
    raise ValueError(f"{name} is not allowed")


def parse_canonical(data: bytes, what: str):
    """Parse JSON that must be byte-identical to its canonical encoding (so two encodings of the
    same content cannot exist, and a flipped byte cannot go unnoticed)."""
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_no_constants)
        again = canonical(obj)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Refused("metadata", f"{what} is not valid JSON ({exc})") from None
    if again != data:
        raise Refused("metadata", f"{what} is not in canonical form (altered or hand-edited)")
    return obj


def manifest_sha256(signed: dict) -> str:
    """A bundle's identity: the sha256 of its signed manifest, signatures excluded (a re-signed
    bundle of the same content with a new counter is another bundle)."""
    return hashlib.sha256(canonical(signed)).hexdigest()


def signing_message(kind: str, signed: dict) -> bytes:
    """What a signature covers: a domain tag (so a root signature can never pass as a bundle
    signature, nor the reverse) and the canonical bytes."""
    return b"edgeops-signature-v1\x00" + kind.encode() + b"\x00" + canonical(signed)


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()


def parse_time(value, what: str) -> datetime:
    if not isinstance(value, str):
        raise Refused("metadata", f"{what} is not a time string")
    try:
        return datetime.strptime(value, TIME_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        raise Refused("metadata", f"{what} {value!r} is not a UTC time like 2026-01-31T12:00:00Z") from None


def format_time(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime(TIME_FORMAT)


def semver(value, what: str = "version") -> tuple[int, int, int]:
    m = SEMVER.fullmatch(value) if isinstance(value, str) else None
    if not m:
        raise Refused("metadata", f"{what} {value!r} is not X.Y.Z")
    return tuple(int(g) for g in m.groups())


# ----------------------------------------------------------------------------- trust roots

@dataclass(frozen=True)
class Role:
    keyids: tuple[str, ...]
    threshold: int


@dataclass(frozen=True)
class Root:
    """A verified trust root: public keys by id and the `root` and `bundle` roles."""
    version: int
    expires: datetime
    keys: dict            # keyid -> Ed25519PublicKey
    names: dict           # keyid -> human name
    roles: dict           # "root" | "bundle" -> Role
    data: bytes           # the canonical envelope, as stored


def _role(signed: dict, name: str, keys: dict) -> Role:
    r = signed["roles"].get(name) if isinstance(signed.get("roles"), dict) else None
    if not isinstance(r, dict) or not isinstance(r.get("keyids"), list) or not isinstance(r.get("threshold"), int) \
            or isinstance(r.get("threshold"), bool):
        raise Refused("root", f"root role {name!r} is missing or malformed")
    ids = r["keyids"]
    if not all(isinstance(k, str) for k in ids):
        raise Refused("root", f"root role {name!r} key ids must be strings")
    if len(set(ids)) != len(ids) or any(k not in keys for k in ids):
        raise Refused("root", f"root role {name!r} lists duplicate or undefined key ids")
    if not 1 <= r["threshold"] <= len(ids):
        raise Refused("root", f"root role {name!r} threshold {r['threshold']} is not between 1 and {len(ids)}")
    return Role(tuple(ids), r["threshold"])


def parse_root(data: bytes) -> tuple[Root, dict, list]:
    """Parse (not yet trust) a root envelope: the Root, its signed part and its signatures."""
    try:
        return _parse_root(data)
    except (TypeError, AttributeError, ValueError, KeyError) as exc:   # malformed in a way not foreseen
        raise Refused("root", f"malformed root metadata ({type(exc).__name__}: {exc})") from None


def _parse_root(data: bytes) -> tuple[Root, dict, list]:
    env = parse_canonical(data, "root metadata")
    if not isinstance(env, dict) or set(env) != {"signed", "signatures"} or not isinstance(env["signed"], dict):
        raise Refused("root", "root metadata must be {\"signed\": {...}, \"signatures\": [...]}")
    s = env["signed"]
    if s.get("_type") != ROOT_TYPE or s.get("schema_version") != SCHEMA_VERSION:
        raise Refused("root", f"not an edgeops root (type {s.get('_type')!r}, schema {s.get('schema_version')!r})")
    v = s.get("version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise Refused("root", f"root version {v!r} is not a positive integer")
    if not isinstance(s.get("keys"), dict):
        raise Refused("root", "root has no keys")
    keys, names = {}, {}
    for kid, k in s["keys"].items():
        if not isinstance(k, dict) or k.get("keytype") != "ed25519" or not isinstance(k.get("public"), str) \
                or not HEX64.fullmatch(k["public"]):
            raise Refused("root", f"root key {kid[:16]} is not an ed25519 key (64 lowercase hex digits)")
        try:
            raw = bytes.fromhex(k["public"])
            pub = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            raise Refused("root", f"root key {kid[:16]} has a malformed public key") from None
        if key_id(raw) != kid:   # ids are computed, never taken on trust
            raise Refused("root", f"root key id {kid[:16]} is not the sha256 of its public key")
        keys[kid], names[kid] = pub, str(k.get("name", ""))
    roles = {n: _role(s, n, keys) for n in ("root", "bundle")}
    return Root(v, parse_time(s.get("expires"), "root expires"), keys, names, roles, data), s, env["signatures"]


def count_signatures(kind: str, signed: dict, signatures, root: Root, role: str) -> tuple[list, list, list]:
    """(valid trusted key ids, unknown key ids, invalid-signature key ids). Each key counts once."""
    if not isinstance(signatures, list):
        raise Refused("signature", "signatures must be a list")
    msg = signing_message(kind, signed)
    allowed = set(root.roles[role].keyids)
    good, unknown, bad, seen = [], [], [], set()
    for sig in signatures:
        if not isinstance(sig, dict) or set(sig) != {"keyid", "sig"} or not isinstance(sig["keyid"], str) \
                or not isinstance(sig["sig"], str) or not HEX64.fullmatch(sig["keyid"]) \
                or not SIG_HEX.fullmatch(sig["sig"]):
            raise Refused("signature", "a signature entry is malformed (keyid: 64 and sig: 128 lowercase hex digits)")
        kid = sig["keyid"]
        if kid in seen:
            raise Refused("signature", f"two signatures by the same key {kid[:16]}")
        seen.add(kid)
        if kid not in allowed:
            unknown.append(kid)
            continue
        try:
            root.keys[kid].verify(bytes.fromhex(sig["sig"]), msg)
            good.append(kid)
        except (InvalidSignature, ValueError):
            bad.append(kid)
    return good, unknown, bad


def _require_threshold(kind: str, signed: dict, signatures, root: Root, role: str, what: str) -> list[str]:
    good, unknown, bad = count_signatures(kind, signed, signatures, root, role)
    need = root.roles[role].threshold
    if len(good) >= need:
        return good
    parts = [f"{what} has {len(good)} valid signature(s) from trusted {role} keys of root v{root.version}, "
             f"needs {need}"]
    if bad:
        parts.append("invalid signature from " + ", ".join(k[:16] for k in bad))
    other = [k for k in unknown if k in root.keys]
    if other:
        parts.append(f"key(s) {', '.join(k[:16] for k in other)} are in the root but not allowed to sign as {role}")
    if len(other) < len(unknown):
        parts.append("signed by unknown key(s) " + ", ".join(k[:16] for k in unknown if k not in root.keys))
    if not signatures:
        parts.append("it is unsigned")
    raise Refused("signature", "; ".join(parts))


def load_root(data: bytes, now: datetime | None = None, check_expiry: bool = True) -> Root:
    """A root trusted by placement (the trust folder): still must be self-signed to threshold."""
    try:
        root, signed, sigs = parse_root(data)
        _require_threshold(ROOT_TYPE, signed, sigs, root, "root", f"root v{root.version}")
    except Refused as exc:
        raise TrustError(f"trusted root: {exc}") from None
    if check_expiry and (now or datetime.now(timezone.utc)) >= root.expires:
        raise TrustError(f"trusted root v{root.version} expired at {format_time(root.expires)}")
    return root


def load_trust(folder: str | Path, now: datetime | None = None, check_expiry: bool = False) -> Root:
    """The trusted root from a trust folder (`<folder>/root.json`). Expiry is checked after
    updates (a newer root may replace an expired one), so it is off by default here."""
    p = Path(folder)
    f = p / ROOT_FILE
    if not f.exists():
        extra = ""
        if p.is_dir() and any(p.glob("*.pub")):
            extra = " (public key files alone carry no threshold)"
        raise TrustError(f"{p}: no {ROOT_FILE} trust root{extra}")
    if not f.is_file() or f.stat().st_size > Limits().max_root_bytes:
        raise TrustError(f"{f} is not a trust root file (not a regular file, or too large)")
    for q in (p, f):   # as sshd's StrictModes: a root others can replace is no root of trust
        if q.stat().st_mode & 0o022:
            raise TrustError(f"{q} is writable by other users (mode {q.stat().st_mode & 0o777:o})")
    root = load_root(f.read_bytes(), now, check_expiry)
    newer = [n for n in _history(p) if n > root.version]
    if newer:   # root.json put back to an older version would bring back revoked keys
        raise TrustError(f"{f} is v{root.version} but {p}/roots has v{max(newer)}: root.json was rolled back")
    return root


def _history(folder: Path) -> list[int]:
    out = []
    for h in (folder / "roots").glob("*.root.json"):
        m = ROOT_NAME.fullmatch("roots/" + h.name)
        if m:
            out.append(int(m.group(1)))
    return out


def update_root(trusted: Root, data: bytes) -> Root:
    """The TUF root rotation rule: the new root must be version N+1 and signed by a threshold of
    the trusted root's root keys and by a threshold of its own root keys."""
    new, signed, sigs = parse_root(data)
    if new.version != trusted.version + 1:
        raise Refused("root", f"root v{new.version} cannot follow trusted root v{trusted.version} "
                              f"(must be v{trusted.version + 1})")
    _require_threshold(ROOT_TYPE, signed, sigs, trusted, "root", f"new root v{new.version} (by the old root)")
    _require_threshold(ROOT_TYPE, signed, sigs, new, "root", f"new root v{new.version} (by itself)")
    return new


def apply_root_updates(trusted: Root, roots) -> tuple[Root, list[bytes]]:
    """Walk a chain of newer roots (a mapping version -> bytes, read on demand) from the trusted
    one, one version at a time. Older or equal versions are not used (a bundle must still list
    their hashes in its signed manifest); a gap in the chain is refused."""
    applied = []
    while trusted.version + 1 in roots:
        trusted = update_root(trusted, roots[trusted.version + 1])
        applied.append(roots[trusted.version])
    beyond = sorted(n for n in roots if n > trusted.version)
    if beyond:
        raise Refused("root", f"root chain is incomplete: it has v{beyond[0]} but not v{trusted.version + 1}")
    return trusted, applied


def save_trust(folder: str | Path, data: bytes) -> Path:
    """Write an already-verified root into a trust folder atomically; history in roots/N.root.json."""
    root = parse_root(data)[0]
    p = Path(folder)
    for d in (p, p / "roots"):
        if not d.exists():
            d.mkdir(parents=True)
            os.chmod(d, 0o755)     # whatever the umask: load_trust refuses group/world-writable
    hist = p / "roots" / f"{root.version}.root.json"
    for target in (hist, p / ROOT_FILE):
        tmp = target.with_name(target.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    return p / ROOT_FILE


# ----------------------------------------------------------------------------- the archive

def _octal(value: int, width: int) -> bytes:
    return b"%0*o\x00" % (width - 1, value)


def check_name(name: str, limits: Limits = Limits()) -> str | None:
    """Why a member name is unsafe, or None. Rules: relative, '/'-separated, no empty / '.' /
    '..' components, a portable character set, and a bounded length."""
    if not name:
        return "empty name"
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return "absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "path traversal ('..')"
    if any(p in ("", ".") for p in parts):
        return "empty or '.' path component"
    if len(name.encode()) > limits.max_name_bytes:
        return f"name longer than {limits.max_name_bytes} bytes"
    if not all(NAME_OK.fullmatch(p) for p in parts):
        return "characters outside [A-Za-z0-9._+-/]"
    return None


def _split_name(name: str) -> tuple[bytes, bytes]:
    raw = name.encode()
    if len(raw) <= 100:
        return raw, b""
    for i in range(len(raw) - 1, 0, -1):       # longest prefix (<=155) at a '/' that leaves <=100
        if raw[i:i + 1] == b"/" and i <= 155 and len(raw) - i - 1 <= 100:
            return raw[i + 1:], raw[:i]
    raise ValueError(f"name too long for a ustar header: {name}")


def tar_header(name: str, size: int) -> bytes:
    """The one canonical header for a regular file: mode 0644, uid/gid 0, mtime 0, no owner names."""
    base, prefix = _split_name(name)
    h = bytearray(BLOCK)
    h[0:len(base)] = base
    h[100:108] = _octal(0o644, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(0, 12)
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[329:337] = _octal(0, 8)
    h[337:345] = _octal(0, 8)
    h[345:345 + len(prefix)] = prefix
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


def write_archive(out, members: list[tuple[str, object]]) -> None:
    """Write members [(name, bytes | path)] in the given order with canonical headers, each
    padded to 512 bytes, then the two zero blocks that end a tar archive."""
    for name, src in members:
        why = check_name(name)
        if why:
            raise ValueError(f"unsafe member name {name!r}: {why}")
        if isinstance(src, (bytes, bytearray)):
            out.write(tar_header(name, len(src)))
            out.write(src)
            size = len(src)
        else:
            size = os.path.getsize(src)
            out.write(tar_header(name, size))
            with open(src, "rb") as f:
                copied = 0
                while chunk := f.read(1 << 20):
                    out.write(chunk)
                    copied += len(chunk)
            if copied != size:
                raise ValueError(f"{src} changed while it was being archived")
        out.write(b"\x00" * (-size % BLOCK))
    out.write(b"\x00" * (2 * BLOCK))


@dataclass(frozen=True)
class Entry:
    name: str
    offset: int        # of the data
    size: int
    header: bytes


_TYPES = {b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device",
          b"5": "directory", b"6": "FIFO", b"7": "contiguous file", b"x": "PAX extended header",
          b"g": "PAX global header", b"L": "GNU long name", b"K": "GNU long link name",
          b"S": "GNU sparse file", b"V": "GNU volume header", b"M": "GNU multi-volume member"}


def _field(h: bytes, a: int, b: int) -> bytes:
    return h[a:b].split(b"\x00", 1)[0]


def _octal_field(raw: bytes) -> int | None:
    """Octal digits only (int() would also take '-', '_' and spaces inside)."""
    t = raw.split(b"\x00", 1)[0].strip(b" ")
    return int(t, 8) if OCTAL.fullmatch(t) else None


def scan_archive(f, file_size: int, limits: Limits = Limits()) -> list[Entry]:
    """Walk every header: refuse unsafe members first (so an attack gets its own name as the
    reason), then require every byte to be the canonical encoding."""
    f.seek(0)
    head = f.read(6)
    for magic, kind in COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise Refused("archive", f"{kind}-compressed data: bundles are uncompressed tar, so no "
                                     "entry's size can hide behind compression")
    if file_size > limits.max_bundle_bytes:
        raise Refused("archive", f"bundle is {file_size} bytes, over the {limits.max_bundle_bytes}-byte limit")
    if file_size < 3 * BLOCK or file_size % BLOCK:
        raise Refused("archive", f"not a bundle: {file_size} bytes is not a whole tar archive")
    entries: list[Entry] = []
    seen: dict[str, str] = {}
    pos = 0
    while True:
        if pos + BLOCK > file_size:
            raise Refused("archive", "archive ends without the end-of-archive blocks (truncated)")
        f.seek(pos)
        h = f.read(BLOCK)
        if h == bytes(BLOCK):
            break
        if _octal_field(h[148:156]) != sum(h[:148]) + 256 + sum(h[156:]):
            raise Refused("archive", f"corrupt tar header at byte {pos} (checksum)")
        prefix, base = _field(h, 345, 500), _field(h, 0, 100)
        try:
            name = ((prefix + b"/" + base) if prefix else base).decode("utf-8")
        except UnicodeDecodeError:
            raise Refused("unsafe-entry", f"entry at byte {pos} has a name that is not UTF-8") from None
        kind = h[156:157]
        if kind not in (b"0", b"\x00"):
            what = _TYPES.get(kind, f"unknown type {kind!r}")
            link = _field(h, 157, 257).decode("utf-8", "replace")
            to = f" -> {link}" if kind in (b"1", b"2") else ""
            raise Refused("unsafe-entry", f"entry {name!r}{to} is a {what}; bundles hold regular files only")
        why = check_name(name, limits)
        if why:
            raise Refused("unsafe-entry", f"entry {name!r}: {why}")
        folded = name.casefold()
        if folded in seen:
            raise Refused("unsafe-entry", f"duplicate entry {name!r} (also {seen[folded]!r})")
        seen[folded] = name
        if h[124] & 0x80:
            raise Refused("unsafe-entry", f"entry {name!r} uses a base-256 size (over 8 GiB)")
        size = _octal_field(h[124:136])
        if size is None:
            raise Refused("archive", f"entry {name!r} has a malformed size field")
        if size > limits.max_entry_bytes:
            raise Refused("unsafe-entry", f"entry {name!r} declares {size} bytes, over the "
                                          f"{limits.max_entry_bytes}-byte limit")
        data_end = pos + BLOCK + size
        if data_end + (-size % BLOCK) + 2 * BLOCK > file_size:
            raise Refused("unsafe-entry", f"entry {name!r} declares {size} bytes but the file ends "
                                          f"before that (oversized entry or truncated bundle)")
        entries.append(Entry(name, pos + BLOCK, size, h))
        if len(entries) > limits.max_entries:
            raise Refused("unsafe-entry", f"more than {limits.max_entries} entries")
        pos = data_end + (-size % BLOCK)
    names = set(seen)
    for e in entries:     # a file may not also be a folder of another entry
        parts = e.name.casefold().split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in names:
                raise Refused("unsafe-entry", f"entry {e.name!r} is inside another entry that is a file")
    # canonical form: every header, every padding byte, and nothing after the end blocks
    for e in entries:
        try:
            canon = tar_header(e.name, e.size)
        except ValueError:
            canon = b""
        if e.header != canon:
            raise Refused("archive", f"entry {e.name!r} has a non-canonical tar header "
                                     "(edited, or not written by edgeops)")
        pad = -e.size % BLOCK
        if pad:
            f.seek(e.offset + e.size)
            if f.read(pad) != bytes(pad):
                raise Refused("archive", f"non-zero padding after entry {e.name!r}")
    if file_size != pos + 2 * BLOCK:
        raise Refused("archive", f"{file_size - pos - 2 * BLOCK} unexpected byte(s) after the end of the archive")
    f.seek(pos + BLOCK)
    if f.read(BLOCK) != bytes(BLOCK):
        raise Refused("archive", "the end-of-archive blocks are not zero")
    return entries


def _read(f, e: Entry, cap: int, what: str) -> bytes:
    if e.size > cap:
        raise Refused("unsafe-entry", f"{what} is {e.size} bytes, over the {cap}-byte limit")
    f.seek(e.offset)
    return f.read(e.size)


# ----------------------------------------------------------------------------- the manifest

def _file_table(table, what: str, prefix_ok) -> None:
    if not isinstance(table, dict):
        raise Refused("metadata", f"manifest {what} must be an object")
    for name, info in table.items():
        why = check_name(name) or prefix_ok(name)
        if why:
            raise Refused("metadata", f"manifest {what} entry {name!r}: {why}")
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) \
                or not HEX64.fullmatch(info["sha256"]) or not isinstance(info.get("size"), int) \
                or isinstance(info.get("size"), bool) or info["size"] < 0:
            raise Refused("metadata", f"manifest {what} entry {name!r} needs a sha256 (64 lowercase hex) and a size")


def check_manifest(m) -> None:
    """Structure of a signed manifest (unknown fields are allowed and kept)."""
    if not isinstance(m, dict) or m.get("_type") != BUNDLE_TYPE:
        raise Refused("metadata", f"not an edgeops bundle manifest (type {m.get('_type') if isinstance(m, dict) else None!r})")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise Refused("metadata", f"manifest schema {m.get('schema_version')!r} is not supported (this verifier reads {SCHEMA_VERSION})")
    for k in ("name", "target"):
        if not isinstance(m.get(k), str) or not m[k]:
            raise Refused("metadata", f"manifest {k} is missing")
    semver(m.get("version"))
    c = m.get("counter")
    if not isinstance(c, int) or isinstance(c, bool) or not 1 <= c <= MAX_COUNTER:
        raise Refused("metadata", f"manifest counter {c!r} is not an integer between 1 and 2**53-1")
    if parse_time(m.get("created"), "created") > parse_time(m.get("expires"), "expires"):
        raise Refused("metadata", "manifest expires before it was created")
    files = m.get("files")
    if not files:
        raise Refused("metadata", "manifest lists no files")
    _file_table(files, "files", lambda n: None if n.startswith(PAYLOAD_DIR) else "not under payload/")
    _file_table(m.get("roots", {}), "roots", lambda n: None if ROOT_NAME.fullmatch(n) else "not roots/N.root.json")
    if not isinstance(m.get("model"), str) or m["model"] not in files:
        raise Refused("metadata", "manifest 'model' is not one of its files")
    health = m.get("health")
    if health is None:
        return
    if not isinstance(health, dict):
        raise Refused("metadata", "manifest health must be an object")
    for group in ("inputs", "expected"):
        refs = health.get(group) or {}
        if not isinstance(refs, dict):
            raise Refused("metadata", f"manifest health {group} must be an object")
        for ref in refs.values():
            if not isinstance(ref, dict) or not isinstance(ref.get("file"), str) or ref["file"] not in files:
                raise Refused("metadata", f"health {group} refer to a file the manifest does not list")


# ----------------------------------------------------------------------------- verification

@dataclass
class Installed:
    """What the device runs now (from its state.json). Counters are one sequence per publisher
    (the registry's), so a bundle of any model must carry a higher counter; versions are
    compared only within the same model name."""
    counter: int | None = None
    version: str | None = None
    name: str | None = None


@dataclass
class VerifyResult:
    path: str
    ok: bool = False
    failures: list[Failure] = field(default_factory=list)
    manifest: dict | None = None
    manifest_sha256: str | None = None      # identity of the signed content (signatures excluded)
    signed_by: list[str] = field(default_factory=list)
    root_version: int | None = None
    root_updates: list[bytes] = field(default_factory=list)   # to persist only if installed
    checked: list[str] = field(default_factory=list)          # checks that passed, in order
    extracted: str | None = None

    def require(self) -> "VerifyResult":
        if not self.ok:
            raise BundleRefused(self.failures)
        return self

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "failures": [x.to_dict() for x in self.failures],
                "signed_by": self.signed_by, "root_version": self.root_version,
                "root_updated": bool(self.root_updates), "checked": self.checked,
                "manifest_sha256": self.manifest_sha256, "manifest": self.manifest,
                "extracted": self.extracted}


class _Roots:
    """roots/N.root.json entries, read only when the chain walk asks for version N."""

    def __init__(self, f, entries: dict[int, Entry], limits: Limits):
        self.f, self.entries, self.limits = f, entries, limits

    def __contains__(self, n) -> bool:
        return n in self.entries

    def __iter__(self):
        return iter(self.entries)

    def __getitem__(self, n) -> bytes:
        e = self.entries[n]
        return _read(self.f, e, self.limits.max_root_bytes, e.name)


@contextlib.contextmanager
def _opened(path: str | Path, limits: Limits):
    """(open file, archive entries, parsed manifest.json) of a bundle file, not yet trusted."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise Refused("archive", "not a regular file")
        entries = scan_archive(f, st.st_size, limits)
        if not entries or entries[0].name != MANIFEST:
            raise Refused("archive", f"the first entry must be {MANIFEST}")
        yield f, entries, parse_canonical(_read(f, entries[0], limits.max_metadata_bytes, MANIFEST), MANIFEST)


def peek(path: str | Path, limits: Limits = Limits()) -> tuple[list[Entry], dict]:
    """The archive's entries and its manifest envelope, NOT verified: for showing a bundle and
    for preflight estimates only (space, name); every decision is taken on verify_bundle's
    result. Raises Refused when the file is not a readable bundle."""
    with _opened(path, limits) as (_, entries, env):
        pass
    if not isinstance(env, dict) or not isinstance(env.get("signed"), dict):
        raise Refused("metadata", "manifest.json has no signed part")
    return entries, env


def verify_bundle(path: str | Path, trusted: Root, *, target: str | None, installed: Installed | None,
                  now: datetime | None = None, allow_same_version: bool = False,
                  extract_to: str | Path | None = None, limits: Limits = Limits()) -> VerifyResult:
    """Every check a device makes before installing. `target` and `installed` must be passed
    (None skips that check, explicitly). Archive and signature failures stop at once (nothing
    unsigned is interpreted); after the signature, every policy failure is listed. With
    `extract_to` (a new folder in an existing one), payload files are written there while being
    hashed (one read, so the bytes checked are the bytes installed); the folder only appears
    if everything passed."""
    res = VerifyResult(str(path))
    now = now or datetime.now(timezone.utc)
    tmp = None
    try:
        with _opened(path, limits) as (f, entries, env):
            res.checked.append("archive")
            by_name = {e.name: e for e in entries}
            if not isinstance(env, dict) or set(env) != {"signed", "signatures"} or not isinstance(env["signed"], dict):
                raise Refused("metadata", "manifest.json must be {\"signed\": {...}, \"signatures\": [...]}")
            roots = {}
            for e in entries:
                if e.name.startswith(ROOTS_DIR):
                    m = ROOT_NAME.fullmatch(e.name)
                    if not m:
                        raise Refused("unsafe-entry", f"unexpected entry {e.name!r} under roots/")
                    roots[int(m.group(1))] = e
            if len(roots) > limits.max_roots:
                raise Refused("unsafe-entry", f"more than {limits.max_roots} roots")
            root, res.root_updates = apply_root_updates(trusted, _Roots(f, roots, limits))
            res.root_version = root.version
            if now >= root.expires:
                raise Refused("expired", f"trust root v{root.version} expired at {format_time(root.expires)}; "
                                         "a newer root is needed (freeze protection)")
            res.checked.append(f"trust root v{root.version}")
            signed = env["signed"]
            res.signed_by = _require_threshold(BUNDLE_TYPE, signed, env["signatures"], root, "bundle", "the manifest")
            res.checked.append(f"signatures {len(res.signed_by)}/{root.roles['bundle'].threshold}")
            check_manifest(signed)
            res.manifest = signed
            res.manifest_sha256 = manifest_sha256(signed)
            _policy(res, signed, now, target, installed, allow_same_version)
            # every entry but manifest.json is listed with its hash: payload in "files", the
            # root chain in "roots" (also the versions this device did not need to apply)
            listed = {**signed["files"], **signed.get("roots", {})}
            for n in sorted(set(by_name) - set(listed) - {MANIFEST}):
                res.failures.append(Failure("files", f"{n} is in the archive but not in the signed manifest"))
            for n in sorted(set(listed) - set(by_name)):
                res.failures.append(Failure("files", f"{n} is in the manifest but missing from the archive"))
            rest = [e.name for e in entries[1:]]
            if not res.failures and rest != sorted(rest):   # one byte order per bundle
                res.failures.append(Failure("archive", "entries after manifest.json are not in sorted order"))
            if res.failures:
                return res
            if extract_to is not None:
                dest = Path(extract_to)
                if dest.exists():
                    raise Refused("files", f"extraction folder {dest} already exists")
                if not dest.parent.is_dir():
                    raise Refused("files", f"the parent of the extraction folder {dest} does not exist")
                tmp = dest.with_name(dest.name + ".partial")
                if tmp.exists():
                    raise Refused("files", f"{tmp} exists (an interrupted extraction?); remove it first")
                tmp.mkdir()
            for n in sorted(listed):
                want, e = listed[n], by_name[n]
                if e.size != want["size"]:
                    res.failures.append(Failure("files", f"{n} is {e.size} bytes, the manifest says {want['size']}"))
                    continue
                out = None
                if tmp is not None and n in signed["files"]:
                    target_path = tmp.joinpath(*n[len(PAYLOAD_DIR):].split("/"))
                    target_path.parent.mkdir(parents=True, exist_ok=True)
                    out = open(target_path, "xb")
                digest = _hash_entry(f, e, out)
                if digest != want["sha256"]:
                    res.failures.append(Failure("files", f"{n} sha256 {digest[:16]}… does not match the manifest "
                                                         f"{want['sha256'][:16]}… (tampered, or from another bundle)"))
            if not res.failures:
                res.checked.append(f"{len(listed)} file hashes")
                if tmp is not None:
                    os.replace(tmp, extract_to)
                    tmp = None
                    res.extracted = str(extract_to)
                res.ok = True
            return res
    except Refused as exc:
        res.failures.append(exc.failure)
    except OSError as exc:
        res.failures.append(Failure("archive", f"cannot read the bundle: {exc}"))
    except Exception as exc:  # fail closed: a verifier that crashes must still say no
        res.failures.append(Failure("malformed", f"malformed bundle ({type(exc).__name__}: {exc})"))
    finally:
        if tmp is not None and Path(tmp).exists():
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    res.ok = False
    return res


def _hash_entry(f, e: Entry, out=None) -> str:
    h = hashlib.sha256()
    f.seek(e.offset)
    left = e.size
    try:
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
            h.update(chunk)
            if out is not None:
                out.write(chunk)
    finally:
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
            out.close()
    return h.hexdigest()


def _policy(res: VerifyResult, m: dict, now: datetime, target: str | None,
            installed: Installed | None, allow_same_version: bool) -> None:
    expires = parse_time(m["expires"], "expires")
    if now >= expires:
        res.failures.append(Failure("expired", f"bundle expired at {m['expires']} (now {format_time(now)}): "
                                               "stale metadata is refused (freeze protection); rebuild or re-sign it"))
    elif parse_time(m["created"], "created") > now + timedelta(days=1):
        res.failures.append(Failure("metadata", f"bundle was created in the future ({m['created']}); "
                                                "check the clock on this machine"))
    else:
        res.checked.append("expiry")
    if target is not None:
        if m["target"] != target:
            res.failures.append(Failure("target", f"bundle is for target {m['target']!r}, this device is {target!r}"))
        else:
            res.checked.append("target")
    if installed is None:
        return
    bad = False
    if installed.counter is not None and m["counter"] <= installed.counter:
        res.failures.append(Failure("rollback", f"bundle counter {m['counter']} is not newer than the installed "
                                                f"{installed.counter} (rollback protection)"))
        bad = True
    same_model = installed.name is None or installed.name == m["name"]
    if installed.version is not None and same_model:
        have, new = semver(installed.version, "installed version"), semver(m["version"])
        if new < have or (new == have and not allow_same_version):
            res.failures.append(Failure("rollback", f"bundle version {m['version']} is not newer than the "
                                                    f"installed {installed.version} (rollback protection)"))
            bad = True
    if not bad:
        res.checked.append("newer than installed" if same_model else
                           f"newer than installed (model changes {installed.name} -> {m['name']})")
