"""Content-addressed blob store, addressed by URL: one file per sha256.

`file://<root>` is the only scheme implemented: blobs live at `<root>/sha256/ab/abcdef...`,
written to a temporary file in that same folder, fsynced, made read-only (0444) and moved
into place with os.replace, so two processes storing the same content race benignly and a
reader never sees a partial blob. The same content is stored once, whatever its name.

Not covered: which blobs are still referenced (the metadata store decides what to delete),
and object stores (an `s3://` store would implement the same five methods).
This module also holds RegistryError, because it is the bottom layer of the registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from .. import paths
from ..errors import EdgeopsError

CHUNK = 1 << 20


class RegistryError(EdgeopsError):
    """Bad registry input or state: unknown name or version, a conflict, a missing or
    corrupted blob, an unsupported storage URL. Exit code 2."""


def url_path(url: str, scheme: str, what: str, supported: str) -> Path:
    """The absolute local path of `scheme:///abs/path` (extra leading slashes are folded)."""
    u = urlparse(url)
    if u.scheme != scheme:
        raise RegistryError(f"unsupported {what} URL {url!r}: only {supported} is implemented",
                            hint=f"use {scheme}:///absolute/path")
    if u.netloc or not u.path.startswith("/"):
        raise RegistryError(f"bad {what} URL {url!r}: the path must be absolute",
                            hint=f"use {scheme}:///absolute/path")
    return Path("/" + unquote(u.path).lstrip("/"))


def copy_checked(src, dst: Path, sha: str, mode: int, durable: bool = False) -> tuple[str, int]:
    """Copy the open binary file `src` to `dst` through a temp file beside it, hashing on the
    way; `dst` appears (atomically, with `mode`) only if the sha256 is `sha`. Returns the
    digest seen and the bytes copied; the caller words the error when they differ."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dst.parent)
    try:
        h, n = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                h.update(chunk)
                out.write(chunk)
                n += len(chunk)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        if h.hexdigest() == sha:
            os.chmod(tmp, mode)
            os.replace(tmp, dst)
        return h.hexdigest(), n
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)    # still there only after a mismatch or an error


class FileBlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = self.root.as_uri()

    def path(self, sha: str) -> Path:
        return self.root / "sha256" / sha[:2] / sha

    def url_of(self, sha: str) -> str:
        return self.path(sha).as_uri()

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def put(self, src: Path, sha: str) -> int:
        """Store `src` under its (already computed) sha256; bytes written, 0 if present.
        The content is hashed again while copying, so a file changed mid-add is refused."""
        dst = self.path(sha)
        if dst.is_file():
            return 0
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as f:
            digest, n = copy_checked(f, dst, sha, 0o444, durable=True)
        if digest != sha:
            raise RegistryError(f"{src} changed while it was being stored",
                                hint="add it again once nothing writes to it")
        dfd = os.open(dst.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename itself survives a crash
        finally:
            os.close(dfd)
        return n

    def open(self, sha: str):
        try:
            return open(self.path(sha), "rb")
        except FileNotFoundError:
            raise RegistryError(f"blob {sha[:12]}... is missing from {self.url}") from None

    def delete(self, sha: str) -> int:
        """Remove a blob; its size, or 0 when it was already gone."""
        p = self.path(sha)
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            return 0
        return size


def default_url() -> str:
    return os.environ.get("EDGEOPS_BLOBS_URL") or (paths.home() / "blobs").absolute().as_uri()


def open_blob_store(url: str | None = None) -> FileBlobStore:
    """The blob store at `url` (default: $EDGEOPS_BLOBS_URL, else file://$EDGEOPS_HOME/blobs)."""
    return FileBlobStore(url_path(url or default_url(), "file", "blob store", "file://"))
