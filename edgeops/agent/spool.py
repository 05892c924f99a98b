"""The device's telemetry spool: crash-safe, bounded, read and acknowledged by a collector.
Standard library only (the agent package's rule).

SQLite in WAL mode with synchronous=FULL rather than fsynced segment files: a record is durable
when its transaction commits (the WAL is fsynced at every commit), a crash leaves whole
transactions or nothing (no torn line to repair), the collector's acknowledgement is one DELETE,
and dropping by priority under the byte cap is one indexed query. Segment files would need their
own index, compaction and torn-tail recovery to do the same.

    records(seq, boot, kind, prio, model, version, t, nbytes, body)

`seq` is AUTOINCREMENT: it only grows and is never reused, also across boots and after deletions,
so "everything after the last acknowledged sequence" is exact. Each record also carries the boot
id (/proc/sys/kernel/random/boot_id). The spool has an id of its own (`spool`, made when it is
created): a collector keys what it stored by (device, spool, seq), so a spool that is deleted and
made again starts a new sequence instead of colliding with the old one.

Only the runtime's flush thread, the agent (install events) and the collector's ack write here;
inference never waits on it. The byte cap (`cap_bytes`, over the records' body bytes) drops the
oldest records of the lowest priority first: raw samples, then health, then events, aggregates
(windows) last, and the profile records that make windows readable never before them, and counts every dropped record per kind (`dropped` in `stats()` and in every `read`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import time
import uuid
from pathlib import Path

PRIORITY = {"sample": 0, "health": 1, "event": 2, "window": 3, "profile": 4}
DEFAULT_CAP = 64 << 20
SCHEMA = 1
_DDL = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    boot TEXT NOT NULL, kind TEXT NOT NULL, prio INTEGER NOT NULL,
    model TEXT, version TEXT, t REAL NOT NULL, nbytes INTEGER NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS records_prio ON records (prio, seq);
"""


class SpoolError(Exception):
    pass


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def device_name(root: Path) -> str:
    try:
        return json.loads((Path(root) / "device.json").read_text())["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return socket.gethostname()


class Spool:
    def __init__(self, path: str | Path, *, cap_bytes: int | None = None, device: str | None = None):
        """CAP_BYTES given: the spool's cap from now on (kept in the spool); None: the cap it has."""
        self.path = Path(path)
        self.boot = boot_id()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA busy_timeout = 30000")
            if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self.db.execute("PRAGMA auto_vacuum = INCREMENTAL")     # only before the first table
                self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.executescript(_DDL)
            with self._write():
                have = dict(self.db.execute("SELECT k, v FROM meta").fetchall())
                if "spool" not in have:
                    self.db.executemany("INSERT INTO meta VALUES (?, ?)",
                                        [("spool", uuid.uuid4().hex), ("schema", str(SCHEMA)), ("bytes", "0"),
                                         ("acked", "0"), ("created", str(time.time()))])
                elif int(have.get("schema", 0)) > SCHEMA:
                    raise SpoolError(f"{self.path}: spool schema {have['schema']} is newer than this agent's ({SCHEMA})")
                if cap_bytes is not None:
                    self.db.execute("INSERT INTO meta VALUES ('cap', ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                                    (str(int(cap_bytes)),))
        except sqlite3.Error as exc:
            raise SpoolError(f"{self.path}: cannot open the telemetry spool ({exc})") from None
        self.id = self._meta("spool")
        self.cap = int(self._meta("cap", str(DEFAULT_CAP)))
        self.device = device or device_name(self.path.parent.parent)

    @contextlib.contextmanager
    def _write(self):
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _meta(self, k: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
        return row[0] if row else default

    def _bump(self, k: str, n: int) -> None:
        self.db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = CAST(v AS INTEGER) + ?",
                        (k, str(n), n))

    # ------------------------------------------------------------------ writes
    def append(self, rows: list[tuple[str, str | None, str | None, float, dict]],
               lost: dict[str, int] | None = None) -> list[int]:
        """Store ROWS [(kind, model, version, t, body)] in one transaction; their sequence numbers.
        LOST: records of each kind the writer could not store earlier (a full disk), counted as dropped."""
        if not rows and not lost:
            return []
        enc = []
        for kind, model, version, t, body in rows:
            text = json.dumps(body, separators=(",", ":"), sort_keys=True, allow_nan=False, default=_plain)
            enc.append((self.boot, kind, PRIORITY[kind], model, version, float(t), len(text), text))
        with self._write():
            seqs = []
            for r in enc:
                seqs.append(self.db.execute("INSERT INTO records (boot, kind, prio, model, version, t, nbytes, body) "
                                            "VALUES (?,?,?,?,?,?,?,?)", r).lastrowid)
            self._bump("bytes", sum(r[6] for r in enc))
            for kind, n in (lost or {}).items():
                self._bump(f"dropped.{kind}", n)
            self._enforce_cap()
        return seqs

    def _enforce_cap(self) -> None:
        total = int(self._meta("bytes", "0"))
        if total <= self.cap:
            return
        for prio in sorted(set(PRIORITY.values())):
            while total > self.cap:
                rows = self.db.execute("SELECT seq, kind, nbytes FROM records WHERE prio = ? ORDER BY seq LIMIT 512",
                                       (prio,)).fetchall()
                if not rows:
                    break
                drop, freed, kinds = [], 0, {}
                for seq, kind, nb in rows:
                    if total - freed <= self.cap:
                        break
                    drop.append((seq,))
                    freed += nb
                    kinds[kind] = kinds.get(kind, 0) + 1
                self.db.executemany("DELETE FROM records WHERE seq = ?", drop)
                total -= freed
                self._bump("bytes", -freed)
                for kind, n in kinds.items():
                    self._bump(f"dropped.{kind}", n)
            if total <= self.cap:
                break

    def ack(self, upto: int, spool_id: str) -> int:
        """Delete every record up to UPTO (the collector has committed them). Refused for another
        spool's sequence (this spool was re-created since the collector last read it)."""
        return self._delete(0, upto, spool_id, acked=True)

    def ack_range(self, first: int, last: int, spool_id: str) -> int:
        """Delete records FIRST..LAST (push mode: a batch the controller stored)."""
        return self._delete(first, last, spool_id, acked=False)

    def _delete(self, first: int, last: int, spool_id: str, *, acked: bool) -> int:
        if spool_id != self.id:
            raise SpoolError(f"ack for spool {spool_id}, but this device's spool is {self.id}")
        with self._write():
            freed = self.db.execute("SELECT COALESCE(SUM(nbytes), 0), COUNT(*) FROM records WHERE seq BETWEEN ? AND ?",
                                    (int(first), int(last))).fetchone()
            self.db.execute("DELETE FROM records WHERE seq BETWEEN ? AND ?", (int(first), int(last)))
            self._bump("bytes", -int(freed[0]))
            if acked and int(last) > int(self._meta("acked", "0")):
                self.db.execute("UPDATE meta SET v = ? WHERE k = 'acked'", (str(int(last)),))
        try:
            self.db.execute("PRAGMA incremental_vacuum")
        except sqlite3.Error:
            pass
        return int(freed[1])

    # ------------------------------------------------------------------ reads
    def read(self, after: int = 0, limit: int = 2000, max_bytes: int = 4 << 20, raw: bool = False) -> dict:
        """Records with seq > AFTER, oldest first, at most LIMIT of them / about MAX_BYTES. RAW: each
        body as its JSON text (what goes over the wire: never parsed and re-encoded on the device)."""
        out, size = [], 0
        cur = self.db.execute("SELECT seq, boot, kind, model, version, t, body FROM records WHERE seq > ? "
                              "ORDER BY seq LIMIT ?", (int(after), int(limit)))
        for seq, boot, kind, model, version, t, body in cur:
            out.append({"seq": seq, "boot": boot, "kind": kind, "model": model, "version": version, "t": t,
                        "body": body if raw else json.loads(body)})
            size += len(body) + 100
            if size >= max_bytes:
                break
        last = out[-1]["seq"] if out else int(after)
        more = self.db.execute("SELECT EXISTS(SELECT 1 FROM records WHERE seq > ?)", (last,)).fetchone()[0]
        return {"device": self.device, "spool": self.id, "records": out, "last": last, "more": bool(more),
                **self.stats()}

    def stats(self) -> dict:
        meta = dict(self.db.execute("SELECT k, v FROM meta").fetchall())
        n, hi = self.db.execute("SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM records").fetchone()
        seq = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
        return {"pending": n, "bytes": int(meta.get("bytes", 0)), "cap_bytes": self.cap,
                "acked": int(meta.get("acked", 0)), "produced": int(seq[0]) if seq else 0,
                "dropped": {k[len("dropped."):]: int(v) for k, v in meta.items() if k.startswith("dropped.")},
                "file_bytes": _file_bytes(self.path)}

    def close(self) -> None:
        self.db.close()


def _file_bytes(path: Path) -> int:
    return sum(os.path.getsize(p) for p in (path, Path(str(path) + "-wal")) if os.path.exists(p))


def _plain(o):
    """numpy scalars and arrays in records (json.dumps default)."""
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def default_path(root: str | Path) -> Path:
    return Path(root) / "telemetry" / "spool.db"


def record_event(root: str | Path, model: str | None, version: str | None, body: dict) -> None:
    """An install event into the spool from the agent; never fails the caller (telemetry must not
    break an install), but says so on stderr."""
    try:
        sp = Spool(default_path(root))
        try:
            sp.append([("event", model, version, time.time(), body)])
        finally:
            sp.close()
    except Exception as exc:  # noqa: BLE001
        import sys

        sys.stderr.write(f"edgeops agent: telemetry event not recorded ({exc})\n")


def device_health(root: str | Path, spool: "Spool | None" = None) -> dict:
    """CPU load, memory, disk, temperatures, agent state: what a health record holds."""
    h: dict = {}
    try:
        h["load"] = list(os.getloadavg())
    except OSError:
        pass
    h["cpus"] = os.cpu_count()
    try:
        mem = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, rest = line.partition(":")
            if k in ("MemTotal", "MemAvailable"):
                mem[k] = int(rest.split()[0]) * 1024
        h["mem_total"], h["mem_available"] = mem.get("MemTotal"), mem.get("MemAvailable")
    except OSError:
        pass
    try:
        du = shutil.disk_usage(root)
        h["disk_total"], h["disk_free"] = du.total, du.free
    except OSError:
        pass
    temps = {}
    for z in sorted(Path("/sys/class/thermal").glob("thermal_zone*")):
        try:
            temps[(z / "type").read_text().strip() or z.name] = int((z / "temp").read_text()) / 1000.0
        except (OSError, ValueError):
            continue
    h["temperature_c"] = temps            # empty where the kernel exposes no thermal zone
    try:
        st = json.loads((Path(root) / "state.json").read_text())
        h["agent"] = {"models": {n: m.get("version") for n, m in (st.get("models") or {}).items()},
                      "transaction": (st.get("transaction") or {}).get("step")}
    except (OSError, ValueError):
        h["agent"] = None
    if spool is not None:
        s = spool.stats()
        h["spool"] = {k: s[k] for k in ("pending", "bytes", "cap_bytes", "dropped", "file_bytes")}
    return h
