"""Trust roots on the publishing side: create one, rotate keys, apply a rotation, show one.

A trust folder holds `root.json` (the root in force) and `roots/N.root.json` (every version, so
bundles can carry the chain to devices that still trust an older root). The rules a root must
pass are in edgeops.agent.verifier (the device runs the same code); every root written here
is first checked with them, so this module cannot produce a root a device would refuse.
Not covered: online key services; threshold signing across machines (sign with several local
keys instead).
"""

from __future__ import annotations

import os
import stat
from datetime import datetime, timezone
from pathlib import Path

from ..agent import verifier as v
from ..errors import EXIT_VERIFY, EdgeopsError, UsageError
from ..paths import home
from .keys import PublicKey, SigningKey


class TrustRefused(EdgeopsError):
    """A root (or rotation) that the verifier refuses."""

    exit_code = EXIT_VERIFY


def default_dir() -> Path:
    return home() / "trust"


def _signed(version: int, bundle_keys: list[PublicKey], threshold: int, root_keys: list[PublicKey],
            root_threshold: int, expires: datetime) -> dict:
    keys = {k.keyid: k.to_root_entry() for k in [*bundle_keys, *root_keys]}
    for role, ks, t in (("bundle", bundle_keys, threshold), ("root", root_keys, root_threshold)):
        ids = {k.keyid for k in ks}
        if not 1 <= t <= len(ids):
            raise UsageError(f"{role} threshold {t} needs between 1 and {len(ids)} distinct {role} keys")
    return {"_type": v.ROOT_TYPE, "schema_version": v.SCHEMA_VERSION, "version": version,
            "expires": v.format_time(expires), "keys": keys,
            "roles": {"bundle": {"keyids": sorted({k.keyid for k in bundle_keys}), "threshold": threshold},
                      "root": {"keyids": sorted({k.keyid for k in root_keys}), "threshold": root_threshold}}}


def sign_envelope(kind: str, signed: dict, signers: list[SigningKey]) -> bytes:
    """Canonical {"signed", "signatures"} bytes, one signature per distinct key."""
    msg = v.signing_message(kind, signed)
    sigs, seen = [], set()
    for k in signers:
        if k.keyid not in seen:
            seen.add(k.keyid)
            sigs.append(k.sign(msg))
    return v.canonical({"signatures": sorted(sigs, key=lambda s: s["keyid"]), "signed": signed})


def _check_expiry(expires: datetime) -> None:
    if expires <= datetime.now(timezone.utc):
        raise UsageError(f"expiry {v.format_time(expires)} is in the past")


def init(folder: Path, root_signers: list[SigningKey], bundle_keys: list[PublicKey], threshold: int,
         root_threshold: int, expires: datetime) -> v.Root:
    """Create version 1 of a trust root. Refuses to replace an existing one (use rotate)."""
    if (folder / v.ROOT_FILE).exists():
        raise UsageError(f"{folder} already has a trust root", hint="edgeops trust rotate changes keys")
    _check_expiry(expires)
    signed = _signed(1, bundle_keys, threshold, [k.public_key for k in root_signers], root_threshold, expires)
    data = sign_envelope(v.ROOT_TYPE, signed, root_signers)
    try:
        root = v.load_root(data)
    except v.TrustError as exc:
        raise TrustRefused(str(exc)) from None
    v.save_trust(folder, data)
    return root


def load(folder: Path) -> v.Root:
    try:
        return v.load_trust(folder)
    except v.TrustError as exc:
        exists = os.path.lexists(Path(folder) / v.ROOT_FILE)
        hint = (f"restore {folder}/root.json from {folder}/roots/ or a backup; never re-init a folder devices trust"
                if exists else f"edgeops trust init {folder} --key NAME")
        raise UsageError(str(exc), hint=hint) from None


def read_root_file(path: Path) -> bytes:
    """A root file from the user: a regular file of at most the verifier's root size limit
    (a FIFO or /dev/zero must not hang or fill memory)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{path}: not a regular file (a trust root file is expected)")
    with os.fdopen(fd, "rb") as f:
        cap = v.Limits().max_root_bytes
        data = f.read(cap + 1)
    if len(data) > cap:
        raise UsageError(f"{path}: larger than {cap} bytes; not a trust root")
    return data


def verify_history(folder: Path, current: v.Root) -> tuple[dict[int, bytes], v.Root]:
    """The stored chain roots/1..N must walk, with the device's own rules, from its oldest
    root to exactly the root in force: bundles carry it to devices still on old roots.
    Returns the chain (version -> bytes) and its oldest root."""
    stored = chain(folder)
    if not stored:
        raise UsageError(f"{folder}/roots/ has no root history; devices on older roots could not follow")
    try:
        start = v.load_root(stored[min(stored)], check_expiry=False)
        end, _ = v.apply_root_updates(start, {n: d for n, d in stored.items() if n > start.version})
    except (v.TrustError, v.Refused) as exc:
        raise UsageError(f"{folder}/roots/ history is broken: {exc}",
                         hint=f"restore {folder}/roots/ from a backup") from None
    if end.version != current.version or end.data != current.data:
        raise UsageError(f"{folder}/roots/ history ends at v{end.version}, which is not the root in force "
                         f"(v{current.version})", hint=f"restore {folder}/roots/ from a backup")
    return stored, start


def rotate(folder: Path, old_signers: list[SigningKey], root_signers: list[SigningKey],
           bundle_keys: list[PublicKey], threshold: int, root_threshold: int, expires: datetime) -> v.Root:
    """Version N+1, signed by the old root keys given and by the new root keys; checked with the
    device's rule (update_root) before anything is written."""
    trusted = load(folder)
    _check_expiry(expires)
    signed = _signed(trusted.version + 1, bundle_keys, threshold, [k.public_key for k in root_signers],
                     root_threshold, expires)
    data = sign_envelope(v.ROOT_TYPE, signed, [*old_signers, *root_signers])
    return apply(folder, data, trusted)


def apply(folder: Path, data: bytes, trusted: v.Root | None = None) -> v.Root:
    """Accept a new root into a trust folder only if the trusted root's keys signed it."""
    trusted = trusted or load(folder)
    try:
        new = v.update_root(trusted, data)
    except v.Refused as exc:
        raise TrustRefused(f"root refused: {exc}") from None
    if datetime.now(timezone.utc) >= new.expires:   # devices would refuse every bundle under it
        raise TrustRefused(f"root refused: v{new.version} expired at {v.format_time(new.expires)}")
    v.save_trust(folder, data)
    return new


def chain(folder: Path) -> dict[int, bytes]:
    """Every stored root version (for embedding in bundles)."""
    out = {}
    for p in sorted((folder / "roots").glob("*.root.json")):
        stem = p.name.split(".", 1)[0]
        if stem.isdigit():
            out[int(stem)] = p.read_bytes()
    return out


def describe(root: v.Root) -> dict:
    return {"version": root.version, "expires": v.format_time(root.expires),
            "roles": {r: {"threshold": role.threshold,
                          "keys": [{"keyid": k, "name": root.names.get(k, "")} for k in role.keyids]}
                      for r, role in root.roles.items()}}
