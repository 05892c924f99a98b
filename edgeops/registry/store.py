"""The model registry's metadata store: versions, files, lineage, metrics, stages, history.

SQLite in WAL mode, addressed by URL (`sqlite:///abs/path/registry.db`; default
$EDGEOPS_REGISTRY_URL, else $EDGEOPS_HOME/registry.db). Every write runs in BEGIN IMMEDIATE
with a 30 s busy timeout, so concurrent edgeops processes queue instead of failing, and
version numbers are allocated inside that transaction (unique and contiguous).

Identity: a version's sha256 is the main file's sha256 for a single-file model; for a
multi-file model (a directory, or ONNX with external data) it is the sha256 of the canonical
listing "relpath\\0sha256\\0size\\n" over its files sorted by relative path (the relative paths
include the model's folder or file name, since an ONNX graph names its external files).
Lineage links use `link_sha256` as well: the digest the rest of edgeops records as a lineage
source (formats.base.sha256_path: the main file, or the directory digest).

Removing a version deletes blobs no live version references and keeps the row as a tombstone
(stage "removed") with its metadata and history. Every mutation writes an `events` row.

Not covered: printing (the CLI), the blob bytes (blobs.py), other databases (a `postgresql://`
store would keep this API).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath

from .. import __version__, paths
from ..db import Database
from ..agent.verifier import SEMVER
from ..lineage import package_versions, utc_now
from . import lineage as lin
from .blobs import CHUNK, FileBlobStore, RegistryError, copy_checked, open_blob_store, url_path

SCHEMA_VERSION = 1
STAGES = ("dev", "staging", "production", "archived")
REMOVED = "removed"
PROTECTED = ("staging", "production")   # retention never touches these
BENCH_SCHEMA = "edgeops.bench/1"
COUNTER_KEY = "*"    # bundle counters: one registry-wide sequence (see next_bundle_counter)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_KIND_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")

_SCHEMA = """
CREATE TABLE versions (
  id INTEGER PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL,
  major INTEGER NOT NULL, minor INTEGER NOT NULL, patch INTEGER NOT NULL,
  stage TEXT NOT NULL, format TEXT NOT NULL, sha256 TEXT NOT NULL, link_sha256 TEXT NOT NULL,
  size INTEGER NOT NULL, main_file TEXT NOT NULL, lineage TEXT, source_sha256 TEXT,
  metrics TEXT NOT NULL, tags TEXT NOT NULL, created TEXT NOT NULL, creator TEXT NOT NULL,
  code_version TEXT, environment TEXT NOT NULL, data TEXT NOT NULL, removed_at TEXT,
  UNIQUE (name, version));
CREATE INDEX versions_sha ON versions (sha256);
CREATE INDEX versions_link ON versions (link_sha256);
CREATE INDEX versions_source ON versions (source_sha256);
CREATE TABLE blobs (sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, url TEXT NOT NULL,
  created TEXT NOT NULL);
CREATE TABLE files (version_id INTEGER NOT NULL REFERENCES versions (id), path TEXT NOT NULL,
  sha256 TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (version_id, path));
CREATE INDEX files_sha ON files (sha256);
CREATE TABLE attachments (id INTEGER PRIMARY KEY,
  version_id INTEGER NOT NULL REFERENCES versions (id), kind TEXT NOT NULL, key TEXT,
  data TEXT NOT NULL, created TEXT NOT NULL, creator TEXT NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY, version_id INTEGER REFERENCES versions (id),
  action TEXT NOT NULL, actor TEXT NOT NULL, at TEXT NOT NULL, details TEXT NOT NULL);
CREATE TABLE bundle_counters (name TEXT PRIMARY KEY, counter INTEGER NOT NULL);
CREATE TABLE bundles (id INTEGER PRIMARY KEY,
  version_id INTEGER NOT NULL REFERENCES versions (id), target TEXT NOT NULL,
  counter INTEGER NOT NULL, sha256 TEXT NOT NULL, path TEXT NOT NULL, expires TEXT,
  keyids TEXT NOT NULL, created TEXT NOT NULL, creator TEXT NOT NULL)
"""


# ----------------------------------------------------------------------------- records

def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise RegistryError(f"bad model name {name!r}",
                            hint="use letters, digits, '.', '_' or '-' (at most 128, no spaces)")
    return name


def semver(version: str) -> tuple[int, int, int]:
    # the device verifier's own pattern: a version it would refuse cannot be registered
    m = SEMVER.fullmatch(version) if isinstance(version, str) else None
    if not m:
        raise RegistryError(f"bad version {version!r}: use X.Y.Z (non-negative integers), "
                            "or 'auto'")
    return int(m[1]), int(m[2]), int(m[3])


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'digits:1.0.0' -> ('digits', '1.0.0'); 'digits' or 'digits:latest' -> ('digits', None)."""
    name, sep, version = str(ref).partition(":")
    check_name(name)
    if not sep or version == "latest":
        return name, None
    semver(version)
    return name, version


@dataclass(frozen=True)
class VersionRecord:
    name: str
    version: str
    stage: str
    format: str
    sha256: str
    size: int
    main_file: str
    files: dict            # relpath -> {"sha256": ..., "size": ...}
    lineage: dict | None
    metrics: dict
    tags: list
    created: str
    creator: str
    code_version: dict | None
    environment: dict
    data: list
    removed_at: str | None = None

    def __post_init__(self):
        check_name(self.name)
        semver(self.version)
        if self.stage not in STAGES + (REMOVED,):
            raise RegistryError(f"bad stage {self.stage!r}")

    @property
    def removed(self) -> bool:
        return self.removed_at is not None

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict:
        return {**asdict(self), "ref": self.ref, "removed": self.removed}

    @classmethod
    def from_dict(cls, d: dict) -> "VersionRecord":
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


@dataclass(frozen=True)
class AddResult:
    record: VersionRecord
    created: bool

    def to_dict(self) -> dict:
        return {**self.record.to_dict(), "created": self.created}


@dataclass
class RemoveResult:
    removed: list = field(default_factory=list)    # refs that became tombstones
    kept: list = field(default_factory=list)       # refs retention left alone (staging/production)
    freed_bytes: int = 0
    blobs_deleted: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- helpers

def _actor() -> str:
    try:
        return os.environ.get("EDGEOPS_USER") or getpass.getuser()
    except Exception:  # no login name in this environment (e.g. a container uid)
        return "unknown"


def _sha_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _collect(path: Path, fmt: str) -> dict[str, tuple[Path, str, int]]:
    """relpath -> (file, sha256, size) for every file of the model, sorted."""
    if path.is_dir():
        items = [(f"{path.name}/{f.relative_to(path).as_posix()}", f)
                 for f in path.rglob("*") if f.is_file()]
    else:
        items = [(path.name, path)]
        if fmt == "onnx":
            from ..formats.onnx import external_files

            for loc in external_files(path):
                rel = PurePosixPath(Path(loc).as_posix())
                if rel.is_absolute() or ".." in rel.parts:
                    raise RegistryError(f"{path}: external data {loc!r} lies outside the "
                                        "model's folder", hint="move it beside the model")
                items.append((str(rel), path.parent / loc))
    if not items:
        raise RegistryError(f"{path}: the folder holds no files")
    return {rel: (f, _sha_file(f), f.stat().st_size) for rel, f in sorted(items)}


def listing_sha256(files: dict) -> str:
    """Identity of a multi-file model: sha256 of "relpath\\0sha256\\0size\\n", sorted."""
    text = "".join(f"{rel}\0{v['sha256']}\0{v['size']}\n" for rel, v in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _git(path: Path) -> dict | None:
    d = path if path.is_dir() else path.parent
    try:
        r = subprocess.run(["git", "-C", str(d), "rev-parse", "HEAD", "--show-toplevel"],
                           capture_output=True, text=True, timeout=5)
        if r.returncode != 0:
            return None
        sha, top = r.stdout.split()[:2]
        st = subprocess.run(["git", "-C", top, "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, timeout=10)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    return {"git_sha": sha, "dirty": bool(st.stdout.strip()) if st.returncode == 0 else None,
            "repo": top}


def _sidecar(path: Path, link_sha: str) -> dict | None:
    """The convert report written beside the model, if it describes this very file."""
    from ..convert import REPORT_SUFFIX

    try:
        rep = json.loads(path.with_name(path.name + REPORT_SUFFIX).read_text())
    except (OSError, ValueError):
        return None
    return rep if isinstance(rep, dict) and rep.get("output_sha256") == link_sha else None


def _metrics(metrics: dict | None) -> dict:
    out = {}
    for k, v in (metrics or {}).items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise RegistryError(f"metric {k}={v!r} is not a number") from None
        if not k or not math.isfinite(out[str(k)]):
            raise RegistryError(f"metric {k}={v!r}: need a name and a finite number")
    return out


def _tags(tags) -> list:
    out = []
    for t in tags or ():
        if not isinstance(t, str) or not t or len(t) > 128 or any(c.isspace() for c in t):
            raise RegistryError(f"bad tag {t!r}: no spaces, at most 128 characters")
        if t not in out:
            out.append(t)
    return out


def _data(data) -> list:
    from ..formats.base import path_size, sha256_path

    out = []
    for d in data or ():
        p = Path(d)
        if not p.exists():
            raise RegistryError(f"data {p}: no such file or directory")
        out.append({"name": p.name, "sha256": sha256_path(p), "size": path_size(p)})
    return out


def bench_key(report: dict) -> str:
    """Where a bench report ran: the device's name, the predicted target's, else 'host'."""
    for d in (report.get("device"), report.get("target"),
              (report.get("prediction") or {}).get("target")):
        if isinstance(d, dict) and d.get("name"):
            return str(d["name"])
        if isinstance(d, str) and d:
            return d
    return "host"


def bench_latency(report: dict) -> dict:
    """{"p50 ms": ..., "p99 ms": ...} measured, or {"p50 ms (predicted)": ...}."""
    m = report.get("measurement")
    if isinstance(m, dict) and isinstance(m.get("latency_ms"), dict):
        lat = m["latency_ms"]
        return {f"{k} ms": lat[k] for k in ("p50", "p99") if lat.get(k) is not None}
    p = report.get("prediction")
    if isinstance(p, dict):
        stat = p.get("statistic", "p50")
        if p.get(f"{stat}_ms") is not None:
            return {f"{stat} ms (predicted)": p[f"{stat}_ms"]}
    return {}


def _json(v) -> str:
    return json.dumps(v, sort_keys=True, default=str)


# ----------------------------------------------------------------------------- registry

def default_url() -> str:
    return (os.environ.get("EDGEOPS_REGISTRY_URL")
            or "sqlite://" + (paths.home() / "registry.db").absolute().as_posix())


def open_registry(url: str | None = None, blobs_url: str | None = None) -> "Registry":
    """The registry at `url` (default $EDGEOPS_REGISTRY_URL, else $EDGEOPS_HOME/registry.db)
    with its blob store (default $EDGEOPS_BLOBS_URL, else $EDGEOPS_HOME/blobs)."""
    url = url or default_url()
    return Registry(url_path(url, "sqlite", "registry", "sqlite://"), open_blob_store(blobs_url),
                    url)


class Registry:
    def __init__(self, db_path: Path, blobs: FileBlobStore, url: str | None = None):
        self.url = url or "sqlite://" + Path(db_path).absolute().as_posix()
        self.blobs = blobs
        self.store = Database(db_path, _SCHEMA, SCHEMA_VERSION, what="registry", url=self.url, error=RegistryError)
        self.db = self.store.db

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _tx(self):
        """A write transaction (the database layer's BEGIN IMMEDIATE)."""
        return self.store.tx()

    def _event(self, db, vid: int | None, action: str, details: dict) -> None:
        db.execute("INSERT INTO events (version_id, action, actor, at, details) "
                   "VALUES (?, ?, ?, ?, ?)", (vid, action, _actor(), utc_now(), _json(details)))

    # -- reading --------------------------------------------------------------------

    def _record(self, row) -> VersionRecord:
        files = {r["path"]: {"sha256": r["sha256"], "size": r["size"]} for r in self.db.execute(
            "SELECT path, sha256, size FROM files WHERE version_id = ? ORDER BY path",
            (row["id"],))}
        j = {k: json.loads(row[k]) if row[k] is not None else None
             for k in ("lineage", "metrics", "tags", "code_version", "environment", "data")}
        return VersionRecord(
            name=row["name"], version=row["version"], stage=row["stage"], format=row["format"],
            sha256=row["sha256"], size=row["size"], main_file=row["main_file"], files=files,
            created=row["created"], creator=row["creator"], removed_at=row["removed_at"], **j)

    def _row(self, name: str, version: str | None = None):
        check_name(name)
        if version in (None, "latest"):
            row = self.db.execute(
                "SELECT * FROM versions WHERE name = ? AND removed_at IS NULL "
                "ORDER BY major DESC, minor DESC, patch DESC LIMIT 1", (name,)).fetchone()
        else:
            semver(version)
            row = self.db.execute("SELECT * FROM versions WHERE name = ? AND version = ?",
                                  (name, version)).fetchone()
        if row is not None:
            return row
        have = [r[0] for r in self.db.execute(
            "SELECT version FROM versions WHERE name = ? AND removed_at IS NULL "
            "ORDER BY major, minor, patch", (name,))]
        if have:
            raise RegistryError(f"{name} has no version {version} (versions: {', '.join(have)})")
        if self.db.execute("SELECT 1 FROM versions WHERE name = ?", (name,)).fetchone():
            raise RegistryError(f"every version of {name} was removed",
                                hint=f"name one explicitly to see its tombstone: {name}:X.Y.Z")
        names = [r[0] for r in self.db.execute("SELECT DISTINCT name FROM versions ORDER BY 1")]
        raise RegistryError(f"no model named {name!r} in the registry (models: "
                            f"{', '.join(names) or 'none yet'})",
                            hint="add one with `edgeops registry add MODEL --name NAME`")

    def get(self, name: str, version: str | None = None) -> VersionRecord:
        """A version (None or 'latest': the newest live one); RegistryError if missing."""
        return self._record(self._row(name, version))

    def versions(self, name: str | None = None, include_removed: bool = False) -> list:
        """Versions sorted by name, then version (oldest first)."""
        sql, args = "SELECT * FROM versions WHERE 1", []
        if name is not None:
            sql, args = sql + " AND name = ?", [check_name(name)]
        if not include_removed:
            sql += " AND removed_at IS NULL"
        rows = self.db.execute(sql + " ORDER BY name, major, minor, patch", args).fetchall()
        return [self._record(r) for r in rows]

    def events(self, name: str, version: str | None = None) -> list[dict]:
        """History, oldest first: {ref, action, actor, at, details}."""
        sql = ("SELECT v.name, v.version, e.* FROM events e JOIN versions v ON v.id = e.version_id "
               "WHERE v.name = ?")
        args = [check_name(name)]
        if version is not None:
            sql, args = sql + " AND v.version = ?", args + [version]
        return [{"ref": f"{r['name']}:{r['version']}", "action": r["action"], "actor": r["actor"],
                 "at": r["at"], "details": json.loads(r["details"])}
                for r in self.db.execute(sql + " ORDER BY e.id", args)]

    def attachments(self, name: str, version: str | None, kind: str | None = None) -> list[dict]:
        vid = self._row(name, version)["id"]
        sql, args = "SELECT * FROM attachments WHERE version_id = ?", [vid]
        if kind is not None:
            sql, args = sql + " AND kind = ?", args + [kind]
        return [{"id": r["id"], "kind": r["kind"], "key": r["key"], "created": r["created"],
                 "creator": r["creator"], "data": json.loads(r["data"])}
                for r in self.db.execute(sql + " ORDER BY id", args)]

    def _refs(self, sql: str, args) -> list[dict]:
        return [{"ref": f"{r['name']}:{r['version']}", "stage": r["stage"],
                 "removed": r["removed_at"] is not None}
                for r in self.db.execute(f"SELECT name, version, stage, removed_at FROM versions "
                                         f"WHERE {sql} ORDER BY name, major, minor, patch", args)]

    def show(self, name: str, version: str | None = None) -> dict:
        """Everything `registry show` prints: the record, its lineage steps linked to registry
        versions, upstream and downstream versions, bundles, attachments and history."""
        row = self._row(name, version)
        rec = self._record(row)
        steps = lin.chain(rec.lineage)
        for s in steps:
            sha = s["source"].get("sha256")
            s["registry"] = [r["ref"] for r in self._refs(
                "(sha256 = ? OR link_sha256 = ?) AND id != ?", (sha, sha, row["id"]))] if sha else []
        src = lin.source_sha256(rec.lineage)
        return {
            "record": rec.to_dict(),
            "lineage_steps": steps,
            "upstream": self._refs("(sha256 = ? OR link_sha256 = ?) AND id != ?",
                                   (src, src, row["id"])) if src else [],
            "downstream": self._refs("source_sha256 IN (?, ?) AND id != ?",
                                     (rec.sha256, row["link_sha256"], row["id"])),
            "bundles": [{**dict(b), "keyids": json.loads(b["keyids"])} for b in self.db.execute(
                "SELECT target, counter, sha256, path, expires, keyids, created, creator "
                "FROM bundles WHERE version_id = ? ORDER BY id", (row["id"],))],
            "attachments": self.attachments(name, rec.version),
            "events": self.events(name, rec.version),
        }

    # -- adding ---------------------------------------------------------------------

    def add(self, path, name: str, version: str = "auto", metrics: dict | None = None,
            tags=None, data=None, trust_pickle: bool = False) -> AddResult:
        """Register the model at `path` as `name` (version 'auto': the latest patch + 1, first
        0.1.0). The same content already live under `name` returns that version, created=False.
        A pickle goes through the same gate as loading it (edgeops.safety): one that reaches
        globals off the allow-list is refused unless TRUST_PICKLE, and that choice is recorded
        with the version (a "safety" attachment and the add event)."""
        from ..formats import detect
        from ..formats.base import sha256_path

        path = Path(path)
        check_name(name)
        if version != "auto":
            semver(version)
        metrics, tags, data = _metrics(metrics), _tags(tags), _data(data)
        fmt = detect(path).id
        safety_record = None
        if fmt == "sklearn":
            from .. import safety

            scan = safety.require_safe_pickle(path, trust=trust_pickle)
            unsafe = safety.unsafe_globals(scan)
            if trust_pickle:
                safety_record = {"pickle": "trusted by the user (--trust-pickle): the allow-list "
                                           "check was waived for this version",
                                 "unsafe_globals": unsafe}
        collected = _collect(path, fmt)
        files = {rel: {"sha256": sha, "size": size} for rel, (_, sha, size) in collected.items()}
        single = path.is_file() and len(files) == 1
        sha = files[path.name]["sha256"] if single else listing_sha256(files)
        link_sha = sha if single else sha256_path(path)
        side = _sidecar(path, link_sha)
        lineage = None
        if fmt == "onnx":
            from ..lineage import read_onnx_lineage

            lineage = read_onnx_lineage(path)
        lineage = lineage or lin.from_convert_report(side)
        same = self._same(name, sha, version)
        if same is not None:  # cheap exit before copying any byte
            return AddResult(same, False)
        for _, (f, fsha, _) in collected.items():
            self.blobs.put(f, fsha)
        row = dict(
            name=name, stage="dev", format=fmt, sha256=sha, link_sha256=link_sha,
            size=sum(v["size"] for v in files.values()), main_file=path.name,
            lineage=_json(lineage) if lineage else None, source_sha256=lin.source_sha256(lineage),
            metrics=_json(metrics), tags=_json(tags), created=utc_now(), creator=_actor(),
            code_version=_json(_git(path.absolute())), data=_json(data),
            environment=_json({"edgeops": __version__, "python": platform.python_version(),
                               "platform": platform.platform(), "packages": package_versions()}))
        with self._tx() as db:
            same = self._same(name, sha, version)
            if same is not None:
                return AddResult(same, False)
            if version == "auto":
                last = db.execute("SELECT major, minor, patch FROM versions WHERE name = ? "
                                  "ORDER BY major DESC, minor DESC, patch DESC LIMIT 1",
                                  (name,)).fetchone()
                version = f"{last[0]}.{last[1]}.{last[2] + 1}" if last else "0.1.0"
            major, minor, patch = semver(version)
            cols = {**row, "version": version, "major": major, "minor": minor, "patch": patch}
            vid = db.execute(f"INSERT INTO versions ({', '.join(cols)}) VALUES "
                             f"({', '.join('?' * len(cols))})", list(cols.values())).lastrowid
            for rel, (f, fsha, size) in collected.items():
                if not self.blobs.has(fsha):  # removed by a concurrent `remove` since the put
                    self.blobs.put(f, fsha)
                db.execute("INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?)",
                           (fsha, size, self.blobs.url_of(fsha), utc_now()))
                db.execute("INSERT INTO files VALUES (?, ?, ?, ?)", (vid, rel, fsha, size))
            self._event(db, vid, "add", {"path": str(path.absolute()), "sha256": sha,
                                         **({"trust_pickle": True} if safety_record else {})})
            if safety_record is not None:
                self._attach(db, vid, "safety", "pickle", safety_record)
            if side is not None:
                self._attach(db, vid, "parity", "convert", side)
        return AddResult(self.get(name, version), True)

    def _same(self, name: str, sha: str, version: str) -> VersionRecord | None:
        """The live version of `name` with this content; a conflict if `version` is taken."""
        row = self.db.execute("SELECT * FROM versions WHERE name = ? AND sha256 = ? AND "
                              "removed_at IS NULL ORDER BY major, minor, patch LIMIT 1",
                              (name, sha)).fetchone()
        if row is not None:
            return self._record(row)
        if version != "auto":
            taken = self.db.execute("SELECT removed_at FROM versions WHERE name = ? AND "
                                    "version = ?", (name, version)).fetchone()
            if taken is not None:
                what = "a removed version" if taken[0] else "different content"
                raise RegistryError(f"{name}:{version} already exists with {what}",
                                    hint="pick another --version, or --version auto")
        return None

    def materialize(self, rec: VersionRecord, dest_dir) -> Path:
        """Copy the version's files into dest_dir (relative paths kept), checking every
        sha256 while copying; the path of the main file."""
        if rec.removed:
            raise RegistryError(f"{rec.ref} was removed on {rec.removed_at}: its files are gone")
        dest = Path(dest_dir)
        for rel, meta in sorted(rec.files.items()):
            if not self.blobs.has(meta["sha256"]):
                raise RegistryError(f"{rec.ref}: the stored blob of {rel} is missing "
                                    f"({self.blobs.url_of(meta['sha256'])})",
                                    hint=f"remove {rec.ref} and add the model again from its source")
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with self.blobs.open(meta["sha256"]) as src:
                digest, _ = copy_checked(src, out, meta["sha256"], 0o644)
            if digest != meta["sha256"]:
                raise RegistryError(
                    f"{rec.ref}: the stored blob of {rel} is corrupted (sha256 "
                    f"{digest[:12]}..., expected {meta['sha256'][:12]}...)",
                    hint=f"remove {rec.ref} and add the model again from its source")
        return dest / rec.main_file

    # -- stages, removal, retention ------------------------------------------------

    def promote(self, name: str, version: str, stage: str) -> VersionRecord:
        """Set the stage; nothing else changes (no automatic demotion of other versions)."""
        if stage not in STAGES:
            raise RegistryError(f"bad stage {stage!r} (stages: {', '.join(STAGES)})")
        with self._tx() as db:
            row = self._row(name, version)
            if row["removed_at"]:
                raise RegistryError(f"{name}:{row['version']} was removed; add it again instead")
            if row["stage"] != stage:
                db.execute("UPDATE versions SET stage = ? WHERE id = ?", (stage, row["id"]))
                self._event(db, row["id"], "promote", {"from": row["stage"], "to": stage})
        return self.get(name, row["version"])

    def remove(self, name: str, version: str, force: bool = False) -> RemoveResult:
        """Make a version a tombstone and delete the blobs no live version needs.
        A production version needs force=True."""
        with self._tx() as db:
            row = self._row(name, version)
            if row["removed_at"]:
                raise RegistryError(f"{name}:{row['version']} was already removed "
                                    f"on {row['removed_at']}")
            if row["stage"] == "production" and not force:
                raise RegistryError(f"{name}:{row['version']} is in production",
                                    hint="promote another version first, or pass --force")
            return self._tombstone(db, [row], RemoveResult(), "remove")

    def retain(self, name: str, keep: int) -> RemoveResult:
        """Remove all but the `keep` newest live versions of `name`; staging and production
        versions are never removed by retention (they are listed in `kept`)."""
        if not isinstance(keep, int) or keep < 0:
            raise RegistryError(f"--keep must be a non-negative integer, got {keep!r}")
        with self._tx() as db:
            self._row(name)  # a clear error for an unknown name
            rows = db.execute("SELECT * FROM versions WHERE name = ? AND removed_at IS NULL "
                              "ORDER BY major DESC, minor DESC, patch DESC", (name,)).fetchall()
            old = rows[keep:]
            res = RemoveResult(kept=[f"{name}:{r['version']}" for r in old
                                     if r["stage"] in PROTECTED])
            return self._tombstone(db, [r for r in old if r["stage"] not in PROTECTED], res,
                                  f"retain --keep {keep}")

    def _tombstone(self, db, rows, res: RemoveResult, why: str) -> RemoveResult:
        # the blobs are deleted inside the write transaction: a concurrent add re-checks
        # blob presence under the same lock, so it never references a deleted blob
        now = utc_now()
        for r in rows:
            db.execute("UPDATE versions SET stage = ?, removed_at = ? WHERE id = ?",
                       (REMOVED, now, r["id"]))
            res.removed.append(f"{r['name']}:{r['version']}")
        ids = [r["id"] for r in rows]
        marks = ", ".join("?" * len(ids))
        orphans = db.execute(
            f"SELECT DISTINCT f.sha256 FROM files f WHERE f.version_id IN ({marks}) AND NOT "
            "EXISTS (SELECT 1 FROM files g JOIN versions v ON v.id = g.version_id "
            "WHERE g.sha256 = f.sha256 AND v.removed_at IS NULL)", ids).fetchall() if ids else []
        for (sha,) in orphans:
            res.freed_bytes += self.blobs.delete(sha)
            res.blobs_deleted += 1
            db.execute("DELETE FROM blobs WHERE sha256 = ?", (sha,))
        for r in rows:
            self._event(db, r["id"], "remove", {"stage": r["stage"], "by": why})
        return res

    # -- attachments, comparison ---------------------------------------------------

    def _attach(self, db, vid: int, kind: str, key: str | None, data: dict) -> int:
        aid = db.execute("INSERT INTO attachments (version_id, kind, key, data, created, creator)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         (vid, kind, key, _json(data), utc_now(), _actor())).lastrowid
        self._event(db, vid, "attach", {"kind": kind, "key": key, "attachment": aid})
        return aid

    def attach(self, name: str, version: str | None, kind: str | None, data: dict,
               key: str | None = None) -> dict:
        """Attach a JSON document. A bench report (schema edgeops.bench/1) is recognised:
        kind 'bench', key = the device or target it ran on, and its model must be this one."""
        if not isinstance(data, dict):
            raise RegistryError("an attachment must be a JSON object")
        if data.get("schema") == BENCH_SCHEMA:
            kind, key = kind or "bench", key or bench_key(data)
        elif kind is None and data.get("route") and data.get("hops"):
            kind, key = "parity", key or "convert"
        if kind is None:
            raise RegistryError("cannot tell what kind of document this is",
                                hint="pass --kind bench|parity|telemetry|evaluation")
        if not _KIND_RE.fullmatch(kind):
            raise RegistryError(f"bad attachment kind {kind!r}")
        with self._tx() as db:
            row = self._row(name, version)
            if kind == "bench":
                sha = (data.get("model") or {}).get("sha256")
                ok = {row["sha256"], row["link_sha256"]}
                if sha is not None and sha not in ok:
                    raise RegistryError(f"the bench report measured another model (sha256 "
                                        f"{sha[:12]}...), not {name}:{row['version']}",
                                        hint="bench the registered file (edgeops registry "
                                             "show lists its sha256)")
            aid = self._attach(db, row["id"], kind, key, data)
        return {"ref": f"{name}:{row['version']}", "id": aid, "kind": kind, "key": key}

    def compare(self, ref_a, ref_b) -> dict:
        """Rows {key, a, b, delta} of stage, format, sha256, size, created, lineage, metrics
        and bench latency per target (the newest report per target)."""
        cols = []
        for ref in (ref_a, ref_b):
            name, version = parse_ref(ref) if isinstance(ref, str) else ref
            rec = self.get(name, version)
            facts = {"stage": rec.stage, "format": rec.format, "sha256": rec.sha256,
                     "size": rec.size, "created": rec.created, "creator": rec.creator,
                     "lineage": lin.label(rec.lineage)}
            facts.update({f"metric {k}": v for k, v in sorted(rec.metrics.items())})
            bench = {a["key"]: a["data"] for a in self.attachments(name, rec.version, "bench")}
            for target, rep in sorted(bench.items()):
                facts.update({f"latency {target} {k}": v
                              for k, v in bench_latency(rep).items()})
            cols.append((rec.ref, facts))
        (ra, fa), (rb, fb) = cols
        rows = []
        for k in list(fa) + [k for k in fb if k not in fa]:
            a, b = fa.get(k), fb.get(k)
            num = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
            rows.append({"key": k, "a": a, "b": b, "delta": b - a if num else None})
        return {"a": ra, "b": rb, "rows": rows}

    # -- bundles ---------------------------------------------------------------------

    def next_bundle_counter(self, name: str) -> int:
        """Allocate the next bundle counter (1, 2, ...): never reused, even across processes.
        One sequence for the whole registry, not one per model: a device refuses any bundle
        whose counter is not above the installed one, so an old signed bundle of ANOTHER model
        cannot be replayed onto it either."""
        check_name(name)
        with self._tx() as db:
            return db.execute(
                "INSERT INTO bundle_counters (name, counter) VALUES (?, 1) ON CONFLICT (name) "
                "DO UPDATE SET counter = counter + 1 RETURNING counter", (COUNTER_KEY,)).fetchone()[0]

    def record_bundle(self, name: str, version: str, target: str, counter: int, sha256: str,
                      path, expires, keyids) -> None:
        with self._tx() as db:
            row = self._row(name, version)
            db.execute("INSERT INTO bundles (version_id, target, counter, sha256, path, expires, "
                       "keyids, created, creator) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (row["id"], target, int(counter), sha256, str(path),
                        None if expires is None else str(expires), _json(list(keyids or [])),
                        utc_now(), _actor()))
            # an explicit --counter above the allocated ones moves the allocator past it, so the
            # next automatic counter is still newer than anything a device may have installed
            db.execute("INSERT INTO bundle_counters (name, counter) VALUES (?, ?) ON CONFLICT (name) "
                       "DO UPDATE SET counter = max(counter, excluded.counter)", (COUNTER_KEY, int(counter)))
            self._event(db, row["id"], "bundle", {"target": target, "counter": int(counter),
                                                  "sha256": sha256})
