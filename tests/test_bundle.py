"""Keys, trust roots and bundles end to end: real Ed25519 keys, a real SQLite registry, real
ONNX models run by onnxruntime for the health vectors, and the CLI's exit codes.

The threat cases (every way a bundle must be refused) are in test_bundle_threats.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeops.agent import health, verifier as v
from edgeops.bundle import build as b, keys, trust
from edgeops.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def _model(path: Path, seed: int = 0, external: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["z"]),
             helper.make_node("Softmax", ["z"], ["y"], axis=-1)]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [w, bias])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    if external:
        onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(m, str(path))
    return path


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEOPS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    monkeypatch.delenv("EDGEOPS_KEY_PASSPHRASE", raising=False)
    return tmp_path / "home"


@pytest.fixture()
def setup(home, tmp_path):
    """Two keys, a trust root needing both, and one registry version."""
    from edgeops.registry import open_registry

    for n in ("release", "qa"):
        keys.generate(n)
    signers = [keys.load_signing("release"), keys.load_signing("qa")]
    trust.init(trust.default_dir(), signers[:1], [s.public_key for s in signers], 2, 1,
               datetime.now(timezone.utc) + timedelta(days=30))
    reg = open_registry()
    reg.add(_model(tmp_path / "clf.onnx"), "clf", version="1.0.0", metrics={"accuracy": 0.91})
    return reg, signers


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgeops", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


# ----------------------------------------------------------------------------- keys

def test_keys_are_ed25519_0600_with_sha256_ids(home):
    pub = keys.generate("k1")
    priv = home / "keys" / "k1.key"
    assert priv.stat().st_mode & 0o777 == 0o600
    assert pub.keyid == hashlib.sha256(pub.public).hexdigest() and len(pub.public) == 32
    assert keys.load_signing("k1").keyid == pub.keyid == keys.load_public("k1").keyid
    with pytest.raises(UsageError, match="already exists"):
        keys.generate("k1")
    os.chmod(priv, 0o644)
    with pytest.raises(keys.KeyFileError, match="readable by other users"):
        keys.load_signing("k1")


def test_passphrase_keys(home):
    keys.generate("locked", passphrase="s3cret")
    assert b"ENCRYPTED" in (home / "keys" / "locked.key").read_bytes()
    with pytest.raises(keys.KeyFileError, match="passphrase is needed"):
        keys.load_signing("locked")
    with pytest.raises(keys.KeyFileError, match="wrong passphrase"):
        keys.load_signing("locked", "nope")
    assert keys.load_signing("locked", "s3cret").keyid == keys.load_public("locked").keyid
    r = _cli("keys", "list", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["encrypted"] is True


# ----------------------------------------------------------------------------- build + verify

def test_build_verify_and_manifest(setup, tmp_path):
    reg, signers = setup
    out = tmp_path / "clf.bundle"
    res = b.build("clf:1.0.0", "rpi4", signers, out, slo_ms=50)
    m = res.manifest
    assert (m["name"], m["version"], m["target"], m["counter"]) == ("clf", "1.0.0", "rpi4", 1)
    assert v.parse_time(m["expires"], "") - v.parse_time(m["created"], "") == timedelta(days=90)
    assert set(m["files"]) == {"payload/model/clf.onnx", "payload/reference/input_0.npy",
                               "payload/reference/output_0.npy"}
    model_bytes = (tmp_path / "clf.onnx").read_bytes()
    assert m["files"]["payload/model/clf.onnx"] == {"sha256": hashlib.sha256(model_bytes).hexdigest(),
                                                     "size": len(model_bytes)}
    assert m["runtime"]["engine"] == "onnxruntime" and m["runtime"]["opset"] == 17
    assert m["runtime"]["min_version"] == "1.13" and m["runtime"]["isa"] == "arm64"
    exp = m["health"]["expected"]["y"]
    assert exp["atol"] > 0 and exp["rtol"] > 0 and exp["shape"] == [1, 8]
    assert m["slo"] == {"latency_ms": 50, "percentile": "p99", "threads": 1}
    assert m["registry"]["metrics"] == {"accuracy": 0.91}
    assert len(res.signed_by) == 2 and res.root_version == 1

    root = v.load_trust(trust.default_dir())
    ok = v.verify_bundle(out, root, target="rpi4", installed=v.Installed(0, "0.9.0"))
    assert ok.ok, ok.failures
    assert ok.checked == ["archive", "trust root v1", "signatures 2/2", "expiry", "target",
                          "newer than installed", "4 file hashes"]
    # the next build of the same name gets the next counter, recorded in the registry
    res2 = b.build("clf:1.0.0", "rpi4", signers, tmp_path / "clf2.bundle")
    assert res2.manifest["counter"] == 2
    assert v.verify_bundle(tmp_path / "clf2.bundle", root, target=None, installed=v.Installed(1, None)).ok
    refused = v.verify_bundle(out, root, target=None, installed=v.Installed(1, None))
    assert not refused.ok and refused.failures[0].code == "rollback"
    # python's tarfile reads bundles too (users can look inside with tar tvf)
    import tarfile
    with tarfile.open(out) as t:
        assert t.getnames()[0] == "manifest.json"


def test_same_inputs_give_same_bytes(setup, tmp_path, monkeypatch):
    reg, signers = setup
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(int(datetime.now(timezone.utc).timestamp()) - 3600))
    a = b.build("clf:1.0.0", "rpi4", signers, tmp_path / "a.bundle", counter=7)
    c = b.build("clf:1.0.0", "rpi4", list(reversed(signers)), tmp_path / "c.bundle", counter=7)
    assert (tmp_path / "a.bundle").read_bytes() == (tmp_path / "c.bundle").read_bytes()
    assert a.sha256 == c.sha256
    d = b.build("clf:1.0.0", "rpi4", signers, tmp_path / "d.bundle", counter=8)
    assert d.sha256 != a.sha256
    # an explicit counter moves the allocator past it: the next automatic one is newer
    assert b.build("clf:1.0.0", "rpi4", signers, tmp_path / "e.bundle").manifest["counter"] == 9


def test_health_vectors_run_from_the_verified_bundle(setup, tmp_path):
    reg, signers = setup
    out = tmp_path / "h.bundle"
    b.build("clf:1.0.0", "rpi4", signers, out, slo_ms=1000)
    dest = tmp_path / "x"
    res = b.verify(out, trust.default_dir(), target="rpi4", extract_to=dest)
    assert res.ok and res.extracted == str(dest)
    report = health.run(dest, res.manifest, runs=5)
    assert report["passed"] and report["outputs"]["y"]["violations"] == 0
    assert report["slo"]["passed"]
    # the same vectors catch a different model: swap in another model's weights
    _model(dest / "model" / "clf.onnx", seed=1)
    bad = health.run(dest, res.manifest, runs=1)
    assert not bad["passed"] and bad["outputs"]["y"]["violations"] > 0
    # and an impossible SLO fails
    _model(dest / "model" / "clf.onnx", seed=0)
    slow = health.run(dest, {**res.manifest, "slo": {"latency_ms": 1e-6, "percentile": "p50"}}, runs=3)
    assert not slow["passed"] and not slow["slo"]["passed"]


def test_external_data_model(home, tmp_path):
    from edgeops.registry import open_registry

    keys.generate("k")
    s = keys.load_signing("k")
    trust.init(trust.default_dir(), [s], [s.public_key], 1, 1, datetime.now(timezone.utc) + timedelta(days=1))
    d = tmp_path / "ext"
    d.mkdir()
    reg = open_registry()
    reg.add(_model(d / "big.onnx", external=True), "big")
    out = tmp_path / "big.bundle"
    res = b.build("big", "rpi5", [s], out)
    assert "payload/model/big.onnx.data" in res.manifest["files"]
    ver = b.verify(out, trust.default_dir(), target="rpi5", extract_to=tmp_path / "dest")
    assert ver.ok, ver.failures
    assert health.run(tmp_path / "dest", ver.manifest, runs=1)["passed"]


def test_build_refusals(setup, tmp_path):
    reg, signers = setup
    with pytest.raises(UsageError, match="need 2 signature"):
        b.build("clf:1.0.0", "rpi4", signers[:1], tmp_path / "x.bundle")
    keys.generate("stranger")
    with pytest.raises(UsageError, match="stranger not in it"):
        b.build("clf:1.0.0", "rpi4", [signers[0], keys.load_signing("stranger")], tmp_path / "x.bundle")
    with pytest.raises(UsageError, match="--threshold 3"):
        b.build("clf:1.0.0", "rpi4", signers, tmp_path / "x.bundle", threshold=3)
    with pytest.raises(UsageError, match="given twice"):
        b.build("clf:1.0.0", "rpi4", [signers[0], signers[0]], tmp_path / "x.bundle")
    with pytest.raises(UsageError, match="unknown target"):
        b.build("clf:1.0.0", "no-such-board", signers, tmp_path / "x.bundle")
    with pytest.raises(UsageError, match="already be expired"):
        b.build("clf:1.0.0", "rpi4", signers, tmp_path / "x.bundle",
                created=datetime.now(timezone.utc) - timedelta(days=10), expires=timedelta(days=1))
    assert not (tmp_path / "x.bundle").exists()


# ----------------------------------------------------------------------------- rotation

def test_key_rotation_reaches_devices_through_the_bundle(setup, tmp_path):
    reg, signers = setup
    device_trust = tmp_path / "device-trust"
    shutil.copytree(trust.default_dir(), device_trust)     # enrolled while root v1 was in force
    keys.generate("release2")
    new = keys.load_signing("release2")
    root2 = trust.rotate(trust.default_dir(), [signers[0]], [new], [new.public_key], 1, 1,
                         datetime.now(timezone.utc) + timedelta(days=30))
    assert root2.version == 2
    out = tmp_path / "r.bundle"
    b.build("clf:1.0.0", "rpi4", [new], out)   # old keys no longer needed
    old_root = v.load_trust(device_trust)
    res = v.verify_bundle(out, old_root, target="rpi4", installed=None)
    assert res.ok and res.root_version == 2 and len(res.root_updates) == 1
    # the CLI persists the newer root only when asked, and only after the bundle verified
    r = _cli("bundle", "verify", out, "--trust", device_trust, "--target", "rpi4", "--update-trust", "--json")
    assert r.returncode == 0, r.stderr
    assert v.load_trust(device_trust).version == 2
    # a root not signed by the old root keys is refused
    keys.generate("mallory")
    mal = keys.load_signing("mallory")
    signed = trust._signed(3, [mal.public_key], 1, [mal.public_key], 1,
                           datetime.now(timezone.utc) + timedelta(days=1))
    forged = tmp_path / "3.root.json"
    forged.write_bytes(trust.sign_envelope(v.ROOT_TYPE, signed, [mal]))
    r = _cli("trust", "update", device_trust, forged)
    assert r.returncode == 1 and "root refused" in r.stderr and "needs 1" in r.stderr
    unsigned = tmp_path / "3u.root.json"
    unsigned.write_bytes(v.canonical({"signatures": [], "signed": signed}))
    r = _cli("trust", "update", device_trust, unsigned)
    assert r.returncode == 1 and "unsigned" in r.stderr
    assert v.load_trust(device_trust).version == 2


# ----------------------------------------------------------------------------- CLI

def _vad_like(path: Path) -> Path:
    """A VAD-like model: audio [1, 1536] and a scalar int64 sample rate that only works at
    8000 or 16000 (frames of sr // 500 samples): generated inputs cannot guess it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Div", ["sr", "k500"], ["flen"], name="frame_len"),
             helper.make_node("Unsqueeze", ["flen", "ax0"], ["flen1"], name="flen_1d"),
             helper.make_node("Concat", ["minus1", "flen1"], ["shape"], axis=0, name="frame_shape"),
             helper.make_node("Reshape", ["x", "shape"], ["framed"], name="frame_reshape", allowzero=1),
             helper.make_node("ReduceMean", ["framed"], ["energy"], keepdims=0, axes=[1], name="energy")]
    g = helper.make_graph(nodes, "vadlike",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1536]),
                           helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info("energy", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.array(500, np.int64), "k500"),
                           numpy_helper.from_array(np.array([0], np.int64), "ax0"),
                           numpy_helper.from_array(np.array([-1], np.int64), "minus1")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_model_failing_on_generated_inputs_is_one_line(home, tmp_path):
    """A model whose integer scalar input cannot be guessed (a sample rate) was exit 70:
    now one line naming the failing node, saying the value was a guess, suggesting --inputs."""
    model = _vad_like(tmp_path / "vad.onnx")
    for cmd in (["keys", "generate", "ops"], ["trust", "init", "--key", "ops"],
                ["registry", "add", model, "--name", "vad"]):
        assert _cli(*cmd).returncode == 0
    r = _cli("bundle", "build", "vad:0.1.0", "--target", "rpi4", "--key", "ops", "-o", tmp_path / "v.bundle")
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "'frame_reshape' (Reshape)" in err[0] and "a guess (sr=" in err[0]
    assert "--inputs" in r.stderr and "Traceback" not in r.stderr
    np.savez(tmp_path / "real.npz", x=np.zeros((1, 1536), np.float32), sr=np.array(16000))
    r = _cli("bundle", "build", "vad:0.1.0", "--target", "rpi4", "--key", "ops", "-o", tmp_path / "v.bundle",
             "--inputs", tmp_path / "real.npz")
    assert r.returncode == 0, r.stderr


def test_cli_end_to_end(home, tmp_path):
    model = _model(tmp_path / "cli.onnx")
    for cmd in (["keys", "generate", "ops"], ["trust", "init", "--key", "ops"],
                ["registry", "add", model, "--name", "cli"]):
        r = _cli(*cmd)
        assert r.returncode == 0, (cmd, r.stderr)
    out = tmp_path / "cli.bundle"
    r = _cli("bundle", "build", "cli:0.1.0", "--target", "rpi4", "--key", "ops", "-o", out, "--slo-ms", "100",
             "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["manifest"]["counter"] == 1
    r = _cli("bundle", "verify", out, "--target", "rpi4", "--installed-version", "0.0.9", "--health")
    assert r.returncode == 0, r.stderr
    assert "VERIFIED" in r.stdout and "health check PASSED" in r.stdout
    r = _cli("bundle", "verify", out, "--target", "jetson-nano", "--installed-version", "0.1.0", "--json")
    assert r.returncode == 1
    codes = sorted(f["code"] for f in json.loads(r.stdout)["failures"])
    assert codes == ["rollback", "target"]
    r = _cli("bundle", "inspect", out, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["verified"] is False
    for args, code, text in [
        (["bundle", "verify", tmp_path / "missing.bundle"], 2, "no such bundle"),
        (["bundle", "verify", out, "--trust", tmp_path], 2, "no root.json"),
        (["bundle", "verify", out, "--installed-version", "one"], 2, "not X.Y.Z"),
        (["bundle", "build", "cli:9.9.9", "--target", "rpi4", "--key", "ops", "-o", tmp_path / "n"], 2, "cli"),
        (["bundle", "build", "cli", "--target", "rpi4", "--key", "nokey", "-o", tmp_path / "n"], 2, "no key"),
        (["bundle", "build", "cli", "--target", "rpi4", "--key", "ops", "--expires", "soon", "-o", tmp_path / "n"],
         2, "not a duration"),
        (["bundle", "inspect", model], 2, "not a readable bundle"),
    ]:
        r = _cli(*map(str, args))
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert text in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_device_side_code_runs_alone(setup, tmp_path):
    """The verifier and the health check are copied to devices alone: they must verify and run
    a real bundle without edgeops importable, using only the standard library, cryptography,
    numpy and onnxruntime."""
    reg, signers = setup
    out = tmp_path / "alone.bundle"
    b.build("clf:1.0.0", "rpi4", signers, out)
    # the agent package under another name: it may import only itself (relatively)
    agent = tmp_path / "dev" / "devagent"
    agent.mkdir(parents=True)
    for f in (REPO / "edgeops" / "agent").glob("*.py"):
        shutil.copy(f, agent / f.name)
    code = f"""
import sys
sys.path[:] = [p for p in sys.path if 'edgeops' not in p and p not in ('', '.')]
sys.path.insert(0, {str(agent.parent)!r})
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == 'edgeops' or name.startswith('edgeops.'):
            raise ImportError('edgeops is not on the device')
sys.meta_path.insert(0, Block())
from devagent import verifier, health
root = verifier.load_trust({str(trust.default_dir())!r})
res = verifier.verify_bundle({str(out)!r}, root, target='rpi4', installed=None, extract_to={str(tmp_path / 'x')!r})
assert res.ok, res.failures
assert health.run({str(tmp_path / 'x')!r}, res.manifest, runs=2)['passed']
allowed = ('cryptography', 'numpy', 'onnxruntime')
print(sorted({{m.split('.')[0] for m in sys.modules}} - set(sys.stdlib_module_names) - set(allowed) - {{'devagent'}}))
"""
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    extra = [m for m in eval(r.stdout.strip().splitlines()[-1]) if not m.startswith("_")]
    # onnxruntime and cryptography pull in a few helpers of their own (cffi, packaging ...)
    assert not [m for m in extra if m in ("edgeops", "onnx", "click", "rich", "paramiko", "torch")], extra


def test_a_model_that_failed_a_check_is_not_bundled_by_default(setup, tmp_path):
    from edgeops import lineage

    reg, signers = setup
    m = _model(tmp_path / "q.onnx", seed=3)
    rec = lineage.make_record("optimize.quantize", tmp_path / "clf.onnx", "0" * 64, "onnx",
                              {"quantize": {"passed": False, "metric": "accuracy", "max_drop": 0.01}})
    lineage.write_onnx_lineage(m, rec)
    reg.add(m, "q")
    with pytest.raises(b.BundleError, match="failed a check"):
        b.build("q", "rpi4", signers, tmp_path / "q.bundle")
    res = b.build("q", "rpi4", signers, tmp_path / "q.bundle", allow_failed_lineage=True)
    assert any("failed check" in w for w in res.warnings)


def test_counters_are_one_sequence_so_other_models_cannot_replay(setup, tmp_path):
    """A device running model A (counter 2) is offered an older, validly signed bundle of model
    B (counter 1): refused, because every bundle of the registry shares one counter sequence."""
    reg, signers = setup
    reg.add(_model(tmp_path / "other.onnx", seed=5), "other")
    old_b = b.build("other", "rpi4", signers, tmp_path / "b1.bundle")
    a = b.build("clf:1.0.0", "rpi4", signers, tmp_path / "a2.bundle")
    assert (old_b.manifest["counter"], a.manifest["counter"]) == (1, 2)
    root = v.load_trust(trust.default_dir())
    here = v.Installed(counter=2, version="1.0.0", name="clf")
    res = v.verify_bundle(tmp_path / "b1.bundle", root, target="rpi4", installed=here)
    assert not res.ok and [f.code for f in res.failures] == ["rollback"]
    new_b = b.build("other", "rpi4", signers, tmp_path / "b3.bundle")
    res = v.verify_bundle(tmp_path / "b3.bundle", root, target="rpi4", installed=here)
    assert res.ok and "model changes clf -> other" in " ".join(res.checked)
    assert res.manifest_sha256 == hashlib.sha256(v.canonical(new_b.manifest)).hexdigest()


def test_a_trust_folder_others_can_write_is_refused(home):
    keys.generate("k")
    s = keys.load_signing("k")
    folder = trust.default_dir()
    old = os.umask(0)      # even under a permissive umask, what edgeops writes is 0644 / 0755
    try:
        trust.init(folder, [s], [s.public_key], 1, 1, datetime.now(timezone.utc) + timedelta(days=1))
    finally:
        os.umask(old)
    assert (folder / "root.json").stat().st_mode & 0o777 == 0o644
    assert v.load_trust(folder).version == 1
    for target in (folder / "root.json", folder):
        mode = target.stat().st_mode & 0o777
        os.chmod(target, mode | 0o002)
        with pytest.raises(v.TrustError, match="writable by other users"):
            v.load_trust(folder)
        os.chmod(target, mode)
