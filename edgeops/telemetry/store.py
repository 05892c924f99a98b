"""The controller's telemetry store: every record a device produced, exactly once.

SQLite through the one database layer (edgeops/db.py; a PostgreSQL URL replaces it later).
Records are keyed by (device, spool, seq): `seq` only grows within a device's spool (see
agent/spool.py), and the spool id tells a re-created spool from the old one. An insert of a
record already stored is ignored, so a batch read twice (a collector killed after its commit
but before the device's ack; an MQTT redelivery) is never a duplicate. The per-device cursor is
written in the same transaction as the records, and the device is acknowledged only after it
commits: no loss either.
"""

from __future__ import annotations

import json
import functools
import os
import threading
import time
from pathlib import Path

from .. import paths
from ..db import Database
from ..errors import EXIT_ENV, EdgeopsError, UsageError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE records (
    device TEXT NOT NULL, spool TEXT NOT NULL, seq INTEGER NOT NULL, boot TEXT NOT NULL,
    kind TEXT NOT NULL, model TEXT, version TEXT, t REAL NOT NULL, body TEXT NOT NULL,
    received REAL NOT NULL, via TEXT NOT NULL,
    PRIMARY KEY (device, spool, seq));
CREATE INDEX records_kind ON records (kind, model, t);
CREATE TABLE cursors (device TEXT NOT NULL, spool TEXT NOT NULL, seq INTEGER NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (device, spool));
CREATE TABLE devices (device TEXT PRIMARY KEY, spool TEXT, seen REAL, via TEXT, dropped TEXT, health TEXT,
    produced INTEGER, pending INTEGER)
"""


class TelemetryError(EdgeopsError):
    pass


class TelemetryUnavailable(TelemetryError):
    """A broker or device that cannot be reached (exit 3)."""

    exit_code = EXIT_ENV


def default_url() -> str:
    return os.environ.get("EDGEOPS_TELEMETRY_URL") or "sqlite://" + (paths.home() / "telemetry.db").absolute().as_posix()


def _locked(fn):
    """One connection, many threads (parallel collection, the metrics server): one at a time."""
    @functools.wraps(fn)
    def wrapper(self, *a, **kw):
        with self._lock:
            return fn(self, *a, **kw)
    return wrapper


class Store:
    def __init__(self, url: str | None = None):
        self._lock = threading.RLock()
        url = url or default_url()
        if not url.startswith("sqlite://"):
            raise UsageError(f"telemetry URL {url!r}: only sqlite:///path is supported here")
        self.url = url
        self.db = Database(Path(url[len("sqlite://"):]), _SCHEMA, SCHEMA_VERSION, what="telemetry store",
                           url=url, error=TelemetryError)

    @_locked
    def cursor(self, device: str) -> tuple[str | None, int]:
        """(spool, seq) of the newest record stored from DEVICE's current spool."""
        row = self.db.execute("SELECT spool FROM devices WHERE device = ?", (device,)).fetchone()
        if not row or not row[0]:
            return None, 0
        c = self.db.execute("SELECT seq FROM cursors WHERE device = ? AND spool = ?", (device, row[0])).fetchone()
        return row[0], int(c[0]) if c else 0

    @_locked
    def cursor_for(self, device: str, spool: str) -> tuple[str, int]:
        c = self.db.execute("SELECT seq FROM cursors WHERE device = ? AND spool = ?", (device, spool)).fetchone()
        return spool, int(c[0]) if c else 0

    @_locked
    def insert(self, device: str, spool: str, records: list[dict], *, via: str, stats: dict | None = None,
               before_commit=None) -> dict:
        """Store RECORDS of DEVICE's SPOOL in one transaction; (inserted, duplicates).
        BEFORE_COMMIT (tests) runs inside the transaction, after the inserts."""
        now = time.time()
        rows = [(device, spool, int(r["seq"]), r["boot"], r["kind"], r.get("model"), r.get("version"), float(r["t"]),
                 r["body"] if isinstance(r["body"], str) else json.dumps(r["body"], separators=(",", ":")),
                 now, via) for r in records]
        with self.db.tx() as db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
            inserted = db.total_changes - before
            if rows:
                top = max(r[2] for r in rows)
                db.execute("INSERT INTO cursors VALUES (?,?,?,?) ON CONFLICT(device, spool) DO UPDATE SET "
                           "seq = MAX(seq, excluded.seq), updated = excluded.updated", (device, spool, top, now))
            s = stats or {}
            db.execute("INSERT INTO devices VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(device) DO UPDATE SET "
                       "spool = excluded.spool, seen = excluded.seen, via = excluded.via, "
                       "dropped = COALESCE(excluded.dropped, dropped), health = COALESCE(excluded.health, health), "
                       "produced = COALESCE(excluded.produced, produced), pending = COALESCE(excluded.pending, pending)",
                       (device, spool, now, via, json.dumps(s["dropped"]) if "dropped" in s else None,
                        json.dumps(s["health_now"]) if s.get("health_now") else None,
                        s.get("produced"), s.get("pending")))
            if before_commit is not None:
                before_commit()
        return {"inserted": inserted, "duplicates": len(rows) - inserted}

    # ------------------------------------------------------------------ reads
    @_locked
    def records(self, kind: str | None = None, *, model: str | None = None, devices: list[str] | None = None,
                since: float | None = None, version: str | None = None) -> list[dict]:
        q, args = ["SELECT device, spool, seq, boot, kind, model, version, t, body FROM records WHERE 1=1"], []
        for col, val in (("kind", kind), ("model", model), ("version", version)):
            if val is not None:
                q.append(f"AND {col} = ?")
                args.append(val)
        if since is not None:
            q.append("AND t >= ?")
            args.append(since)
        if devices is not None:
            q.append(f"AND device IN ({','.join('?' * len(devices))})")
            args += devices
        q.append("ORDER BY device, t, seq")
        return [{"device": d, "spool": s, "seq": n, "boot": b, "kind": k, "model": m, "version": v, "t": t,
                 "body": json.loads(body)} for d, s, n, b, k, m, v, t, body in self.db.execute(" ".join(q), args)]

    @_locked
    def devices(self) -> list[dict]:
        out = []
        for d, spool, seen, via, dropped, health, produced, pending in self.db.execute(
                "SELECT device, spool, seen, via, dropped, health, produced, pending FROM devices ORDER BY device"):
            out.append({"device": d, "spool": spool, "seen": seen, "via": via, "dropped": json.loads(dropped or "{}"),
                        "health": json.loads(health) if health else None, "produced": produced, "pending": pending})
        return out

    @_locked
    def count(self, device: str | None = None) -> int:
        if device is None:
            return self.db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM records WHERE device = ?", (device,)).fetchone()[0]

    def close(self) -> None:
        self.db.close()
