"""Threat-model tests for signed bundles: every attack must be REFUSED with a relevant reason.

The device-side verifier (edgeops.agent.verifier) is attacked directly, with bundles built here
without the model registry (verifier.write_archive + trust.sign_envelope), trust roots made
with edgeops.bundle.trust and keys with edgeops.bundle.keys.

Each attack is one "case". A case counts as refused when verify_bundle returns ok=False; it is a
problem (and its test fails) when it is accepted, when it is refused with a reason that does not
match the attack (wrong Failure.code or no relevant keyword in the message), or when anything
raises out of verify_bundle (it must never raise for a bad bundle).

THREAT_TALLY = {category: [tried, refused]} is kept at module level; the totals are written in
pytest's terminal summary (with or without -s) by a plugin registered from a module fixture.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tracemalloc
import zipfile
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from edgeops.agent import verifier as v
from edgeops.bundle import keys as keys_mod
from edgeops.bundle import trust

THREAT_TALLY: dict[str, list[int]] = {}          # category -> [tried, refused]
THREAT_PROBLEMS: dict[str, list[str]] = {}       # category -> ["label: problem", ...]

KNOWN_CODES = {"archive", "unsafe-entry", "metadata", "root", "signature", "expired", "target",
               "rollback", "files", "malformed"}
NOW = datetime.now(timezone.utc).replace(microsecond=0)
TARGET = "rpi4"
INSTALLED = v.Installed(4, "0.9.0")
HDR = {"archive", "unsafe-entry"}


# ----------------------------------------------------------------------------- tally + reporting

def _summary_lines() -> list[str]:
    tried = sum(t for t, _ in THREAT_TALLY.values())
    refused = sum(r for _, r in THREAT_TALLY.values())
    probs = sum(len(p) for p in THREAT_PROBLEMS.values())
    lines = [f"THREAT CASES: tried {tried}, refused {refused}, problems {probs} "
             f"(accepted / wrong reason / raised)"]
    for cat in sorted(THREAT_TALLY):
        t, r = THREAT_TALLY[cat]
        n = len(THREAT_PROBLEMS.get(cat, []))
        lines.append(f"  {cat:<22} tried {t:>6}  refused {r:>6}" + (f"  PROBLEMS {n}" if n else ""))
    return lines


class _TallyReporter:
    def pytest_terminal_summary(self, terminalreporter):
        if THREAT_TALLY:
            terminalreporter.section("bundle threat tally")
            for line in _summary_lines():
                terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _threat_summary(request):
    pm = request.config.pluginmanager
    if not pm.has_plugin("edgeops-threat-tally"):
        pm.register(_TallyReporter(), "edgeops-threat-tally")
    yield


def _judge(outcome, codes, keywords=(), forbid=()) -> str | None:
    """None if `outcome` (a VerifyResult or an exception) is a proper refusal, else the problem."""
    if isinstance(outcome, BaseException):
        return f"RAISED {type(outcome).__name__}: {str(outcome)[:160]}"
    if not isinstance(outcome, v.VerifyResult):
        return f"returned {type(outcome).__name__}, not a VerifyResult"
    if outcome.ok:
        return "ACCEPTED (ok=True)"
    if not outcome.failures:
        return "ok=False but no failure listed"
    shown = "; ".join(f"[{f.code}] {f.message}" for f in outcome.failures)[:300]
    unknown = [f.code for f in outcome.failures if f.code not in KNOWN_CODES]
    if unknown:
        return f"WRONG REASON (unknown code {unknown}): {shown}"
    for f in outcome.failures:
        msg = f.message.lower()
        if f.code in codes and (not keywords or any(k.lower() in msg for k in keywords)) \
                and not any(x.lower() in msg for x in forbid):
            return None
    return f"WRONG REASON (want code {sorted(codes)} with {list(keywords) or 'any message'}" \
           + (f", without {list(forbid)}" if forbid else "") + f"): {shown}"


class Cases:
    """The cases of one test: tallied per category; `check()` fails the test on any problem."""

    def __init__(self, category: str):
        self.category = category
        self.problems: list[str] = []
        self.pairs: list[tuple[str, str]] = []

    def record(self, label: str, problem: str | None) -> None:
        t = THREAT_TALLY.setdefault(self.category, [0, 0])
        t[0] += 1
        if problem is None or problem.startswith("WRONG REASON"):
            t[1] += 1
        if problem is not None:
            self.problem(label, problem)

    def problem(self, label: str, problem: str) -> None:
        self.problems.append(f"{label}: {problem}")
        self.pairs.append((label, problem))
        THREAT_PROBLEMS.setdefault(self.category, []).append(f"{label}: {problem}")

    def run(self, label, fn, codes, keywords=(), forbid=()) -> object:
        try:
            out = fn()
        except Exception as exc:     # verify_bundle must never raise for a bad bundle
            out = exc
        self.record(label, _judge(out, set(codes), keywords, forbid))
        return out

    def raises(self, label, fn, exc_types, keywords=()) -> None:
        """For trust-level functions that refuse by raising (update_root, load_root, trust.apply)."""
        try:
            fn()
        except exc_types as exc:
            msg = str(exc).lower()
            if keywords and not any(k.lower() in msg for k in keywords):
                self.record(label, f"WRONG REASON (want {list(keywords)}): {exc}")
            else:
                self.record(label, None)
            return
        except Exception as exc:
            self.record(label, f"RAISED {type(exc).__name__} instead of {exc_types}: {str(exc)[:160]}")
            return
        self.record(label, "ACCEPTED (no exception)")

    def check(self, max_shown: int = 25) -> None:
        if not self.problems:
            return
        head = f"{len(self.problems)} {self.category} case(s) not properly refused"
        if len(self.problems) > max_shown:    # group sweeps: "N x flip PATTERN (REGION): ACCEPTED"
            groups = Counter(f"{re.sub(r' @[0-9]+| 0x[0-9a-f]{2}->0x[0-9a-f]{2}', '', lab)}: {prob.split(' (')[0]}"
                             for lab, prob in self.pairs)
            head += ", by kind:\n  " + "\n  ".join(f"{n:>5} x {g}" for g, n in groups.most_common(40))
            head += "\nfirst cases"
        shown = self.problems[:max_shown]
        more = len(self.problems) - len(shown)
        pytest.fail(head + ":\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else ""),
                    pytrace=False)


# ----------------------------------------------------------------------------- building blocks

def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def onnx_model(seed: int = 0) -> bytes:
    """A small but real ONNX MLP (~2.7 KB of weights)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(seed)
    inits = [numpy_helper.from_array(rng.randn(16, 32).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.randn(32).astype(np.float32), "B1"),
             numpy_helper.from_array(rng.randn(32, 4).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.randn(4).astype(np.float32), "B2")]
    nodes = [helper.make_node("Gemm", ["X", "W1", "B1"], ["H"]),
             helper.make_node("Relu", ["H"], ["R"]),
             helper.make_node("Gemm", ["R", "W2", "B2"], ["Y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="threats")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def archive(members) -> bytes:
    buf = io.BytesIO()
    v.write_archive(buf, members)
    return buf.getvalue()


def raw_header(name: bytes, size: int = 0, typeflag: bytes = b"0", linkname: bytes = b"",
               prefix: bytes = b"", size_field: bytes | None = None, mode: int = 0o644,
               uid: int = 0, mtime: int = 0, uname: bytes = b"", checksum_delta: int = 0) -> bytes:
    """A hand-crafted ustar header with a valid checksum (as an attacker would write)."""
    h = bytearray(512)
    name, linkname, prefix = name[:100], linkname[:100], prefix[:155]
    h[0:len(name)] = name
    h[100:108] = b"%07o\x00" % mode
    h[108:116] = b"%07o\x00" % uid
    h[116:124] = b"%07o\x00" % 0
    h[124:136] = size_field if size_field is not None else b"%011o\x00" % size
    h[136:148] = b"%011o\x00" % mtime
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157:157 + len(linkname)] = linkname
    h[257:265] = b"ustar\x0000"
    h[265:265 + len(uname)] = uname
    h[329:337] = b"%07o\x00" % 0
    h[337:345] = b"%07o\x00" % 0
    h[345:345 + len(prefix)] = prefix
    h[148:156] = b"%06o\x00 " % (sum(h) + checksum_delta)
    return bytes(h)


def raw_entry(name: bytes, data: bytes = b"", **kw) -> bytes:
    kw.setdefault("size", len(data))
    return raw_header(name, **kw) + data + b"\x00" * (-len(data) % 512)


def insert_before_end(bundle: bytes, *raw_entries: bytes) -> bytes:
    assert bundle[-1024:] == bytes(1024)
    return bundle[:-1024] + b"".join(raw_entries) + bytes(1024)


def layout(data: bytes) -> list[tuple[str, int, int, int]]:
    """(name, header offset, data offset, size) for a canonical archive."""
    out, pos = [], 0
    while data[pos:pos + 512] != bytes(512):
        h = data[pos:pos + 512]
        name = h[0:100].split(b"\0")[0]
        prefix = h[345:500].split(b"\0")[0]
        size = int(h[124:136].split(b"\0")[0], 8)
        out.append(((prefix + b"/" + name if prefix else name).decode(), pos, pos + 512, size))
        pos += 512 + size + (-size % 512)
    return out


class World:
    """Keys, trust roots and bundle builders shared by all tests (module scope)."""

    def __init__(self, base: Path):
        self.base = base
        self.kdir = base / "keys"
        names = ["root1", "root2", "bkey1", "bkey2", "stranger", "newroot", "newbundle", "bundle3", "evilroot"]
        for n in names:
            keys_mod.generate(n, folder=self.kdir)
        self.k = {n: keys_mod.load_signing(n, None, folder=self.kdir) for n in names}
        self.pub = {n: keys_mod.load_public(n, folder=self.kdir) for n in names}
        self.expires = NOW + timedelta(days=365)
        # T1: one root key, one bundle key
        self.t1 = base / "trust1"
        self.root1 = trust.init(self.t1, [self.k["root1"]], [self.pub["bkey1"]], 1, 1, self.expires)
        self.root1_bytes = (self.t1 / "root.json").read_bytes()
        # T2: thresholds 2/2
        self.t2 = base / "trust2"
        self.root2 = trust.init(self.t2, [self.k["root1"], self.k["root2"]],
                                [self.pub["bkey1"], self.pub["bkey2"]], 2, 2, self.expires)
        # rotation chain R: v1 (= T1) -> v2 (newroot / newbundle) -> v3 (newroot / bundle3)
        self.rot = base / "rot"
        shutil.copytree(self.t1, self.rot)
        trust.rotate(self.rot, [self.k["root1"]], [self.k["newroot"]], [self.pub["newbundle"]], 1, 1, self.expires)
        trust.rotate(self.rot, [self.k["newroot"]], [self.k["newroot"]], [self.pub["bundle3"]], 1, 1, self.expires)
        self.chain = trust.chain(self.rot)
        assert sorted(self.chain) == [1, 2, 3] and self.chain[1] == self.root1_bytes
        self.rootv2 = v.update_root(self.root1, self.chain[2])
        self.model = onnx_model(0)
        self.model_b = onnx_model(1)     # same size, other weights
        self.labels = b"\n".join(b"class_%d" % i for i in range(4)) + b"\n"
        self.files = {"payload/model.onnx": self.model, "payload/labels.txt": self.labels}
        self.scratch = base / "scratch"
        self.scratch.mkdir()
        self._n = 0

    # -- manifests and bundles
    def manifest(self, files=None, **over) -> dict:
        files = self.files if files is None else files
        m = {"_type": v.BUNDLE_TYPE, "schema_version": 1, "name": "m", "version": "1.0.0", "counter": 5,
             "target": TARGET, "created": v.format_time(NOW), "expires": v.format_time(NOW + timedelta(days=1)),
             "files": {n: {"sha256": sha256(b), "size": len(b)} for n, b in files.items()},
             "model": "payload/model.onnx"}
        m.update(over)
        return m

    def envelope(self, signers=("bkey1",), manifest=None, kind=v.BUNDLE_TYPE) -> bytes:
        return trust.sign_envelope(kind, manifest if manifest is not None else self.manifest(),
                                   [self.k[s] if isinstance(s, str) else s for s in signers])

    def bundle(self, signers=("bkey1",), files=None, manifest=None, roots=None, envelope=None,
               payload=None, signed_roots=None) -> bytes:
        """`files` is signed in the manifest; `payload` (default: files) is what goes in the archive."""
        files = self.files if files is None else files
        root_files = {f"roots/{n}.root.json": d for n, d in (roots or {}).items()}
        if manifest is None:   # as build() does: the chain's hashes are signed too
            signed = {f"roots/{n}.root.json": d for n, d in (signed_roots or roots or {}).items()}
            manifest = self.manifest(files, roots={n: {"sha256": sha256(d), "size": len(d)}
                                                   for n, d in signed.items()})
        env = envelope if envelope is not None else self.envelope(signers, manifest)
        rest = {**(payload if payload is not None else files), **root_files}
        return archive([(v.MANIFEST, env)] + sorted(rest.items()))

    # -- verification
    def path(self, suffix=".bundle") -> Path:
        self._n += 1
        return self.scratch / f"b{self._n}{suffix}"

    def verify(self, data: bytes, root=None, **kw):
        p = self.path()
        p.write_bytes(data)
        try:
            return self.verify_path(p, root, **kw)
        finally:
            p.unlink()

    def verify_path(self, p, root=None, **kw):
        kw.setdefault("target", TARGET)
        kw.setdefault("installed", INSTALLED)
        kw.setdefault("now", NOW)
        return v.verify_bundle(p, root or self.root1, **kw)


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    base = tmp_path_factory.mktemp("threats")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEOPS_HOME", str(base / "home"))
        yield World(base)


def _canon_edit(env_bytes: bytes, fn) -> bytes:
    env = json.loads(env_bytes)
    fn(env)
    return v.canonical(env)


# ----------------------------------------------------------------------------- controls

def test_controls_valid_bundles_verify(w):
    """Not threats: the legitimate cases the attacks below are variations of."""
    res = w.verify(w.bundle())
    assert res.ok, res.failures
    assert res.signed_by == [w.k["bkey1"].keyid]
    # threshold 2 with both keys; an extra unknown signature does not hurt a met threshold
    assert w.verify(w.bundle(("bkey1", "bkey2")), w.root2).ok
    assert w.verify(w.bundle(("bkey1", "stranger"))).ok
    # semver is numeric: 1.10.0 is newer than 1.9.0
    m = w.manifest(version="1.10.0", counter=9)
    assert w.verify(w.bundle(manifest=m), installed=v.Installed(8, "1.9.0")).ok
    # same version allowed only on request (counter still strictly newer)
    m = w.manifest(version="0.9.0", counter=5)
    assert not w.verify(w.bundle(manifest=m)).ok
    assert w.verify(w.bundle(manifest=m), allow_same_version=True).ok
    # the layout the sweeps rely on
    names = [n for n, *_ in layout(w.bundle())]
    assert names == ["manifest.json", "payload/labels.txt", "payload/model.onnx"]
    assert 2000 < len(w.model) < 8000


# ----------------------------------------------------------------------------- tampering

def _region_expect(w, data: bytes):
    """Per byte position: (region label, acceptable codes, keywords)."""
    regions = []
    lay = layout(data)
    for name, hpos, dpos, size in lay:
        regions.append((hpos, hpos + 512, f"{name} header", HDR, ()))
        if name == v.MANIFEST:
            body = data[dpos:dpos + size]
            sig = json.loads(body)["signatures"][0]["sig"].encode()
            s = body.index(sig)
            regions.append((dpos, dpos + s, "manifest.json data", {"metadata", "signature"}, ()))
            regions.append((dpos + s, dpos + s + len(sig), "manifest.json signature hex", {"signature", "metadata"}, ()))
            regions.append((dpos + s + len(sig), dpos + size, "manifest.json data", {"metadata", "signature"}, ()))
        else:
            regions.append((dpos, dpos + size, f"{name} data", {"files"}, ("sha256", name)))
        pad_end = dpos + size + (-size % 512)
        if pad_end > dpos + size:
            regions.append((dpos + size, pad_end, f"{name} padding", {"archive"}, ("padding",)))
    end = lay[-1][2] + lay[-1][3] + (-lay[-1][3] % 512)
    regions.append((end, end + 1024, "end-of-archive blocks", {"archive"}, ("end-of-archive", "corrupt", "checksum")))
    out = [None] * len(data)
    for a, b, label, codes, kws in regions:
        for i in range(a, b):
            out[i] = (label, codes, kws)
    assert all(x is not None for x in out) and len(data) == end + 1024
    return out


FLIPS = {"xor0xFF": lambda b: b ^ 0xFF, "xor0x01": lambda b: b ^ 0x01, "set0x00": lambda b: 0,
         "plus1": lambda b: (b + 1) % 256, "xor0x20": lambda b: b ^ 0x20}


def _sweep(w, c: Cases, data: bytes, positions, expect, root=None) -> None:
    p = w.path()
    p.write_bytes(data)
    fd = os.open(p, os.O_RDWR)
    try:
        for i in positions:
            old = data[i]
            tried = set()
            for pname, fn in FLIPS.items():
                new = fn(old)
                if new == old or new in tried:
                    continue
                tried.add(new)
                os.pwrite(fd, bytes([new]), i)
                label, codes, kws = expect[i]
                c.run(f"flip {pname} @{i} ({label}) {old:#04x}->{new:#04x}",
                      lambda: w.verify_path(p, root), codes, kws)
            os.pwrite(fd, bytes([old]), i)
    finally:
        os.close(fd)
        p.unlink()


def test_single_byte_flips_everywhere(w):
    """Every byte of a ~7 KB bundle (headers, manifest, signature, payload, padding, end blocks),
    each with up to five flip patterns."""
    c = Cases("tamper-flip")
    data = w.bundle()
    assert w.verify(data).ok
    t0 = time.monotonic()
    _sweep(w, c, data, range(len(data)), _region_expect(w, data))
    print(f"\n[byte sweep] {len(data)} bytes, {THREAT_TALLY['tamper-flip'][0]} flips, {time.monotonic() - t0:.1f}s")
    c.check()


def test_signature_hex_encoding_is_not_malleable(w):
    """The signatures list is outside the signed bytes, so its encoding must be the one canonical
    form (lowercase hex, 128 chars); otherwise the bundle's bytes change and it still verifies."""
    c = Cases("signature-encoding")
    env = w.envelope()

    def edit(fn):
        return w.bundle(envelope=_canon_edit(env, fn))

    def upper(e):
        e["signatures"][0]["sig"] = e["signatures"][0]["sig"].upper()

    def one_upper(e):
        s = e["signatures"][0]["sig"]
        i = next(i for i, ch in enumerate(s) if ch in "abcdef")
        e["signatures"][0]["sig"] = s[:i] + s[i].upper() + s[i + 1:]

    def spaces(e):
        s = e["signatures"][0]["sig"]
        e["signatures"][0]["sig"] = " ".join(s[i:i + 2] for i in range(0, len(s), 2))

    def leading_space(e):
        e["signatures"][0]["sig"] = " " + e["signatures"][0]["sig"]

    for label, fn in [("sig hex all upper-case", upper), ("one sig hex digit upper-cased", one_upper),
                      ("sig hex with spaces between bytes", spaces), ("sig hex with a leading space", leading_space)]:
        c.run(label, lambda: w.verify(edit(fn)), {"signature", "metadata"}, ("signature", "sig"))
    c.check()


def test_truncation_append_insert(w):
    data = w.bundle()
    n = len(data)
    trunc = Cases("tamper-truncate")
    for length in range(0, n):     # every length
        trunc.run(f"truncated to {length}/{n}", lambda: w.verify(data[:length]), HDR,
                  ("truncat", "whole tar archive", "ends before", "ends without"))
    trunc.check()

    app = Cases("tamper-append")
    extra_entry = raw_entry(b"payload/extra.bin", b"evil")
    for label, tail in [("1 zero byte", b"\0"), ("1 byte 0x41", b"A"), ("511 zero bytes", bytes(511)),
                        ("512 zero bytes", bytes(512)), ("1024 zero bytes", bytes(1024)),
                        ("512 random bytes", os.urandom(512)), ("a whole tar entry", extra_entry),
                        ("a whole tar entry + end blocks", extra_entry + bytes(1024)),
                        ("a second copy of the bundle", data), ("10240 zero bytes (tar record padding)", bytes(10240))]:
        app.run(f"appended {label}", lambda: w.verify(data + tail), HDR, ("unexpected byte", "whole tar archive"))
    app.check()

    ins = Cases("tamper-insert")
    for i in range(0, n + 1, 7):           # a byte inserted at every 7th position
        for b in (b"\0", b"A"):
            ins.run(f"byte {b!r} inserted @{i}", lambda: w.verify(data[:i] + b + data[i:]), HDR, ("whole tar archive",))
    for i in range(0, n + 1, 512):         # a whole block inserted at every block boundary
        for blk in (bytes(512), raw_header(b"payload/x", 0)):
            ins.run(f"block inserted @{i}", lambda: w.verify(data[:i] + blk + data[i:]),
                    HDR | {"files", "metadata", "signature"})
    ins.check()


def test_flips_in_embedded_root_chain(w):
    """A built bundle carries the whole chain roots/1..N. A device trusting v1 applies roots/2 and
    roots/3; roots/1 (its own version) is never compared with what it trusts. Every byte of
    the chain must still be covered: a flipped or forged byte must not verify."""
    c = Cases("tamper-chain")
    data = w.bundle(("bundle3",), roots=w.chain)
    assert w.verify(data).ok and w.verify(data).root_version == 3
    lay = {name: (h, d, s) for name, h, d, s in layout(data)}
    expect = [None] * len(data)
    positions = []
    for n in (1, 2, 3):
        h, d, s = lay[f"roots/{n}.root.json"]
        for i in range(d, d + s, 3):     # every 3rd byte of each embedded root
            # roots the device applies fail their signatures; the ones it does not need fail
            # their hash in the signed manifest
            expect[i] = (f"roots/{n}.root.json data", {"root", "signature", "metadata", "files"}, ())
            positions.append(i)
    _sweep(w, c, data, positions, expect)

    # whole-entry forgeries of the version the device already trusts
    base = w.bundle()
    forged = v.canonical({"signatures": [], "signed": {"anything": "at all"}})
    evil_root = trust.sign_envelope(v.ROOT_TYPE, trust._signed(1, [w.pub["stranger"]], 1, [w.pub["evilroot"]], 1,
                                                                w.expires), [w.k["evilroot"]])
    cases = [
        ("garbage roots/1.root.json added", insert_before_end(base, raw_entry(b"roots/1.root.json", b"garbage"))),
        ("empty roots/1.root.json added", insert_before_end(base, raw_entry(b"roots/1.root.json", b""))),
        # the attacker cannot re-sign the manifest: it lists the real roots/1
        ("unsigned JSON as roots/1.root.json", w.bundle(roots={1: forged}, signed_roots={1: w.chain[1]})),
        ("attacker-signed fork as roots/1.root.json", w.bundle(roots={1: evil_root}, signed_roots={1: w.chain[1]})),
    ]
    for label, b in cases:
        c.run(label, lambda: w.verify(b), {"root", "signature", "metadata", "unsafe-entry", "files"}, ())
    # a device already on v2: roots/1 and roots/2 are both at or below its version
    v1 = bytearray(w.chain[1])
    v1[len(v1) // 2] ^= 0x01
    for label, chain in [("device on v2: flipped roots/1", {1: bytes(v1), 2: w.chain[2], 3: w.chain[3]}),
                         ("device on v2: forged roots/2", {1: w.chain[1], 2: evil_root, 3: w.chain[3]}),
                         ("device on v2: roots/2 replaced by roots/1", {1: w.chain[1], 2: w.chain[1], 3: w.chain[3]})]:
        c.run(label, lambda: w.verify(w.bundle(("bundle3",), roots=chain, signed_roots=w.chain), w.rootv2),
              {"root", "signature", "metadata", "unsafe-entry", "files"}, ())
    c.check()


# ----------------------------------------------------------------------------- keys and signatures

def test_keys_and_thresholds(w):
    c = Cases("keys")
    c.run("signed by an unknown key", lambda: w.verify(w.bundle(("stranger",))), {"signature"}, ("unknown",))
    c.run("unsigned (no signatures)", lambda: w.verify(w.bundle(())), {"signature"}, ("unsigned",))
    c.run("threshold 2, one signature", lambda: w.verify(w.bundle(("bkey1",)), w.root2), {"signature"}, ("needs 2",))
    c.run("threshold 2, one signature + one unknown", lambda: w.verify(w.bundle(("bkey1", "stranger")), w.root2),
          {"signature"}, ("needs 2",))
    env = w.envelope(("bkey1",))
    for n in (2, 3, 10):
        dup = _canon_edit(env, lambda e: e.__setitem__("signatures", e["signatures"] * n))
        c.run(f"same signature duplicated {n}x vs threshold 2", lambda: w.verify(w.bundle(envelope=dup), w.root2),
              {"signature"}, ("same key",))
    copied = _canon_edit(env, lambda e: e["signatures"].append({"keyid": w.k["bkey2"].keyid,
                                                                 "sig": e["signatures"][0]["sig"]}))
    c.run("bkey1's signature copied under bkey2's keyid", lambda: w.verify(w.bundle(envelope=copied), w.root2),
          {"signature"}, ("invalid signature",))
    moved = _canon_edit(env, lambda e: e["signatures"][0].__setitem__("keyid", w.k["bkey2"].keyid))
    c.run("valid sig relabelled with another trusted keyid", lambda: w.verify(w.bundle(envelope=moved), w.root2),
          {"signature"}, ("invalid signature",))
    c.run("root-role-only key signs a bundle (threshold 1)", lambda: w.verify(w.bundle(("root1",))),
          {"signature"}, ("bundle",), forbid=("unknown key",))
    c.run("root-role-only key + bkey1 vs bundle threshold 2", lambda: w.verify(w.bundle(("root1", "bkey1")), w.root2),
          {"signature"}, ("needs 2",), forbid=("unknown key",))
    other = w.envelope(("bkey1",), w.manifest(counter=6))
    stolen = _canon_edit(env, lambda e: e.__setitem__("signatures", json.loads(other)["signatures"]))
    c.run("signature taken from another valid manifest", lambda: w.verify(w.bundle(envelope=stolen)),
          {"signature"}, ("invalid signature",))
    for label, sigs in [("signatures is a dict", {"keyid": "x", "sig": "y"}),
                        ("signature entry with an extra field", [{"keyid": w.k["bkey1"].keyid, "sig": "00", "x": 1}]),
                        ("signature keyid is a number", [{"keyid": 1, "sig": "00"}]),
                        ("signature sig is not hex", [{"keyid": w.k["bkey1"].keyid, "sig": "zz" * 64}]),
                        ("signature sig truncated", [{"keyid": w.k["bkey1"].keyid, "sig": json.loads(env)["signatures"][0]["sig"][:-2]}]),
                        ("signature sig all zero", [{"keyid": w.k["bkey1"].keyid, "sig": "00" * 64}])]:
        bad = _canon_edit(env, lambda e: e.__setitem__("signatures", sigs))
        c.run(label, lambda: w.verify(w.bundle(envelope=bad)), {"signature"}, ("signature",))
    # roots whose key ids are not the sha256 of the key
    fake = sha256(b"not the key")
    s = trust._signed(1, [w.pub["bkey1"]], 1, [w.pub["root1"]], 1, w.expires)
    s["keys"][fake] = s["keys"].pop(w.k["bkey1"].keyid)
    s["roles"]["bundle"]["keyids"] = [fake]
    bad_root = trust.sign_envelope(v.ROOT_TYPE, s, [w.k["root1"]])
    c.raises("trusted root: key id not sha256 of its key (load_root)", lambda: v.load_root(bad_root), v.TrustError,
             ("sha256",))
    tf = w.base / "trust-badid"
    tf.mkdir()
    (tf / "root.json").write_bytes(bad_root)
    c.raises("trust folder root.json with a fake key id", lambda: v.load_trust(tf), v.TrustError, ("sha256",))
    s2 = trust._signed(2, [w.pub["stranger"]], 1, [w.pub["root1"]], 1, w.expires)
    s2["keys"][fake] = s2["keys"].pop(w.k["stranger"].keyid)
    s2["roles"]["bundle"]["keyids"] = [fake]
    bad_v2 = trust.sign_envelope(v.ROOT_TYPE, s2, [w.k["root1"]])
    c.raises("new root with a fake key id (update_root)", lambda: v.update_root(w.root1, bad_v2), v.Refused, ("sha256",))
    c.run("chain root v2 with a fake key id", lambda: w.verify(w.bundle(("stranger",), roots={2: bad_v2})),
          {"root"}, ("sha256",))
    # a trusted root that lacks its own root threshold
    s3 = trust._signed(1, [w.pub["bkey1"]], 1, [w.pub["root1"], w.pub["root2"]], 2, w.expires)
    half = trust.sign_envelope(v.ROOT_TYPE, s3, [w.k["root1"]])
    c.raises("trusted root signed by 1 of 2 root keys", lambda: v.load_root(half), v.TrustError, ("needs 2",))
    c.check()


# ----------------------------------------------------------------------------- stale metadata

def test_rollback_and_freeze(w):
    c = Cases("stale")
    for label, m, inst in [
        ("counter equal to installed", w.manifest(counter=4, version="2.0.0"), INSTALLED),
        ("counter lower than installed", w.manifest(counter=3, version="2.0.0"), INSTALLED),
        ("counter 1 vs installed 1000", w.manifest(counter=1, version="9.0.0"), v.Installed(1000, "0.0.1")),
        ("semver lower (patch)", w.manifest(counter=50, version="1.2.2"), v.Installed(4, "1.2.3")),
        ("semver lower (major)", w.manifest(counter=50, version="0.99.99"), v.Installed(4, "1.0.0")),
        ("semver 1.9.0 vs installed 1.10.0 (string order would accept)", w.manifest(counter=50, version="1.9.0"),
         v.Installed(4, "1.10.0")),
        ("semver equal, counter higher", w.manifest(counter=50, version="1.0.0"), v.Installed(4, "1.0.0")),
        ("semver equal, counter only (no installed version)", w.manifest(counter=4), v.Installed(4, None)),
    ]:
        c.run(label, lambda: w.verify(w.bundle(manifest=m), installed=inst), {"rollback"}, ("rollback",))
    c.run("semver lower with allow_same_version", lambda: w.verify(
        w.bundle(manifest=w.manifest(counter=50, version="0.8.0")), allow_same_version=True), {"rollback"}, ("rollback",))
    b = w.bundle()
    exp = NOW + timedelta(days=1)
    for label, now in [("now == expires", exp), ("now = expires + 1s", exp + timedelta(seconds=1)),
                       ("now = expires + 30d", exp + timedelta(days=30)),
                       ("now = +300 years", NOW + timedelta(days=365 * 300))]:
        c.run(f"expired bundle ({label})", lambda: w.verify(b, now=now), {"expired"}, ("expired",))
    m = w.manifest(created=v.format_time(NOW + timedelta(days=10)), expires=v.format_time(NOW + timedelta(days=20)))
    c.run("bundle created 10 days in the future", lambda: w.verify(w.bundle(manifest=m)), {"metadata", "expired"},
          ("future",))
    m = w.manifest(expires=v.format_time(NOW + timedelta(days=400)))
    c.run("trust root expired (bundle still valid)", lambda: w.verify(w.bundle(manifest=m), now=NOW + timedelta(days=366)),
          {"expired"}, ("trust root",))
    # an expired trust root that a valid chain root replaces is fine; an expired chain head is not
    m2 = w.manifest(expires=v.format_time(NOW + timedelta(days=800)))
    c.run("chain head root v3 expired too", lambda: w.verify(w.bundle(("bundle3",), manifest=m2, roots=w.chain),
                                                              now=NOW + timedelta(days=400)),
          {"expired"}, ("trust root",))
    # root version rollback / replays / skips
    v1, v2, v3 = w.chain[1], w.chain[2], w.chain[3]
    c.raises("update_root v2 -> v1 (rollback)", lambda: v.update_root(w.rootv2, v1), v.Refused, ("cannot follow",))
    c.raises("update_root v2 -> v2 (replay)", lambda: v.update_root(w.rootv2, v2), v.Refused, ("cannot follow",))
    c.raises("update_root v1 -> v3 (skip)", lambda: v.update_root(w.root1, v3), v.Refused, ("cannot follow",))
    c.raises("update_root v1 -> v1 (replay)", lambda: v.update_root(w.root1, v1), v.Refused, ("cannot follow",))
    folder = w.base / "trust-rollback"
    shutil.copytree(w.rot, folder)
    c.raises("trust.apply v1 onto a v3 folder", lambda: trust.apply(folder, v1), trust.TrustRefused, ("cannot follow",))
    c.raises("trust.apply v2 onto a v3 folder", lambda: trust.apply(folder, v2), trust.TrustRefused, ("cannot follow",))
    assert v.load_trust(folder).version == 3
    # in a bundle: a device on v2 (bkey1 revoked) offered the old root + a bundle by the revoked key
    c.run("device on v2, bundle by revoked bkey1 carrying roots/1",
          lambda: w.verify(w.bundle(("bkey1",), roots={1: v1}), w.rootv2), {"signature"}, ("unknown",))
    c.run("device on v1, chain skips v2 (only roots/3), signed by v3's key",
          lambda: w.verify(w.bundle(("bundle3",), roots={3: v3})), {"signature", "root"}, ("unknown", "root"))
    c.run("device on v1, chain has roots/1 and roots/3 (gap at 2), signed by v3's key",
          lambda: w.verify(w.bundle(("bundle3",), roots={1: v1, 3: v3})), {"signature", "root"}, ("unknown", "root"))
    c.check()


# ----------------------------------------------------------------------------- wrong combinations

def test_wrong_combinations(w):
    c = Cases("combination")
    c.run("target mismatch", lambda: w.verify(w.bundle(), target="jetson-orin"), {"target"}, ("target",))
    c.run("target mismatch by case", lambda: w.verify(w.bundle(), target="RPI4"), {"target"}, ("target",))
    files_b = {"payload/model.onnx": w.model_b, "payload/labels.txt": w.labels}
    assert len(w.model_b) == len(w.model)
    c.run("mix: payload of A (model) under manifest of B", lambda: w.verify(w.bundle(files=files_b, payload=w.files)),
          {"files"}, ("sha256",))
    c.run("mix: manifest of A with model of B", lambda: w.verify(w.bundle(files=w.files, payload=files_b)),
          {"files"}, ("sha256",))
    bigger = dict(w.files, **{"payload/labels.txt": w.labels + b"extra\n"})
    c.run("mix: other-sized labels from another bundle", lambda: w.verify(w.bundle(files=w.files, payload=bigger)),
          {"files"}, ("bytes",))
    # both signed; the envelope of B spliced into the archive of A
    env_b = w.envelope(("bkey1",), w.manifest(files_b, counter=7))
    c.run("mix: valid envelope of B + payload of A", lambda: w.verify(w.bundle(envelope=env_b, payload=w.files)),
          {"files"}, ("sha256",))
    c.run("root envelope presented as the manifest", lambda: w.verify(w.bundle(envelope=w.root1_bytes)),
          {"signature"}, ("signature",))
    c.run("root envelope (v2) as manifest, device v1", lambda: w.verify(w.bundle(envelope=w.chain[2])),
          {"signature"}, ("signature",))
    c.run("manifest signed in the root domain", lambda: w.verify(w.bundle(envelope=w.envelope(kind=v.ROOT_TYPE))),
          {"signature"}, ("invalid signature",))
    root_shaped = json.loads(w.root1_bytes)["signed"]
    c.run("root metadata signed by a bundle key as manifest",
          lambda: w.verify(w.bundle(envelope=w.envelope(manifest=root_shaped))), {"metadata"}, ("bundle manifest",))
    c.run("bundle manifest presented as roots/2.root.json",
          lambda: w.verify(w.bundle(roots={2: w.envelope()})), {"root"}, ("not an edgeops root",))
    missing = dict(w.files, **{"payload/extra.bin": b"x" * 100})
    c.run("manifest lists a file not in the archive", lambda: w.verify(w.bundle(files=missing, payload=w.files)),
          {"files"}, ("missing",))
    extra = dict(w.files, **{"payload/extra.bin": b"x" * 100})
    c.run("archive has a payload file not listed", lambda: w.verify(w.bundle(files=w.files, payload=extra)),
          {"files"}, ("not in the signed manifest",))
    c.run("archive has a top-level file not listed",
          lambda: w.verify(insert_before_end(w.bundle(), raw_entry(b"install.sh", b"rm -rf /"))),
          {"files"}, ("not in the signed manifest",))
    renamed = {"payload/model.onnx": w.model, "payload/labels.txu": w.labels}
    c.run("payload file renamed (header rewritten)", lambda: w.verify(w.bundle(files=w.files, payload=renamed)),
          {"files"}, ("missing", "not in the signed manifest"))
    c.run("manifest.json not the first entry",
          lambda: w.verify(archive([("payload/labels.txt", w.labels), (v.MANIFEST, w.envelope()),
                                    ("payload/model.onnx", w.model)])), {"archive"}, ("first entry",))
    c.run("no manifest.json at all", lambda: w.verify(archive(sorted(w.files.items()))), {"archive"}, ("first entry",))
    for label, m, kw in [
        ("signed manifest with schema 2", w.manifest(schema_version=2), "schema"),
        ("signed manifest lists roots/1 as a file", w.manifest(files={**w.files, "roots/1.root.json": b"x"}), "payload/"),
        ("signed manifest lists ../x", dict(w.manifest(), files={"payload/../x": {"sha256": "0" * 64, "size": 1}},
                                            model="payload/../x"), "traversal"),
        ("signed manifest: model not a listed file", w.manifest(model="payload/other.onnx"), "model"),
        ("signed manifest: health refers to an unlisted file",
         w.manifest(health={"inputs": {"x": {"file": "payload/x.npy"}}}), "health"),
        ("signed manifest: sha256 upper-case", w.manifest(files={}) | {"files": {
            n: {"sha256": sha256(b).upper(), "size": len(b)} for n, b in w.files.items()}}, "sha256"),
        ("signed manifest: negative size", w.manifest() | {"files": {
            n: {"sha256": sha256(b), "size": -1} for n, b in w.files.items()}}, "size"),
        ("signed manifest: counter 0", w.manifest(counter=0), "counter"),
        ("signed manifest: counter true", w.manifest(counter=True), "counter"),
        ("signed manifest: version v1.0", w.manifest(version="v1.0"), "version"),
        ("signed manifest: expires before created", w.manifest(expires=v.format_time(NOW - timedelta(days=1))), "expire"),
        ("signed manifest: no target", w.manifest(target=""), "target"),
    ]:
        c.run(label, lambda: w.verify(w.bundle(envelope=w.envelope(manifest=m))), {"metadata"}, (kw,))
    c.check()


# ----------------------------------------------------------------------------- unsafe archive entries

def _handmade_cases(w):
    model = w.model
    long_prefix = b"payload/" + b"a" * 147
    return [
        ("../x", raw_entry(b"../x", b"x"), ("traversal",)),
        ("payload/../../x", raw_entry(b"payload/../../x", b"x"), ("traversal",)),
        ("payload/sub/../../../x", raw_entry(b"payload/sub/../../../x", b"x"), ("traversal",)),
        ("traversal via ustar prefix", raw_entry(b"x", b"x", prefix=b"payload/../.."), ("traversal",)),
        ("absolute /etc/x", raw_entry(b"/etc/x", b"x"), ("absolute",)),
        ("absolute via prefix /etc", raw_entry(b"x", b"x", prefix=b"/etc"), ("absolute", "empty")),
        ("drive C:x", raw_entry(b"C:x", b"x"), ("absolute",)),
        ("drive c:/x", raw_entry(b"c:/x", b"x"), ("absolute",)),
        ("backslash payload\\..\\..\\x", raw_entry(b"payload\\..\\..\\x", b"x"), ("characters",)),
        ("backslash \\\\server\\x", raw_entry(b"\\\\server\\x", b"x"), ("characters",)),
        ("dot component payload/./x", raw_entry(b"payload/./x", b"x"), ("'.'",)),
        ("empty component payload//x", raw_entry(b"payload//x", b"x"), ("empty",)),
        ("trailing slash payload/x/", raw_entry(b"payload/x/", b"x"), ("empty",)),
        ("name with a space", raw_entry(b"payload/x y", b"x"), ("characters",)),
        ("name with a newline", raw_entry(b"payload/x\ny", b"x"), ("characters",)),
        ("non-ASCII name", raw_entry("payload/é".encode(), b"x"), ("characters",)),
        ("non-UTF-8 name", raw_entry(b"payload/\xff\xfe", b"x"), ("utf-8",)),
        ("name over 255 bytes (prefix+name)", raw_entry(b"b" * 100, b"x", prefix=long_prefix), ("longer than",)),
        ("symlink -> /etc/passwd", raw_entry(b"payload/link", typeflag=b"2", linkname=b"/etc/passwd"), ("symbolic link",)),
        ("symlink named like the model", raw_entry(b"payload/model2.onnx", typeflag=b"2", linkname=b"../../x"),
         ("symbolic link",)),
        ("hard link -> payload/model.onnx", raw_entry(b"payload/hl", typeflag=b"1", linkname=b"payload/model.onnx"),
         ("hard link",)),
        ("hard link -> /etc/shadow", raw_entry(b"payload/hl", typeflag=b"1", linkname=b"/etc/shadow"), ("hard link",)),
        ("character device", raw_entry(b"payload/tty", typeflag=b"3"), ("character device",)),
        ("block device", raw_entry(b"payload/sda", typeflag=b"4"), ("block device",)),
        ("FIFO", raw_entry(b"payload/fifo", typeflag=b"6"), ("fifo",)),
        ("directory entry", raw_entry(b"payload/dir/", typeflag=b"5"), ("directory",)),
        ("directory entry without slash", raw_entry(b"payload/dir", typeflag=b"5"), ("directory",)),
        ("contiguous file (type 7)", raw_entry(b"payload/c", b"x", typeflag=b"7"), ("contiguous",)),
        ("PAX extended header", raw_entry(b"PaxHeaders/x", b"30 path=payload/../../etc/x\n", typeflag=b"x"), ("pax",)),
        ("PAX global header", raw_entry(b"pax_global_header", b"19 path=../../../x\n", typeflag=b"g"), ("pax",)),
        ("GNU long name", raw_entry(b"././@LongLink", b"../" * 60 + b"\0", typeflag=b"L"), ("gnu long name",)),
        ("GNU long link name", raw_entry(b"././@LongLink", b"/" + b"a" * 150 + b"\0", typeflag=b"K"), ("gnu long link",)),
        ("GNU sparse member (8 GiB apparent)", raw_entry(b"payload/sparse", b"", typeflag=b"S"), ("sparse",)),
        ("GNU volume header", raw_entry(b"vol", typeflag=b"V"), ("volume",)),
        ("GNU multi-volume member", raw_entry(b"payload/mv", b"x", typeflag=b"M"), ("multi-volume",)),
        ("unknown type Z", raw_entry(b"payload/z", b"x", typeflag=b"Z"), ("unknown type",)),
        ("duplicate exact payload/model.onnx", raw_entry(b"payload/model.onnx", model), ("duplicate",)),
        ("duplicate exact, other content", raw_entry(b"payload/model.onnx", b"evil"), ("duplicate",)),
        ("duplicate case-folded payload/MODEL.onnx", raw_entry(b"payload/MODEL.onnx", b"evil"), ("duplicate",)),
        ("duplicate case-folded Payload/model.onnx", raw_entry(b"Payload/model.onnx", b"evil"), ("duplicate",)),
        ("duplicate manifest.json", raw_entry(b"manifest.json", b"{}"), ("duplicate",)),
        ("duplicate case-folded MANIFEST.JSON", raw_entry(b"MANIFEST.JSON", b"{}"), ("duplicate",)),
        ("nested under a file entry", raw_entry(b"payload/model.onnx/evil", b"x"), ("inside another entry",)),
        ("nested under the manifest", raw_entry(b"manifest.json/x", b"x"), ("inside another entry",)),
        ("huge declared size (8 GiB - 1)", raw_header(b"payload/big", 8 * 2**30 - 1), ("declares", "ends before")),
        ("1 GiB declared, 512 bytes present", raw_header(b"payload/big", 2**30) + bytes(512), ("declares", "ends before")),
        ("size 1 byte beyond the end", raw_header(b"payload/big", 1024 + 1) + bytes(1024), ("declares", "ends before")),
        ("base-256 size (GNU, 10 GiB)", raw_header(b"payload/big", size_field=b"\x80" + bytes(6) + b"\x02\x80" + bytes(3)),
         ("base-256",)),
        ("negative size -8 (unlisted name)", raw_header(b"payload/neg", size_field=b"-0000000010\x00"), ("size",)),
        ("negative size -512 (re-reads itself)", raw_header(b"payload/neg", size_field=b"-0000001000\x00"), ("size",)),
        ("negative size -1024 (walks backwards)", raw_header(b"payload/neg", size_field=b"-0000002000\x00"), ("size",)),
        ("negative size on roots/1.root.json", raw_header(b"roots/1.root.json", size_field=b"-0000000010\x00"), ("size",)),
        ("negative size on roots/2.root.json", raw_header(b"roots/2.root.json", size_field=b"-0000000010\x00"), ("size",)),
        ("non-octal size", raw_header(b"payload/x", size_field=b"0000000009a\x00"), ("size",)),
        ("setuid mode 4755", raw_entry(b"payload/x", b"x", mode=0o4755), ("non-canonical",)),
        ("uid 1000 owner root", raw_entry(b"payload/x", b"x", uid=1000, uname=b"root"), ("non-canonical",)),
        ("junk after NUL in name field", raw_entry(b"payload/x\0/../../etc", b"x"), ("non-canonical",)),
        ("bad checksum", raw_entry(b"payload/x", b"x", checksum_delta=1), ("checksum",)),
        ("roots/ entry with a bad name", raw_entry(b"roots/x.json", b"{}"), ("under roots/",)),
        ("roots/ entry with leading zero", raw_entry(b"roots/02.root.json", b"{}"), ("under roots/",)),
        ("roots/2.root.json garbage", raw_entry(b"roots/2.root.json", b"\x00garbage"), ("root",)),
    ]


def test_unsafe_entries_handmade(w):
    c = Cases("unsafe-handmade")
    base = w.bundle()
    for label, entry, kws in _handmade_cases(w):
        codes = HDR | {"root", "metadata"} if label.startswith(("roots/", "negative size on roots")) else HDR
        c.run(label, lambda: w.verify(insert_before_end(base, entry)), codes, kws)
        # the same entry placed first (before manifest.json) must still be named as the reason
        if not label.startswith(("duplicate", "nested", "roots/", "negative", "huge", "1 GiB", "size 1", "base-256")):
            c.run(f"{label} (as first entry)", lambda: w.verify(entry + base), HDR, kws)
    # 10001 zero-size entries
    many = b"".join(raw_header(b"payload/f%05d" % i, 0) for i in range(10_001))
    c.run("10001 entries", lambda: w.verify(insert_before_end(base, many)), {"unsafe-entry"}, ("more than",))
    c.check()


def _tar(members, fmt=tarfile.DEFAULT_FORMAT, pax_headers=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=pax_headers) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _ti(name, data=b"", type=tarfile.REGTYPE, **kw):
    ti = tarfile.TarInfo(name)
    ti.type = type
    ti.size = len(data) if type == tarfile.REGTYPE else 0
    ti.mtime = 1_700_000_000
    ti.mode = 0o644
    for k, val in kw.items():
        setattr(ti, k, val)
    return ti, (data if type == tarfile.REGTYPE else None)


def test_unsafe_entries_python_tarfile(w):
    """The same attacks as a real attacker would write them, with Python's tarfile (non-canonical
    headers, uid/mtime/uname set, a 10 KB record): the unsafe entry must be the reason given."""
    c = Cases("unsafe-tarfile")
    env = w.envelope()
    good = [_ti(v.MANIFEST, env)] + [_ti(n, b) for n, b in sorted(w.files.items())]
    G, P = tarfile.GNU_FORMAT, tarfile.PAX_FORMAT
    cases = [
        ("../x", [_ti("../x", b"x")], None, ("traversal",)),
        ("payload/../../x", [_ti("payload/../../x", b"x")], None, ("traversal",)),
        ("absolute /etc/x", [_ti("/etc/x", b"x")], None, ("absolute",)),
        ("drive C:x", [_ti("C:x", b"x")], None, ("absolute",)),
        ("backslashes", [_ti("payload\\..\\..\\x", b"x")], None, ("characters",)),
        ("./payload/x", [_ti("./payload/x", b"x")], None, ("'.'",)),
        ("symlink", [_ti("payload/link", type=tarfile.SYMTYPE, linkname="/etc/passwd")], None, ("symbolic link",)),
        ("symlink then file through it", [_ti("payload/d", type=tarfile.SYMTYPE, linkname="/tmp"),
                                          _ti("payload/d/x", b"x")], None, ("symbolic link",)),
        ("hard link", [_ti("payload/hl", type=tarfile.LNKTYPE, linkname="payload/model.onnx")], None, ("hard link",)),
        ("char device", [_ti("payload/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)], None, ("character device",)),
        ("block device", [_ti("payload/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0)], None, ("block device",)),
        ("FIFO", [_ti("payload/fifo", type=tarfile.FIFOTYPE)], None, ("fifo",)),
        ("directory", [_ti("payload/dir", type=tarfile.DIRTYPE, mode=0o755)], None, ("directory",)),
        ("duplicate exact", [_ti("payload/model.onnx", b"evil")], None, ("duplicate",)),
        ("duplicate case-folded", [_ti("payload/Model.ONNX", b"evil")], None, ("duplicate",)),
        ("nested under a file", [_ti("payload/labels.txt/x", b"x")], None, ("inside another entry",)),
        ("PAX header (non-ASCII name)", [_ti("payload/é", b"x")], None, ("pax",)),
        ("PAX header (explicit path)", [_ti("payload/x", b"x", pax_headers={"path": "../../etc/x"})], P, ("pax",)),
        ("GNU long name", [_ti("payload/" + "a" * 150, b"x")], G, ("gnu long name",)),
        ("GNU long link name", [_ti("payload/l", type=tarfile.SYMTYPE, linkname="a" * 150)], G, ("gnu long link",)),
    ]
    for label, extra, fmt, kws in cases:
        for where in ("after", "before"):
            members = good + extra if where == "after" else extra + good
            data = _tar(members, fmt or tarfile.DEFAULT_FORMAT)
            c.run(f"{label} ({'default' if fmt is None else fmt} format, {where} the bundle files)",
                  lambda: w.verify(data), HDR, kws)
    data = _tar(good, P, pax_headers={"comment": "x"})
    c.run("PAX global header at the start", lambda: w.verify(data), HDR, ("pax global",))
    for fmt, kws in [(G, ("base-256",)), (P, ("pax",)), (tarfile.USTAR_FORMAT, ("declares", "ends before"))]:
        info = tarfile.TarInfo("payload/big")
        info.size = 10 << 30 if fmt != tarfile.USTAR_FORMAT else (8 << 30) - 1
        hdr = info.tobuf(fmt)
        c.run(f"oversized member header by tarfile (format {fmt})",
              lambda: w.verify(insert_before_end(w.bundle(), hdr)), HDR, kws)
    # a faithful tarfile re-pack of a valid bundle: nothing unsafe, but not the canonical bytes
    for fmt in (tarfile.USTAR_FORMAT, G, P):
        data = _tar(good, fmt)
        c.run(f"valid content re-packed by tarfile (format {fmt})", lambda: w.verify(data), {"archive"},
              ("non-canonical", "unexpected byte"))
    c.check()


def test_compressed_and_bombs(w):
    c = Cases("compressed")
    valid = w.bundle()
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bundle.tar", valid)
    zbomb = io.BytesIO()
    with zipfile.ZipFile(zbomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bundle.tar", bytes(64 << 20))
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as t:
        for n, b in [(v.MANIFEST, w.envelope()), *sorted(w.files.items())]:
            ti = tarfile.TarInfo(n)
            ti.size = len(b)
            t.addfile(ti, io.BytesIO(b))
    gzbomb = gzip.compress(bytes(64 << 20), compresslevel=9)
    cases = [
        ("tar.gz (tarfile w:gz)", tgz.getvalue()),
        ("gzip-wrapped valid bundle", gzip.compress(valid)),
        ("gzip bomb (64 MiB of zeros)", gzbomb),
        ("gzip bomb padded to 512", gzbomb + bytes(-len(gzbomb) % 512)),
        ("bz2-wrapped bundle", bz2.compress(valid)),
        ("bz2 bomb", bz2.compress(bytes(16 << 20))),
        ("xz-wrapped bundle", lzma.compress(valid)),
        ("zip containing the bundle", zbuf.getvalue()),
        ("zip bomb", zbomb.getvalue()),
        ("zstd magic", b"\x28\xb5\x2f\xfd" + bytes(1532)),
    ]
    for label, data in cases:
        t0 = time.monotonic()
        c.run(label, lambda: w.verify(data), {"archive"}, ("compress",))
        assert time.monotonic() - t0 < 2, f"{label}: verification took too long (decompressing?)"
    lz = lzma.compress(valid, format=lzma.FORMAT_ALONE)
    c.run("lzma-alone-wrapped bundle", lambda: w.verify(lz + bytes(-len(lz) % 512)), {"archive"})
    c.check()


# ----------------------------------------------------------------------------- key rotation

def test_key_rotation(w):
    c = Cases("rotation")
    v1, v2 = w.chain[1], w.chain[2]
    # control: the chain is accepted and a bundle by the new bundle key verifies via it
    res = w.verify(w.bundle(("newbundle",), roots={1: v1, 2: v2}))
    assert res.ok, res.failures
    assert res.root_version == 2 and res.root_updates == [v2]
    folder = w.base / "trust-apply"
    shutil.copytree(w.t1, folder)
    assert trust.apply(folder, v2).version == 2 and v.load_trust(folder).version == 2
    assert w.verify(w.bundle(("newbundle",)), v.load_trust(folder)).ok

    signed = json.loads(v2)["signed"]

    def env(signers, edit=None):
        data = trust.sign_envelope(v.ROOT_TYPE, signed, [w.k[s] for s in signers])
        return _canon_edit(data, edit) if edit else data

    def flip_sig(e):
        s = e["signatures"][0]["sig"]
        e["signatures"][0]["sig"] = s[:10] + ("0" if s[10] != "0" else "1") + s[11:]

    def change_signed(e):
        e["signed"]["roles"]["bundle"]["threshold"] = 1
        e["signed"]["expires"] = v.format_time(NOW + timedelta(days=3650))

    def add_attacker_key(e):
        kid = w.k["stranger"].keyid
        e["signed"]["keys"][kid] = w.pub["stranger"].to_root_entry()
        e["signed"]["roles"]["bundle"]["keyids"] = sorted(e["signed"]["roles"]["bundle"]["keyids"] + [kid])

    bad = [
        ("unsigned v2", env([]), ("unsigned",)),
        ("v2 signed only by its own new root key", env(["newroot"]), ("by the old root",)),
        ("v2 signed only by the old root key", env(["root1"]), ("by itself",)),
        ("v2 with a corrupted old-root signature", env(["root1", "newroot"], flip_sig), ("invalid signature", "needs")),
        ("v2 with signed part changed after signing", env(["root1", "newroot"], change_signed), ("invalid signature",)),
        ("v2 with an attacker key added after signing", env(["root1", "newroot"], add_attacker_key), ("invalid signature",)),
        ("v2 signed by the old BUNDLE key + new root key", env(["bkey1", "newroot"]), ("by the old root",)),
        ("v2 signed by attacker keys", env(["stranger", "evilroot"]), ("by the old root",)),
    ]
    for label, data, kws in bad:
        c.raises(f"update_root: {label}", lambda: v.update_root(w.root1, data), v.Refused, kws)
        f2 = w.base / f"trust-bad-{THREAT_TALLY['rotation'][0]}"
        shutil.copytree(w.t1, f2)
        c.raises(f"trust.apply: {label}", lambda: trust.apply(f2, data), trust.TrustRefused, kws)
        assert v.load_trust(f2).version == 1
        c.run(f"bundle by new key carrying {label}", lambda: w.verify(w.bundle(("newbundle",), roots={1: v1, 2: data})),
              {"root", "signature"}, kws)
    # root threshold 2: one of the two old root keys is not enough
    s2 = trust._signed(2, [w.pub["newbundle"]], 1, [w.pub["newroot"]], 1, w.expires)
    half = trust.sign_envelope(v.ROOT_TYPE, s2, [w.k["root1"], w.k["newroot"]])
    c.raises("v2 signed by 1 of 2 old root keys (root threshold 2)", lambda: v.update_root(w.root2, half), v.Refused,
             ("needs 2",))
    # its own root keys are newroot + evilroot (threshold 2); only newroot signed
    s3 = trust._signed(2, [w.pub["newbundle"]], 1, [w.pub["newroot"], w.pub["evilroot"]], 2, w.expires)
    self_half = trust.sign_envelope(v.ROOT_TYPE, s3, [w.k["root1"], w.k["root2"], w.k["newroot"]])
    c.raises("v2 with own root threshold 2 signed by 1 of its own keys", lambda: v.update_root(w.root2, self_half),
             v.Refused, ("by itself",))
    c.run("bundle by the new key without the chain (device on v1)", lambda: w.verify(w.bundle(("newbundle",))),
          {"signature"}, ("unknown",))
    c.run("bundle by the new key with only roots/1", lambda: w.verify(w.bundle(("newbundle",), roots={1: v1})),
          {"signature"}, ("unknown",))
    c.run("bundle by the revoked old key, valid chain to v2", lambda: w.verify(w.bundle(("bkey1",), roots={1: v1, 2: v2})),
          {"signature"}, ("unknown",))
    c.run("device on v2, bundle by the revoked old key carrying roots/2",
          lambda: w.verify(w.bundle(("bkey1",), roots={2: v2}), w.rootv2), {"signature"}, ("unknown",))
    c.check()


# ----------------------------------------------------------------------------- extraction

def test_extraction_of_refused_bundles_leaves_nothing(w):
    c = Cases("extraction")
    tampered = bytearray(w.bundle())
    lay = {n: (h, d, s) for n, h, d, s in layout(bytes(tampered))}
    _, d, s = lay["payload/model.onnx"]     # sorted after labels.txt: labels is extracted first
    tampered[d + s // 2] ^= 0xFF
    cases = [
        ("tampered 2nd payload file", bytes(tampered), {"files"}, ("sha256",)),
        ("unknown signer", w.bundle(("stranger",)), {"signature"}, ("unknown",)),
        ("expired", w.bundle(manifest=w.manifest(created=v.format_time(NOW - timedelta(days=2)),
                                                  expires=v.format_time(NOW - timedelta(days=1)))), {"expired"}, ()),
        ("symlink entry", insert_before_end(w.bundle(), raw_entry(b"payload/l", typeflag=b"2", linkname=b"/")),
         {"unsafe-entry"}, ("symbolic link",)),
        ("missing file", w.bundle(files={**w.files, "payload/x": b"x"}, payload=w.files), {"files"}, ("missing",)),
    ]
    for i, (label, data, codes, kws) in enumerate(cases):
        for nested in (False, True):
            root = w.base / f"extract-{i}-{int(nested)}"
            root.mkdir()
            dest = root / "new" / "dest" if nested else root / "dest"
            before = sorted(p.relative_to(root) for p in root.rglob("*"))
            # a missing parent folder is refused before any payload byte is written (unless the
            # bundle already failed on its signature or policy)
            res = c.run(f"extract_to ({'under a new folder' if nested else 'plain'}): {label}",
                        lambda: w.verify(data, extract_to=dest), codes | ({"files"} if nested else set()),
                        kws + (("parent of the extraction folder",) if nested and kws else ()))
            after = sorted(p.relative_to(root) for p in root.rglob("*"))
            if isinstance(res, v.VerifyResult) and (after != before or res.extracted):
                c.problem(f"extract_to ({'under a new folder' if nested else 'plain'}): {label}",
                          f"LEFT BEHIND {[str(a) for a in after]} (extracted={res.extracted})")
    # an existing destination is never written into
    root = w.base / "extract-existing"
    (root / "dest").mkdir(parents=True)
    (root / "dest" / "keep").write_text("mine")
    c.run("extract_to an existing folder", lambda: w.verify(w.bundle(), extract_to=root / "dest"), {"files"},
          ("already exists",))
    assert [p.name for p in (root / "dest").iterdir()] == ["keep"]
    # control: a valid bundle extracts exactly its payload
    (w.base / "extract-ok").mkdir()
    res = w.verify(w.bundle(), extract_to=w.base / "extract-ok" / "dest")
    assert res.ok and sorted(p.name for p in (w.base / "extract-ok" / "dest").iterdir()) == ["labels.txt", "model.onnx"]
    assert (w.base / "extract-ok" / "dest" / "model.onnx").read_bytes() == w.model
    c.check()


# ----------------------------------------------------------------------------- robustness

def test_verify_never_raises(w):
    """Inputs that reach the parsers before (or after) the signature: VerifyResult, never a traceback."""
    c = Cases("robustness")
    env = w.envelope()

    def manifest_bytes(raw: bytes) -> bytes:
        return archive([(v.MANIFEST, raw), *sorted(w.files.items())])

    unsigned = [
        ("manifest with 1e400 (float overflow)", b'{"signatures":[],"signed":{"x":1e400}}', ("json", "canonical", "number")),
        ("manifest with -1e400", b'{"signatures":[],"signed":{"x":-1e400}}', ("json", "canonical", "number")),
        ("manifest with NaN", b'{"signatures":[],"signed":{"x":NaN}}', ("json",)),
        ("manifest with a 5000-digit integer", b'{"signatures":[],"signed":{"x":' + b"9" * 5000 + b"}}", ("json",)),
        ("manifest with duplicate keys", b'{"signatures":[],"signatures":[],"signed":{}}', ("json", "duplicate")),
        ("manifest not UTF-8", b'{"signatures":[],"signed":{"x":"\xff"}}', ("json",)),
        ("manifest with a BOM", b"\xef\xbb\xbf" + env, ("json", "canonical")),
        ("manifest pretty-printed", json.dumps(json.loads(env), indent=1).encode(), ("canonical",)),
        ("manifest is a list", b"[]", ("signed",)),
        ("manifest signed is a list", b'{"signatures":[],"signed":[]}', ("signed",)),
        ("manifest empty", b"", ("json",)),
    ]
    for depth in (500, 900, 950, 980, 990, 995, 1000, 1100, 5000, 200_000):
        unsigned.append((f"manifest nested {depth} deep", b"[" * depth + b"]" * depth, ("json", "signed", "recursion")))
        nested = b'{"signatures":[],"signed":{"x":' + b"[" * depth + b"]" * depth + b"}}"
        unsigned.append((f"manifest with a value nested {depth} deep", nested, ("json", "signed", "recursion", "signature")))
    for label, raw, kws in unsigned:
        c.run(label, lambda: w.verify(manifest_bytes(raw)), {"metadata", "signature"}, kws)

    # malformed roots in the chain (parsed before any signature is checked)
    def root_with(edit):
        s = trust._signed(2, [w.pub["newbundle"]], 1, [w.pub["newroot"]], 1, w.expires)
        edit(s)
        return trust.sign_envelope(v.ROOT_TYPE, s, [w.k["root1"], w.k["newroot"]])

    def set_role(role, key, val):
        return lambda s: s["roles"][role].__setitem__(key, val)

    bad_roots = [
        ("chain root: bundle keyids contain a list", root_with(set_role("bundle", "keyids", [[1]]))),
        ("chain root: bundle keyids contain a dict", root_with(set_role("bundle", "keyids", [{"a": 1}]))),
        ("chain root: root keyids contain a list", root_with(set_role("root", "keyids", [["x"]]))),
        ("chain root: threshold is a float", root_with(set_role("bundle", "threshold", 1.0))),
        ("chain root: threshold true", root_with(set_role("bundle", "threshold", True))),
        ("chain root: threshold 0", root_with(set_role("bundle", "threshold", 0))),
        ("chain root: roles a list", root_with(lambda s: s.__setitem__("roles", []))),
        ("chain root: keys a list", root_with(lambda s: s.__setitem__("keys", []))),
        ("chain root: key public 31 bytes", root_with(lambda s: next(iter(s["keys"].values())).__setitem__("public", "00" * 31))),
        ("chain root: key public not hex", root_with(lambda s: next(iter(s["keys"].values())).__setitem__("public", "zz"))),
        ("chain root: key entry a string", root_with(lambda s: s["keys"].__setitem__(next(iter(s["keys"])), "x"))),
        ("chain root: version a string", root_with(lambda s: s.__setitem__("version", "2"))),
        ("chain root: expires a number", root_with(lambda s: s.__setitem__("expires", 5))),
        ("chain root: expires 2026-99-99", root_with(lambda s: s.__setitem__("expires", "2026-99-99T00:00:00Z"))),
        ("chain root: 1e400 inside", b'{"signatures":[],"signed":{"version":1e400}}'),
        ("chain root: signatures a dict", _canon_edit(w.chain[2], lambda e: e.__setitem__("signatures", {}))),
        ("chain root: signature entry a list", _canon_edit(w.chain[2], lambda e: e.__setitem__("signatures", [[1]]))),
    ]
    for label, data in bad_roots:
        c.run(label, lambda: w.verify(w.bundle(("newbundle",), roots={1: w.chain[1], 2: data})),
              {"root", "metadata", "signature"}, ())
        c.raises(f"update_root: {label}", lambda: v.update_root(w.root1, data), v.Refused)
        tf = w.base / f"trust-malformed-{THREAT_TALLY['robustness'][0]}"
        tf.mkdir()
        (tf / "root.json").write_bytes(data)
        c.raises(f"load_trust: {label}", lambda: v.load_trust(tf), v.TrustError)

    # validly SIGNED but malformed manifests (a buggy or hostile builder with a real key)
    signed_bad = [
        ("model is a list", w.manifest(model=["payload/model.onnx"]), ("model",)),
        ("model is a dict", w.manifest(model={"a": 1}), ("model",)),
        ("health is a string", w.manifest(health="x"), ("health",)),
        ("health is a list", w.manifest(health=[1]), ("health",)),
        ("health inputs a list", w.manifest(health={"inputs": [1]}), ("health",)),
        ("health inputs ref file a list", w.manifest(health={"inputs": {"x": {"file": ["a"]}}}), ("health",)),
        ("files is a list", w.manifest() | {"files": [1]}, ("files",)),
        ("file info a list", w.manifest() | {"files": {"payload/model.onnx": [1]}}, ("sha256",)),
        ("created 2026-02-30", w.manifest(created="2026-02-30T00:00:00Z"), ("created",)),
        ("expires a number", w.manifest(expires=1), ("expires",)),
        ("name a list", w.manifest(name=["m"]), ("name",)),
        ("version a float", w.manifest(version=1.0), ("version",)),
        ("version with 20-digit parts", w.manifest(version="1.0.99999999999999999999"), ("version",)),
        ("signed has _type only", {"_type": v.BUNDLE_TYPE}, ("schema",)),
    ]
    for label, m, kws in signed_bad:
        c.run(f"signed manifest: {label}", lambda: w.verify(w.bundle(envelope=w.envelope(manifest=m))), {"metadata"}, kws)

    # odd paths
    c.run("path does not exist", lambda: w.verify_path(w.base / "nope.bundle"), {"archive"}, ("cannot read",))
    c.run("path is a directory", lambda: w.verify_path(w.base), {"archive"}, ("cannot read", "not a regular file"))
    c.run("empty file", lambda: w.verify(b""), {"archive"}, ("whole tar archive",))
    c.run("path is a FIFO (open() must not block)", lambda: _verify_fifo(w), {"archive"}, ("regular file",))
    c.run("installed version malformed", lambda: w.verify(w.bundle(), installed=v.Installed(1, "1.0")),
          {"metadata", "rollback"}, ("installed version",))
    res = w.verify(w.bundle(("stranger",)))
    json.dumps(res.to_dict())
    with pytest.raises(v.BundleRefused):
        res.require()
    c.check()


def test_pre_signature_memory_is_bounded(w):
    """Entries under roots/ are read into memory before the manifest signature is checked, even
    the ones the device will ignore (version <= trusted). 24 x 1 MB of ignored roots must not
    cost 24 MB (scaled up: 9,998 x 1 MB = 10 GB on a Raspberry Pi)."""
    c = Cases("dos")
    blob = b"x" * (1 << 20)
    base = w.bundle(("stranger",))     # not even validly signed
    entries = b"".join(raw_entry(b"roots/%d.root.json" % (i + 1), blob) for i in range(24))
    data = insert_before_end(base, entries)
    p = w.path()
    p.write_bytes(data)
    holder = {}

    def run():
        tracemalloc.start()
        try:
            res = w.verify_path(p, _root_at(w, 30))
            holder["peak"] = tracemalloc.get_traced_memory()[1]
            return res
        finally:
            tracemalloc.stop()

    res = c.run("24 x 1 MB ignored roots/ entries, bad signature", run, {"signature", "root", "unsafe-entry"}, ())
    p.unlink()
    peak = holder.get("peak", 0)
    print(f"\n[dos] peak traced memory while refusing: {peak / 2**20:.1f} MiB for {len(data) / 2**20:.1f} MiB of bundle")
    if isinstance(res, v.VerifyResult) and peak > 6 << 20:
        c.problem("24 x 1 MB ignored roots/ entries", f"MEMORY: read into memory before the signature check: "
                  f"peak {peak / 2**20:.1f} MiB (> 6 MiB) for 24 x 1 MiB")
    c.check()


def _root_at(w, version: int) -> v.Root:
    """A trusted root object at `version` (as a device that rotated many times would hold)."""
    s = trust._signed(version, [w.pub["bkey1"]], 1, [w.pub["root1"]], 1, w.expires)
    return v.load_root(trust.sign_envelope(v.ROOT_TYPE, s, [w.k["root1"]]), NOW)


def _verify_fifo(w):
    """verify_bundle on a FIFO, in a child process (a blocking open() would hang the suite)."""
    fifo = w.base / "bundle.fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    code = ("import json, sys; from edgeops.agent import verifier as v; "
            "r = v.verify_bundle(sys.argv[1], None, target=None, installed=None); "
            "print(json.dumps([[f.code, f.message] for f in r.failures]) if not r.ok else 'OK')")
    try:
        out = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=10,
                             cwd=Path(v.__file__).resolve().parents[2])
    except subprocess.TimeoutExpired:
        raise TimeoutError("verify_bundle blocked for 10 s opening a FIFO (open() before the regular-file check)")
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    if out.stdout.strip() == "OK":
        return v.VerifyResult(str(fifo), ok=True)
    return v.VerifyResult(str(fifo), failures=[v.Failure(c, m) for c, m in json.loads(out.stdout)])
