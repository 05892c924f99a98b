"""The devices inventory: named devices with pinned SSH host keys ($EDGEOPS_HOME/devices.json).

The file is JSON, rewritten atomically (temporary file + os.replace) under an fcntl lock so two
edgeops processes never lose each other's changes. A host key enters the inventory only at
enrolment, either given by the user (--host-key) or accepted on first use when the user asks
(--accept-new-host-key); afterwards every connection checks it before authenticating.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from edgeops import paths
from edgeops.errors import FormatError, UsageError, first_line
from edgeops.fleet.ssh import SSHTarget, connect, normalize_host_key

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_VERSION = 1


@dataclass
class Device:
    name: str
    host: str
    port: int
    user: str
    key_path: str
    host_key: str
    python: str = "python3"
    workdir: str = "~/.edgeops"
    tags: list[str] = field(default_factory=list)
    # set by `devices enrol` (the agent's install): empty for devices only added for benchmarks
    target: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    agent_root: str = ""          # absolute path of the agent's folder on the device
    agent_version: str = ""
    arch: str = ""
    runtime: str = ""             # "x86_64 onnxruntime 1.32.0": with target, the hardware class

    @property
    def spec(self) -> str:
        return SSHTarget(host=self.host, user=self.user, key_path=self.key_path,
                         port=self.port).label

    def ssh_target(self) -> SSHTarget:
        return SSHTarget(host=self.host, user=self.user, key_path=self.key_path,
                         port=self.port, host_key=self.host_key)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Device":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise UsageError(f"bad device name {name!r}",
                         hint="use letters, digits, '.', '_' or '-' (at most 64, no spaces)")
    return name


def _validate(device: Device) -> Device:
    _check_name(device.name)
    if not isinstance(device.port, int) or not 0 < device.port < 65536:
        raise UsageError(f"device {device.name}: bad port {device.port!r}")
    if not device.host or not device.user:
        raise UsageError(f"device {device.name}: host and user are required")
    if not device.host_key:
        raise UsageError(f"device {device.name}: no pinned host key",
                         hint="enrol it with --host-key or --accept-new-host-key")
    device.host_key = normalize_host_key(device.host_key)
    device.key_path = str(Path(device.key_path).expanduser())
    device.tags = [str(t) for t in (device.tags or [])]
    return device


class Inventory:
    def __init__(self, path=None):
        self.path = Path(path) if path is not None else paths.home() / "devices.json"

    # -- storage --------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _read(self) -> dict[str, Device]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise UsageError(f"cannot read {self.path}: {e.strerror}") from None
        try:
            data = json.loads(text)
            devices = data["devices"]
            return {name: Device.from_dict({**d, "name": name}) for name, d in devices.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"devices inventory {self.path} is corrupt: {first_line(e)}",
                              hint="fix or remove the file and enrol the devices again") \
                from None

    def _write(self, devices: dict[str, Device]) -> None:
        data = {"version": _VERSION,
                "devices": {n: {k: v for k, v in d.to_dict().items() if k != "name"}
                            for n, d in sorted(devices.items())}}
        fd, tmp = tempfile.mkstemp(prefix=".devices.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- API ------------------------------------------------------------------------

    def list(self) -> list[Device]:
        return [d for _, d in sorted(self._read().items())]

    def names(self) -> list[str]:
        return sorted(self._read())

    def get(self, name: str) -> Device:
        devices = self._read()
        if name not in devices:
            known = ", ".join(sorted(devices)) or "none enrolled"
            raise UsageError(f"unknown device {name!r} (known: {known})",
                             hint="list them with `edgeops devices list`")
        return devices[name]

    def add(self, device: Device, replace: bool = False) -> Device:
        device = _validate(device)
        with self._locked():
            devices = self._read()
            if device.name in devices and not replace:
                raise UsageError(f"device {device.name!r} is already enrolled",
                                 hint="remove it first, or re-enrol with --replace")
            devices[device.name] = device
            self._write(devices)
        return device

    def remove(self, name: str) -> Device:
        with self._locked():
            devices = self._read()
            if name not in devices:
                known = ", ".join(sorted(devices)) or "none enrolled"
                raise UsageError(f"unknown device {name!r} (known: {known})")
            device = devices.pop(name)
            self._write(devices)
        return device


def enrol(name: str, spec: str, key_path, *, accept_new_host_key: bool = False,
          host_key: str | None = None, python: str = "python3",
          inventory: Inventory | None = None, replace: bool = False,
          tags: list[str] | None = None, workdir: str = "~/.edgeops",
          connect_timeout: float = 10.0) -> Device:
    """Pin a device's host key and add it to the inventory, after one successful login.

    The host key is ``host_key`` when given; otherwise it is accepted on first use only when
    ``accept_new_host_key`` is true. ``python`` must run on the device.
    """
    inventory = inventory or Inventory()
    _check_name(name)
    if not replace and name in inventory.names():
        raise UsageError(f"device {name!r} is already enrolled",
                         hint="remove it first, or re-enrol with --replace")
    target = SSHTarget.parse(spec, str(Path(str(key_path)).expanduser()))
    if host_key:
        target.host_key = normalize_host_key(host_key)
    elif not accept_new_host_key:
        raise UsageError(
            f"no host key given for device {name} ({target.label})",
            hint="pass --host-key '<contents of /etc/ssh/ssh_host_ed25519_key.pub on the "
            "device>' (safe), or --accept-new-host-key to trust whatever key it presents now")
    with connect(target, accept_new_host_key=accept_new_host_key,
                 connect_timeout=connect_timeout) as conn:
        res = conn.run([python, "-c", "import sys; print(sys.version_info[0])"], timeout=60)
        if res.rc != 0 or res.stdout.strip() != "3":
            raise UsageError(
                f"device {name}: {python!r} is not a working Python 3 on {target.label}",
                hint="install python3 on the device or pass --python with its path")
        pinned = conn.host_key
    device = Device(name=name, host=target.host, port=target.port, user=target.user,
                    key_path=target.key_path, host_key=pinned, python=python,
                    workdir=workdir, tags=list(tags or []))
    return inventory.add(device, replace=replace)
