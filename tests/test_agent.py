"""The device agent on its own: the install transaction, A/B slots, crash recovery and rollback,
run as the device runs it -- the agent package copied alone (edgeops import-blocked) and
driven through its JSON command line in a real process, on real signed bundles of real ONNX
models. Crashes are real SIGKILLs at every step boundary. (Over SSH: test_deploy.py.)"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgeops.agent import install as I
from edgeops.agent import verifier as v
from edgeops.bundle import build as b, keys, trust

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_bundle import _model  # noqa: E402

BLOCK = """
import sys, runpy
sys.path[:] = [p for p in sys.path if 'edgeops' not in p and p not in ('', '.')]
sys.path.insert(0, {pkg_parent!r})
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == 'edgeops' or name.startswith('edgeops.'):
            raise ImportError('edgeops is not on the device')
sys.meta_path.insert(0, Block())
sys.argv = ['devagent'] + {argv!r}
runpy.run_module('devagent', run_name='__main__', alter_sys=True)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Keys, a trust root, a registry with three versions of one model and one of another,
    and their bundles for target `host` (this machine's ISA)."""
    from edgeops.registry import open_registry

    base = tmp_path_factory.mktemp("agent")
    old = os.environ.get("EDGEOPS_HOME")
    os.environ["EDGEOPS_HOME"] = str(base / "home")
    try:
        keys.generate("release")
        signer = keys.load_signing("release")
        trust.init(trust.default_dir(), [signer], [signer.public_key], 1, 1,
                   datetime.now(timezone.utc) + timedelta(days=30))
        reg = open_registry()
        out = {}
        for i, ver in enumerate(("1.0.0", "1.1.0", "1.2.0")):
            reg.add(_model(base / f"m{i}.onnx", seed=i), "clf", version=ver)
            out[ver] = b.build(f"clf:{ver}", "host", [signer], base / f"clf-{ver}.bundle").path
        reg.add(_model(base / "o.onnx", seed=9), "other", version="1.0.0")
        out["other"] = b.build("other:1.0.0", "host", [signer], base / "other.bundle").path
        out["slo"] = b.build("clf:1.2.0", "host", [signer], base / "slo.bundle", slo_ms=1e-6).path
        out["rpi4"] = b.build("clf:1.2.0", "rpi4", [signer], base / "rpi4.bundle").path
        out["wrong-ref"] = _resign(out["1.2.0"], base / "wrong-ref.bundle", signer, _wrong_reference)
        yield {"bundles": out, "trust": trust.default_dir(), "signer": signer, "base": base}
    finally:
        if old is None:
            os.environ.pop("EDGEOPS_HOME", None)
        else:
            os.environ["EDGEOPS_HOME"] = old


def _wrong_reference(manifest: dict, members: dict) -> None:
    """Reference outputs that this model does not produce (a build from the wrong model),
    signed properly: only the device's health check can catch it."""
    name = manifest["health"]["expected"]["y"]["file"]
    arr = np.load(io.BytesIO(members[name]), allow_pickle=False)
    buf = io.BytesIO()
    np.save(buf, np.roll(arr, 1, axis=-1), allow_pickle=False)
    members[name] = buf.getvalue()


def _resign(src: Path, out: Path, signer, edit) -> Path:
    entries, env = v.peek(src)
    data = src.read_bytes()
    members = {e.name: data[e.offset:e.offset + e.size] for e in entries[1:]}
    manifest = json.loads(json.dumps(env["signed"]))
    edit(manifest, members)
    for n, blob in members.items():
        if n in manifest["files"]:
            manifest["files"][n] = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
    envelope = trust.sign_envelope(v.BUNDLE_TYPE, manifest, [signer])
    with open(out, "wb") as f:
        v.write_archive(f, [(v.MANIFEST, envelope)] + [(n, members[n]) for n in sorted(members)])
    return out


def _device(tmp_path: Path, world, target: str = "host") -> Path:
    """A device folder with the agent installed as enrolment leaves it: the package alone, under
    another name, in ROOT/agent/versions/V/devagent."""
    root = tmp_path / "dev" / "edgeops"
    pkg = root / "agent" / "versions" / I.AGENT_VERSION / "devagent"
    pkg.mkdir(parents=True)
    for f in (REPO / "edgeops" / "agent").glob("*.py"):
        shutil.copy(f, pkg / f.name)
    r = _agent(root, "init", "--name", "d1", "--target", target, "--label", "site=lab",
               "--trust", str(world["trust"] / "root.json"))
    assert r["ok"], r
    return root


def _agent(root: Path, *argv, env: dict | None = None, code: int | None = None):
    """Run the agent CLI on the device copy; returns its JSON (or the process on a kill)."""
    pkg_parent = root / "agent" / "versions" / I.AGENT_VERSION
    p = subprocess.run([sys.executable, "-I", "-c", BLOCK.format(pkg_parent=str(pkg_parent), argv=[str(a) for a in argv])],
                       capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    if p.returncode < 0:
        return p
    assert "Traceback" not in p.stderr, p.stderr
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    if code is not None:
        assert p.returncode == code, (p.returncode, doc)
    doc["_exit"] = p.returncode
    return doc


def _invariant(root: Path, name: str = "clf", version: str | None = None) -> dict:
    """The device's current model passes its own health check, and state and disk agree."""
    st = _agent(root, "status", code=0)
    m = st["models"][name]
    assert m["consistent"] and m["exists"], m
    assert st["transaction"] is None
    if version:
        assert m["version"] == version, m
    # the app's view: the stable path loads and gives the bundle's reference outputs
    slot = root / "models" / name / "current"
    manifest = json.loads((slot / "manifest.json").read_text())
    assert manifest["version"] == m["version"]
    sess = ort.InferenceSession(str(slot / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {n: np.load(slot / r["file"][len("payload/"):]) for n, r in manifest["health"]["inputs"].items()}
    exp = np.load(slot / manifest["health"]["expected"]["y"]["file"][len("payload/"):])
    np.testing.assert_allclose(sess.run(["y"], feeds)[0], exp, atol=1e-5)
    return st


def test_install_upgrade_rollback_and_idempotence(tmp_path, world):
    root = _device(tmp_path, world)
    B = world["bundles"]
    r = _agent(root, "install", B["1.0.0"], "--runs", "3", code=0)
    assert r["ok"] and r["slot"] == "a" and r["previous"] is None
    assert [s["step"] for s in r["steps"]] == list(I.STEPS)
    _invariant(root, version="1.0.0")
    # after a commit the agent indexes its chunks for the next delta, in the background
    deadline = time.monotonic() + 30
    while not (root / "chunks-cache.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert json.loads((root / "chunks-cache.json").read_text())
    r = _agent(root, "install", B["1.1.0"], "--runs", "3", code=0)
    assert r["slot"] == "b" and r["previous"] == "1.0.0"
    st = _invariant(root, version="1.1.0")
    assert st["models"]["clf"]["previous"]["version"] == "1.0.0"
    # the same bundle again: nothing to do (a resumed rollout asks this)
    r = _agent(root, "install", B["1.1.0"], code=0)
    assert r["already_installed"] and r["slot"] == "b"
    # a second model beside the first
    _agent(root, "install", B["other"], "--runs", "3", code=0)
    _invariant(root, "other", "1.0.0")
    # rollback: the kept version is checked, then current again
    r = _agent(root, "rollback", "clf", code=0)
    assert r["version"] == "1.0.0" and r["previous"] == "1.1.0"
    st = _invariant(root, version="1.0.0")
    assert st["models"]["clf"]["previous"]["version"] == "1.1.0"
    # the counter never goes back: the bundle rolled back from is not accepted again
    r = _agent(root, "install", B["1.1.0"], code=1)
    assert r["reason"] == "VERIFY" and "rollback" in r["message"]
    r = _agent(root, "install", B["1.2.0"], "--runs", "3", code=0)
    _invariant(root, version="1.2.0")
    # an older bundle replayed is refused by the device's own state
    r = _agent(root, "install", B["1.0.0"], code=1)
    assert r["reason"] == "VERIFY" and "not newer" in r["message"]
    _invariant(root, version="1.2.0")


@pytest.mark.parametrize("case,reason,needle", [
    ("slo", "SLO", "exceeds the SLO"),
    ("wrong-ref", "HEALTH", "differs on this device"),
    ("rpi4", "PREFLIGHT", "ISA arm64"),
    ("flipped", "VERIFY", "sha256"),
])
def test_a_bad_bundle_leaves_the_running_model(tmp_path, world, case, reason, needle):
    root = _device(tmp_path, world, target="rpi4" if case == "rpi4" else "host")
    B = world["bundles"]
    if case == "rpi4":
        # the device says it is an rpi4 but runs on this machine's ISA: nothing installs, and
        # nothing was there before either
        r = _agent(root, "install", B["rpi4"], code=1)
        assert r["reason"] == reason and needle in r["message"], r
        assert not (root / "models" / "clf").exists()
        return
    _agent(root, "install", B["1.0.0"], "--runs", "3", code=0)
    bundle = B[case] if case != "flipped" else tmp_path / "flipped.bundle"
    if case == "flipped":
        data = bytearray(B["1.1.0"].read_bytes())
        model = next(e for e in v.peek(B["1.1.0"])[0] if e.name.startswith("payload/model/"))
        data[model.offset + model.size // 2] ^= 0x40       # one bit of the model's weights
        bundle.write_bytes(bytes(data))
    r = _agent(root, "install", bundle, "--runs", "5", code=1)
    assert r["reason"] == reason and needle in r["message"], r
    assert not r["rolled_back"]        # refused before the switch
    _invariant(root, version="1.0.0")
    # the idle slot holds nothing half-made (a flipped bundle is never staged)
    assert not (root / "models" / "clf" / "b").exists()
    assert not (root / "models" / "clf" / "b.partial").exists()


@pytest.mark.parametrize("step", I.STEPS[1:])
def test_sigkill_at_every_step_is_recovered(tmp_path, world, step):
    """The agent dies right after recording STEP (before acting on it): the next agent start
    rolls back (before commit) or completes (at commit); one working model is current."""
    root = _device(tmp_path, world)
    B = world["bundles"]
    _agent(root, "install", B["1.0.0"], "--runs", "3", code=0)
    p = _agent(root, "install", B["1.1.0"], "--runs", "3", env={I.FAULT_ENV: step})
    assert isinstance(p, subprocess.CompletedProcess) and p.returncode == -9, p
    raw = json.loads((root / "state.json").read_text())
    assert raw["transaction"]["step"] == step
    st = _agent(root, "status", code=0)
    assert st["recovered"] and st["transaction"] is None
    want = "1.1.0" if step == "commit" else "1.0.0"
    _invariant(root, version=want)
    # and the device takes the next install normally
    _agent(root, "install", B["1.2.0"], "--runs", "3", code=0)
    _invariant(root, version="1.2.0")


def test_sigkill_during_a_first_install_leaves_no_half_model(tmp_path, world):
    root = _device(tmp_path, world)
    p = _agent(root, "install", world["bundles"]["1.0.0"], env={I.FAULT_ENV: "postcheck"})
    assert p.returncode == -9
    st = _agent(root, "status", code=0)
    assert st["recovered"] and "clf" not in st["models"]
    assert not (root / "models" / "clf" / "current").is_symlink()
    _agent(root, "install", world["bundles"]["1.0.0"], "--runs", "3", code=0)
    _invariant(root, version="1.0.0")


def test_agent_cli_refusals_are_json_with_exit_codes(tmp_path, world):
    root = _device(tmp_path, world)
    r = _agent(root, "install", tmp_path / "missing.bundle", code=1)
    assert r["reason"] == "VERIFY" and "not a readable bundle" in r["message"]
    r = _agent(root, "rollback", "clf", code=1)
    assert r["reason"] == "PREFLIGHT" and "no model named" in r["message"]
    (root / "state.json").write_text('{"schema": 99}')
    r = _agent(root, "status", code=3)
    assert "newer agent" in r["error"]
    r = _agent(root, "version", code=0)
    assert r["agent"] == I.AGENT_VERSION and r["protocol"] == I.PROTOCOL


def test_gc_keeps_current_and_previous(tmp_path, world):
    root = _device(tmp_path, world)
    B = world["bundles"]
    _agent(root, "install", B["1.0.0"], "--runs", "3", code=0)
    _agent(root, "install", B["1.1.0"], "--runs", "3", code=0)
    (root / "incoming" / "leftover.part").write_bytes(b"x" * 1000)
    r = _agent(root, "gc", code=0)
    assert "leftover.part" in r["removed"] and r["freed_bytes"] >= 1000
    st = _invariant(root, version="1.1.0")
    assert (root / "models" / "clf" / st["models"]["clf"]["previous"]["slot"]).is_dir()


def test_delta_rebuilds_exactly_or_refuses(tmp_path):
    """Content-defined chunks survive an insertion; a delta rebuilds the file bit for bit from
    the chunks a device holds; a tampered literal, a changed source or a wrong target hash is
    refused before anything is renamed into place."""
    import hashlib as hl

    from edgeops.agent import delta

    rng = np.random.default_rng(0)
    old = rng.integers(0, 256, 6 << 20, dtype=np.uint8).tobytes()
    new = old[:1 << 20] + b"new bytes" * 500 + old[1 << 20:]
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    ch = list(delta.chunks(tmp_path / "old"))
    assert sum(n for _, n, _ in ch) == len(old)
    assert all(delta.MIN_CHUNK <= n <= delta.MAX_CHUNK for _, n, _ in ch[:-1])
    stats = delta.make(tmp_path / "new", {s for _, _, s in ch}, tmp_path / "d")
    assert stats["literal_bytes"] < 4 * delta.MAX_CHUNK and stats["reused"] >= stats["chunks"] - 4
    want = hl.sha256(new).hexdigest()
    delta.apply(tmp_path / "d", [tmp_path / "old"], tmp_path / "out", want)
    assert (tmp_path / "out").read_bytes() == new
    with pytest.raises(delta.DeltaError, match="not the expected"):
        delta.apply(tmp_path / "d", [tmp_path / "old"], tmp_path / "x", "0" * 64)
    bad = bytearray((tmp_path / "d").read_bytes())
    bad[-10] ^= 1                                          # a literal byte
    (tmp_path / "bad").write_bytes(bytes(bad))
    with pytest.raises(delta.DeltaError, match="does not match its name"):
        delta.apply(tmp_path / "bad", [tmp_path / "old"], tmp_path / "x", want)
    (tmp_path / "old").write_bytes(old[:3 << 20])          # the device lost part of its source
    with pytest.raises(delta.DeltaError, match="not on this device"):
        delta.apply(tmp_path / "d", [tmp_path / "old"], tmp_path / "x", want)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.part").exists()
    # an unrelated file: the probe of its first 8 MiB stops the delta early
    (tmp_path / "other").write_bytes(rng.integers(0, 256, 12 << 20, dtype=np.uint8).tobytes())
    assert delta.make(tmp_path / "other", {s for _, _, s in ch}, tmp_path / "o", min_reuse=0.2) is None
    # the chunk cache: a second listing reads the cache; a changed file is re-chunked
    cache = tmp_path / "cache.json"
    first = delta.index([tmp_path / "new"], cache)
    assert cache.exists() and delta.index([tmp_path / "new"], cache) == first
    (tmp_path / "new").write_bytes(old)
    assert delta.index([tmp_path / "new"], cache) != first


def test_rotated_trust_root_is_kept_only_when_the_install_commits(tmp_path, world):
    """The publisher rotates to a new signing key (root v2, signed by the v1 root key); bundles
    carry the chain. A device still on v1 installs a v2-signed bundle and keeps v2 -- but not
    from a bundle that failed its health check."""
    from edgeops.registry import open_registry

    root = _device(tmp_path, world)
    pub_trust = tmp_path / "publisher-trust"
    shutil.copytree(world["trust"], pub_trust)
    keys.generate("release2")
    new = keys.load_signing("release2")
    trust.rotate(pub_trust, [world["signer"]], [new], [new.public_key], 1, 1,
                 datetime.now(timezone.utc) + timedelta(days=30))
    reg = open_registry()
    reg.add(_model(tmp_path / "r.onnx", seed=21), "rot", version="1.0.0")
    good = b.build("rot:1.0.0", "host", [new], tmp_path / "rot.bundle", trust_dir=pub_trust).path
    bad = _resign(good, tmp_path / "rot-bad.bundle", new, _wrong_reference)
    r = _agent(root, "install", bad, "--runs", "3", code=1)
    assert r["reason"] == "HEALTH"
    assert v.load_trust(root / "trust").version == 1            # not kept from a failed install
    r = _agent(root, "install", good, "--runs", "3", code=0)
    assert "trust root v2" in " ".join(s["detail"] for s in r["steps"])
    assert v.load_trust(root / "trust").version == 2
    _invariant(root, "rot", "1.0.0")


def test_target_mismatch_is_a_preflight_refusal(tmp_path, world):
    root = _device(tmp_path, world, target="x86-laptop")       # same ISA, another profile
    r = _agent(root, "install", world["bundles"]["1.0.0"], code=1)
    assert r["reason"] == "PREFLIGHT" and "this device is 'x86-laptop'" in r["message"]
    assert not (root / "models" / "clf").exists()
