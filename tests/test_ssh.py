"""SSH transport + inventory against real OpenSSH devices on loopback (tests/testbed.py).
No mocks: real sshd, real sockets, real SFTP, real process kills."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgeops.errors import EXIT_ENV, UsageError
from edgeops.fleet.inventory import Device, Inventory, enrol
from edgeops.fleet.ssh import (AuthFailed, CommandTimeout, DeviceUnreachable, HostKeyMismatch,
                               HostKeyUnknown, LinkLost, RemoteError, SSHError, SSHTarget,
                               connect, fetch_host_key, fingerprint, normalize_host_key)
from testbed import free_port, generate_ed25519

ssh = pytest.mark.ssh


def _other_host_key() -> str:
    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    return pub.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode()


def _one_line(exc: BaseException) -> None:
    assert str(exc) and "\n" not in str(exc) and "Traceback" not in str(exc)


def _log_count(dev, needle: str) -> int:
    return dev.log.read_text(errors="replace").count(needle)


# ------------------------------------------------------------------ pure (no network)


def test_parse_target_specs():
    t = SSHTarget.parse("pi@10.0.0.5:2222", "/k")
    assert (t.user, t.host, t.port, t.key_path) == ("pi", "10.0.0.5", 2222, "/k")
    assert SSHTarget.parse("pi@board.local", "/k").port == 22
    t6 = SSHTarget.parse("root@[::1]:2200", "/k", host_key="x")
    assert (t6.host, t6.port, t6.host_key, t6.label) == ("::1", 2200, "x", "root@[::1]:2200")
    assert SSHTarget.parse("u@[fe80::1]", "/k").port == 22
    for bad in ["", "host", "@h", "u@", "u@h:0", "u@h:99999", "u@h:x", "u@[::1", "u@[::1]x",
                "u@[h]:22", "u@h/x", "u v@h"]:
        with pytest.raises(UsageError):
            SSHTarget.parse(bad, "/k")


def test_host_key_lines():
    line = _other_host_key()
    assert normalize_host_key(f"[127.0.0.1]:22 {line} comment") == line
    assert fingerprint(line).startswith("SHA256:") and "=" not in fingerprint(line)
    for bad in ["", "ssh-ed25519", "ssh-ed25519 notbase64!", "ssh-rsa " + line.split()[1]]:
        with pytest.raises(UsageError):
            normalize_host_key(bad)


# ------------------------------------------------------------------ connect + run


@ssh
def test_connect_run_and_socket_options(device):
    with connect(device.ssh_target()) as conn:
        assert conn.host_key == device.host_key
        res = conn.run("echo hi; echo err >&2; exit 3")
        assert (res.rc, res.stdout, res.stderr) == (3, "hi\n", "err\n")
        assert conn.run(["printf", "%s|", "a b", "c'd", "$HOME"]).stdout == "a b|c'd|$HOME|"
        assert conn.run("id -un").stdout.strip() == device.user
        s = conn.sock
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 8000
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
        # TCP_NODELAY makes an exec round trip cheap (TESTBED.md: ~9 ms vs ~49 ms)
        t0 = time.monotonic()
        for _ in range(10):
            assert conn.run("true").rc == 0
        assert (time.monotonic() - t0) / 10 < 0.04
    assert not conn.alive
    with connect(device.ssh_target(), user_timeout_ms=3000) as conn:
        assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 3000


@ssh
def test_run_stdin_large_output_and_timeout(device):
    blob = os.urandom(3 << 20)
    with connect(device.ssh_target()) as conn:
        # stdin and stdout both larger than the SSH window: no deadlock
        res = conn.run("sha256sum; head -c 3000000 /dev/zero | tr '\\0' x >&2", stdin=blob)
        assert res.rc == 0 and res.stdout.split()[0] == hashlib.sha256(blob).hexdigest()
        assert len(res.stderr) == 3_000_000
        t0 = time.monotonic()
        with pytest.raises(CommandTimeout) as ei:
            conn.run("sleep 5", timeout=0.5)
        assert time.monotonic() - t0 < 2.5
        assert isinstance(ei.value, RemoteError) and "0.5 s" in str(ei.value)
        _one_line(ei.value)
        assert conn.run("echo still").stdout == "still\n"  # the connection survived
        # killed by a signal: no exit status, but the link is fine -> rc -1, not LinkLost
        res = conn.run("echo before; kill -9 $$")
        assert (res.rc, res.stdout) == (-1, "before\n") and conn.alive


# ------------------------------------------------------------------ files


@ssh
def test_put_get_roundtrip(device, tmp_path):
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom((2 << 20) + 123))
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    seen = []
    with connect(device.ssh_target()) as conn:
        got = conn.put(src, "~/rt/a/b/model.bin", progress=lambda d, t: seen.append((d, t)))
        assert got == want
        assert seen[-1] == (src.stat().st_size, src.stat().st_size)
        assert conn.run(["sha256sum", "rt/a/b/model.bin"]).stdout.split()[0] == want
        assert conn.run("test -e rt/a/b/model.bin.part").rc == 1  # renamed into place
        # overwrite with new content: still atomic rename over the old file
        src.write_bytes(b"v2")
        assert conn.put(src, "rt/a/b/model.bin") == hashlib.sha256(b"v2").hexdigest()
        conn.get("rt/a/b/model.bin", tmp_path / "back.bin")
        assert (tmp_path / "back.bin").read_bytes() == b"v2"
        empty = tmp_path / "empty"
        empty.write_bytes(b"")
        assert conn.put(empty, "rt/empty") == hashlib.sha256(b"").hexdigest()
        with pytest.raises(RemoteError) as ei:
            conn.get("rt/does-not-exist", tmp_path / "x")
        _one_line(ei.value)
        assert not (tmp_path / "x").exists() and not (tmp_path / "x.part").exists()
        with pytest.raises(RemoteError):
            conn.put(src, "/proc/edgeops-cannot-write-here")
        assert conn.run("echo ok").rc == 0


@ssh
def test_put_resumes_partial_upload(device, tmp_path):
    data = os.urandom(4 << 20)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    half = len(data) // 2
    seen = []
    with connect(device.ssh_target()) as conn:
        conn.run("mkdir -p resume && rm -f resume/big.bin")
        # what a transfer cut in the middle leaves behind
        assert conn.run(["sh", "-c", 'cat > "$1"', "sh", "resume/big.bin.part"],
                        stdin=data[:half]).rc == 0
        sha = conn.put(src, "resume/big.bin", progress=lambda d, t: seen.append(d))
        assert sha == hashlib.sha256(data).hexdigest()
        assert conn.last_put_sent == len(data) - half  # only the missing half went out
        assert seen[0] == half and seen[-1] == len(data)
        assert conn.sha256("resume/big.bin") == sha
        # a .part with wrong bytes: device-side sha mismatch -> restart from 0 once
        conn.run(["sh", "-c", 'cat > "$1"', "sh", "resume/big.bin.part"],
                 stdin=os.urandom(half))
        assert conn.put(src, "resume/big.bin") == sha
        assert conn.last_put_sent == (len(data) - half) + len(data)
        assert conn.sha256("resume/big.bin") == sha
        # resume=False ignores the .part
        conn.run(["sh", "-c", 'cat > "$1"', "sh", "resume/big.bin.part"], stdin=data[:half])
        conn.put(src, "resume/big.bin", resume=False)
        assert conn.last_put_sent == len(data)


# ------------------------------------------------------------------ host keys + auth


@ssh
def test_pinned_host_key_mismatch_before_auth(device):
    before = _log_count(device, "publickey")
    wrong = _other_host_key()
    with pytest.raises(HostKeyMismatch) as ei:
        connect(device.ssh_target(host_key=wrong))
    e = ei.value
    _one_line(e)
    assert fingerprint(wrong) in str(e) and fingerprint(device.host_key) in str(e)
    assert "re-enrol" in e.hint and e.exit_code == EXIT_ENV
    assert _log_count(device, "publickey") == before  # never authenticated
    # accept_new_host_key never overrides a pinned key
    with pytest.raises(HostKeyMismatch):
        connect(device.ssh_target(host_key=wrong), accept_new_host_key=True)


@ssh
def test_unknown_host_key_and_known_hosts(device, tmp_path):
    with pytest.raises(HostKeyUnknown) as ei:
        connect(device.ssh_target(host_key=None))
    _one_line(ei.value)
    assert fingerprint(device.host_key) in str(ei.value)
    assert "--accept-new-host-key" in ei.value.hint
    with connect(device.ssh_target(host_key=None), accept_new_host_key=True) as conn:
        assert conn.host_key == device.host_key
        assert conn.run("echo ok").stdout == "ok\n"
    assert fetch_host_key(device.host, device.port) == device.host_key

    kh = tmp_path / "known_hosts"
    kh.write_text(f"[{device.host}]:{device.port} {device.host_key}\n")
    with connect(device.ssh_target(host_key=None, known_hosts=str(kh))) as conn:
        assert conn.run("true").rc == 0
    kh.write_text(f"[{device.host}]:{device.port} {_other_host_key()}\n")
    with pytest.raises(HostKeyMismatch):
        connect(device.ssh_target(host_key=None, known_hosts=str(kh)))
    kh.write_text(f"[{device.host}]:{device.port + 1} {device.host_key}\n")  # other host
    with pytest.raises(HostKeyUnknown):
        connect(device.ssh_target(host_key=None, known_hosts=str(kh)))


@ssh
def test_client_key_problems(device, tmp_path):
    other = tmp_path / "other_ed25519"
    generate_ed25519(other)
    with pytest.raises(AuthFailed) as ei:
        connect(device.ssh_target(key_path=str(other)))
    _one_line(ei.value)
    assert "refused the key" in str(ei.value) and "authorized_keys" in ei.value.hint

    locked = tmp_path / "locked_ed25519"
    locked.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(AuthFailed) as ei:
        connect(device.ssh_target(key_path=str(locked)))
    assert "passphrase" in str(ei.value) and "ssh-keygen" in ei.value.hint

    with pytest.raises(UsageError) as ei:
        connect(device.ssh_target(key_path=str(tmp_path / "missing")))
    assert "not found" in str(ei.value)
    garbage = tmp_path / "garbage"
    garbage.write_text("not a key\n")
    with pytest.raises(UsageError):
        connect(device.ssh_target(key_path=str(garbage)))
    with pytest.raises(AuthFailed):  # right key, wrong user (AllowUsers)
        connect(device.ssh_target().__class__(host=device.host, port=device.port, user="nobody",
                                              key_path=device.key_path,
                                              host_key=device.host_key))


@ssh
def test_closed_port_is_unreachable_quickly(testbed):
    port = free_port()  # nothing listens there
    target = SSHTarget.parse(f"u@127.0.0.1:{port}", testbed.key_path, host_key=_other_host_key())
    t0 = time.monotonic()
    with pytest.raises(DeviceUnreachable) as ei:
        connect(target, connect_timeout=3)
    assert time.monotonic() - t0 < 5
    e = ei.value
    _one_line(e)
    assert str(e) == f"device u@127.0.0.1:{port} unreachable: connection refused"
    assert e.hint and isinstance(e, SSHError) and e.exit_code == EXIT_ENV
    with pytest.raises(DeviceUnreachable):
        fetch_host_key("127.0.0.1", port, timeout=3)


@ssh
def test_not_an_ssh_server_is_unreachable(testbed):
    with socket.socket() as srv:  # accepts, then says nothing
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        target = SSHTarget.parse(f"u@127.0.0.1:{port}", testbed.key_path,
                                 host_key=_other_host_key())
        t0 = time.monotonic()
        with pytest.raises(DeviceUnreachable) as ei:
            connect(target, connect_timeout=1.5)
        assert time.monotonic() - t0 < 5
        _one_line(ei.value)


# ------------------------------------------------------------------ inventory


@ssh
def test_inventory_enrol_roundtrip(device, testbed, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEOPS_HOME", str(tmp_path / "home"))
    inv = Inventory()
    assert inv.path == tmp_path / "home" / "devices.json"
    assert inv.list() == []

    with pytest.raises(UsageError) as ei:  # no key and no permission to trust one
        enrol("pi1", device.spec, testbed.key_path)
    assert "--host-key" in ei.value.hint and "--accept-new-host-key" in ei.value.hint
    assert not inv.path.exists()

    d1 = enrol("pi1", device.spec, testbed.key_path, accept_new_host_key=True,
               python=device.python)
    assert d1.host_key == device.host_key and d1.port == device.port
    d2 = enrol("pi2", device.spec, testbed.key_path, host_key=device.host_key + " comment",
               inventory=Inventory())
    assert d2.host_key == device.host_key
    with pytest.raises(HostKeyMismatch):
        enrol("pi3", device.spec, testbed.key_path, host_key=_other_host_key())
    with pytest.raises(UsageError):
        enrol("pi1", device.spec, testbed.key_path, host_key=device.host_key)  # duplicate
    with pytest.raises(UsageError):
        enrol("pi4", device.spec, testbed.key_path, host_key=device.host_key,
              python="/nonexistent/python3")
    assert [d.name for d in Inventory().list()] == ["pi1", "pi2"]

    again = Inventory().get("pi1")
    assert again == d1 and again.python == device.python and again.workdir == "~/.edgeops"
    with connect(again.ssh_target()) as conn:
        assert conn.run("echo ok").stdout == "ok\n"
    with connect(again) as conn:  # a Device works as a target too
        assert conn.host_key == device.host_key

    with pytest.raises(UsageError) as ei:
        inv.get("nope")
    assert "pi1, pi2" in str(ei.value)
    assert inv.remove("pi1").name == "pi1"
    assert inv.names() == ["pi2"]
    with pytest.raises(UsageError):
        inv.remove("pi1")

    data = json.loads(inv.path.read_text())
    assert data["version"] == 1 and list(data["devices"]) == ["pi2"]
    assert stat.S_IMODE(inv.path.stat().st_mode) == 0o600
    inv.add(Device(name="pi2", host="127.0.0.1", port=1, user="u", key_path="~/k",
                   host_key=device.host_key, tags=["lab"]), replace=True)
    assert inv.get("pi2").tags == ["lab"] and not inv.get("pi2").key_path.startswith("~")
    with pytest.raises(UsageError):
        inv.add(Device(name="bad name", host="h", port=22, user="u", key_path="k",
                       host_key=device.host_key))
    assert not [p for p in inv.path.parent.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ dead links


@ssh
def test_cut_link_fails_fast(testbed):
    dev = testbed.add_device("cut")  # its own device: the shared one stays intact
    try:
        conn = connect(dev.ssh_target())
        killed = []

        def cut():
            end = time.monotonic() + 10
            while time.monotonic() < end:  # wait until the command really runs
                procs = testbed.session_pids(dev)
                if any(Path(f"/proc/{p}/comm").read_text().strip() == "sleep"
                       for p in procs if Path(f"/proc/{p}/comm").exists()):
                    break
                time.sleep(0.02)
            killed.extend(testbed.cut_sessions(dev))

        th = threading.Thread(target=cut, daemon=True)
        t0 = time.monotonic()
        th.start()
        with pytest.raises(LinkLost) as ei:
            conn.run("sleep 60", timeout=45)
        elapsed = time.monotonic() - t0
        th.join(10)
        assert killed and elapsed < 10, elapsed
        _one_line(ei.value)
        assert "lost while running `sleep 60`" in str(ei.value)
        assert not conn.alive
        with pytest.raises(LinkLost):  # later calls fail at once, typed
            conn.run("true")
        # the device itself is still up: a new connection works
        with connect(dev.ssh_target()) as c2:
            assert c2.run("echo back").stdout == "back\n"
    finally:
        testbed.stop_device(dev)
    assert dev not in testbed.devices


@ssh
def test_cut_link_during_upload_keeps_part_for_resume(testbed, tmp_path):
    dev = testbed.add_device("cutput")
    data = os.urandom(24 << 20)
    src = tmp_path / "payload.bin"
    src.write_bytes(data)
    try:
        conn = connect(dev.ssh_target())
        fired = threading.Event()

        def progress(done, total):
            if done >= total // 4 and not fired.is_set():
                fired.set()
                threading.Thread(target=testbed.cut_sessions, args=(dev,), daemon=True).start()

        t0 = time.monotonic()
        with pytest.raises(LinkLost) as ei:
            conn.put(src, "up/payload.bin", progress=progress)
        assert time.monotonic() - t0 < 15
        assert "resume" in ei.value.hint
        with connect(dev.ssh_target()) as c2:
            part = int(c2.run("stat -c %s up/payload.bin.part").stdout)
            assert 0 < part < len(data)
            assert c2.put(src, "up/payload.bin") == hashlib.sha256(data).hexdigest()
            assert c2.last_put_sent < len(data)
    finally:
        testbed.stop_device(dev)


# ------------------------------------------------------------------ the test bed itself


@ssh
def test_device_pythons_and_cpu_quota(testbed, device, slow_device):
    with connect(device.ssh_target()) as conn:
        res = conn.run([device.python, "-c", "import numpy, onnxruntime; print('ok')"])
        assert res.stdout == "ok\n", res.stderr
        res = conn.run([testbed.system_python, "-c", "import onnxruntime"])
        assert res.rc != 0 and "onnxruntime" in res.stderr
    burn = ("import time\nw=time.monotonic(); c=time.process_time()\n"
            "while time.process_time() - c < 0.15: pass\n"
            "print((time.process_time() - c) / (time.monotonic() - w))")
    with connect(slow_device.ssh_target()) as conn:
        share = float(conn.run(["python3", "-c", burn]).stdout)
    assert 0.12 < share < 0.4, share  # 25 % of one core


@ssh
def test_silent_link_cut_hits_tcp_user_timeout(testbed, device, tmp_path):
    """A cut that sends nothing (no FIN/RST): only TCP_USER_TIMEOUT ends the wait."""
    data = os.urandom(48 << 20)
    src = tmp_path / "payload.bin"
    src.write_bytes(data)
    with testbed.netns_link(device) as link:
        target = device.ssh_target(host=link.host, port=link.port)
        # during an upload: unacknowledged data -> aborted ~user_timeout after the cut
        conn = connect(target, user_timeout_ms=2000)
        cut_at = []

        def progress(done, total):
            if done >= total // 4 and not cut_at:
                link.cut()
                cut_at.append(time.monotonic())

        with pytest.raises(LinkLost) as ei:
            conn.put(src, "silent/payload.bin", progress=progress)
        assert cut_at and time.monotonic() - cut_at[0] < 6
        assert "TCP_USER_TIMEOUT" in str(ei.value)
        _one_line(ei.value)

        # during an idle command: the 5 s SSH keepalive is the unacknowledged data
        link.restore()
        conn = connect(target, user_timeout_ms=2000)
        threading.Timer(0.3, link.cut).start()
        t0 = time.monotonic()
        with pytest.raises(LinkLost) as ei:
            conn.run("sleep 60", timeout=45)
        assert time.monotonic() - t0 < 12
        assert "TCP_USER_TIMEOUT" in str(ei.value)

        # link back: the upload resumes from the .part the cut left behind
        link.restore()
        with connect(target) as c2:
            assert c2.put(src, "silent/payload.bin") == hashlib.sha256(data).hexdigest()
            assert c2.last_put_sent < len(data)
