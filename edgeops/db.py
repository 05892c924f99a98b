"""The one SQLite layer: the registry, the rollout journal and (later) telemetry open their
databases through it.

WAL mode, a 30 s busy timeout, foreign keys on, write transactions that take the write lock up
front (BEGIN IMMEDIATE: concurrent writers queue instead of failing on a lock upgrade), and a
schema version in `PRAGMA user_version`, created or checked under a lock file (switching a new
database to WAL does not wait on the busy handler). A database written by a newer edgeops is
refused rather than misread. Addressed by URL (`sqlite:///abs/path.db`) so a PostgreSQL store can
replace it behind the same callers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from pathlib import Path

from .errors import EdgeopsError


class Database:
    """A SQLite database at PATH with SCHEMA (statements separated by ';') at VERSION.
    ERROR is the EdgeopsError subclass raised for problems (with WHAT naming the store)."""

    def __init__(self, path: str | Path, schema: str, version: int, *, what: str, url: str | None = None,
                 error: type[EdgeopsError] = EdgeopsError):
        self.path = Path(path)
        self.url = url or "sqlite://" + self.path.absolute().as_posix()
        self.schema, self.version, self.what, self.error = schema, version, what, error
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout = 30000")
            self.db.execute("PRAGMA foreign_keys = ON")
            fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self.db.execute("PRAGMA journal_mode = WAL")
                self._migrate()
            finally:
                os.close(fd)  # releases the lock
        except (OSError, sqlite3.Error) as e:
            raise error(f"cannot open the {what} at {self.url}: {e}") from None

    def _migrate(self) -> None:
        if self.db.execute("PRAGMA user_version").fetchone()[0] == self.version:
            return
        with self.tx() as db:
            v = db.execute("PRAGMA user_version").fetchone()[0]
            if v > self.version:
                raise self.error(f"the {self.what} at {self.url} has schema {v}, newer than "
                                 f"this edgeops ({self.version})", hint="upgrade edgeops")
            if v == 0:
                for stmt in self.schema.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(f"PRAGMA user_version = {self.version}")

    @contextlib.contextmanager
    def tx(self):
        """A write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def execute(self, sql: str, params=()):
        return self.db.execute(sql, params)

    def close(self) -> None:
        self.db.close()
