"""Signing keys: Ed25519 key pairs in $EDGEOPS_HOME/keys (or any folder).

`NAME.key` is the private key (PKCS#8 PEM, optionally encrypted with a passphrase), created
with mode 0600 and never overwritten. `NAME.pub` is JSON {name, keytype, public (hex), keyid};
the key id is the sha256 of the raw 32-byte public key, computed by the verifier, never read
from the file. Not covered: hardware keys / KMS (a signer only needs `sign(message)`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..agent.verifier import key_id
from ..errors import EdgeopsError, UsageError
from ..paths import home

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class KeyFileError(EdgeopsError):
    """A key that is missing, unreadable, or locked with a passphrase that was not given."""


def keys_dir() -> Path:
    return home() / "keys"


@dataclass(frozen=True)
class PublicKey:
    name: str
    public: bytes

    @property
    def keyid(self) -> str:
        return key_id(self.public)

    def to_root_entry(self) -> dict:
        return {"keytype": "ed25519", "public": self.public.hex(), "name": self.name}

    def to_dict(self) -> dict:
        return {"name": self.name, "keytype": "ed25519", "public": self.public.hex(), "keyid": self.keyid}


@dataclass(frozen=True)
class SigningKey:
    name: str
    private: Ed25519PrivateKey

    @property
    def public_key(self) -> PublicKey:
        raw = self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return PublicKey(self.name, raw)

    @property
    def keyid(self) -> str:
        return self.public_key.keyid

    def sign(self, message: bytes) -> dict:
        return {"keyid": self.keyid, "sig": self.private.sign(message).hex()}


def generate(name: str, folder: Path | None = None, passphrase: str | None = None) -> PublicKey:
    if not NAME.fullmatch(name):
        raise UsageError(f"key name {name!r} is not allowed", hint="letters, digits, '.', '_' and '-'")
    d = folder or keys_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    priv_path, pub_path = d / f"{name}.key", d / f"{name}.pub"
    if os.path.lexists(priv_path) or os.path.lexists(pub_path):   # also dangling symlinks
        raise UsageError(f"key {name!r} already exists in {d}", hint="pick another name; keys are never overwritten")
    key = Ed25519PrivateKey.generate()
    enc = (serialization.BestAvailableEncryption(passphrase.encode()) if passphrase
           else serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    # O_EXCL + 0600 at creation: the private key is never readable by others, not even briefly
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = SigningKey(name, key).public_key
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(pub.to_dict(), indent=2) + "\n")
    return pub


def _resolve(ref: str | Path, suffix: str, folder: Path | None) -> Path:
    p = Path(ref)
    if p.is_file():
        return p
    cand = (folder or keys_dir()) / f"{ref}{suffix}"
    if cand.is_file():
        return cand
    raise KeyFileError(f"no key {str(ref)!r} (looked for {p} and {cand})",
                    hint="edgeops keys list; edgeops keys generate NAME")


def load_signing(ref: str | Path, passphrase: str | None = None, folder: Path | None = None) -> SigningKey:
    """A private key by name (in the keys folder) or path. Refuses group/world-readable files."""
    path = _resolve(ref, ".key", folder)
    if path.suffix == ".pub":
        raise KeyFileError(f"{path} is a public key; signing needs the private key",
                           hint=f"pass {path.with_suffix('.key')} or the key's name")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(f"{path} is readable by other users (mode {mode:o})", hint=f"chmod 600 {path}")
    data = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, passphrase.encode() if passphrase else None)
    except TypeError:
        raise KeyFileError(f"{path} is encrypted: a passphrase is needed",
                        hint="set EDGEOPS_KEY_PASSPHRASE or answer the prompt") from None
    except ValueError as exc:
        msg = "wrong passphrase" if b"ENCRYPTED" in data else "not an Ed25519 private key (PEM)"
        raise KeyFileError(f"{path}: {msg}", hint=str(exc).splitlines()[0][:120] if msg != "wrong passphrase" else None) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key")
    name = path.name.removesuffix(".key")
    return SigningKey(name, key)


def is_encrypted(ref: str | Path, folder: Path | None = None) -> bool:
    return b"ENCRYPTED" in _resolve(ref, ".key", folder).read_bytes()


def load_public(ref: str | Path, folder: Path | None = None) -> PublicKey:
    """A public key by name or path: our .pub JSON, or the public half of a private key file."""
    try:
        path = _resolve(ref, ".pub", folder)
    except KeyFileError:
        path = _resolve(ref, ".key", folder)
    if path.suffix == ".key":
        return load_signing(path).public_key
    try:
        d = json.loads(path.read_text())
        raw = bytes.fromhex(d["public"])
        Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, KeyError, TypeError):
        raise KeyFileError(f"{path} is not an edgeops public key file") from None
    pub = PublicKey(str(d.get("name") or path.stem), raw)
    priv = path.with_suffix(".key")
    if priv.is_file() and not is_encrypted(priv) and load_signing(priv).keyid != pub.keyid:
        # a swapped .pub would put someone else's key into a trust root
        raise KeyFileError(f"{path} does not match {priv}", hint="regenerate the .pub from the private key")
    return pub


def list_keys(folder: Path | None = None) -> list[dict]:
    d = folder or keys_dir()
    out = []
    for pub in sorted(d.glob("*.pub")) if d.is_dir() else []:
        try:
            k = load_public(pub)
        except KeyFileError:
            continue
        priv = pub.with_suffix(".key")
        row = k.to_dict()
        row.update(private=priv.is_file(), encrypted=priv.is_file() and b"ENCRYPTED" in priv.read_bytes(),
                   mode=f"{priv.stat().st_mode & 0o777:o}" if priv.is_file() else None, path=str(pub))
        out.append(row)
    return out
