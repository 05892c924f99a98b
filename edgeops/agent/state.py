"""The device's state file: what is installed, in which slot, and the install transaction in
flight. Written atomically (temp file, fsync, rename, fsync of the folder), so after a crash
or a power cut it holds either the old or the new content, never a torn mix. Every step of an
install is written here *before* it is acted on; the next agent start reads it to finish or
undo what a killed agent left (install.recover).

Standard library only (the agent package's rule).

    {"schema": 1, "agent": "0.1.0", "device": {"name", "target"},
     "models": {NAME: {"slot": "a", "version": "1.2.0",
                       "counter": 7,     # highest bundle counter committed for NAME (anti-rollback)
                       "manifest_sha256": ...,
                       "installed_at": ..., "health": {...}, "previous": {...} | null}},
     "transaction": null | {"id", "name", "step", "slot", "bundle", "started", ...},
     "events": [{"at", "name", "event", ...}, ...]}   # the last EVENTS_KEPT, newest last
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

SCHEMA = 1
EVENTS_KEPT = 200
FILE = "state.json"


class StateError(Exception):
    """The state file is unreadable or from a schema this agent does not know."""


def now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def empty(agent_version: str) -> dict:
    return {"schema": SCHEMA, "agent": agent_version, "device": {}, "models": {},
            "transaction": None, "events": []}


def fsync_dir(folder: Path) -> None:
    fd = os.open(str(folder), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace PATH with DATA so that a crash at any instruction leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load(root: Path, agent_version: str) -> dict:
    p = Path(root) / FILE
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return empty(agent_version)
    except OSError as exc:
        raise StateError(f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        st = json.loads(raw)
    except ValueError as exc:
        raise StateError(f"{p} is not JSON ({exc}); it is only ever replaced whole, so this is "
                         "damage from outside the agent") from None
    if not isinstance(st, dict) or not isinstance(st.get("schema"), int):
        raise StateError(f"{p} has no schema version")
    if st["schema"] > SCHEMA:
        raise StateError(f"{p} is schema {st['schema']}, written by a newer agent; this agent "
                         f"knows schema {SCHEMA} (update the agent)")
    base = empty(agent_version)
    base.update(st)
    return base


def save(root: Path, st: dict) -> None:
    st = dict(st)
    st["events"] = st.get("events", [])[-EVENTS_KEPT:]
    write_atomic(Path(root) / FILE, (json.dumps(st, indent=1, sort_keys=True) + "\n").encode())


def event(st: dict, name: str | None, what: str, **detail) -> None:
    st.setdefault("events", []).append({"at": now_text(), "name": name, "event": what, **detail})


def snapshot(st: dict) -> dict:
    return copy.deepcopy(st)
