"""SSH transport to edge devices (paramiko), built so that a dead link never hangs.

Rules (DESIGN.md "Security model", TESTBED.md section 2):
- key-only authentication; a password is never sent;
- the host key is checked BEFORE authenticating: against the key pinned in the inventory, or
  against a known_hosts file; an unknown key is accepted only when the caller asks
  (``accept_new_host_key``, trust on first use at enrolment);
- every socket gets TCP_NODELAY (exec round trips of ~9 ms instead of ~49 ms) and
  TCP_USER_TIMEOUT (unacknowledged data for longer than ``user_timeout_ms`` aborts the
  connection, so a transfer over a cut link fails instead of hanging forever), plus TCP
  keepalive and an SSH keepalive every 5 s so that an idle link is probed too;
- uploads go to ``<remote>.part`` (a shorter .part left by a broken transfer is resumed), are
  checked with sha256 ON the device, then renamed into place atomically (posix-rename).

Every failure is one typed line (an ``SSHError`` subclass, exit code 3); no paramiko traceback
reaches the user.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import posixpath
import re
import select
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import paramiko

from edgeops.errors import EXIT_ENV, EdgeopsError, UsageError, first_line

# paramiko logs transport failures (with tracebacks) at ERROR level; with no handler at all
# Python's last-resort handler would print them to stderr. Errors reach the user as typed
# exceptions instead. An application that configures logging still sees them.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

SSH_KEEPALIVE_S = 5
SFTP_REQUEST_TIMEOUT_S = 120  # one SFTP request (a link that died is caught much sooner)
_CHUNK = 32768  # paramiko's SFTP request size

# host key name (as in an OpenSSH public-key line) -> host key algorithms to offer paramiko
_HOST_KEY_ALGOS = {
    "ssh-ed25519": ["ssh-ed25519"],
    "ecdsa-sha2-nistp256": ["ecdsa-sha2-nistp256"],
    "ecdsa-sha2-nistp384": ["ecdsa-sha2-nistp384"],
    "ecdsa-sha2-nistp521": ["ecdsa-sha2-nistp521"],
    "ssh-rsa": ["rsa-sha2-512", "rsa-sha2-256"],
}


# --------------------------------------------------------------------------- errors


class SSHError(EdgeopsError):
    """Any failure talking to a device over SSH."""

    exit_code = EXIT_ENV


class DeviceUnreachable(SSHError):
    """No SSH server could be reached (refused, timed out, no route, DNS, no SSH banner)."""


class AuthFailed(SSHError):
    """The device refused the key (or the key cannot be used)."""


class HostKeyMismatch(SSHError):
    """The device presented a host key other than the pinned/known one."""


class HostKeyUnknown(SSHError):
    """No pinned or known host key, and the caller did not ask to accept a new one."""


class LinkLost(SSHError):
    """The connection died during a command or a transfer."""


class RemoteError(SSHError):
    """A remote operation failed (file missing, permission, checksum, ...)."""


class CommandTimeout(RemoteError):
    """A remote command did not finish within its timeout (the link itself was alive)."""


# --------------------------------------------------------------------------- host keys


def fingerprint(key_line: str) -> str:
    """OpenSSH-style fingerprint ``SHA256:...`` of a public-key line."""
    _, blob = _split_key_line(key_line)
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def normalize_host_key(text: str) -> str:
    """``"<type> <base64>"`` from an OpenSSH public-key line, a known_hosts line or
    ssh-keyscan output (host names and comments dropped). Bad input -> UsageError."""
    kind, blob = _split_key_line(text)
    return f"{kind} {base64.b64encode(blob).decode()}"


def _split_key_line(text: str) -> tuple[str, bytes]:
    tokens = str(text or "").split()
    for i, tok in enumerate(tokens[:-1]):
        if tok in _HOST_KEY_ALGOS:
            try:
                blob = base64.b64decode(tokens[i + 1], validate=True)
            except (ValueError, TypeError):
                break
            # the blob starts with its own type name: uint32 length + name
            if len(blob) > 4:
                n = int.from_bytes(blob[:4], "big")
                if blob[4 : 4 + n] == tok.encode():
                    return tok, blob
            break
    shown = (str(text or "").strip()[:60] or "(empty)")
    raise UsageError(
        f"not an SSH public host key: {shown!r}",
        hint="expected an OpenSSH line such as 'ssh-ed25519 AAAAC3Nz...' "
        "(on the device: cat /etc/ssh/ssh_host_ed25519_key.pub)",
    )


def _key_line(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


# --------------------------------------------------------------------------- target


_NAME_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.\-]*$")


@dataclass
class SSHTarget:
    host: str
    user: str
    key_path: str
    port: int = 22
    host_key: str | None = None  # pinned, OpenSSH public-key line "ssh-ed25519 AAAA..."
    known_hosts: str | None = None  # consulted when host_key is None

    @property
    def label(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"

    @classmethod
    def parse(cls, spec: str, key_path, **kw) -> "SSHTarget":
        """``user@host:port``, ``user@host`` (port 22), ``user@[::1]:2222``, ``user@[::1]``."""
        bad = UsageError(
            f"bad device address {spec!r}",
            hint="use user@host or user@host:port (IPv6: user@[::1]:2222)",
        )
        s = str(spec or "").strip()
        user, at, rest = s.rpartition("@")
        if not at or not user or not rest or not _NAME_RE.match(user):
            raise bad
        port_text = None
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0:
                raise bad
            host, tail = rest[1:end], rest[end + 1 :]
            if tail:
                if not tail.startswith(":"):
                    raise bad
                port_text = tail[1:]
            if ":" not in host:
                raise bad
        elif rest.count(":") == 1:
            host, port_text = rest.split(":")
        elif rest.count(":") > 1:
            host = rest  # bare IPv6 address, default port
        else:
            host = rest
        if not host or any(c.isspace() or c in "/@[]" for c in host):
            raise bad
        port = 22
        if port_text is not None:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise bad
            port = int(port_text)
        return cls(host=host, user=user, key_path=str(key_path), port=port, **kw)


@dataclass
class CommandResult:
    rc: int  # -1 when the command ended without an exit status (killed by a signal)
    stdout: str
    stderr: str


# --------------------------------------------------------------------------- socket + key


def _open_socket(host: str, port: int, label: str, connect_timeout: float,
                 user_timeout_ms: int) -> socket.socket:
    hint = ("check that the device is powered and on the network, that sshd runs on that "
            "port, and the address in the inventory")
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except socket.gaierror as e:
        raise DeviceUnreachable(
            f"device {label} unreachable: cannot resolve host name ({e.strerror or e})",
            hint=hint) from None
    except ConnectionRefusedError:
        raise DeviceUnreachable(f"device {label} unreachable: connection refused",
                                hint=hint) from None
    except (socket.timeout, TimeoutError):
        raise DeviceUnreachable(
            f"device {label} unreachable: no answer within {connect_timeout:g} s",
            hint=hint) from None
    except OSError as e:
        reason = {errno.EHOSTUNREACH: "no route to host",
                  errno.ENETUNREACH: "network unreachable"}.get(e.errno, e.strerror or str(e))
        raise DeviceUnreachable(f"device {label} unreachable: {reason}", hint=hint) from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout_ms))
        probe_s = max(1, int(user_timeout_ms // 2000))
        for opt, val in (("TCP_KEEPIDLE", SSH_KEEPALIVE_S), ("TCP_KEEPINTVL", probe_s),
                         ("TCP_KEEPCNT", 3)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
    except OSError:
        sock.close()
        raise
    return sock


class _RecordingSocket:
    """The connection's socket, remembering the OS error that killed it: paramiko reports a
    failed write as a bare EOFError and treats the kernel's ETIMEDOUT (TCP_USER_TIMEOUT
    expired) like a poll timeout, so without this every dead link would read "closed"."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.error: OSError | None = None

    def _note(self, e: OSError) -> None:
        if e.errno not in (None, errno.EAGAIN, errno.EINTR) and self.error is None:
            self.error = e

    def recv(self, n: int) -> bytes:
        try:
            return self._sock.recv(n)
        except OSError as e:
            self._note(e)
            raise

    def send(self, data) -> int:
        try:
            return self._sock.send(data)
        except OSError as e:
            self._note(e)
            raise

    def __getattr__(self, name):
        return getattr(self._sock, name)


def load_private_key(key_path) -> paramiko.PKey:
    """The client key for key-only auth. Missing file -> UsageError; encrypted -> AuthFailed."""
    path = Path(str(key_path)).expanduser()
    try:
        return paramiko.PKey.from_path(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise UsageError(f"SSH key {path} not found",
                         hint="pass --key with the private key file enrolled on the devices") \
            from None
    except PermissionError:
        raise UsageError(f"SSH key {path} is not readable (permission denied)") from None
    except (TypeError, paramiko.PasswordRequiredException) as e:
        if "password" in str(e).lower() or "encrypt" in str(e).lower() or isinstance(
                e, paramiko.PasswordRequiredException):
            raise AuthFailed(
                f"SSH key {path} is protected by a passphrase",
                hint="edgeops needs a key file without passphrase for unattended fleet work: "
                "ssh-keygen -t ed25519 -N '' -f ~/.ssh/edgeops_ed25519, then add its .pub to "
                "the devices' authorized_keys") from None
        raise UsageError(f"cannot load SSH key {path}: {first_line(e)}") from None
    except Exception as e:  # UnknownKeyType, ValueError (corrupt), SSHException
        raise UsageError(
            f"cannot load SSH key {path}: {first_line(e)}",
            hint="use an OpenSSH or PEM ed25519, ecdsa or rsa private key") from None


# --------------------------------------------------------------------------- connect


def _handshake(sock, label: str, timeout: float,
               key_types: list[str] | None) -> paramiko.Transport:
    t = paramiko.Transport(sock)
    t.banner_timeout = timeout
    t.handshake_timeout = timeout
    t.auth_timeout = max(timeout, 10.0)
    if key_types:
        t.get_security_options().key_types = key_types
    try:
        t.start_client(timeout=timeout)
    except paramiko.IncompatiblePeer as e:
        t.close()
        raise SSHError(f"device {label}: no common SSH algorithms ({first_line(e)})") from None
    except (paramiko.SSHException, EOFError, OSError) as e:
        t.close()
        reason = first_line(t.get_exception() or e)
        raise DeviceUnreachable(
            f"device {label} unreachable: SSH handshake failed ({reason})",
            hint="is an SSH server listening on that port? a device under load may also "
            "drop new connections (sshd MaxStartups)") from None
    if not (t.is_active() and t.initial_kex_done):  # start_client returns on timeout
        t.close()
        raise DeviceUnreachable(
            f"device {label} unreachable: no SSH handshake within {timeout:g} s",
            hint="is an SSH server listening on that port? the device may be overloaded")
    return t


def fetch_host_key(host: str, port: int = 22, timeout: float = 10.0) -> str:
    """The host key the server at host:port presents, as an OpenSSH line (for enrolment; the
    caller decides whether to trust it). Nothing is authenticated."""
    label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock = _open_socket(host, port, label, timeout, 8000)
    t = _handshake(sock, label, timeout, None)
    try:
        return _key_line(t.get_remote_server_key())
    finally:
        t.close()


def _known_hosts_keys(path: str, host: str, port: int) -> list[str]:
    p = Path(path).expanduser()
    if not p.exists():
        return []
    try:
        hk = paramiko.HostKeys(str(p))
    except Exception as e:
        raise UsageError(f"cannot read known_hosts file {p}: {first_line(e)}") from None
    name = host if port == 22 else f"[{host}]:{port}"
    entry = hk.lookup(name)
    return [_key_line(k) for k in entry.values()] if entry else []


def connect(target: SSHTarget, *, accept_new_host_key: bool = False,
            connect_timeout: float = 10.0, user_timeout_ms: int = 8000) -> "Connection":
    """Open an authenticated SSH connection (see the module docstring for the rules)."""
    if hasattr(target, "ssh_target") and not isinstance(target, SSHTarget):
        target = target.ssh_target()  # an inventory Device
    label = target.label
    pkey = load_private_key(target.key_path)  # before any network: a missing key is usage

    expected: list[str] = []
    source = ""
    if target.host_key:
        expected = [normalize_host_key(target.host_key)]
        source = "pinned"
    elif target.known_hosts:
        expected = _known_hosts_keys(target.known_hosts, target.host, target.port)
        source = f"in {target.known_hosts}"
    key_types = [a for k in expected for a in _HOST_KEY_ALGOS[k.split()[0]]] or None

    sock = _open_socket(target.host, target.port, label, connect_timeout, user_timeout_ms)
    rsock = _RecordingSocket(sock)
    t = _handshake(rsock, label, connect_timeout, key_types)
    try:
        presented = _key_line(t.get_remote_server_key())
        if expected and presented not in expected:
            exp = ", ".join(f"{fingerprint(k)} ({k.split()[0]})" for k in expected)
            raise HostKeyMismatch(
                f"host key of device {label} does not match the {source} key: expected "
                f"{exp}, presented {fingerprint(presented)} ({presented.split()[0]})",
                hint="if the device was re-imaged, re-enrol it with its new host key; "
                "otherwise something may be intercepting the connection: do not continue")
        if not expected and not accept_new_host_key:
            raise HostKeyUnknown(
                f"host key of device {label} is unknown (presented "
                f"{fingerprint(presented)}, {presented.split()[0]})",
                hint="pin it with --host-key '<line of /etc/ssh/ssh_host_ed25519_key.pub on "
                "the device>', or trust it on first use with --accept-new-host-key")
        try:
            remaining = t.auth_publickey(target.user, pkey)
        except paramiko.BadAuthenticationType as e:
            raise AuthFailed(
                f"device {label} does not accept public-key login for {target.user!r} "
                f"(allowed: {', '.join(e.allowed_types) or 'none'})") from None
        except paramiko.AuthenticationException as e:
            if "timeout" in str(e).lower():
                raise DeviceUnreachable(
                    f"device {label}: no answer to authentication within "
                    f"{t.auth_timeout:g} s", hint="the device may be overloaded") from None
            raise AuthFailed(
                f"device {label} refused the key {target.key_path}",
                hint=f"add {target.key_path}.pub to ~{target.user}/.ssh/authorized_keys on "
                "the device and check the user name") from None
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise DeviceUnreachable(
                f"device {label}: connection dropped during authentication "
                f"({first_line(t.get_exception() or e)})") from None
        if remaining or not t.is_authenticated():
            raise AuthFailed(
                f"device {label} asks for more than a key ({', '.join(remaining)})",
                hint="edgeops uses key-only authentication; configure sshd accordingly")
        t.set_keepalive(SSH_KEEPALIVE_S)
    except BaseException:
        t.close()
        raise
    conn = Connection(t, sock, target, presented)
    conn._rsock = rsock
    conn._user_timeout_ms = user_timeout_ms
    return conn


# --------------------------------------------------------------------------- connection


def _sftp_path(path: str) -> str:
    """'~/x' -> 'x': SFTP and exec both start in the login user's home directory."""
    path = str(path)
    if path == "~":
        return "."
    if path.startswith("~/"):
        return path[2:] or "."
    return path


def _short(cmd: str, n: int = 80) -> str:
    cmd = " ".join(cmd.split())
    return cmd if len(cmd) <= n else cmd[: n - 3] + "..."


class Connection:
    """An authenticated SSH connection to one device. Use as a context manager."""

    def __init__(self, transport: paramiko.Transport, sock: socket.socket,
                 target: SSHTarget, host_key: str):
        self._transport = transport
        self.sock = sock
        self.target = target
        self.label = target.label
        self.host_key = host_key  # the key the server presented
        self.python = "python3"  # used by the sha256 fallback
        self.last_put_sent = 0  # bytes actually sent by the last put() (resume skips some)
        self._sftp: paramiko.SFTPClient | None = None
        self._closed = False
        self._rsock: _RecordingSocket | None = None
        self._user_timeout_ms = 0

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Connection {self.label} {'closed' if self._closed else 'open'}>"

    @property
    def alive(self) -> bool:
        return not self._closed and self._transport.is_active()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._sftp is not None:
                self._sftp.close()
        except Exception:
            pass
        try:
            self._transport.close()
        except Exception:
            pass

    # -- failures -----------------------------------------------------------------

    def _reason(self, exc: BaseException | None = None) -> str:
        saved = self._transport.get_exception()
        oserr = self._rsock.error if self._rsock is not None else None
        if oserr is not None:
            if oserr.errno == errno.ETIMEDOUT:
                return (f"no answer from the device for {self._user_timeout_ms / 1000:g} s "
                        "(TCP_USER_TIMEOUT)")
            if oserr.errno == errno.ECONNRESET:
                return "connection reset by the device"
            if oserr.errno == errno.EPIPE:
                return "connection broken"
            return oserr.strerror or first_line(oserr)
        src = saved or exc
        if src is None or isinstance(src, EOFError) or not str(src).strip():
            return "connection closed by the device"
        return first_line(src)

    def _lost(self, what: str, exc: BaseException | None = None, hint: str | None = None):
        reason = self._reason(exc)
        self.close()
        return LinkLost(
            f"link to device {self.label} lost while {what}: {reason}",
            hint=hint or "the device rebooted, lost its network or its sshd died; "
            "reconnect and retry")

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise LinkLost(f"connection to device {self.label} is closed (while {what})",
                           hint="open a new connection")
        if not self._transport.is_active():
            raise self._lost(what)

    # -- commands -----------------------------------------------------------------

    def run(self, cmd: str | list[str], timeout: float = 120,
            stdin: bytes | None = None) -> CommandResult:
        """Run a command; returns rc/stdout/stderr. A list is shell-quoted (shlex.join).
        The link dying -> LinkLost; exceeding ``timeout`` -> CommandTimeout (a RemoteError),
        the channel is closed. Never blocks for longer than the timeout (plus TCP's)."""
        command = shlex.join([str(c) for c in cmd]) if isinstance(cmd, (list, tuple)) else cmd
        what = f"running `{_short(command)}`"
        self._check_open(what)
        deadline = time.monotonic() + timeout
        try:
            chan = self._transport.open_session(timeout=max(1.0, min(timeout, 30.0)))
        except (paramiko.SSHException, EOFError, OSError) as e:
            if not self._transport.is_active():
                raise self._lost(what, e) from None
            raise RemoteError(f"device {self.label} refused a session: {first_line(e)}",
                              hint="sshd MaxSessions reached?") from None
        try:
            return self._run_on(chan, command, what, timeout, deadline, stdin)
        finally:
            try:
                chan.close()
            except Exception:
                pass

    def _run_on(self, chan, command, what, timeout, deadline, stdin) -> CommandResult:
        # paramiko waits for the exec reply without a timeout: a watchdog closes the channel
        # at the deadline so that a device that never answers cannot hold us
        expired = threading.Event()

        def _expire():
            expired.set()
            chan.close()

        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            chan.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as e:
            if not self._transport.is_active():
                raise self._lost(what, e) from None
            if expired.is_set():
                raise CommandTimeout(
                    f"device {self.label} did not start `{_short(command)}` within "
                    f"{timeout:g} s", hint="the device may be overloaded") from None
            if chan.closed:
                raise self._lost(what, e) from None
            raise RemoteError(f"device {self.label} refused to run `{_short(command)}`: "
                              f"{first_line(e)}") from None
        finally:
            watchdog.cancel()

        def timed_out() -> CommandTimeout:
            return CommandTimeout(
                f"command on device {self.label} did not finish within {timeout:g} s: "
                f"`{_short(command)}`",
                hint="the link is alive; the command may still be running on the device")

        fd = chan.fileno()  # becomes readable on stdout/stderr data, EOF and close
        writer_error: list[BaseException] = []
        if stdin:
            def _write():
                try:
                    chan.sendall(stdin)
                    chan.shutdown_write()
                except BaseException as e:  # reported by the reader loop
                    writer_error.append(e)
            threading.Thread(target=_write, daemon=True, name="edgeops-ssh-stdin").start()
        else:
            chan.shutdown_write()

        out, err = bytearray(), bytearray()

        def drain():
            while chan.recv_ready():
                out.extend(chan.recv(65536))
            while chan.recv_stderr_ready():
                err.extend(chan.recv_stderr(65536))

        def has_status() -> bool:  # paramiko's exit_status_ready() is also true on close
            return chan.exit_status != -1

        exit_at = None
        while True:
            drain()
            if chan.closed:
                drain()
                if has_status():
                    break
                if expired.is_set():  # the exec watchdog fired just as the command started
                    raise timed_out()
                if not chan.eof_received:  # closed under us: the transport died
                    raise self._lost(what)
                # EOF + close without exit status: killed by a signal, or the link died
                # right after the EOF (paramiko closes channels before marking the
                # transport inactive, so give it a moment to tell)
                settle = time.monotonic() + 0.2
                while self._transport.is_active() and time.monotonic() < settle:
                    time.sleep(0.01)
                if not self._transport.is_active():
                    raise self._lost(what)
                break
            if has_status():
                if chan.eof_received:
                    drain()
                    break
                # exit status without EOF: a background child keeps stdout open
                exit_at = exit_at or time.monotonic()
                if time.monotonic() - exit_at > 2.0:
                    break
            if not self._transport.is_active():
                raise self._lost(what, writer_error[0] if writer_error else None)
            left = deadline - time.monotonic()
            if left <= 0:
                raise timed_out()
            select.select([fd], [], [], min(left, 0.5))
        rc = chan.exit_status if has_status() else -1
        return CommandResult(rc=rc, stdout=out.decode("utf-8", "replace"),
                             stderr=err.decode("utf-8", "replace"))

    # -- files ----------------------------------------------------------------------

    def _sftp_client(self, what: str) -> paramiko.SFTPClient:
        self._check_open(what)
        if self._sftp is None:
            try:
                self._sftp = self._transport.open_sftp_client()
                # a live but stuck sftp-server must not hold us forever either
                self._sftp.get_channel().settimeout(SFTP_REQUEST_TIMEOUT_S)
            except (paramiko.SSHException, EOFError, OSError) as e:
                if not self._transport.is_active():
                    raise self._lost(what, e) from None
                raise RemoteError(f"device {self.label} has no SFTP service: {first_line(e)}",
                                  hint="enable 'Subsystem sftp internal-sftp' in sshd_config")\
                    from None
        return self._sftp

    def _file_error(self, e: BaseException, what: str, hint: str | None = None):
        """Map an exception raised during SFTP work: link death -> LinkLost, else RemoteError."""
        chan = self._sftp.get_channel() if self._sftp is not None else None
        if isinstance(e, socket.timeout) and self._transport.is_active() and e.errno is None:
            self.close()  # the SFTP session is out of step now
            return RemoteError(f"device {self.label}: {what} failed: no SFTP answer within "
                               f"{SFTP_REQUEST_TIMEOUT_S} s", hint="the device may be overloaded")
        link_dead = (not self._transport.is_active() or (chan is not None and chan.closed)
                     or isinstance(e, (EOFError, ConnectionError, socket.timeout)))
        if link_dead:
            return self._lost(what, e, hint=hint)
        if isinstance(e, (OSError, IOError)) and e.errno is not None:
            reason = os.strerror(e.errno) if e.errno else first_line(e)
        else:
            reason = first_line(e)
        return RemoteError(f"device {self.label}: {what} failed: {reason}")

    def _makedirs(self, sftp: paramiko.SFTPClient, directory: str) -> None:
        if directory in ("", ".", "/"):
            return
        try:
            sftp.stat(directory)
            return
        except FileNotFoundError:
            pass
        self._makedirs(sftp, posixpath.dirname(directory.rstrip("/")))
        try:
            sftp.mkdir(directory)
        except OSError:
            sftp.stat(directory)  # raced with someone else creating it: fine if it exists

    def sha256(self, remote: str) -> str:
        """sha256 of a file, computed on the device (sha256sum, else python3 hashlib)."""
        path = _sftp_path(remote)
        res = self.run(["sha256sum", "--", path], timeout=300)
        m = re.match(r"^\\?([0-9a-f]{64})\s", res.stdout)
        if res.rc == 0 and m:
            return m.group(1)
        code = ("import hashlib,sys\nh=hashlib.sha256()\nf=open(sys.argv[1],'rb')\n"
                "for b in iter(lambda: f.read(1<<20), b''): h.update(b)\nprint(h.hexdigest())")
        res2 = self.run([self.python, "-c", code, path], timeout=300)
        m = re.match(r"^([0-9a-f]{64})\s*$", res2.stdout)
        if res2.rc == 0 and m:
            return m.group(1)
        detail = (res.stderr.strip() or res2.stderr.strip() or "no sha256sum or python3")
        raise RemoteError(f"cannot compute sha256 of {remote} on device {self.label}: "
                          f"{detail.splitlines()[-1][:200]}")

    def put(self, local, remote: str, *, resume: bool = True,
            progress: Callable[[int, int], None] | None = None) -> str:
        """Upload ``local`` to ``remote`` through ``remote + '.part'`` and return its sha256.

        A shorter existing .part is resumed (when ``resume``); the device checks the sha256
        before the atomic rename. On a mismatch the upload restarts from 0 once, then
        RemoteError. ``progress(done, total)`` is called as bytes are sent (``done`` counts
        resumed bytes too). If the link dies the .part stays for the next attempt.
        """
        local = Path(local)
        try:
            total = local.stat().st_size
            h = hashlib.sha256()
            with open(local, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as e:
            raise UsageError(f"cannot read {local}: {e.strerror or first_line(e)}") from None
        want = h.hexdigest()
        dest = _sftp_path(remote)
        part = dest + ".part"
        what = f"uploading {local.name} to {remote}"
        keep_hint = (f"the partial upload {remote}.part is kept on the device; "
                     "reconnect and put again to resume")
        sftp = self._sftp_client(what)
        try:
            self._makedirs(sftp, posixpath.dirname(dest))
        except Exception as e:
            raise self._file_error(e, f"creating the folder of {remote}") from None
        self.last_put_sent = 0

        for attempt in (0, 1):
            offset = 0
            if resume and attempt == 0:
                try:
                    size = sftp.stat(part).st_size or 0
                    offset = size if size <= total else 0
                except FileNotFoundError:
                    pass
                except Exception as e:
                    raise self._file_error(e, f"checking {remote}.part") from None
            if offset < total or offset == 0:
                self._send(sftp, local, part, offset, total, progress, what, keep_hint)
            elif progress is not None:
                progress(total, total)
            got = self.sha256(part)
            if got == want:
                break
            if attempt == 1:
                raise RemoteError(
                    f"upload of {local.name} to device {self.label} is corrupt twice "
                    f"(sha256 on the device {got[:12]}..., expected {want[:12]}...)",
                    hint="the device's storage may be failing or full")
        try:
            sftp.posix_rename(part, dest)
        except Exception as e:
            raise self._file_error(e, f"renaming {remote}.part into place") from None
        return want

    def _send(self, sftp, local: Path, part: str, offset: int, total: int, progress,
              what: str, keep_hint: str) -> None:
        done = offset
        try:
            with open(local, "rb") as src:
                rf = sftp.open(part, "r+b" if offset else "wb")
                try:
                    rf.set_pipelined(True)
                    if offset:
                        rf.seek(offset)
                        src.seek(offset)
                    if progress is not None:
                        progress(done, total)
                    for block in iter(lambda: src.read(_CHUNK), b""):
                        rf.write(block)
                        done += len(block)
                        self.last_put_sent += len(block)
                        if progress is not None:
                            progress(done, total)
                finally:
                    try:
                        rf.close()  # waits for the pipelined write acknowledgements
                    except Exception:
                        if self._transport.is_active():
                            raise
        except OSError as e:
            if isinstance(e, (FileNotFoundError, PermissionError)) and e.filename == str(local):
                raise UsageError(f"cannot read {local}: {e.strerror}") from None
            raise self._file_error(e, what, hint=keep_hint) from None
        except (paramiko.SSHException, EOFError) as e:
            raise self._file_error(e, what, hint=keep_hint) from None

    def get(self, remote: str, local) -> None:
        """Download ``remote`` to ``local`` (written to local + '.part', then renamed)."""
        local = Path(local)
        src = _sftp_path(remote)
        what = f"downloading {remote}"
        sftp = self._sftp_client(what)
        tmp = local.with_name(local.name + ".part")
        try:
            sftp.get(src, str(tmp))
        except (OSError, paramiko.SSHException, EOFError) as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.filename in (str(tmp), str(local)):
                raise UsageError(f"cannot write {local}: {e.strerror}") from None
            if isinstance(e, FileNotFoundError) and self._transport.is_active():
                raise RemoteError(f"{remote} does not exist on device {self.label}") from None
            raise self._file_error(e, what) from None
        os.replace(tmp, local)


# --------------------------------------------------------------------------- the agent over SSH

AGENT_PACKAGE = "edgeops_agent"      # the agent package's name on devices


class SSHDeviceLink:
    """transport.DeviceLink over one SSH connection: the agent's commands run as
    `PYTHONPATH=ROOT/agent/current PYTHON -m edgeops_agent --root ROOT ...`, files go through
    SFTP with resume and a sha256 check on the device (Connection.put)."""

    def __init__(self, conn: Connection, python: str, root: str, label: str):
        self.conn, self.python, self.root, self.label = conn, python, root.rstrip("/"), label

    def command(self, *args: str) -> list[str]:
        return ["env", f"PYTHONPATH={self.root}/agent/current", self.python, "-m", AGENT_PACKAGE,
                "--root", self.root, *map(str, args)]

    def agent(self, *args: str, timeout: float = 600) -> tuple[int, dict]:
        res = self.conn.run(self.command(*args), timeout=timeout)
        lines = res.stdout.strip().splitlines()
        try:
            doc = json.loads(lines[-1]) if lines else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            tail = (res.stderr.strip().splitlines() or [f"exit {res.rc}, no output"])[-1][:300]
            if f"No module named {AGENT_PACKAGE}" in res.stderr:
                raise RemoteError(f"device {self.label} has no edgeops agent in {self.root}",
                                  hint="enrol it first: edgeops devices enrol ...")
            raise RemoteError(f"the agent on device {self.label} answered no JSON ({' '.join(args[:1])}): {tail}")
        return res.rc, doc

    def has(self, remote: str, sha256: str) -> bool:
        try:
            return self.conn.sha256(f"{self.root}/{remote}") == sha256
        except RemoteError:
            return False

    def upload(self, local, remote: str, *, sha256: str | None = None, progress=None):
        from .transport import Upload

        local = Path(local)
        size = local.stat().st_size
        if sha256 and self.has(remote, sha256):
            if progress is not None:
                progress(size, size)
            return Upload(remote, sha256, size, 0, True)
        got = self.conn.put(local, f"{self.root}/{remote}", resume=True, progress=progress)
        return Upload(remote, got, size, self.conn.last_put_sent, False)

    def close(self) -> None:
        self.conn.close()
