"""The rollout journal: every rollout, its bundles and every device transition, in SQLite
through the one database layer (edgeops/db.py), written *before* the controller acts on it, so
a controller killed at any instruction can be resumed from here.

Default location: $EDGEOPS_HOME/rollouts.db (or $EDGEOPS_JOURNAL_URL, `sqlite:///abs/path`).
Times are UNIX seconds (float), so tests can order starts against the moment a breach was known.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from .. import paths
from ..db import Database
from ..errors import EdgeopsError, UsageError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE rollouts (
  id TEXT PRIMARY KEY, created REAL NOT NULL, updated REAL NOT NULL, state TEXT NOT NULL,
  control TEXT, halted_reason TEXT, params TEXT NOT NULL, controller_pid INTEGER);
CREATE TABLE bundles (
  rollout TEXT NOT NULL REFERENCES rollouts(id), target TEXT NOT NULL, path TEXT NOT NULL,
  sha256 TEXT NOT NULL, manifest_sha256 TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL,
  size INTEGER NOT NULL, PRIMARY KEY (rollout, target));
CREATE TABLE devices (
  rollout TEXT NOT NULL REFERENCES rollouts(id), device TEXT NOT NULL, wave INTEGER NOT NULL,
  position INTEGER NOT NULL, target TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
  reason TEXT, message TEXT, previous_version TEXT, bytes_sent INTEGER NOT NULL DEFAULT 0,
  started REAL, finished REAL, PRIMARY KEY (rollout, device));
CREATE TABLE events (
  id INTEGER PRIMARY KEY, rollout TEXT NOT NULL, device TEXT, at REAL NOT NULL, event TEXT NOT NULL,
  detail TEXT)
"""

ROLLOUT_STATES = ("running", "paused", "halted", "completed", "aborted", "rolled-back", "failed")
DEVICE_STATES = ("pending", "running", "succeeded", "failed", "skipped", "rolled-back")


class JournalError(EdgeopsError):
    pass


def default_url() -> str:
    return os.environ.get("EDGEOPS_JOURNAL_URL") or "sqlite://" + (paths.home() / "rollouts.db").absolute().as_posix()


class Journal:
    def __init__(self, url: str | None = None):
        url = url or default_url()
        if not url.startswith("sqlite://"):
            raise UsageError(f"journal URL {url!r}: only sqlite:///path is supported here")
        self.store = Database(Path(url[len("sqlite://"):]), _SCHEMA, SCHEMA_VERSION, what="rollout journal",
                              url=url, error=JournalError)

    # ---- writes (each one transaction, committed before the caller acts)
    def create(self, params: dict, bundles: list[dict], waves: list[list[tuple[str, str]]]) -> str:
        rid = time.strftime("r%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(2)
        now = time.time()
        with self.store.tx() as db:
            db.execute("INSERT INTO rollouts VALUES (?,?,?,?,?,?,?,?)",
                       (rid, now, now, "running", None, None, json.dumps(params, sort_keys=True), os.getpid()))
            for b in bundles:
                db.execute("INSERT INTO bundles VALUES (?,?,?,?,?,?,?,?)",
                           (rid, b["target"], b["path"], b["sha256"], b["manifest_sha256"], b["name"],
                            b["version"], b["size"]))
            pos = 0
            for w, members in enumerate(waves):
                for name, target in members:
                    db.execute("INSERT INTO devices (rollout, device, wave, position, target, state) "
                               "VALUES (?,?,?,?,?,?)", (rid, name, w, pos, target, "pending"))
                    pos += 1
            db.execute("INSERT INTO events (rollout, at, event, detail) VALUES (?,?,?,?)",
                       (rid, now, "created", json.dumps({"devices": pos})))
        return rid

    def device(self, rid: str, name: str, *, event: str | None = None, detail: dict | None = None, **fields) -> None:
        now = time.time()
        with self.store.tx() as db:
            if fields:
                cols = ", ".join(f"{k} = ?" for k in fields)
                db.execute(f"UPDATE devices SET {cols} WHERE rollout = ? AND device = ?", (*fields.values(), rid, name))
            db.execute("INSERT INTO events (rollout, device, at, event, detail) VALUES (?,?,?,?,?)",
                       (rid, name, now, event or fields.get("state", "update"), json.dumps(detail or fields, default=str)))
            db.execute("UPDATE rollouts SET updated = ? WHERE id = ?", (now, rid))

    def rollout(self, rid: str, *, event: str | None = None, detail: dict | None = None, **fields) -> None:
        now = time.time()
        with self.store.tx() as db:
            fields["updated"] = now
            cols = ", ".join(f"{k} = ?" for k in fields)
            db.execute(f"UPDATE rollouts SET {cols} WHERE id = ?", (*fields.values(), rid))
            db.execute("INSERT INTO events (rollout, at, event, detail) VALUES (?,?,?,?)",
                       (rid, now, event or fields.get("state", "update"), json.dumps(detail or {}, default=str)))

    # ---- reads
    def get(self, rid: str) -> dict:
        row = self.store.execute("SELECT * FROM rollouts WHERE id = ?", (rid,)).fetchone()
        if row is None:
            ids = [r[0] for r in self.store.execute("SELECT id FROM rollouts ORDER BY created DESC LIMIT 5")]
            raise UsageError(f"no rollout {rid!r}" + (f" (recent: {', '.join(ids)})" if ids else ""),
                             hint="edgeops rollout list")
        d = dict(row)
        d["params"] = json.loads(d["params"])
        d["bundles"] = {r["target"]: dict(r) for r in self.store.execute(
            "SELECT * FROM bundles WHERE rollout = ?", (rid,))}
        d["devices"] = [dict(r) for r in self.store.execute(
            "SELECT * FROM devices WHERE rollout = ? ORDER BY position", (rid,))]
        return d

    def latest(self) -> str | None:
        row = self.store.execute("SELECT id FROM rollouts ORDER BY created DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def list(self) -> list[dict]:
        out = []
        for r in self.store.execute("SELECT * FROM rollouts ORDER BY created"):
            d = dict(r)
            d.pop("params")
            counts = {row[0]: row[1] for row in self.store.execute(
                "SELECT state, COUNT(*) FROM devices WHERE rollout = ? GROUP BY state", (r["id"],))}
            d["devices"] = counts
            out.append(d)
        return out

    def events(self, rid: str) -> list[dict]:
        return [dict(r) for r in self.store.execute("SELECT * FROM events WHERE rollout = ? ORDER BY id", (rid,))]

    def close(self) -> None:
        self.store.close()
