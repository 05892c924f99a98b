"""Real devices on one machine for the tests: one OpenSSH sshd per device, with its own unix
user, host key and home, listening on a loopback port; optionally under a cgroup CPU quota so
that it behaves like a slower CPU. Facts and recipes: /work/shared/TESTBED.md sections 1 and 4.

Needs root, /usr/sbin/sshd (openssh-server) and, for CPU quotas, cgroup-tools on cgroups v1.
Without them the tests are skipped, except under CI (env CI set), where they fail loudly: CI
must install the packages.

Every process is stopped by PID, every user and cgroup removed, every wait is bounded.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import math
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

SSHD = "/usr/sbin/sshd"
SYSTEM_PYTHON = "/usr/bin/python3"
RUNTIME_ROOT = Path("/opt/edgeops-testbed")
DEVPY = RUNTIME_ROOT / "devpy"  # shared device runtime: numpy + onnxruntime, world-readable
CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
GECOS = "edgeops-testbed"  # marks the unix users created here
DEVICE_PACKAGES = ("numpy", "onnxruntime", "cryptography")  # what the agent may import


def unavailable(reason: str):
    """Skip (developer machine) or fail loudly (CI must provide the test bed)."""
    if os.environ.get("CI"):
        pytest.fail(f"test bed unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"test bed unavailable: {reason}")


def check_requirements(cgroups: bool = False) -> None:
    if os.geteuid() != 0:
        unavailable("needs root (creates unix users and starts sshd)")
    if not os.path.exists(SSHD):
        unavailable(f"{SSHD} missing: apt-get install -y openssh-server")
    for tool in ("useradd", "userdel", "runuser", "ssh-keygen"):
        if not shutil.which(tool):
            unavailable(f"{tool} missing")
    if cgroups:
        for tool in ("cgcreate", "cgset", "cgclassify", "cgdelete"):
            if not shutil.which(tool):
                unavailable(f"{tool} missing: apt-get install -y cgroup-tools")
        if not os.path.exists("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
            unavailable("no cgroups v1 cpu controller at /sys/fs/cgroup/cpu")


def generate_ed25519(path: Path, comment: str = "edgeops-testbed") -> str:
    """An ed25519 key pair with `cryptography` (paramiko cannot generate ed25519): the private
    key in OpenSSH format (mode 0600) at ``path``, the public line at ``path.pub``."""
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(path, 0o600)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH).decode()
    Path(str(path) + ".pub").write_text(f"{pub} {comment}\n")
    return pub


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: float = 60, check: bool = True, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()[-500:]}")
    return res


# ------------------------------------------------------------------ processes (by PID)


def _procs() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, uid, state) for every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2 :].split()
        uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
        table[int(entry)] = (int(rest[1]), uid, rest[0])
    return table


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _descendants(root: int, table) -> set[int]:
    found, frontier = set(), {root}
    while frontier:
        kids = {p for p, (pp, _, _) in table.items() if pp in frontier and p not in found}
        found |= kids
        frontier = kids
    return found


def _alive(pids, table=None) -> set[int]:
    table = _procs() if table is None else table
    return {p for p in pids if p in table and table[p][2] != "Z"}


def _kill_and_wait(pids: set[int], sig=signal.SIGKILL, timeout: float = 5.0) -> set[int]:
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)
    end = time.monotonic() + timeout
    left = _alive(pids)
    while left and time.monotonic() < end:
        time.sleep(0.02)
        left = _alive(left)
    return left


# ------------------------------------------------------------------ devices


@dataclass
class TestDevice:
    __test__ = False  # not a pytest test class

    name: str
    host: str
    port: int
    user: str
    key_path: str
    host_key: str  # OpenSSH public line of the device's host key ("ssh-ed25519 AAAA...")
    python: str  # a python with numpy + onnxruntime that the device user can run
    root: Path
    pid: int  # the listening sshd
    cpu_quota: float | None = None
    cgroup: str | None = None
    cpu_period_us: int | None = None
    log: Path | None = None
    uid: int = -1
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def spec(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def home(self) -> Path:
        return self.root / "home"

    def ssh_target(self, **kw):
        """An SSHTarget with the device's pinned host key; keyword arguments override."""
        from edgeops.fleet.ssh import SSHTarget

        args = dict(host=self.host, user=self.user, key_path=self.key_path, port=self.port,
                    host_key=self.host_key)
        args.update(kw)
        return SSHTarget(**args)


@dataclass
class NetnsLink:
    ns: str
    veth: str  # host end
    peer: str  # device end, inside the namespace
    host: str  # the device's address (inside the namespace)
    gateway: str  # the host end's address
    port: int
    pid: int = -1  # the namespace's sshd

    def cut(self) -> None:
        """Drop the link silently: packets vanish, nobody sends FIN or RST."""
        _run(["ip", "link", "set", self.veth, "down"])

    def restore(self) -> None:
        _run(["ip", "link", "set", self.veth, "up"])


class Testbed:
    __test__ = False

    def __init__(self, root: Path):
        check_requirements()
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.devices: list[TestDevice] = []
        self._python: str | None = None
        self._system_python: str | None = None
        self._closed = False
        self._links = 0
        _remove_stale_users()
        self.key_path = str(self.root / "controller" / "id_ed25519")
        self.public_key = generate_ed25519(Path(self.key_path), "edgeops-testbed-controller")
        os.chmod(self.root / "controller", 0o700)
        atexit.register(self.close)

    # -- pythons ---------------------------------------------------------------------

    def device_python(self, user: str) -> str:
        """A python with numpy + onnxruntime that ``user`` can run (resolved once)."""
        if self._python is None:
            self._python = _resolve_device_python(user)
        return self._python

    @property
    def system_python(self) -> str:
        """A python WITHOUT onnxruntime (for the 'runtime missing on the device' tests)."""
        if self._system_python is None:
            probe = _run([SYSTEM_PYTHON, "-c", "import onnxruntime"], check=False)
            if "ModuleNotFoundError" in probe.stderr:
                self._system_python = SYSTEM_PYTHON
            else:  # someone installed onnxruntime system-wide: a bare venv lacks it for sure
                bare = RUNTIME_ROOT / "barepy"
                with _locked(RUNTIME_ROOT / ".lock"):
                    if not (bare / "bin" / "python").exists():
                        _run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(bare)])
                        _run(["chmod", "-R", "a+rX", str(RUNTIME_ROOT)])
                self._system_python = str(bare / "bin" / "python")
        return self._system_python

    # -- devices ---------------------------------------------------------------------

    def add_device(self, name: str, cpu_quota: float | None = None,
                   cpu_period_us: int | None = None) -> TestDevice:
        """Start a device. ``cpu_quota``: fraction of one core (cgroup CFS quota on CPU 0);
        ``cpu_period_us``: the CFS period (default: the shortest the kernel allows)."""
        if self._closed:
            raise RuntimeError("test bed is closed")
        if cpu_quota is not None:
            check_requirements(cgroups=True)
            if not 0 < cpu_quota <= 1:
                raise ValueError("cpu_quota is a fraction of one core, in (0, 1]")
        devroot = self.root / name
        for i in range(1, 100):
            if not devroot.exists():
                break
            devroot = self.root / f"{name}-{i}"
        etc, home = devroot / "etc", devroot / "home"
        etc.mkdir(parents=True)
        (home / ".ssh").mkdir(parents=True)
        os.chmod(devroot, 0o755)
        user = _new_user_name()
        _run(["useradd", "-M", "-d", str(home), "-s", "/bin/bash", "-p", "*", "-c", GECOS, user])
        dev = None
        try:
            pw = pwd.getpwnam(user)
            auth = home / ".ssh" / "authorized_keys"
            auth.write_text(self.public_key + "\n")
            os.chmod(home / ".ssh", 0o700)
            os.chmod(auth, 0o600)
            os.chmod(home, 0o755)
            for p in (home, home / ".ssh", auth):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            hostkey = etc / "ssh_host_ed25519_key"
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@testbed",
                  "-f", str(hostkey)])
            host_key = " ".join(Path(str(hostkey) + ".pub").read_text().split()[:2])
            python = self.device_python(user)
            dev = TestDevice(name=name, host="127.0.0.1", port=0, user=user,
                             key_path=self.key_path, host_key=host_key, python=python,
                             root=devroot, pid=-1, cpu_quota=cpu_quota,
                             log=devroot / "sshd.log", uid=pw.pw_uid)
            self._start_sshd(dev, hostkey)
            self.devices.append(dev)
            if cpu_quota is not None:
                self._limit_cpu(dev, cpu_quota, cpu_period_us)
            return dev
        except BaseException:
            if dev is not None and dev.pid > 0:
                self.stop_device(dev)
            else:
                _userdel(user)
            raise

    def _start_sshd(self, dev: TestDevice, hostkey: Path) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        config = dev.root / "etc" / "sshd_config"
        for _ in range(5):  # a free port can be taken between probing and binding: retry
            dev.port = free_port()
            config.write_text("\n".join([
                f"Port {dev.port}",
                f"ListenAddress {dev.host}",
                f"HostKey {hostkey}",
                f"PidFile {dev.root / 'sshd.pid'}",
                f"AllowUsers {dev.user}",
                "AuthorizedKeysFile .ssh/authorized_keys",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "PermitRootLogin no",
                "StrictModes yes",
                "Subsystem sftp internal-sftp",
                "ClientAliveInterval 3",
                "ClientAliveCountMax 2",
                "MaxStartups 100:30:200",
                "PrintMotd no",
                "LogLevel VERBOSE",
                "",
            ]))
            # -D: sshd stays our child, so its PID is known without racing the pid file.
            # The config path must be absolute (a relative one resets every connection).
            proc = subprocess.Popen([SSHD, "-D", "-f", str(config.resolve()), "-E", str(dev.log)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            dev.proc, dev.pid = proc, proc.pid
            if _wait_banner(dev.host, dev.port, proc):
                return
            log = dev.log.read_text() if dev.log.exists() else ""
            if proc.poll() is None:
                _stop_popen(proc)
            if "Address already in use" not in log:
                raise RuntimeError(f"sshd for test device {dev.name} did not start: "
                                   f"{log.strip()[-800:]}")
        raise RuntimeError(f"sshd for test device {dev.name}: no free port after 5 tries")

    def _limit_cpu(self, dev: TestDevice, quota: float, period_us: int | None) -> None:
        group = f"edgeops-test-{dev.user}"
        _run(["cgcreate", "-g", f"cpu,cpuset:/{group}"])
        dev.cgroup = group
        # A short period makes a short inference throttled evenly, like a slower CPU, instead
        # of running at full speed and then stalling (default period 100 ms: 75 ms stalls).
        # The shortest the kernel allows: quota >= 1 ms, so 4 ms for 25 % of a core. With a
        # 10 ms period a ~1.6 ms inference often still fits in one period's 2.5 ms budget.
        if period_us is None:
            period_us = max(1000, math.ceil(1000 / quota))
        quota_us = int(round(quota * period_us))
        if quota_us < 1000:
            raise ValueError(f"cpu quota {quota} x period {period_us} us is under the "
                             "kernel's 1000 us minimum")
        dev.cpu_period_us = period_us
        _run(["cgset", "-r", f"cpu.cfs_period_us={period_us}", group])
        _run(["cgset", "-r", f"cpu.cfs_quota_us={quota_us}", group])
        _run(["cgset", "-r", "cpuset.cpus=0", group])
        _run(["cgset", "-r", "cpuset.mems=0", group])
        _run(["cgclassify", "-g", f"cpu,cpuset:/{group}", str(dev.pid)])

    @contextlib.contextmanager
    def netns_link(self, dev: TestDevice):
        """A second sshd for ``dev`` (same user, host key and home) inside a network
        namespace of its own, reached over a veth pair: ``link.cut()`` drops the link
        silently (no FIN, no RST), the way a pulled cable or a dead radio does, which is what
        TCP_USER_TIMEOUT exists for (TESTBED.md section 3). Everything is removed on exit."""
        if not shutil.which("ip"):
            unavailable("ip (iproute2) missing: apt-get install -y iproute2")
        k = self._links
        self._links += 1
        if k >= 63:
            raise RuntimeError("too many netns links for one test bed")
        link = NetnsLink(ns=f"eo-{dev.user}-{k}", veth=f"{dev.user}h{k}", peer=f"{dev.user}n{k}",
                         host=f"10.200.250.{4 * k + 2}", gateway=f"10.200.250.{4 * k + 1}",
                         port=22)
        proc = None
        try:
            _run(["ip", "netns", "add", link.ns])
            _run(["ip", "link", "add", link.veth, "type", "veth", "peer", "name", link.peer])
            _run(["ip", "link", "set", link.peer, "netns", link.ns])
            _run(["ip", "addr", "add", f"{link.gateway}/30", "dev", link.veth])
            _run(["ip", "link", "set", link.veth, "up"])
            for cmd in (["ip", "addr", "add", f"{link.host}/30", "dev", link.peer],
                        ["ip", "link", "set", link.peer, "up"], ["ip", "link", "set", "lo", "up"]):
                _run(["ip", "netns", "exec", link.ns, *cmd])
            cfg = dev.root / "etc" / f"sshd_config.{link.ns}"
            text = (dev.root / "etc" / "sshd_config").read_text()
            text = re.sub(r"(?m)^Port .*$", f"Port {link.port}", text)
            text = re.sub(r"(?m)^ListenAddress .*$", f"ListenAddress {link.host}", text)
            text = re.sub(r"(?m)^PidFile .*$", f"PidFile {dev.root / (link.ns + '.pid')}", text)
            cfg.write_text(text)
            # `ip netns exec` execs sshd in place: the Popen pid is sshd's
            proc = subprocess.Popen(["ip", "netns", "exec", link.ns, SSHD, "-D", "-f", str(cfg),
                                     "-E", str(dev.root / f"sshd.{link.ns}.log")],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            link.pid = proc.pid
            if not _wait_banner(link.host, link.port, proc):
                raise RuntimeError(f"sshd in namespace {link.ns} did not start")
            yield link
        finally:
            sessions = _descendants(proc.pid, _procs()) if proc is not None else set()
            if proc is not None:
                _stop_popen(proc)
            _kill_and_wait(sessions)
            _run(["ip", "link", "del", link.veth], check=False)
            _run(["ip", "netns", "del", link.ns], check=False)

    def session_pids(self, dev: TestDevice) -> set[int]:
        """Every process of the device except its listening sshd: the per-connection sshd
        processes and whatever the device user runs."""
        table = _procs()
        pids = _descendants(dev.pid, table) if dev.pid > 0 else set()
        if dev.uid >= 0:
            pids |= {p for p, (_, uid, _) in table.items() if uid == dev.uid}
        pids.discard(dev.pid)
        return _alive(pids, table)

    def cut_sessions(self, dev: TestDevice, timeout: float = 5.0) -> set[int]:
        """Kill (SIGKILL) every open session of the device; its sshd keeps listening."""
        pids = self.session_pids(dev)
        # the sshd session processes hold the connection: kill them first, so the client
        # sees the link die rather than its command being killed (exit-signal + clean close)
        net = {p for p in pids if _comm(p) == "sshd"}
        left = _kill_and_wait(net, signal.SIGKILL, timeout)
        left |= _kill_and_wait(pids - net, signal.SIGKILL, timeout)
        if left:
            raise RuntimeError(f"device {dev.name}: processes {sorted(left)} did not die")
        return pids

    def stop_device(self, dev: TestDevice) -> None:
        sessions = self.session_pids(dev)
        if dev.proc is not None:
            _stop_popen(dev.proc)
        elif dev.pid > 0 and _kill_and_wait({dev.pid}, signal.SIGTERM, 3):
            _kill_and_wait({dev.pid})
        _kill_and_wait(sessions | self.session_pids(dev), signal.SIGKILL, 5)
        if dev.cgroup:
            _cgdelete(dev.cgroup)
            dev.cgroup = None
        _userdel(dev.user)
        dev.pid = -1
        if dev in self.devices:
            self.devices.remove(dev)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        errors = []
        for dev in list(self.devices):
            try:
                self.stop_device(dev)
            except Exception as e:  # keep stopping the others
                errors.append(f"{dev.name}: {e}")
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if errors:
            raise RuntimeError("test bed teardown: " + "; ".join(errors))


# ------------------------------------------------------------------ helpers


def _wait_banner(host: str, port: int, proc: subprocess.Popen, timeout: float = 10.0) -> bool:
    """True once sshd at host:port greets with its SSH banner; False if it exits or the
    bounded wait ends first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                s.settimeout(2)
                if s.recv(8).startswith(b"SSH-"):
                    return True
        except OSError:
            time.sleep(0.01)
    return False


def _stop_popen(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _cgroup_dirs(group: str) -> list[Path]:
    dirs = []
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[2] == "cgroup":
            opts = set(parts[3].split(","))
            if opts & {"cpu", "cpuset"}:
                dirs.append(Path(parts[1]) / group)
    return dirs


def _cgdelete(group: str) -> None:
    # one controller per call: `cgdelete -g cpu,cpuset:/g` (libcgroup 2.0.2, separate v1
    # hierarchies) leaves the cpuset group behind
    for ctl in ("cpu", "cpuset"):
        _run(["cgdelete", "-g", f"{ctl}:/{group}"], check=False)
    end = time.monotonic() + 3
    for d in _cgroup_dirs(group):
        while d.exists():
            try:
                d.rmdir()
            except OSError:
                if time.monotonic() > end:
                    raise RuntimeError(f"cgroup {d} could not be removed")
                time.sleep(0.05)


def _new_user_name() -> str:
    for _ in range(20):
        name = "eo" + secrets.token_hex(3)
        try:
            pwd.getpwnam(name)
        except KeyError:
            return name
    raise RuntimeError("no free test user name after 20 tries")


def _userdel(user: str) -> None:
    end = time.monotonic() + 5
    while True:
        res = _run(["userdel", user], check=False)
        if res.returncode in (0, 6):  # 6: no such user
            return
        if time.monotonic() > end:  # e.g. a zombie still counted as the user's process
            _run(["userdel", "-f", user], check=False)
            return
        time.sleep(0.1)


def _remove_stale_users() -> None:
    """Users left by a test run that was killed: ours (GECOS), with their test bed gone."""
    for pw in pwd.getpwall():
        if pw.pw_gecos == GECOS and re.fullmatch(r"eo[0-9a-f]{6}", pw.pw_name) \
                and not Path(pw.pw_dir).parent.exists():
            if not any(uid == pw.pw_uid for _, uid, _ in _procs().values()):
                _run(["userdel", pw.pw_name], check=False)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o755)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _runs_as(user: str, python: str, code: str) -> bool:
    try:
        res = subprocess.run(["runuser", "-u", user, "--", python, "-c", code], cwd="/",
                             capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def _pins() -> list[str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    missing = [p for p in DEVICE_PACKAGES if p not in pins]
    if missing:
        raise RuntimeError(f"{CONSTRAINTS} pins no version for {missing}")
    return [f"{p}=={pins[p]}" for p in DEVICE_PACKAGES]


def _resolve_device_python(user: str) -> str:
    """sys.executable when the device user can run it (numpy, onnxruntime, cryptography importable);
    otherwise (e.g. the venv lives under /root, mode 700) a shared venv at
    /opt/edgeops-testbed/devpy built from the system python with the repo's pinned versions."""
    check = "import numpy, onnxruntime, cryptography"
    if _runs_as(user, sys.executable, check):
        return sys.executable
    py = DEVPY / "bin" / "python"
    with _locked(RUNTIME_ROOT / ".lock"):
        if py.exists() and _runs_as(user, str(py), check):
            return str(py)
        if not os.path.exists(SYSTEM_PYTHON):
            unavailable(f"{SYSTEM_PYTHON} missing (base of the device runtime venv)")
        shutil.rmtree(DEVPY, ignore_errors=True)
        old = os.umask(0o022)
        try:
            _run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(DEVPY)], timeout=120)
            # the controller's pip installs into the device venv (pip >= 22.3: --python)
            _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                  "--no-input", *_pins()], timeout=900)
        finally:
            os.umask(old)
        _run(["chmod", "-R", "a+rX", str(RUNTIME_ROOT)])
        if not _runs_as(user, str(py), check):
            raise RuntimeError(f"device runtime {py} does not import {', '.join(DEVICE_PACKAGES)} "
                               f"as user {user}")
    return str(py)
