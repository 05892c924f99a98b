"""What deploy and rollout need from a device connection, whatever carries it.

Today one transport implements it: SSH push (`ssh.SSHDeviceLink`). The roadmap's pull mode
(devices fetch signed bundles from static HTTP and report over MQTT) will implement the same
methods, so `deploy.py` and the rollout's plan and abort logic never learn which one moved the
bytes. The device side does not care either: the agent's install takes a path.

A transport moves three things:
  * the agent's JSON commands (`agent(...)`) -> (exit code, JSON document)
  * files into the device's agent root (`upload(...)`, resumable, sha256-checked on the device)
  * the question "do you already hold this content?" (`has(...)`), so nothing is sent twice
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol


@dataclass
class Upload:
    remote: str            # path relative to the agent root
    sha256: str
    size: int
    sent: int              # bytes that crossed the link in this call (0 when skipped)
    skipped: bool          # the device already held it


class DeviceLink(Protocol):
    label: str
    root: str              # the agent root on the device

    def agent(self, *args: str, timeout: float = 600) -> tuple[int, dict]:
        """Run one agent command; its exit code and JSON output."""

    def upload(self, local: Path, remote: str, *, sha256: str | None = None,
               progress: Callable[[int, int], None] | None = None) -> Upload:
        """Put LOCAL at ROOT/REMOTE (resuming a partial upload), unless it is there already."""

    def has(self, remote: str, sha256: str) -> bool:
        """Whether ROOT/REMOTE exists on the device with this sha256."""

    def close(self) -> None:
        ...
