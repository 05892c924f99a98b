"""Second round of bundle threat tests: end to end, on bundles made by the real `edgeops bundle
build` from a real registry, checked through the real CLI and the device library.

The first round (test_bundle_threats.py) attacked the verifier with hand-built bundles. This
round attacks what is around it: the device's trust folder, `trust update`, `--update-trust`,
clocks and lifetimes, rollback options as typed on a command line, the registry and its blobs,
key files, the bundle path itself, mix-and-match between real builds, the health check run on a
bundle re-signed by a trusted key (an insider or a compromised build machine), and `inspect`.

Every CLI case checks the exact exit code (0 ok, 1 refused, 2 usage/bad input, 3 environment)
and that stderr is one line `error: ...` plus an optional `  hint: ...` (or the REFUSED block
of `bundle verify`, or click's own usage error), never a traceback, never exit 70.

Tally: the cases go into the first round's THREAT_TALLY (categories "e2e-..."), so one terminal
summary covers both files. `_threat_summary` is imported from test_bundle_threats, which makes
it an autouse module fixture here too; it registers the reporter under a fixed plugin name and
only if that name is not registered yet, so the summary is printed once whichever file runs
first. Both files see the same THREAT_TALLY because pytest's default (prepend) import mode puts
tests/ on sys.path and imports test_bundle_threats.py under that same module name, so our import
and pytest's collection share one module object. That is checked at import time (whichever file
is collected first) and again at the end against the module pytest collected, so another
--import-mode cannot silently split the tally into two half summaries.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

import test_bundle_threats as _round1
from test_bundle_threats import THREAT_TALLY, Cases, _threat_summary  # noqa: F401  (autouse fixture)

from edgeops.agent import verifier as v
from edgeops.bundle import build as b
from edgeops.bundle import keys as keys_mod
from edgeops.bundle import trust

assert Path(_round1.__file__).resolve().parent == Path(__file__).resolve().parent
assert sys.modules.get("test_bundle_threats") is _round1

NOW = datetime.now(timezone.utc).replace(microsecond=0)
T0 = NOW - timedelta(minutes=2)          # SOURCE_DATE_EPOCH of the deterministic builds
COUNTER_A = 100                          # explicit counter of bundles A and A5
ABS_PATH = re.compile(r"(?<![\w.])/[^\s'\"()]+")
PROGRESS = ("materializing ", "computing reference outputs", "profiling inputs and outputs", "writing ")
REFUSED_BUNDLES: list[Path] = []         # every refused bundle made here, for the inspect test


# ----------------------------------------------------------------------------- helpers

def onnx_model(path: Path, seed: int = 0) -> Path:
    """MatMul + Add + Softmax, input x [n, 16] -> y [n, 8]: models of every seed share a signature."""
    from test_bundle import _model

    return _model(Path(path), seed)


def members(data: bytes) -> dict[str, bytes]:
    es = v.scan_archive(io.BytesIO(data), len(data))
    return {e.name: data[e.offset:e.offset + e.size] for e in es}


def pack(envelope: bytes, rest: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    v.write_archive(buf, [(v.MANIFEST, envelope)] + sorted(rest.items()))
    return buf.getvalue()


def resign(data: bytes, signers, edit_members=None, edit_manifest=None, edit_envelope=None) -> bytes:
    """A real bundle, changed and (with `signers`) re-signed with every hash recomputed: what an
    insider with a trusted key, or a compromised build machine, can produce."""
    m = members(data)
    env = json.loads(m.pop(v.MANIFEST))
    s = env["signed"]
    if edit_members:
        edit_members(m)
    for table in ("files", "roots"):
        for n in list(s.get(table) or {}):
            if n in m:
                s[table][n] = {"sha256": hashlib.sha256(m[n]).hexdigest(), "size": len(m[n])}
    if edit_manifest:
        edit_manifest(s)
    if edit_envelope:
        edit_envelope(env)
    envelope = trust.sign_envelope(v.BUNDLE_TYPE, s, signers) if signers else v.canonical(env)
    return pack(envelope, m)


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under a folder: bytes for files, the link target for symlinks, 'dir' for dirs."""
    out: dict[str, bytes | str] = {}
    if folder.is_symlink() or not folder.exists():
        return {".": os.readlink(folder) if folder.is_symlink() else "missing"}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = ("link:" + os.readlink(p)) if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def _msg(r) -> str:
    lines = [x for x in (r.stderr or "").splitlines() if x.strip() and not x.startswith(PROGRESS)]
    if not lines:
        lines = [x for x in (r.stdout or "").splitlines() if x.strip()][-3:]
    return " / ".join(x.strip() for x in lines)[:300]


def _stderr_format(r) -> str | None:
    """None if stderr is one `error:` line (+ one `  hint:`), a REFUSED block, or click's usage error."""
    if r.returncode == 0:
        return None
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith(PROGRESS)]
    if not lines:
        return None if "health check FAILED" in r.stdout else "exit code without any message on stderr"
    if lines[0].startswith("Usage: "):
        return None if any(x.startswith("Error: ") for x in lines) else "click usage text without an Error line"
    if lines[0].startswith("  health check FAILED: ") and len(lines) == 1:   # verified, then unhealthy
        return None
    if lines[0].startswith("REFUSED "):
        return None if all(x.startswith("  ") for x in lines[1:]) else f"REFUSED block with stray lines {lines[1:3]}"
    if not lines[0].startswith("error: "):
        return f"stderr does not start with 'error: ...' ({len(lines)} lines, first {lines[0][:120]!r})"
    if len(lines) > 2 or (len(lines) == 2 and not lines[1].startswith("  hint: ")):
        return f"{len(lines)} lines on stderr, not one error line and a hint: {lines[:4]}"
    return None


def judge_cli(r, rc, keywords=(), forbid=()) -> str | None:
    """None if a CLI run refused properly with exit code `rc` (an int or a set) and a relevant
    message; otherwise the problem, prefixed like the first round's (ACCEPTED / RAISED / WRONG REASON)."""
    want = {rc} if isinstance(rc, int) else set(rc)
    if isinstance(r, subprocess.TimeoutExpired):
        return f"HUNG: killed after {r.timeout:.0f} s"
    if "Traceback (most recent call last)" in (r.stderr or ""):
        return f"RAISED: a traceback on stderr: {r.stderr.strip().splitlines()[-1][:200]}"
    if r.returncode == 70:
        return f"RAISED (internal error, exit 70): {_msg(r)}"
    if r.returncode < 0:
        return f"RAISED: killed by signal {-r.returncode} ({_msg(r)})"
    if r.returncode == 0 and 0 not in want:
        return f"ACCEPTED (exit 0): {(r.stdout or '').strip()[:200]!r}"
    if r.returncode not in want:
        return f"WRONG REASON (exit {r.returncode}, want {sorted(want)}): {_msg(r)}"
    fmt = _stderr_format(r)
    if fmt:
        return f"WRONG REASON (stderr format: {fmt})"
    # keywords are matched on the message without its paths (a temp path holds 'root', 'trust', ...)
    text = ABS_PATH.sub("<path>", (r.stdout or "") + "\n" + (r.stderr or "")).lower()
    if keywords and not any(k.lower() in text for k in keywords):
        return f"WRONG REASON (want one of {list(keywords)}): {_msg(r)}"
    bad = [x for x in forbid if x.lower() in text]
    if bad:
        return f"WRONG REASON (misleading: says {bad[0]!r}): {_msg(r)}"
    return None


def _mem_limit():   # for commands pointed at /dev/zero: a runaway read stops at 2 GiB, not at the machine's RAM
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


class W:
    """One registry + keys + trust setup for the module; bundles built by the real CLI."""

    def __init__(self, base: Path):
        self.base = base
        self.home = base / "home"
        self.tmp = base / "tmp"          # TMPDIR of every subprocess: checked for leftovers at the end
        self.tmp.mkdir()
        self.out = base / "out"
        self.out.mkdir()
        self._n = 0
        self.kdir = self.home / "keys"
        names = ["rootk", "rel", "qa", "rootk2", "rel2", "rootk3", "rel3", "mallory", "evilroot", "evilbundle"]
        for n in names:
            keys_mod.generate(n, folder=self.kdir)
        keys_mod.generate("locked", folder=self.kdir, passphrase="s3cret")
        self.k = {n: keys_mod.load_signing(n, folder=self.kdir) for n in names}
        self.exp = NOW + timedelta(days=365)
        # publisher trust (= devices enrolled at v1): root key rootk, bundle key rel
        self.trust = self.home / "trust"
        trust.init(self.trust, [self.k["rootk"]], [self.k["rel"].public_key], 1, 1, self.exp)
        self.v1 = (self.trust / "root.json").read_bytes()
        self.dev1 = base / "device-v1"
        shutil.copytree(self.trust, self.dev1)
        # publisher after rotation: v2 (rootk2 / rel2), and a v3 (rootk3 / rel3) kept aside
        self.pubrot = base / "pub-rot"
        shutil.copytree(self.trust, self.pubrot)
        trust.rotate(self.pubrot, [self.k["rootk"]], [self.k["rootk2"]], [self.k["rel2"].public_key], 1, 1, self.exp)
        self.v2 = (self.pubrot / "root.json").read_bytes()
        self.pubrot3 = p3 = base / "pub-rot3"
        shutil.copytree(self.pubrot, p3)
        trust.rotate(p3, [self.k["rootk2"]], [self.k["rootk3"]], [self.k["rel3"].public_key], 1, 1, self.exp)
        self.v3 = (p3 / "root.json").read_bytes()
        # another publisher, and a short-lived root (expires before the bundles it signs)
        self.evil = base / "evil-trust"
        trust.init(self.evil, [self.k["evilroot"]], [self.k["evilbundle"].public_key], 1, 1, self.exp)
        self.short = base / "short-trust"
        trust.init(self.short, [self.k["rootk"]], [self.k["rel"].public_key], 1, 1, NOW + timedelta(days=2))
        # the registry
        from edgeops.registry import open_registry

        src = base / "src"
        src.mkdir()
        with open_registry() as reg:
            reg.add(onnx_model(src / "clf.onnx", 0), "clf", version="1.0.0")
            d = src / "v11"
            d.mkdir()
            reg.add(onnx_model(d / "clf.onnx", 1), "clf", version="1.1.0")
            reg.add(onnx_model(src / "other.onnx", 5), "other", version="0.1.0")
        self.model0 = (src / "clf.onnx").read_bytes()
        self.model1 = (src / "v11" / "clf.onnx").read_bytes()
        np.savez(base / "inputs.npz", x=np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32))
        fixed = {"SOURCE_DATE_EPOCH": str(int(T0.timestamp()))}
        specs = {    # A and A5: one version for two targets, same counter and time (deterministic bytes)
            "A": (["clf:1.1.0", "--target", "rpi4", "--key", "rel", "--counter", COUNTER_A], fixed),
            "A5": (["clf:1.1.0", "--target", "rpi5", "--key", "rel", "--counter", COUNTER_A], fixed),
            "A0": (["clf:1.0.0", "--target", "rpi4", "--key", "rel"], {}),
            "AI": (["clf:1.1.0", "--target", "rpi4", "--key", "rel", "--inputs", base / "inputs.npz"], {}),
            "B": (["other:0.1.0", "--target", "rpi4", "--key", "rel"], {}),
            "ROT": (["clf:1.1.0", "--target", "rpi4", "--key", "rel2", "--trust", self.pubrot], {}),
            "ROT3": (["clf:1.1.0", "--target", "rpi4", "--key", "rel3", "--trust", self.pubrot3], {}),
            "SLO": (["clf:1.1.0", "--target", "rpi4", "--key", "rel2", "--trust", self.pubrot, "--slo-ms", "1e-9"],
                    {}),
            "SHORT": (["clf:1.1.0", "--target", "rpi4", "--key", "rel", "--trust", self.short], {}),
        }
        self.bundles: dict[str, Path] = {}
        self.manifests: dict[str, dict] = {}
        jobs = [(["bundle", "build", *args, "-o", self.out / f"{n}.bundle", "--json"], dict(env=env))
                for n, (args, env) in specs.items()]
        for n, r in zip(specs, self.many(jobs)):
            assert r.returncode == 0, (n, r.stderr)
            self.bundles[n] = self.out / f"{n}.bundle"
            self.manifests[n] = json.loads(r.stdout)["manifest"]
        self.data = {n: p.read_bytes() for n, p in self.bundles.items()}
        self.model_member = self.manifests["A"]["model"]
        self.root1 = v.load_trust(self.dev1)
        # the registry tests copy this home: checkpoint the WAL so registry.db alone holds everything
        con = sqlite3.connect(self.home / "registry.db")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()

    # -- subprocess
    def env(self, home: Path | None = None, extra: dict | None = None) -> dict:
        env = {k: x for k, x in os.environ.items()
               if k not in ("SOURCE_DATE_EPOCH", "EDGEOPS_KEY_PASSPHRASE", "EDGEOPS_REGISTRY_URL",
                            "EDGEOPS_BLOBS_URL", "EDGEOPS_HOME")}
        env.update(EDGEOPS_HOME=str(home or self.home), TMPDIR=str(self.tmp))
        env.update({k: str(x) for k, x in (extra or {}).items()})
        return env

    def cli(self, *args, home=None, env=None, timeout=60, mem_limit=False, cwd=None):
        try:
            return subprocess.run([sys.executable, "-m", "edgeops", *map(str, args)], capture_output=True, text=True,
                                  env=self.env(home, env), timeout=timeout, stdin=subprocess.DEVNULL,
                                  cwd=cwd or self.base, preexec_fn=_mem_limit if mem_limit else None)
        except subprocess.TimeoutExpired as exc:
            return exc

    def many(self, jobs):
        """[(args, kwargs)] run 3 at a time (CLI start-up is ~0.3 s of CPU each)."""
        with ThreadPoolExecutor(3) as pool:
            return list(pool.map(lambda j: self.cli(*j[0], **j[1]), jobs))

    # -- scratch
    def path(self, name="x.bundle") -> Path:
        self._n += 1
        d = self.base / "scratch" / f"{self._n:04d}"
        d.mkdir(parents=True)
        return d / name

    def write(self, data: bytes, refused=True) -> Path:
        p = self.path()
        p.write_bytes(data)
        if refused:
            REFUSED_BUNDLES.append(p)
        return p

    def device(self, src: Path | None = None) -> Path:
        d = self.path("trust")
        shutil.copytree(src or self.dev1, d, symlinks=True)
        return d

    def home_copy(self) -> Path:
        d = self.path("home")
        shutil.copytree(self.home, d, symlinks=True)
        return d

    def root_env(self, version, bundle_keys, root_keys, signers, threshold=1, root_threshold=1,
                 expires=None, edit=None) -> bytes:
        """A root envelope with any content (trust._signed refuses bad thresholds, so built by hand)."""
        s = {"_type": v.ROOT_TYPE, "schema_version": 1, "version": version,
             "expires": v.format_time(expires or self.exp),
             "keys": {self.k[n].keyid: self.k[n].public_key.to_root_entry() for n in [*bundle_keys, *root_keys]},
             "roles": {"bundle": {"keyids": sorted({self.k[n].keyid for n in bundle_keys}), "threshold": threshold},
                       "root": {"keyids": sorted({self.k[n].keyid for n in root_keys}), "threshold": root_threshold}}}
        if edit:
            edit(s)
        return trust.sign_envelope(v.ROOT_TYPE, s, [self.k[n] for n in signers])


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEOPS_HOME", str(base / "home"))
        for k in ("SOURCE_DATE_EPOCH", "EDGEOPS_KEY_PASSPHRASE", "EDGEOPS_REGISTRY_URL", "EDGEOPS_BLOBS_URL"):
            mp.delenv(k, raising=False)
        yield W(base)


def _ok(c: Cases, label: str, r, want_stdout=()) -> None:
    """A control (not a threat): must succeed; not tallied, but a failure is a problem."""
    if isinstance(r, subprocess.TimeoutExpired) or r.returncode != 0 or "Traceback" in r.stderr:
        c.problem(label, f"CONTROL FAILED (should succeed): {judge_cli(r, 0) or 'exit ' + str(r.returncode)}")
        return
    for s in want_stdout:
        if s not in r.stdout:
            c.problem(label, f"CONTROL FAILED: {s!r} not in stdout {r.stdout[:200]!r}")


def _cases_cli(c: Cases, w: W, cases) -> None:
    """cases: [(label, args, kwargs, rc, keywords, forbid)], run in parallel, judged in order."""
    results = w.many([(args, kw) for _, args, kw, *_ in cases])
    for (label, _, _, rc, kws, forbid), r in zip(cases, results):
        if rc == 0:
            _ok(c, label, r)
        else:
            c.record(label, judge_cli(r, rc, kws, forbid))


# ----------------------------------------------------------------------------- controls

def test_e2e_controls(w):
    """Not threats: the real builds verify through the CLI and the library, the deterministic
    builds are deterministic, and a symlink to a bundle verifies (see test_bundle_path_variants)."""
    c = Cases("e2e-controls")
    for n, root, target in [("A", w.root1, "rpi4"), ("A5", w.root1, "rpi5"), ("A0", w.root1, "rpi4"),
                            ("AI", w.root1, "rpi4"), ("B", w.root1, "rpi4"), ("ROT", w.root1, "rpi4"),
                            ("ROT3", w.root1, "rpi4"), ("SLO", w.root1, "rpi4"), ("SHORT", v.load_trust(w.short), "rpi4")]:
        res = v.verify_bundle(w.bundles[n], root, target=target, installed=None)
        if not res.ok:
            c.problem(f"library verify {n}", f"CONTROL FAILED: {[f.message for f in res.failures]}")
    assert w.manifests["A"]["counter"] == w.manifests["A5"]["counter"] == COUNTER_A
    assert w.manifests["A"]["created"] == v.format_time(T0)
    assert len({m["counter"] for m in w.manifests.values()}) == len(w.manifests) - 1   # A and A5 share one
    assert sorted(members(w.data["ROT"])) == ["manifest.json", "payload/model/clf.onnx", "payload/reference/input_0.npy",
                                               "payload/reference/output_0.npy", "roots/1.root.json", "roots/2.root.json"]
    link = w.path("link.bundle")
    link.symlink_to(w.bundles["A"])
    r1, r2, r3 = w.many([(["bundle", "verify", w.bundles["A"], "--trust", w.dev1, "--target", "rpi4",
                           "--installed-counter", COUNTER_A - 1], {}),
                         (["bundle", "verify", link, "--trust", w.dev1, "--target", "rpi4"], {}),
                         (["bundle", "verify", w.bundles["A"], "--trust", w.dev1, "--health"], {})])
    _ok(c, "CLI verify A", r1, ["VERIFIED"])
    _ok(c, "CLI verify a symlink to A", r2, ["VERIFIED"])
    _ok(c, "CLI verify A --health", r3, ["health check PASSED"])
    c.check()


# ----------------------------------------------------------------------------- the device's trust folder

def test_trust_folder_on_device(w):
    """root.json on the device edited, truncated, emptied, replaced; roots/ history forged."""
    c = Cases("e2e-trust-folder")
    data = w.v1
    # library sweep: every byte of the device's root.json flipped two ways, and every truncation
    scratch = w.device()
    f = scratch / "root.json"
    for i in range(len(data)):
        for pat in (0x01, 0x20):
            flipped = bytearray(data)
            flipped[i] ^= pat
            f.write_bytes(bytes(flipped))
            c.raises(f"root.json byte {i} ^{pat:#04x}", lambda: v.load_trust(scratch), v.TrustError)
    for n in range(len(data)):
        f.write_bytes(data[:n])
        c.raises(f"root.json truncated to {n} bytes", lambda: v.load_trust(scratch), v.TrustError)
    for label, extra in [("trailing newline (editor)", data + b"\n"), ("BOM", b"\xef\xbb\xbf" + data),
                         ("CRLF line end", data + b"\r\n"), ("root twice", data + data)]:
        f.write_bytes(extra)
        c.raises(f"root.json with {label}", lambda: v.load_trust(scratch), v.TrustError, ("canonical", "json"))

    # CLI: `bundle verify A --trust DEVICE` with the device's folder damaged or swapped
    A = w.bundles["A"]
    no_init = ("trust init",)     # root.json exists: `trust init` refuses ("already has a trust root")

    def dev(edit):
        d = w.device()
        edit(d)
        return d

    def flip(d):
        b_ = bytearray((d / "root.json").read_bytes())
        b_[len(b_) // 2] ^= 0x01
        (d / "root.json").write_bytes(bytes(b_))

    def to_dir(d):
        (d / "root.json").unlink()
        (d / "root.json").mkdir()

    def dangling(d):
        (d / "root.json").unlink()
        (d / "root.json").symlink_to(d / "nowhere.json")

    def other(src):
        def edit(d):
            shutil.copy(src, d / "root.json")
        return edit

    evil_v5 = w.root_env(5, ["evilbundle"], ["evilroot"], ["evilroot"])
    evil_v5_path = w.path("evil5.json")
    evil_v5_path.write_bytes(evil_v5)
    expired = w.root_env(1, ["rel"], ["rootk"], ["rootk"], expires=NOW - timedelta(seconds=5))
    expired_path = w.path("expired.json")
    expired_path.write_bytes(expired)
    forged2 = w.root_env(2, ["mallory"], ["mallory"], ["mallory"])

    def forged_history(d):
        (d / "roots" / "2.root.json").write_bytes(forged2)

    # a bundle by mallory carrying the forged v2 (listed in its signed manifest)
    mal = w.write(resign(w.data["A"], [w.k["mallory"]],
                         edit_members=lambda m: m.__setitem__("roots/2.root.json", forged2),
                         edit_manifest=lambda s: s["roots"].__setitem__(
                             "roots/2.root.json", {"sha256": hashlib.sha256(forged2).hexdigest(), "size": len(forged2)})))
    cases = [
        ("root.json with one byte flipped", dev(flip), A, 2, ("root",), no_init),
        ("root.json truncated", dev(lambda d: (d / "root.json").write_bytes(w.v1[:300])), A, 2, ("root",), no_init),
        ("root.json empty", dev(lambda d: (d / "root.json").write_bytes(b"")), A, 2, ("root",), no_init),
        ("root.json hand-edited (trailing newline)", dev(lambda d: (d / "root.json").write_bytes(w.v1 + b"\n")), A, 2,
         ("canonical",), no_init),
        ("root.json is a directory", dev(to_dir), A, 2, ("directory", "not a regular file", "not a file"), no_init),
        ("root.json is a dangling symlink", dev(dangling), A, 2, ("root.json",), ()),
        ("root.json swapped for another publisher's v1", dev(other(w.evil / "root.json")), A, 1, ("unknown",), ()),
        ("root.json swapped for another publisher's v5", dev(other(evil_v5_path)), A, 1, ("unknown",), ()),
        ("root.json of another publisher, bundle carries our v1->v2 chain", dev(other(w.evil / "root.json")),
         w.bundles["ROT"], 1, ("root", "signature"), ()),
        ("root.json expired (no newer root in the bundle)", dev(other(expired_path)), A, 1, ("expired",), ()),
        ("device rotated to v2, bundle by the revoked v1 key", dev(other(w.pubrot / "root.json")), A, 1,
         ("unknown",), ()),
        # a history newer than root.json: the folder is inconsistent, so nothing is trusted (exit 2)
        ("forged roots/2 in the device history, bundle by mallory with it", dev(forged_history), mal, 2,
         ("rolled back",), ()),
    ]
    before = {label: snapshot(d) for label, d, *_ in cases}
    results = w.many([(["bundle", "verify", bundle, "--trust", d, "--target", "rpi4", "--update-trust"], {})
                      for _, d, bundle, *_ in cases])
    for (label, d, _, rc, kws, forbid), r in zip(cases, results):
        c.record(label, judge_cli(r, rc, kws, forbid))
        if snapshot(d) != before[label]:
            c.problem(label, "TRUST FOLDER CHANGED by a refused verification")
    # control: a symlinked root.json (e.g. into a read-only partition) is read like a file
    d = w.device()
    (d / "root.json").unlink()
    (d / "root.json").symlink_to(w.dev1 / "root.json")
    _ok(c, "root.json is a symlink to the real root", w.cli("bundle", "verify", A, "--trust", d, "--target", "rpi4"))
    c.check()


# ----------------------------------------------------------------------------- trust update

def test_trust_update_cli(w):
    """`edgeops trust update DEVICE FILE` with everything but the one valid next root."""
    c = Cases("e2e-trust-update")
    roots = {
        "replay of v1 (roots/1.root.json)": (w.dev1 / "roots" / "1.root.json").read_bytes(),
        "v3 (skips v2)": w.v3,
        "v2 signed only by the OLD root key": w.root_env(2, ["rel2"], ["rootk2"], ["rootk"]),
        "v2 signed only by its NEW root key": w.root_env(2, ["rel2"], ["rootk2"], ["rootk2"]),
        "v2 signed by the old BUNDLE key + new root key": w.root_env(2, ["rel2"], ["rootk2"], ["rel", "rootk2"]),
        "v2 with bundle threshold 0": w.root_env(2, ["rel2"], ["rootk2"], ["rootk", "rootk2"], threshold=0),
        "v2 with bundle threshold 2 of 1 key": w.root_env(2, ["rel2"], ["rootk2"], ["rootk", "rootk2"], threshold=2),
        "v2 with root threshold 0": w.root_env(2, ["rel2"], ["rootk2"], ["rootk", "rootk2"], root_threshold=0),
        "v2 with root threshold 3 of 1 key": w.root_env(2, ["rel2"], ["rootk2"], ["rootk", "rootk2"], root_threshold=3),
        "v2 with no bundle keys": w.root_env(2, [], ["rootk2"], ["rootk", "rootk2"]),
        "v2 already expired": w.root_env(2, ["rel2"], ["rootk2"], ["rootk", "rootk2"], expires=NOW - timedelta(days=1)),
        "v2 expiring right now": w.root_env(2, ["rel2"], ["rootk2"], ["rootk", "rootk2"], expires=NOW),
        "v2 pretty-printed (not canonical)": json.dumps(json.loads(w.v2), indent=2).encode(),
        "v2 with its signatures listed twice": v.canonical({**json.loads(w.v2),
                                                           "signatures": json.loads(w.v2)["signatures"] * 2}),
        "v2 of another publisher": w.root_env(2, ["evilbundle"], ["evilroot"], ["evilroot"]),
        "v2 signed in the bundle domain": trust.sign_envelope(v.BUNDLE_TYPE, json.loads(w.v2)["signed"],
                                                              [w.k["rootk"], w.k["rootk2"]]),
        "a whole bundle instead of a root": w.data["ROT"],
        "an empty file": b"",
    }
    kws = {"replay of v1 (roots/1.root.json)": ("must be v2",), "v3 (skips v2)": ("must be v2",),
           "v2 signed only by the OLD root key": ("by itself",), "v2 signed only by its NEW root key": ("by the old root",),
           "v2 already expired": ("expired",), "v2 expiring right now": ("expired",),
           "v2 pretty-printed (not canonical)": ("canonical",), "v2 with its signatures listed twice": ("two signatures",),
           "v2 of another publisher": ("by the old root",), "v2 with bundle threshold 0": ("threshold",),
           "v2 with bundle threshold 2 of 1 key": ("threshold",), "v2 with root threshold 0": ("threshold",),
           "v2 with root threshold 3 of 1 key": ("threshold",)}
    devices, jobs = {}, []
    for label, data in roots.items():
        d = w.device()
        f = w.path("new.root.json")
        f.write_bytes(data)
        devices[label] = (d, snapshot(d))
        jobs.append((["trust", "update", d, f], {}))
    same = w.device()
    devices["the root already in force"] = (same, snapshot(same))
    jobs.append((["trust", "update", same, same / "root.json"], {}))
    kws["the root already in force"] = ("must be v2",)
    adir = w.device()
    devices["a directory as the root file"] = (adir, snapshot(adir))
    jobs.append((["trust", "update", adir, adir / "roots"], {}))
    for (label, (d, before)), r in zip(devices.items(), w.many(jobs)):
        rc = 2 if label == "a directory as the root file" else 1
        c.record(f"trust update: {label}", judge_cli(r, rc, kws.get(label, ("root",))))
        if snapshot(d) != before:
            c.problem(f"trust update: {label}", f"TRUST FOLDER CHANGED: now {sorted(snapshot(d))}")
    # files that never end (must not hang or eat memory: a root is at most 1 MiB)
    fifo = w.path("root.fifo")
    os.mkfifo(fifo)
    for label, src, kw in [("/dev/zero as the root file", "/dev/zero", dict(mem_limit=True, timeout=20)),
                           ("a FIFO as the root file (no writer)", fifo, dict(timeout=5))]:
        d = w.device()
        before = snapshot(d)
        t = time.monotonic()
        r = w.cli("trust", "update", d, src, **kw)
        c.record(f"trust update: {label}", judge_cli(r, 2, ("regular file", "not a file", "too large", "limit", "bytes")))
        if snapshot(d) != before:
            c.problem(f"trust update: {label}", "TRUST FOLDER CHANGED")
        print(f"\n[trust update {label}] {time.monotonic() - t:.1f}s")
    # control: the real v2 is accepted once, then neither v2 nor v1 again
    d = w.device()
    f = w.path("2.root.json")
    f.write_bytes(w.v2)
    _ok(c, "trust update with the real v2", w.cli("trust", "update", d, f))
    if (d / "root.json").read_bytes() != w.v2 or (d / "roots" / "2.root.json").read_bytes() != w.v2:
        c.problem("trust update with the real v2", "CONTROL FAILED: v2 not persisted")
    after = snapshot(d)
    r1, r2 = w.many([(["trust", "update", d, f], {}), (["trust", "update", d, w.dev1 / "root.json"], {})])
    c.record("trust update: v2 again after v2", judge_cli(r1, 1, ("must be v3",)))
    c.record("trust update: v1 after v2 (rollback of trust)", judge_cli(r2, 1, ("must be v3",)))
    if snapshot(d) != after:
        c.problem("trust update: replays after v2", "TRUST FOLDER CHANGED")
    c.check()


# ----------------------------------------------------------------------------- --update-trust

def test_update_trust_persists_only_when_accepted(w):
    """`bundle verify --update-trust` on a device at v1 with bundles that carry the v1 -> v2 chain:
    the folder's bytes must be identical after any refusal (exit != 0), and hold v2 after success."""
    c = Cases("e2e-update-trust")
    rot = w.data["ROT"]
    tampered = bytearray(rot)
    e = {x.name: x for x in v.scan_archive(io.BytesIO(rot), len(rot))}[w.model_member]
    tampered[e.offset + 10] ^= 0xFF
    swapped = resign(rot, [w.k["rel2"]], edit_members=lambda m: m.__setitem__(w.model_member, w.model0))
    base = ["bundle", "verify", None, "--update-trust", "--trust", None]
    cases = [
        ("wrong target", w.bundles["ROT"], ["--target", "jetson-nano"], ("target",)),
        ("rollback (installed counter above)", w.bundles["ROT"], ["--installed-counter", 10 ** 6], ("rollback",)),
        ("rollback (installed version above)", w.bundles["ROT"], ["--installed-version", "clf:9.0.0"], ("rollback",)),
        ("tampered payload byte", w.write(bytes(tampered)), [], ("sha256",)),
        ("health: SLO breached (a real build with --slo-ms 1e-9)", w.bundles["SLO"], ["--health"], ("breached",)),
        ("health: model swapped, re-signed by the new bundle key", w.write(swapped), ["--health"], ("mismatch",)),
    ]
    devs = []
    for _ in cases:
        devs.append(w.device())
    befores = [snapshot(d) for d in devs]
    jobs = [([*base[:2], p, *base[3:5], d, *extra], {}) for (label, p, extra, _), d in zip(cases, devs)]
    for (label, p, extra, kws), d, before, r in zip(cases, devs, befores, w.many(jobs)):
        c.record(f"--update-trust, refused: {label}", judge_cli(r, 1, kws))
        if snapshot(d) != before:
            c.problem(f"--update-trust, refused: {label}",
                      f"TRUST ROOT PERSISTED although the bundle was refused (exit {getattr(r, 'returncode', '?')}): "
                      f"root.json is now v{json.loads((d / 'root.json').read_bytes())['signed']['version']}")
    # controls: accepted without --update-trust changes nothing; accepted with it saves v2 exactly
    d1, d2 = w.device(), w.device()
    s1 = snapshot(d1)
    r1, r2 = w.many([(["bundle", "verify", w.bundles["ROT"], "--trust", d1, "--target", "rpi4"], {}),
                     (["bundle", "verify", w.bundles["ROT"], "--trust", d2, "--target", "rpi4", "--update-trust",
                       "--health"], {})])
    _ok(c, "accepted without --update-trust", r1, ["VERIFIED"])
    if snapshot(d1) != s1:
        c.problem("accepted without --update-trust", "TRUST FOLDER CHANGED without --update-trust")
    _ok(c, "accepted with --update-trust --health", r2, ["updated", "health check PASSED"])
    want = {"root.json": w.v2, "roots": "dir", "roots/1.root.json": w.v1, "roots/2.root.json": w.v2}
    if snapshot(d2) != want:
        c.problem("accepted with --update-trust", f"CONTROL FAILED: folder holds {sorted(snapshot(d2))}, want {sorted(want)}")
    # two rotations in one bundle: both saved, v3 in force; refused first (wrong target), then accepted
    d3 = w.device()
    s3 = snapshot(d3)
    r = w.cli("bundle", "verify", w.bundles["ROT3"], "--trust", d3, "--target", "rpi5", "--update-trust")
    c.record("--update-trust, refused: v1 -> v3 chain, wrong target", judge_cli(r, 1, ("target",)))
    if snapshot(d3) != s3:
        c.problem("--update-trust, refused: v1 -> v3 chain, wrong target", "TRUST FOLDER CHANGED")
    _ok(c, "v1 -> v3 chain accepted", w.cli("bundle", "verify", w.bundles["ROT3"], "--trust", d3, "--target", "rpi4",
                                            "--update-trust"))
    want = {"root.json": w.v3, "roots": "dir", "roots/1.root.json": w.v1, "roots/2.root.json": w.v2,
            "roots/3.root.json": w.v3}
    if snapshot(d3) != want:
        c.problem("v1 -> v3 chain accepted", f"CONTROL FAILED: folder holds {sorted(snapshot(d3))}")
    c.check()


def test_publisher_chain_consistency(w):
    """The publisher's history (roots/N.root.json) is what bundles carry to devices still on an
    older root. `bundle build` checks its bundle only against root.json (a v2 verifier ignores
    roots/1 and roots/2), so a damaged history gives a bundle that every device on v1 refuses,
    reported as built and verified. The build must refuse it (and leave no file)."""
    c = Cases("e2e-publisher-chain")

    def flip2(d):
        f = d / "roots" / "2.root.json"
        x = bytearray(f.read_bytes())
        x[len(x) // 2] ^= 0x01
        f.write_bytes(bytes(x))

    evil2 = w.root_env(2, ["evilbundle"], ["evilroot"], ["evilroot"])
    scen = [
        ("roots/2.root.json with one byte flipped", flip2),
        ("roots/2.root.json deleted", lambda d: (d / "roots" / "2.root.json").unlink()),
        ("roots/ folder deleted", lambda d: shutil.rmtree(d / "roots")),
        ("roots/2.root.json is a copy of v1", lambda d: shutil.copy(d / "roots" / "1.root.json",
                                                                   d / "roots" / "2.root.json")),
        ("roots/2.root.json is another publisher's v2 (root.json is ours)",
         lambda d: (d / "roots" / "2.root.json").write_bytes(evil2)),
        ("roots/1.root.json deleted (devices on v1 need none: a control)", lambda d: (d / "roots" / "1.root.json").unlink()),
        ("an extra roots/5.root.json (gap after v2)", lambda d: shutil.copy(d / "roots" / "2.root.json",
                                                                         d / "roots" / "5.root.json")),
    ]
    jobs, outs = [], []
    for label, edit in scen:
        d = w.device(w.pubrot)
        edit(d)
        out = w.path()
        outs.append(out)
        jobs.append((["bundle", "build", "clf:1.1.0", "--target", "rpi4", "--key", "rel2", "--trust", d, "-o", out], {}))
    for (label, _), out, r in zip(scen, outs, w.many(jobs)):
        if "a control" in label:
            _ok(c, label, r)
            res = v.verify_bundle(out, w.root1, target="rpi4", installed=None) if out.exists() else None
            if res is None or not res.ok:
                c.problem(label, f"CONTROL FAILED: a device on v1 refuses it: {res.failures if res else 'no file'}")
            continue
        if getattr(r, "returncode", None) == 0 and out.exists():
            res = v.verify_bundle(out, w.root1, target="rpi4", installed=None)
            REFUSED_BUNDLES.append(out)
            c.record(label, "ACCEPTED (exit 0, 'verified against trust root v2'), but a device on root v1 "
                     + ("accepts it" if res.ok else f"REFUSES it: {res.failures[0].message[:160]}"))
            continue
        c.record(label, judge_cli(r, {1, 2}, ("chain", "roots/", "history", "root")))
        if out.exists() or out.with_name(out.name + ".partial").exists():
            c.problem(label, "LEFT BEHIND the refused bundle")
    c.check()


# ----------------------------------------------------------------------------- clocks and lifetimes

def test_clock_and_freeze(w):
    c = Cases("e2e-freeze")
    # library sweep over the device clock, on real bundles
    mA, mS = w.manifests["A"], w.manifests["SHORT"]
    created, expires = v.parse_time(mA["created"], ""), v.parse_time(mA["expires"], "")
    root_exp = w.root1.expires
    short_root = v.load_trust(w.short)
    s_created, s_expires = v.parse_time(mS["created"], ""), v.parse_time(mS["expires"], "")
    assert short_root.expires < s_expires      # the SHORT root dies long before its bundle

    def sweep(name, root, created, expires, points):
        for label, now in points:
            ok = created - timedelta(days=1) <= now < min(expires, root.expires)
            fn = lambda: v.verify_bundle(w.bundles[name], root, target="rpi4", installed=None, now=now)  # noqa: E731
            if ok:
                res = fn()
                if not res.ok:
                    c.problem(f"{name} at {label}", f"CONTROL FAILED: refused {[f.message for f in res.failures]}")
            elif now >= root.expires:
                c.run(f"{name} at {label}", fn, {"expired"}, ("trust root",))
            elif now >= expires:
                c.run(f"{name} at {label}", fn, {"expired"}, ("bundle expired",))
            else:
                c.run(f"{name} at {label}", fn, {"metadata"}, ("future",))

    one = timedelta(seconds=1)
    sweep("A", w.root1, created, expires, [
        ("created - 10y", created - timedelta(days=3650)), ("created - 1d - 1s", created - timedelta(days=1) - one),
        ("created - 1d", created - timedelta(days=1)), ("created", created), ("expires - 1s", expires - one),
        ("expires exactly", expires), ("expires + 1s", expires + one), ("root expiry - 1s", root_exp - one),
        ("root expiry exactly", root_exp), ("year 9999", datetime(9999, 12, 31, tzinfo=timezone.utc)),
        ("epoch 0", datetime(1970, 1, 1, tzinfo=timezone.utc))])
    sweep("SHORT", short_root, s_created, s_expires, [
        ("now", NOW), ("root expiry - 1s", short_root.expires - one), ("root expiry exactly", short_root.expires),
        ("root expiry + 1s (bundle still valid)", short_root.expires + one), ("bundle expiry - 1s", s_expires - one)])
    for hours in range(0, 24 * 8, 6):     # hour by hour over the short root's end
        now = NOW + timedelta(hours=hours)
        sweep("SHORT", short_root, s_created, s_expires, [(f"now + {hours}h", now)])

    # CLI: lifetimes and build times
    rpi = ["bundle", "build", "clf:1.1.0", "--target", "rpi4", "--key", "rel", "-o"]
    future = str(int((NOW + timedelta(days=30)).timestamp()))
    cases = []
    for exp, rc, kws in [("0d", 2, ("positive",)), ("0s", 2, ("positive",)), ("-1d", 2, ("duration",)),
                         ("1.5d", 2, ("duration",)), ("", 2, ("duration",)), ("2920000d", 2, ("expires",)),
                         ("99999999999d", 2, ("expires",)), ("5000000w", 2, ("expires",))]:
        cases.append((f"bundle build --expires {exp!r}", [*rpi, w.path(), "--expires", exp], {}, rc, kws, ()))
    cases += [
        ("trust init --expires 99999999999d", ["trust", "init", w.path("t"), "--key", "rel", "--expires", "99999999999d"],
         {}, 2, ("expires",), ()),
        ("trust init --expires 5000000w", ["trust", "init", w.path("t"), "--key", "rel", "--expires", "5000000w"],
         {}, 2, ("expires",), ()),
        ("SOURCE_DATE_EPOCH 30 days ahead (created in the future)", [*rpi, w.path()],
         dict(env={"SOURCE_DATE_EPOCH": future}), {1, 2}, ("future",), ()),
        ("SOURCE_DATE_EPOCH=-1", [*rpi, w.path()], dict(env={"SOURCE_DATE_EPOCH": "-1"}), 2, ("expired",), ()),
        ("SOURCE_DATE_EPOCH=abc", [*rpi, w.path()], dict(env={"SOURCE_DATE_EPOCH": "abc"}), 2, ("integer",), ()),
        ("SOURCE_DATE_EPOCH=99999999999999 (year 3170843)", [*rpi, w.path()],
         dict(env={"SOURCE_DATE_EPOCH": "99999999999999"}), 2, ("range", "year", "too large", "future"),
         ("must be an integer",)),
        ("SOURCE_DATE_EPOCH=999999999999999999999", [*rpi, w.path()],
         dict(env={"SOURCE_DATE_EPOCH": "999999999999999999999"}), 2, ("range", "year", "too large", "future"), ()),
    ]
    _cases_cli(c, w, cases)
    for label, args, *_ in cases:
        out = Path(args[args.index("-o") + 1]) if "-o" in args else None
        for x in (out, out.with_name(out.name + ".partial")) if out is not None else ():
            if x.exists():
                c.problem(label, f"LEFT BEHIND {x.name}")
                x.unlink()
    c.check()


# ----------------------------------------------------------------------------- rollback

def test_rollback_library_grid(w):
    """Every combination of installed counter / version / name / --allow-same-version on bundle A
    (clf 1.1.0, counter 100), against the documented rule computed here independently."""
    c = Cases("e2e-rollback")
    A = w.bundles["A"]
    sem = lambda s: tuple(int(x) for x in s.split("."))  # noqa: E731
    for counter in (None, 0, COUNTER_A - 1, COUNTER_A, COUNTER_A + 1, 2 ** 62):
        for version in (None, "0.9.9", "1.0.0", "1.0.10", "1.1.0", "1.1.1", "1.10.0", "2.0.0"):
            for name in (None, "clf", "other", "CLF"):
                for same in (False, True):
                    inst = v.Installed(counter, version, name)
                    bad_counter = counter is not None and COUNTER_A <= counter
                    same_model = name is None or name == "clf"
                    bad_version = version is not None and same_model and (
                        sem(version) > (1, 1, 0) or (sem(version) == (1, 1, 0) and not same))
                    label = f"installed counter={counter} version={version} name={name} allow_same={same}"
                    fn = lambda: v.verify_bundle(A, w.root1, target="rpi4", installed=inst,  # noqa: E731
                                                 allow_same_version=same)
                    if bad_counter or bad_version:
                        res = c.run(label, fn, {"rollback"}, ("counter",) if bad_counter else ("version",))
                        if isinstance(res, v.VerifyResult) and bad_counter and bad_version and len(res.failures) != 2:
                            c.problem(label, f"WRONG REASON: both rollback reasons expected, got {res.failures}")
                    else:
                        res = fn()
                        if not res.ok:
                            c.problem(label, f"CONTROL FAILED: {[f.message for f in res.failures]}")
    c.check()


def test_rollback_cli_options(w):
    """--installed-version / --installed-counter / --allow-same-version as typed on a device."""
    c = Cases("e2e-rollback-cli")
    A = w.bundles["A"]
    vfy = ["bundle", "verify", A, "--trust", w.dev1, "--target", "rpi4"]
    cases = []
    for iv, ic, same, rc, kws in [
        ("1.1.0", None, False, 1, ("rollback",)), ("clf:1.1.0", None, False, 1, ("rollback",)),
        ("clf:2.0.0", None, False, 1, ("rollback",)), ("clf:1.1.0", COUNTER_A, True, 1, ("counter",)),
        ("clf:1.1.0", COUNTER_A + 1, True, 1, ("counter",)), (None, COUNTER_A, False, 1, ("counter",)),
        (None, 10 ** 30, False, 2, ("range",)), ("other:0.0.1", COUNTER_A, False, 1, ("counter",)),
        ("clf:1.1.0", COUNTER_A - 1, True, 0, ()), ("other:9.0.0", COUNTER_A - 1, False, 0, ()),
        ("clf:1.0.9", COUNTER_A - 1, False, 0, ()),
        # malformed: a usage error, never a silently skipped check
        ("1.0", None, False, 2, ("x.y.z",)), ("01.0.0", None, False, 2, ("x.y.z",)), ("-1", None, False, 2, ("x.y.z",)),
        ("1.0.0-rc1", None, False, 2, ("x.y.z",)), ("", None, False, 2, ("x.y.z",)), ("clf:", None, False, 2, ("x.y.z",)),
        ("v1.1.0", None, False, 2, ("x.y.z",)), (" 1.1.0", None, False, 2, ("x.y.z",)),
        (":2.0.0", None, False, 2, ("name",)), ("a:b:2.0.0", None, False, 2, ("name",)),
        ("clf :2.0.0", None, False, 2, ("name",)), ("../clf:2.0.0", None, False, 2, ("name",)),
        (None, -1, False, 2, ("counter",)), (None, -(10 ** 30), False, 2, ("counter",)),
    ]:
        args = list(vfy)
        if iv is not None:
            args.append(f"--installed-version={iv}")
        if ic is not None:
            args.append(f"--installed-counter={ic}")
        if same:
            args.append("--allow-same-version")
        label = f"--installed-version {iv!r} --installed-counter {ic}" + (" --allow-same-version" if same else "")
        cases.append((label, args, {}, rc, kws, ()))
    cases.append(("--installed-counter=abc", [*vfy, "--installed-counter=abc"], {}, 2, ("integer",), ()))
    _cases_cli(c, w, cases)
    c.check()


# ----------------------------------------------------------------------------- registry side

def test_registry_side(w):
    c = Cases("e2e-registry")
    build = ["bundle", "build", "clf:1.1.0", "--target", "rpi4", "--key", "rel", "-o"]
    sha = hashlib.sha256(w.model1).hexdigest()

    def blob(home):
        p = home / "blobs" / "sha256" / sha[:2] / sha
        os.chmod(p, 0o644)
        return p

    def flip_blob(h):
        p = blob(h)
        d = bytearray(p.read_bytes())
        d[len(d) // 2] ^= 0x01
        p.write_bytes(bytes(d))

    def other_model_blob(h):   # a valid ONNX model of the same shape: only the sha256 tells
        blob(h).write_bytes(w.model0)

    def link_blob(h):
        p = blob(h)
        p.unlink()
        p.symlink_to(w.base / "src" / "clf.onnx")

    def corrupt_pages(h):
        db = h / "registry.db"
        d = bytearray(db.read_bytes())
        for i in range(4096, len(d), 97):
            d[i] ^= 0x55
        db.write_bytes(bytes(d))

    def db_dir(h):
        (h / "registry.db").unlink()
        (h / "registry.db").mkdir()

    scenarios = [
        ("blob of the model with one byte flipped", flip_blob, 2, ("corrupted",)),
        ("blob truncated", lambda h: blob(h).write_bytes(w.model1[:100]), 2, ("corrupted",)),
        ("blob replaced by another valid model", other_model_blob, 2, ("corrupted",)),
        ("blob replaced by a symlink to another model", link_blob, 2, ("corrupted",)),
        ("blob deleted", lambda h: blob(h).unlink(), 2, ("missing",)),
        ("registry.db deleted", lambda h: (h / "registry.db").unlink(), 2, ("no model", "registry")),
        ("registry.db is garbage", lambda h: (h / "registry.db").write_bytes(b"garbage" * 100), 2, ("registry",)),
        ("registry.db truncated to its header", lambda h: (h / "registry.db").write_bytes(
            (w.home / "registry.db").read_bytes()[:4096]), 2, ("registry", "malformed")),
        ("registry.db with corrupted pages", corrupt_pages, 2, ("registry", "malformed", "corrupt")),
        ("registry.db is a directory", db_dir, 2, ("registry",)),
    ]
    cases, outs = [], []
    for label, edit, rc, kws in scenarios:
        h = w.home_copy()
        edit(h)
        out = w.path()
        outs.append((f"build with {label}", out))
        cases.append((f"build with {label}", [*build, out], dict(home=h), rc, kws, ()))
    # model files whose names cannot go into a bundle; a removed version
    h = w.home_copy()
    from edgeops.registry import open_registry

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEOPS_HOME", str(h))
        with open_registry() as reg:
            for i, fname in enumerate(["my model.onnx", "modèle.onnx", "we:ird.onnx", "tab\tname.onnx"]):
                d = w.path("m")
                d.mkdir()
                reg.add(onnx_model(d / fname, 10 + i), f"odd{i}", version="1.0.0")
            reg.remove("clf", "1.0.0")
    for i, fname in enumerate(["my model.onnx", "modèle.onnx", "we:ird.onnx", "tab\tname.onnx"]):
        out = w.path()
        outs.append((f"model file named {fname!r}", out))
        cases.append((f"model file named {fname!r}", ["bundle", "build", f"odd{i}:1.0.0", "--target", "rpi4", "--key",
                                                      "rel", "-o", out], dict(home=h), 2, ("rename",), ()))
    out = w.path()
    outs.append(("build of a removed version", out))
    cases.append(("build of a removed version", ["bundle", "build", "clf:1.0.0", "--target", "rpi4", "--key", "rel",
                                                 "-o", out], dict(home=h), 2, ("removed",), ()))
    # build options that cannot make a meaningful health check or counter
    for opt, val in [("--atol", "nan"), ("--atol", "inf"), ("--atol", "-1"), ("--rtol", "nan"), ("--rtol", "-0.5"),
                     ("--slo-ms", "inf"), ("--counter", str(2 ** 63)), ("--counter", str(10 ** 30))]:
        out = w.path()
        outs.append((f"build {opt} {val}", out))
        cases.append((f"build {opt} {val}", [*build, out, opt, val], dict(home=w.home_copy()), 2,
                      (opt.lstrip("-").split("-")[0],), ()))
    # output paths
    odir = w.path("outdir")
    odir.mkdir()
    afile = w.path("afile")
    afile.write_text("x")
    for label, o, kws in [("-o an existing directory", odir, ("directory",)), ("-o under a regular file", afile / "x.bundle",
                          ("not a directory", "exists", "cannot")), ("-o ''", "", ("output", "path", "-o"))]:
        cases.append((f"build {label}", [*build, o], {}, 2, kws, ()))
    results = dict(zip([x[0] for x in cases], w.many([(args, kw) for _, args, kw, *_ in cases])))
    for label, _, _, rc, kws, forbid in cases:
        c.record(label, judge_cli(results[label], rc, kws, forbid))
    refused = {out for (label, out), case in zip(outs, cases) if getattr(results[case[0]], "returncode", 1) != 0}
    for label, out in outs:
        for x in (out, out.with_name(out.name + ".partial")):
            if x.exists() and (out in refused or x.name.endswith(".partial")):
                c.problem(label, f"LEFT BEHIND {x.name} after a refused build")
                x.unlink()
    if odir.with_name(odir.name + ".partial").exists():
        c.problem("build -o an existing directory", f"LEFT BEHIND {odir.name}.partial")
        odir.with_name(odir.name + ".partial").unlink()

    # a planted OUT.partial must never be written through
    victim = w.path("victim.txt")
    victim.write_text("precious")
    out = w.path()
    out.with_name(out.name + ".partial").symlink_to(victim)
    r = w.cli(*build, out)
    if victim.read_text(errors="replace") != "precious" or out.is_symlink():
        c.record("OUT.partial is a planted symlink", f"ACCEPTED: the build wrote through the symlink into "
                 f"{victim.name} (now {victim.stat().st_size} bytes) and {out.name} is "
                 f"{'a symlink to it' if out.is_symlink() else 'a file'} (exit {r.returncode})")
    else:
        c.record("OUT.partial is a planted symlink", judge_cli(r, {0, 2}))
    for x in (out, out.with_name(out.name + ".partial")):
        if x.is_symlink():
            x.unlink()
    out = w.path()
    out.with_name(out.name + ".partial").mkdir()
    r = w.cli(*build, out)
    if r.returncode == 0:
        res = v.verify_bundle(out, w.root1, target="rpi4", installed=None)
        c.record("OUT.partial is a leftover directory", None if res.ok else f"built but does not verify: {res.failures}")
    else:
        c.record("OUT.partial is a leftover directory", judge_cli(r, 2))
    if out.with_name(out.name + ".partial").is_dir():
        out.with_name(out.name + ".partial").rmdir()

    # a huge explicit counter must not break every later build (nor devices: see the report)
    h = w.home_copy()
    r1 = w.cli(*build, w.path(), "--counter", 2 ** 63 - 1, home=h)
    r2 = w.cli(*build, w.path(), home=h)
    if r1.returncode == 0:
        c.record("--counter 2**63-1, then a normal build", None if r2.returncode == 0 else
                 f"ACCEPTED --counter 2**63-1, and now EVERY later build fails (exit {r2.returncode}): {_msg(r2)}")
    else:
        c.record("--counter 2**63-1, then a normal build", judge_cli(r1, 2, ("counter",)))
    c.check()


def test_concurrent_builds(w):
    """4 `bundle build` processes at once: unique counters, every bundle verifies; and 4 at once
    to the SAME output path: each one ends cleanly and the file left is a valid bundle."""
    c = Cases("e2e-concurrency")
    h = w.home_copy()
    env = w.env(h)

    def launch(outs):
        procs = [subprocess.Popen([sys.executable, "-m", "edgeops", "bundle", "build", "clf:1.1.0", "--target", "rpi4",
                                   "--key", "rel", "-o", str(o), "--json"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL) for o in outs]
        return [(p, *p.communicate(timeout=120)) for p in procs]

    outs = [w.path(f"c{i}.bundle") for i in range(4)]
    counters = []
    for o, (p, so, se) in zip(outs, launch(outs)):
        r = subprocess.CompletedProcess(p.args, p.returncode, so, se)
        if p.returncode != 0:
            c.record(f"concurrent build -> {o.name}", judge_cli(r, 0) or f"exit {p.returncode}")
            continue
        counters.append(json.loads(so)["manifest"]["counter"])
        res = v.verify_bundle(o, w.root1, target="rpi4", installed=None)
        c.record(f"concurrent build -> {o.name}", None if res.ok else f"does not verify: {res.failures}")
    if len(set(counters)) != len(counters):
        c.problem("concurrent builds", f"DUPLICATE COUNTERS {counters}")
    for rnd in range(2):
        same = w.path("same.bundle")
        got = launch([same] * 4)
        for i, (p, so, se) in enumerate(got):
            r = subprocess.CompletedProcess(p.args, p.returncode, so, se)
            c.record(f"round {rnd}: 4 builds to one output path, process {i}", judge_cli(r, 0) if p.returncode else None)
        res = v.verify_bundle(same, w.root1, target="rpi4", installed=None) if same.exists() else None
        if res is None or not res.ok:
            c.problem(f"round {rnd}: 4 builds to one output path", f"the file left is not a valid bundle: "
                      f"{res.failures if res else 'missing'}")
        shas = {json.loads(so)["sha256"] for p, so, _ in got if p.returncode == 0}
        if same.exists() and shas and hashlib.sha256(same.read_bytes()).hexdigest() not in shas:
            c.problem(f"round {rnd}: 4 builds to one output path", "the file left is none of the reported bundles")
        if same.with_name("same.bundle.partial").exists():
            c.problem(f"round {rnd}: 4 builds to one output path", "LEFT BEHIND same.bundle.partial")
            same.with_name("same.bundle.partial").unlink()
    c.check()


# ----------------------------------------------------------------------------- keys

def test_key_files(w):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

    c = Cases("e2e-keys")
    kd = w.base / "foreign-keys"
    kd.mkdir()

    def pem(key, fmt=serialization.PrivateFormat.PKCS8):
        return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())

    foreign = {
        "RSA-2048 PKCS8": pem(rsa.generate_private_key(65537, 2048)),
        "RSA traditional": pem(rsa.generate_private_key(65537, 2048), serialization.PrivateFormat.TraditionalOpenSSL),
        "ECDSA P-256": pem(ec.generate_private_key(ec.SECP256R1())),
        "X25519": pem(x25519.X25519PrivateKey.generate()),
        "OpenSSH ed25519 (ssh-keygen format)": pem(ed25519.Ed25519PrivateKey.generate(), serialization.PrivateFormat.OpenSSH),
        "raw 32 bytes": os.urandom(32),
        "empty": b"",
        "the .pub JSON of a key": (w.kdir / "rel.pub").read_bytes(),
    }
    build = ["bundle", "build", "clf:1.1.0", "--target", "rpi4", "-o"]
    cases = []
    for label, data in foreign.items():
        p = kd / (label.split()[0] + str(len(cases)) + ".key")
        p.write_bytes(data)
        os.chmod(p, 0o600)
        cases.append((f"--key {label}", [*build, w.path(), "--key", p], {}, 2,
                      ("ed25519", "not an edgeops", "private key"), ()))
    # the public half passed as --key: it is readable by all (as it should be) - the reason must
    # be that it is a public key, not "chmod 600" it
    cases.append(("--key NAME.pub (the public key file)", [*build, w.path(), "--key", w.kdir / "rel.pub"], {}, 2,
                  ("public",), ("chmod 600",)))
    # symlinks to key files: mode of the target counts
    world = kd / "world.key"
    shutil.copy(w.kdir / "rel.key", world)
    os.chmod(world, 0o644)
    (w.kdir / "lnk-world.key").symlink_to(world)
    cases.append(("--key symlink to a world-readable copy of a key", [*build, w.path(), "--key", "lnk-world"], {}, 2,
                  ("readable by other users",), ()))
    # passphrases
    cases += [
        ("encrypted key, EDGEOPS_KEY_PASSPHRASE wrong", [*build, w.path(), "--key", "locked"],
         dict(env={"EDGEOPS_KEY_PASSPHRASE": "nope"}), 2, ("wrong passphrase",), ()),
        ("encrypted key, EDGEOPS_KEY_PASSPHRASE empty, no terminal", [*build, w.path(), "--key", "locked"],
         dict(env={"EDGEOPS_KEY_PASSPHRASE": ""}), 2, ("passphrase",), ()),
        ("encrypted key, no passphrase, no terminal", [*build, w.path(), "--key", "locked"], {}, 2, ("passphrase",), ()),
        ("keys generate --passphrase, EDGEOPS_KEY_PASSPHRASE empty, no terminal",
         ["keys", "generate", "pw-empty", "--passphrase"], dict(env={"EDGEOPS_KEY_PASSPHRASE": ""}), 2,
         ("passphrase",), ()),
        ("encrypted key, right passphrase, key not in the root", [*build, w.path(), "--key", "locked"],
         dict(env={"EDGEOPS_KEY_PASSPHRASE": "s3cret"}), 2, ("not in it",), ()),
    ]
    # key names
    for name in ["../x", "a/b", "", "a" * 65, ".hidden", "x y", "é", "x\n", "/abs", "~", "a\\b"]:
        cases.append((f"keys generate {name!r}", ["keys", "generate", "--", name], {}, 2, ("not allowed",), ()))
    cases.append(("keys generate 64 characters", ["keys", "generate", "k" * 64], {}, 0, (), ()))
    # planted files at the key's paths
    (w.kdir / "plantk.key").symlink_to(w.base / "planted-nowhere.key")
    (w.kdir / "plantp.pub").symlink_to(w.base / "planted-elsewhere.pub")
    cases += [
        ("keys generate over a dangling NAME.key symlink", ["keys", "generate", "plantk"], {}, 2,
         ("exists",), ()),
        ("keys generate over a dangling NAME.pub symlink", ["keys", "generate", "plantp"], {}, 2,
         ("exists",), ()),
    ]
    # a .pub that does not match its .key: trust init would give the bundle role to another key
    keys_mod.generate("mism", folder=w.kdir)
    good_pub = (w.kdir / "mism.pub").read_bytes()
    shutil.copy(w.kdir / "mallory.pub", w.kdir / "mism.pub")
    tdir = w.path("mism-trust")
    cases.append(("trust init --key K where K.pub is another key's", ["trust", "init", tdir, "--key", "mism"], {}, 2,
                  ("does not match", "mismatch"), ()))
    before = sorted(p.name for p in w.kdir.iterdir())
    _cases_cli(c, w, cases)
    after = sorted(p.name for p in w.kdir.iterdir())
    made = {n for n in set(after) - set(before) if not n.startswith(("k" * 64, "plant"))}
    if made:
        c.problem("keys generate with refused names", f"CREATED {sorted(made)}")
    for stray in (w.base / "planted-elsewhere.pub", w.base / "planted-nowhere.key", w.base / "x.key", w.base / "x.pub",
                  Path("/x.key"), Path("/abs.key")):
        if stray.exists():
            c.problem("keys generate", f"WROTE THROUGH a planted symlink / outside the keys folder: {stray}")
    (w.kdir / "mism.pub").write_bytes(good_pub)
    c.check()


# ----------------------------------------------------------------------------- the bundle file itself

def test_bundle_path_variants(w):
    """What `bundle verify` / `bundle inspect` are pointed at. A symlink to a valid bundle is
    verified (control in test_e2e_controls): the verifier opens it once and checks the opened
    file is regular (fstat), so the bytes hashed are the bytes of the file it names; refusing
    symlinks would only break read-only layouts. Devices, FIFOs and folders are not bundles and
    must be named as such, fast, without reading endless data."""
    c = Cases("e2e-bundle-file")
    fifo = w.path("b.pipe")
    os.mkfifo(fifo)
    dangling = w.path("dangling.bundle")
    dangling.symlink_to(w.base / "nowhere.bundle")
    twice = w.write(w.data["A"] * 2)
    padded = w.write(w.data["A"] + bytes(1024))
    cases = []
    for cmd in ("verify", "inspect"):
        extra = ["--trust", w.dev1] if cmd == "verify" else []
        for label, p, rc, kws in [
            ("a directory", w.out, 2, ("directory", "not a regular file", "not a file")),
            ("/dev/zero", "/dev/zero", 2, ("regular file", "not a file", "device")),
            ("/dev/urandom", "/dev/urandom", 2, ("regular file", "not a file", "device")),
            ("a FIFO", fifo, 2, ("regular file", "not a file", "fifo")),
            ("a dangling symlink", dangling, 2, ("no such",)),
            ("a missing file", w.base / "missing.bundle", 2, ("no such",)),
        ]:
            cases.append((f"bundle {cmd} {label}", ["bundle", cmd, p, *extra], dict(timeout=20, mem_limit=True), rc,
                          kws, ()))
    cases += [
        ("bundle verify: a valid bundle concatenated twice", ["bundle", "verify", twice, "--trust", w.dev1], {}, 1,
         ("after the end",), ()),
        ("bundle verify: a valid bundle + 1024 zero bytes", ["bundle", "verify", padded, "--trust", w.dev1], {}, 1,
         ("after the end",), ()),
    ]
    for label, args, kw, rc, kws, forbid in cases:     # sequential: preexec_fn (memory limit) is not thread-safe
        c.record(label, judge_cli(w.cli(*args, **kw), rc, kws, forbid))
    c.check()


def test_mix_and_match_real_builds(w):
    """Splices between real builds: every entry of every bundle replaced by the same-named entry
    of every other bundle, and every manifest put on every other payload."""
    c = Cases("e2e-mix")
    names = ["A", "A5", "A0", "AI", "B", "ROT"]
    mem = {n: members(w.data[n]) for n in names}
    roots = {"A": w.root1, "A5": w.root1, "A0": w.root1, "AI": w.root1, "B": w.root1, "ROT": w.root1}
    p = w.path()
    for a in names:
        for bn in names:
            if a == bn:
                continue
            for entry in sorted(set(mem[a]) & set(mem[bn])):
                if mem[a][entry] == mem[bn][entry]:
                    continue
                spliced = dict(mem[a])
                spliced[entry] = mem[bn][entry]
                env = spliced.pop(v.MANIFEST)
                p.write_bytes(pack(env, spliced))
                label = f"{a} with {entry} of {bn}"
                if entry == v.MANIFEST:
                    continue   # below
                codes = {"files", "signature"} if "ROT" in (a, bn) else {"files"}
                c.run(label, lambda: v.verify_bundle(p, roots[a], target=None, installed=None), codes,
                      ("sha256", "bytes", "unknown"))
            # the whole signed manifest of bn on the payload of a
            rest = {k: x for k, x in mem[a].items() if k != v.MANIFEST}
            p.write_bytes(pack(mem[bn][v.MANIFEST], rest))
            res = v.verify_bundle(p, roots[bn], target=None, installed=None)
            same_payload = {k: x for k, x in mem[bn].items() if k != v.MANIFEST} == rest
            if same_payload:
                # rpi4 and rpi5 builds of one version share a payload: the splice IS the other bundle
                if not res.ok or p.read_bytes() != w.data[bn]:
                    c.problem(f"manifest of {bn} on payload of {a}", f"CONTROL FAILED: {res.failures}")
            else:
                codes = {"files", "signature"} if "ROT" in (a, bn) else {"files"}
                c.run(f"manifest of {bn} on payload of {a}", lambda: res, codes,
                      ("sha256", "missing", "bytes", "not in the signed manifest", "unknown"))
    # the target splice through the CLI: the rpi5 manifest on the rpi4 payload is the rpi5 bundle
    rest = {k: x for k, x in mem["A"].items() if k != v.MANIFEST}
    sp = w.write(pack(mem["A5"][v.MANIFEST], rest))
    r = w.cli("bundle", "verify", sp, "--trust", w.dev1, "--target", "rpi4")
    c.record("CLI: rpi5 manifest on the rpi4 payload, device rpi4", judge_cli(r, 1, ("target",)))
    assert sp.read_bytes() == w.data["A5"]     # deterministic builds: same counter and time, same bytes
    c.check()


# ----------------------------------------------------------------------------- health check

def test_health_check_on_resigned_bundles(w):
    """A trusted key signs a bad payload (insider / compromised build machine): `--health` is the
    last line. It must FAIL with exit 1 and say why, and must never unpickle anything."""
    c = Cases("e2e-health")
    marker = w.base / "PWNED"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    def npy(arr, allow_pickle=False) -> bytes:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=allow_pickle)
        return buf.getvalue()

    pickled = npy(np.array([Boom()], dtype=object), allow_pickle=True)
    A = w.data["A"]
    inp, outp = "payload/reference/input_0.npy", "payload/reference/output_0.npy"

    def setm(name, data):
        return lambda m: m.__setitem__(name, data)

    def seth(group, fn):
        return lambda s: fn(s["health"][group])

    scen = [
        ("model swapped for another of the same signature", dict(edit_members=setm(w.model_member, w.model0)),
         ("y: mismatch",)),
        ("input vector swapped for one of another build", dict(edit_members=setm(inp, members(w.data["AI"])[inp])),
         ("y: mismatch", "shape")),
        ("pickle-bearing object array as the input", dict(edit_members=setm(inp, pickled)), ("pickle", "object")),
        ("pickle-bearing object array as the expected output", dict(edit_members=setm(outp, pickled)),
         ("pickle", "object")),
        ("expected output is not an .npy", dict(edit_members=setm(outp, b"garbage")), ("npy", "output", "y")),
        ("model is not ONNX", dict(edit_members=setm(w.model_member, b"not onnx")), ("model", "onnx", "protobuf")),
        ("input of the wrong shape", dict(edit_members=setm(inp, npy(np.zeros((3, 3), np.float32)))),
         ("input", "shape", "dimension")),
        ("input of the wrong dtype", dict(edit_members=setm(inp, npy(np.zeros((1, 16), np.float64)))),
         ("input", "dtype", "type")),
        ("expected names an output the model lacks", dict(edit_manifest=seth("expected", lambda e: e.__setitem__(
            "nope", e.pop("y")))), ("nope",)),
        ("inputs name an input the model lacks", dict(edit_manifest=seth("inputs", lambda e: e.__setitem__(
            "nope", e.pop("x")))), ("input", "nope")),
        ("atol is a string", dict(edit_manifest=seth("expected", lambda e: e["y"].__setitem__("atol", "x"))),
         ("atol", "tolerance")),
        ("slo is a string", dict(edit_manifest=lambda s: s.__setitem__("slo", "fast")), ("slo",)),
        ("slo latency is a string", dict(edit_manifest=lambda s: s.__setitem__(
            "slo", {"latency_ms": "x", "percentile": "p99"})), ("slo",)),
        ("no health section", dict(edit_manifest=lambda s: s.pop("health")), ("health",)),
        ("health section with no expected outputs (nothing would be checked)",
         dict(edit_manifest=seth("expected", lambda e: e.clear())), ("health", "expected", "no output")),
    ]
    jobs = []
    for label, kw, _ in scen:
        p = w.write(resign(A, [w.k["rel"]], **kw))
        res = v.verify_bundle(p, w.root1, target="rpi4", installed=None)
        assert res.ok, (label, res.failures)    # validly signed: only the health check can catch it
        jobs.append((["bundle", "verify", p, "--trust", w.dev1, "--target", "rpi4", "--health"], {}))
    for (label, _, kws), r in zip(scen, w.many(jobs)):
        c.record(f"--health: {label}", judge_cli(r, 1, kws))
    if marker.exists():
        c.problem("--health: pickle", "UNPICKLED: the object array's payload ran")
    c.check()


# ----------------------------------------------------------------------------- inspect

def test_inspect_never_claims_verification(w):
    """`bundle inspect` on every refused bundle made in this module, and on hostile (unsigned)
    manifests: exit 0 or 2, UNVERIFIED when it shows anything, never a crash."""
    c = Cases("e2e-inspect")
    A = w.data["A"]

    def unsigned(**kw):
        return w.write(resign(A, None, **kw))

    hostile = [
        ("runtime is a string", unsigned(edit_manifest=lambda s: s.__setitem__("runtime", "x"))),
        ("slo without a percentile", unsigned(edit_manifest=lambda s: s.__setitem__("slo", {"latency_ms": 5}))),
        ("parity entries are strings", unsigned(edit_manifest=lambda s: s.__setitem__("parity", ["x"]))),
        ("a files entry is a string", unsigned(edit_manifest=lambda s: s["files"].__setitem__(
            "payload/reference/input_0.npy", "x"))),
        ("signatures is a number", unsigned(edit_envelope=lambda e: e.__setitem__("signatures", 5))),
        ("signatures is a string", unsigned(edit_envelope=lambda e: e.__setitem__("signatures", "abc"))),
        ("name is rich markup claiming VERIFIED", unsigned(edit_manifest=lambda s: s.__setitem__(
            "name", "[bold green]VERIFIED[/]"))),
        ("name is an object", unsigned(edit_manifest=lambda s: s.__setitem__("name", {"a": 1}))),
    ]
    # the library sweep: everything refused in this module
    for p in dict.fromkeys(REFUSED_BUNDLES + [p for _, p in hostile]):
        try:
            d = b.inspect(p)
            problem = None if d.get("verified") is False else f"CLAIMS verified={d.get('verified')!r}"
        except b.UsageError:
            problem = None
        except Exception as exc:
            problem = f"RAISED {type(exc).__name__}: {exc}"
        c.record(f"inspect (library) {p.parent.name}/{p.name}", problem)
    # the CLI, text and JSON, on the hostile ones and a sample of the rest
    hostile_paths = {p for _, p in hostile}
    sample = [(label, p) for label, p in hostile] + [
        (f"refused {p.parent.name}", p) for p in [x for x in REFUSED_BUNDLES if x not in hostile_paths][:6]]
    jobs = [(["bundle", "inspect", p, *j], {}) for _, p in sample for j in ([], ["--json"])]
    for (label, p, j), r in zip([(lab, p, j) for lab, p in sample for j in ("text", "json")], w.many(jobs)):
        problem = judge_cli(r, {0, 2})
        if problem is None and r.returncode == 0:
            if j == "json":
                if json.loads(r.stdout).get("verified") is not False:
                    problem = "CLAIMS verified"
            elif "UNVERIFIED" not in r.stdout or any(x.startswith("VERIFIED") for x in r.stdout.splitlines()):
                problem = f"does not say UNVERIFIED: {r.stdout[:160]!r}"
        c.record(f"bundle inspect ({j}): {label}", problem)
    c.check()


# ----------------------------------------------------------------------------- leftovers

def test_zz_nothing_left_behind(w, request):
    """After everything above (refusals, crashes, health runs): no edgeops-* work folder in the
    subprocesses' TMPDIR and no .partial file next to any output."""
    collected = {it.module for it in request.session.items
                 if Path(str(it.path)).name == "test_bundle_threats.py" and hasattr(it, "module")}
    assert collected <= {_round1}, "test_bundle_threats.py was imported twice: the threat tally is split in two"
    assert "e2e-rollback" in THREAT_TALLY or not any(n.endswith("rollback_library_grid") for n in
                                                      (it.name for it in request.session.items))
    c = Cases("e2e-leftovers")
    left = sorted(p.name for p in w.tmp.iterdir() if p.name.startswith(("edgeops", "tmp")))
    c.record("TMPDIR of every CLI run", f"LEFT BEHIND {left[:8]}" if left else None)
    partial = sorted(str(p.relative_to(w.base)) for p in w.base.rglob("*.partial"))   # known ones were removed
    c.record("*.partial next to build outputs", f"LEFT BEHIND {partial[:8]}" if partial else None)
    c.check()
