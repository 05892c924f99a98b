"""One device, from the host: enrolment (pin the host key, create the agent's layout, push the
agent and the trust root), deploy (upload a bundle, resumable and skipped when the device has
it, then the agent's install transaction on the device), status and rollback -- each asked of
the device itself, never of a host-side record.

Exit codes (the CLI): 0 installed / ok, 1 refused or rolled back (with the agent's reason),
2 usage, 3 unreachable or an agent this edgeops does not understand.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..agent import install as agent_install
from ..errors import EXIT_ENV, EdgeopsError, UsageError
from ..formats.base import sha256_path
from .inventory import Device, Inventory, _check_name
from .ssh import AGENT_PACKAGE, RemoteError, SSHDeviceLink, connect

AGENT_SRC = Path(__file__).resolve().parents[1] / "agent"
DELTA_MIN_BYTES = 1 << 20


class AgentMismatch(EdgeopsError):
    """The device runs an agent whose protocol this edgeops does not speak."""

    exit_code = EXIT_ENV


@dataclass
class Outcome:
    """What happened on one device: the steps with their times, and the agent's verdict."""
    device: str
    ok: bool = False
    reason: str | None = None            # the agent's typed reason (install.REASONS), or UNREACHABLE
    message: str = ""
    steps: list[dict] = field(default_factory=list)
    agent: dict | None = None            # the agent's full JSON answer
    bytes_sent: int = 0
    bundle_sha256: str | None = None
    delta: dict | None = None            # delta.make's figures when a delta was built

    def step(self, name: str, seconds: float, detail: str = "", ok: bool = True) -> None:
        self.steps.append({"step": name, "seconds": round(seconds, 4), "detail": detail, "ok": ok})

    def to_dict(self) -> dict:
        return {"device": self.device, "ok": self.ok, "reason": self.reason, "message": self.message,
                "steps": self.steps, "bytes_sent": self.bytes_sent, "bundle_sha256": self.bundle_sha256,
                "delta": self.delta, "agent": self.agent}


def agent_files() -> list[Path]:
    return sorted(p for p in AGENT_SRC.glob("*.py"))


def link_for(device: Device, connect_timeout: float = 10.0) -> SSHDeviceLink:
    if not device.agent_root:
        raise UsageError(f"device {device.name} is in the inventory but has no agent",
                         hint=f"enrol it: edgeops devices enrol {device.name} --ssh ... --target T")
    conn = connect(device.ssh_target(), connect_timeout=connect_timeout)
    return SSHDeviceLink(conn, device.python, device.agent_root, f"{device.name} ({device.spec})")


def check_agent(doc: dict, device: str) -> None:
    """Refuse to talk to an agent whose protocol differs from ours."""
    proto = doc.get("protocol")
    if proto != agent_install.PROTOCOL:
        raise AgentMismatch(f"device {device} runs agent {doc.get('agent')} (protocol {proto}); this "
                            f"edgeops speaks protocol {agent_install.PROTOCOL}",
                            hint=f"re-enrol it to push the current agent: edgeops devices enrol {device} ... --replace")


# ----------------------------------------------------------------------------- enrol

_PUSH = r"""
import os, sys
root, version = sys.argv[1], sys.argv[2]
agent = os.path.join(root, "agent")
staged = os.path.join(agent, "versions", version + ".staged")
final = os.path.join(agent, "versions", version)
if os.path.isdir(final):
    import shutil
    old = os.path.join(agent, "versions", version + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(final, old)
os.rename(staged, final)
tmp = os.path.join(agent, ".current.tmp")
if os.path.lexists(tmp):
    os.unlink(tmp)
os.symlink(os.path.join("versions", version), tmp)
os.replace(tmp, os.path.join(agent, "current"))
fd = os.open(agent, os.O_RDONLY); os.fsync(fd); os.close(fd)
import shutil
shutil.rmtree(os.path.join(agent, "versions", version + ".old"), ignore_errors=True)
print(os.path.realpath(os.path.join(agent, "current")))
"""


def enrol(name: str, spec: str, key_path, *, target: str, host_key: str | None = None,
          accept_new_host_key: bool = False, python: str = "python3", labels: dict | None = None,
          root: str = "~/.edgeops/agent-root", trust_dir: Path | None = None, replace: bool = False,
          inventory: Inventory | None = None, progress: Callable[[str], None] = lambda m: None) -> dict:
    """Pin the host key, check the runtime, push the agent and the trust root, create the layout
    and record target, arch and labels. Returns the device record and the agent's status."""
    from .. import targets
    from ..bench.remote import preflight
    from ..bundle import trust as trust_mod
    from .inventory import enrol as pin

    inventory = inventory or Inventory()
    _check_name(name)
    profile = targets.load(target)
    trust_dir = Path(trust_dir) if trust_dir else trust_mod.default_dir()
    root_file = trust_dir / "root.json"
    if not root_file.is_file():
        raise UsageError(f"no trust root at {root_file}: devices need one to verify bundles",
                         hint="create it: edgeops trust init --key KEY")
    for k, v in (labels or {}).items():
        if not k or "=" in k or "," in k or "," in v:
            raise UsageError(f"--label {k}={v}: keys and values cannot contain ',' (keys no '=')")
    progress("connecting and pinning the host key")
    dev = pin(name, spec, key_path, accept_new_host_key=accept_new_host_key, host_key=host_key,
              python=python, inventory=inventory, replace=replace)
    try:
        with connect(dev.ssh_target()) as conn:
            where = f"device {name}"
            versions = preflight(conn, python, where)
            r = conn.run([python, "-c", "import cryptography; print(cryptography.__version__)"], timeout=60)
            if r.rc != 0:
                from ..bench.remote import DeviceEnvError

                raise DeviceEnvError(f"{where}: cryptography is not installed for {python} on the device "
                                     "(the agent checks bundle signatures with it)",
                                     hint=f"on the device: {python} -m pip install cryptography")
            versions["cryptography"] = r.stdout.strip()
            want_isa = agent_install.machine_isa(str(profile.data.get("cpu", {}).get("isa", "")))
            have_isa = agent_install.machine_isa(versions["arch"])
            if want_isa and want_isa != have_isa:
                raise UsageError(f"device {name} is {versions['arch']} ({have_isa}); target {target} is {want_isa}",
                                 hint="pick the target profile that matches the device (edgeops targets list)")
            r = conn.run([python, "-c", "import os,sys; print(os.path.abspath(os.path.expanduser(sys.argv[1])))",
                          root], timeout=60)
            if r.rc != 0:
                raise RemoteError(f"{where}: cannot resolve {root}: {r.stderr.strip()[-200:]}")
            abs_root = r.stdout.strip()
            progress(f"pushing agent {agent_install.AGENT_VERSION} to {abs_root}/agent")
            staged = f"{abs_root}/agent/versions/{agent_install.AGENT_VERSION}.staged/{AGENT_PACKAGE}"
            conn.run(["rm", "-rf", staged.rsplit("/", 1)[0]], timeout=60)
            for p in agent_files():
                conn.put(p, f"{staged}/{p.name}", resume=False)
            r = conn.run([python, "-c", _PUSH, abs_root, agent_install.AGENT_VERSION], timeout=60)
            if r.rc != 0:
                raise RemoteError(f"{where}: activating the agent failed: "
                                  f"{(r.stderr.strip().splitlines() or ['?'])[-1][:200]}")
            link = SSHDeviceLink(conn, python, abs_root, f"{name} ({dev.spec})")
            progress("installing the trust root and creating the layout")
            link.upload(root_file, "incoming/enrol-root.json")
            args = ["init", "--name", name, "--target", profile.name,
                    "--trust", f"{abs_root}/incoming/enrol-root.json"]
            for k, v in sorted((labels or {}).items()):
                args += ["--label", f"{k}={v}"]
            code, doc = link.agent(*args, timeout=120)
            if code != 0:
                raise RemoteError(f"{where}: the agent refused enrolment: {doc.get('error') or doc}")
            check_agent(doc["status"], name)
            conn.run(["rm", "-f", f"{abs_root}/incoming/enrol-root.json"], timeout=60)
    except BaseException:
        if not replace:
            inventory.remove(name)     # a half-enrolled device is not left in the inventory
        raise
    dev.target, dev.labels, dev.agent_root = profile.name, dict(labels or {}), abs_root
    dev.agent_version, dev.arch = agent_install.AGENT_VERSION, versions["arch"]
    dev.runtime = f"{versions['arch']} onnxruntime {versions['onnxruntime']}"
    inventory.add(dev, replace=True)
    return {"device": dev.to_dict(), "runtime": versions, "status": doc["status"], "notes": doc.get("notes", [])}


# ----------------------------------------------------------------------------- deploy

def _send_delta(link, bundle: Path, sha: str, remote: str, have: set, out: Outcome, progress,
                upload_progress) -> str | None:
    """Send BUNDLE as a delta against the chunks the device holds (HAVE, listed with its
    status); None when a whole upload is the better way, with the reason in the steps."""
    import tempfile

    from ..agent import delta as dl

    t = time.monotonic()
    size = bundle.stat().st_size
    with tempfile.TemporaryDirectory(prefix="edgeops-delta-") as tmp:
        d = Path(tmp) / f"{sha}.delta"
        stats = dl.make(bundle, have, d, min_reuse=0.2)
        if stats is None:
            out.step("delta", time.monotonic() - t, f"under 20 % of the first {dl.PROBE_BYTES >> 20} MiB is on "
                                                    "the device: whole upload")
            return None
        out.delta = stats
        if stats["delta_bytes"] > 0.8 * size:
            out.step("delta", time.monotonic() - t, f"{stats['reused']}/{stats['chunks']} chunks on the device: "
                                                    "not worth a delta, whole upload")
            return None
        progress(f"sending a delta: {stats['delta_bytes'] / 2**20:.2f} MiB for a {size / 2**20:.1f} MiB bundle "
                 f"({stats['reused']}/{stats['chunks']} chunks already on the device)")
        up = link.upload(d, f"incoming/{sha}.delta", progress=upload_progress)
        out.bytes_sent += up.sent
    code, r = link.agent("assemble", f"{link.root}/incoming/{sha}.delta", "--out", f"{link.root}/{remote}",
                         "--sha256", sha, timeout=600)
    if code != 0:
        out.step("delta", time.monotonic() - t, f"the device could not rebuild the bundle ({r.get('error')}): "
                                                "whole upload", ok=False)
        return None
    return (f"delta: {up.sent} bytes sent for a {size}-byte bundle ({stats['reused']}/{stats['chunks']} "
            f"chunks reused, {stats['literal_bytes']} new bytes), rebuilt and sha256-checked on the device")


def deploy(device: Device, bundle: Path, *, timeout: float = 900, health_runs: int = 30, delta: bool = True,
           allow_same_version: bool = False,
           progress: Callable[[str], None] = lambda m: None,
           upload_progress: Callable[[int, int], None] | None = None,
           link: SSHDeviceLink | None = None) -> Outcome:
    """Upload BUNDLE to DEVICE (resumed, skipped when already there) and run the agent's install.
    Connection failures raise (exit 3); the agent's refusals are in the Outcome (exit 1)."""
    from ..agent import verifier as v

    out = Outcome(device.name)
    t = time.monotonic()
    try:        # a file that is not a bundle is refused before any device is touched
        signed = v.peek(bundle)[1]["signed"]
    except (v.Refused, OSError) as exc:
        raise UsageError(f"{bundle}: not a readable bundle: {exc}") from None
    sha = sha256_path(bundle)
    out.bundle_sha256 = sha
    own = link is None
    if own:
        progress(f"connecting to {device.name}")
        link = link_for(device)
    try:
        size = bundle.stat().st_size
        want_chunks = delta and size >= DELTA_MIN_BYTES
        code, st = link.agent("status", "--brief", *(["--chunks"] if want_chunks else []), timeout=300)
        check_agent(st, device.name)
        if st.get("recovered"):
            progress(f"the agent recovered: {'; '.join(st['recovered'])}")
        out.step("connect", time.monotonic() - t, f"agent {st.get('agent')}, {len(st.get('models', {}))} model(s)")
        t = time.monotonic()
        msha = v.manifest_sha256(signed)
        have = (st.get("models") or {}).get(signed.get("name")) or {}
        if have.get("manifest_sha256") == msha and have.get("consistent"):
            out.ok, out.reason = True, None
            out.message = f"{signed.get('name')}:{signed.get('version')} is already installed (slot {have.get('slot')})"
            out.step("upload", time.monotonic() - t, "skipped: the device runs this bundle")
            return out
        remote = f"incoming/{sha}.bundle"
        sent_by_delta = None
        # below 1 MiB a delta's extra round trips cost more than the bytes they save
        if want_chunks and st.get("chunks") and not link.has(remote, sha):
            sent_by_delta = _send_delta(link, bundle, sha, remote, set(st["chunks"]), out, progress,
                                        upload_progress)
        if sent_by_delta is None:
            progress(f"uploading {bundle.name} ({size / 2**20:.1f} MiB)")
            up = link.upload(bundle, remote, sha256=sha, progress=upload_progress)
            out.bytes_sent += up.sent
            out.step("upload", time.monotonic() - t,
                     "already on the device" if up.skipped else f"{up.sent} bytes sent of {up.size}")
        else:
            out.step("upload", time.monotonic() - t, sent_by_delta)
        t = time.monotonic()
        progress("installing on the device (verify, stage, health, switch, postcheck, commit)")
        code, doc = link.agent("install", f"{link.root}/{remote}", "--timeout", str(timeout),
                               "--runs", str(health_runs),
                               *(["--allow-same-version"] if allow_same_version else []), timeout=timeout + 120)
        out.agent = doc
        for s in doc.get("steps", []):
            out.steps.append({**s, "step": f"device:{s['step']}"})
        out.step("install", time.monotonic() - t, doc.get("message", ""), ok=bool(doc.get("ok")))
        out.ok = bool(doc.get("ok")) and code == 0
        out.reason = doc.get("reason")
        out.message = doc.get("message", "")
        if out.ok:
            # the bundle's work is done; a failed one stays in incoming/ for a look (gc removes it)
            link.conn.run(["rm", "-f", f"{link.root}/{remote}"], timeout=60)
        return out
    finally:
        if own:
            link.close()


def status(device: Device) -> dict:
    link = link_for(device)
    try:
        code, doc = link.agent("status", timeout=120)
        check_agent(doc, device.name)
        doc["agent_command"] = shlex.join(link.command())
        return doc
    finally:
        link.close()


def rollback(device: Device, name: str) -> Outcome:
    out = Outcome(device.name)
    t = time.monotonic()
    link = link_for(device)
    try:
        code, st = link.agent("status", timeout=120)
        check_agent(st, device.name)
        code, doc = link.agent("rollback", name, timeout=600)
        out.agent, out.ok = doc, bool(doc.get("ok")) and code == 0
        out.reason, out.message = doc.get("reason"), doc.get("message", "")
        out.step("rollback", time.monotonic() - t, out.message, ok=out.ok)
        return out
    finally:
        link.close()
