"""The model registry against real SQLite and real files: identity and dedup, versions,
lineage links, external data, corruption, stages and retention with tombstones, bench
attachments, bundle counters, concurrent writers in separate processes, and the CLI's
exit codes and --json."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgeops import lineage
from edgeops.cli import cli
from edgeops.formats.base import sha256_path
from edgeops.registry import RegistryError, open_blob_store, open_registry, parse_ref
from edgeops.registry.store import listing_sha256


def _model(path, seed: int = 0, external: bool = False) -> Path:
    """x[1,4] @ W[4,3] + b: a tiny real ONNX model, its weights from `seed`."""
    rng = np.random.default_rng(seed)
    W = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [W, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = Path(path)
    if external:
        onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(m, str(path))
    return path


def _blob_files(home: Path) -> list[Path]:
    return [p for p in (home / "blobs").rglob("*") if p.is_file()]


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("EDGEOPS_HOME", str(h))
    monkeypatch.setenv("EDGEOPS_USER", "tester")
    monkeypatch.delenv("EDGEOPS_REGISTRY_URL", raising=False)
    monkeypatch.delenv("EDGEOPS_BLOBS_URL", raising=False)
    return h


@pytest.fixture
def reg(home):
    with open_registry() as r:
        yield r


def test_add_get_list_and_auto_versions(reg, home, tmp_path):
    data = tmp_path / "train.csv"
    data.write_text("x,y\n1,2\n")
    a = _model(tmp_path / "a.onnx", 1)
    res = reg.add(a, "digits", metrics={"accuracy": "0.97"}, tags=["cnn", "team=vision"],
                  data=[data])
    r = res.record
    assert res.created and r.version == "0.1.0" and r.stage == "dev" and r.format == "onnx"
    assert r.sha256 == sha256_path(a) and r.main_file == "a.onnx" and r.size == a.stat().st_size
    assert r.files == {"a.onnx": {"sha256": r.sha256, "size": r.size}}
    assert r.metrics == {"accuracy": 0.97} and r.tags == ["cnn", "team=vision"]
    assert r.data == [{"name": "train.csv", "sha256": sha256_path(data), "size": 8}]
    assert r.creator == "tester" and r.created.endswith("+00:00") and not r.removed
    assert "onnx" in r.environment["packages"] and r.environment["python"]
    assert r.lineage is None
    assert (home / "registry.db").is_file()
    assert reg.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    assert reg.add(_model(tmp_path / "b.onnx", 2), "digits").record.version == "0.1.1"
    assert reg.add(_model(tmp_path / "c.onnx", 3), "digits", version="1.0.0").record.version == "1.0.0"
    assert reg.add(_model(tmp_path / "d.onnx", 4), "digits").record.version == "1.0.1"
    assert reg.get("digits").version == "1.0.1" == reg.get("digits", "latest").version
    assert reg.get("digits", "0.1.0") == r
    assert [v.version for v in reg.versions("digits")] == ["0.1.0", "0.1.1", "1.0.0", "1.0.1"]
    assert type(r).from_dict(json.loads(json.dumps(r.to_dict()))) == r
    with pytest.raises(RegistryError, match=r"no version 2.0.0 \(versions: 0.1.0, 0.1.1"):
        reg.get("digits", "2.0.0")
    with pytest.raises(RegistryError, match="no model named 'nope'.*models: digits"):
        reg.get("nope")
    assert parse_ref("digits:1.0.0") == ("digits", "1.0.0") and parse_ref("digits") == ("digits", None)
    for bad in ("", "digits:1.0", "di gits", "a:1.0.0:x", ":1.0.0", "digits:01.0.0"):
        with pytest.raises(RegistryError) as e:
            parse_ref(bad)
        assert e.value.exit_code == 2


def test_idempotent_shared_blob_and_conflicts(reg, home, tmp_path):
    a = _model(tmp_path / "a.onnx", 1)
    first = reg.add(a, "m")
    again = reg.add(a, "m")
    assert not again.created and again.record == first.record
    assert not reg.add(a, "m", version="5.0.0").created  # same content: nothing new
    assert len(reg.versions("m")) == 1 and len(_blob_files(home)) == 1
    blob = _blob_files(home)[0]
    assert blob.name == first.record.sha256 and blob.parent.name == blob.name[:2]
    assert blob.stat().st_mode & 0o777 == 0o444

    other = reg.add(a, "m-copy")
    assert other.created and other.record.sha256 == first.record.sha256
    assert len(_blob_files(home)) == 1
    count = reg.db.execute("SELECT COUNT(*) FROM blobs").fetchone()[0]
    assert count == 1

    b = _model(tmp_path / "b.onnx", 2)
    with pytest.raises(RegistryError, match="m:0.1.0 already exists with different content"):
        reg.add(b, "m", version="0.1.0")
    for kwargs, msg in (({"version": "1.0"}, "bad version"), ({"version": "v1.0.0"}, "bad version"),
                        ({"metrics": {"acc": "high"}}, "not a number"), ({"tags": ["a b"]}, "bad tag")):
        with pytest.raises(RegistryError, match=msg):
            reg.add(b, "m", **kwargs)
    with pytest.raises(RegistryError, match="bad model name"):
        reg.add(b, "bad/name")
    with pytest.raises(Exception, match="no such file"):
        reg.add(tmp_path / "missing.onnx", "m")
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01junk" * 10)
    with pytest.raises(Exception) as e:
        reg.add(tmp_path / "junk.bin", "m")
    assert e.value.exit_code == 2
    assert len(reg.versions("m")) == 1  # the failures left nothing behind


def test_lineage_links_upstream_and_downstream(reg, tmp_path):
    base, mid, small = (_model(tmp_path / f"{n}.onnx", i) for i, n in enumerate(("base", "mid", "small")))
    conv = lineage.make_record("convert", base, sha256_path(base), "onnx",
                               {"route": ["onnx", "onnx"], "status": "passed"})
    lineage.write_onnx_lineage(mid, conv)
    lineage.write_onnx_lineage(small, lineage.make_record(
        "optimize.quantize", mid, sha256_path(mid), "onnx", {"quantize": {"passed": True}},
        parent=conv))
    for p in (base, mid, small):
        reg.add(p, p.stem)
    assert reg.get("mid").lineage == conv
    s = reg.show("small")
    assert [x["ref"] for x in s["upstream"]] == ["mid:0.1.0"] and s["downstream"] == []
    assert [(st["step"], st["registry"], st["status"]) for st in s["lineage_steps"]] == [
        ("convert", ["base:0.1.0"], "passed"), ("optimize.quantize", ["mid:0.1.0"], "passed")]
    m = reg.show("mid")
    assert [x["ref"] for x in m["upstream"]] == ["base:0.1.0"]
    assert [x["ref"] for x in m["downstream"]] == ["small:0.1.0"]
    assert [x["ref"] for x in reg.show("base")["downstream"]] == ["mid:0.1.0"]
    assert reg.show("base")["upstream"] == []
    rows = {r["key"]: r for r in reg.compare("base:0.1.0", "small")["rows"]}
    assert rows["lineage"]["a"] == "-"
    assert rows["lineage"]["b"] == "convert(onnx->onnx) -> optimize.quantize"


def test_external_data_stored_and_materialized(reg, home, tmp_path):
    import onnxruntime as ort

    (tmp_path / "src").mkdir()
    m = _model(tmp_path / "src" / "ext.onnx", 5, external=True)
    r = reg.add(m, "ext").record
    assert sorted(r.files) == ["ext.onnx", "ext.onnx.data"] and len(_blob_files(home)) == 2
    assert r.sha256 == listing_sha256(r.files) != r.files["ext.onnx"]["sha256"]
    assert r.size == sum(f["size"] for f in r.files.values())
    out = reg.materialize(reg.get("ext"), tmp_path / "out")
    assert out == tmp_path / "out" / "ext.onnx" and (tmp_path / "out" / "ext.onnx.data").is_file()
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    want = ort.InferenceSession(str(m)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    assert not reg.add(m, "ext").created


def test_materialize_detects_corrupted_and_missing_blobs(reg, home, tmp_path):
    r = reg.add(_model(tmp_path / "a.onnx", 1), "m").record
    blob = open_blob_store().path(r.sha256)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="blob of a.onnx is corrupted") as e:
        reg.materialize(r, tmp_path / "out")
    assert e.value.exit_code == 2 and not (tmp_path / "out" / "a.onnx").exists()
    blob.unlink()
    with pytest.raises(RegistryError, match="blob of a.onnx is missing"):
        reg.materialize(r, tmp_path / "out")


def test_promote_remove_retain_with_tombstones(reg, home, tmp_path):
    paths = [_model(tmp_path / f"v{i}.onnx", 10 + i) for i in range(5)]
    for p in paths:
        reg.add(p, "m")
    reg.add(paths[0], "keeper")  # shares v0's blob
    sizes = {f"m:0.1.{i}": p.stat().st_size for i, p in enumerate(paths)}
    assert reg.promote("m", "0.1.1", "production").stage == "production"
    reg.promote("m", "0.1.2", "staging")
    reg.promote("m", "0.1.0", "archived")
    reg.promote("m", "0.1.4", "production")  # no automatic demotion
    assert reg.get("m", "0.1.1").stage == "production"
    with pytest.raises(RegistryError, match="bad stage"):
        reg.promote("m", "0.1.3", "removed")
    with pytest.raises(RegistryError, match="in production"):
        reg.remove("m", "0.1.1")

    res = reg.retain("m", 1)
    assert res.removed == ["m:0.1.3", "m:0.1.0"] and res.kept == ["m:0.1.2", "m:0.1.1"]
    # v0's blob is still needed by keeper:0.1.0, so only v3's bytes were freed
    assert res.freed_bytes == sizes["m:0.1.3"] and res.blobs_deleted == 1
    assert len(_blob_files(home)) == 4
    tomb = reg.get("m", "0.1.0")
    assert tomb.removed and tomb.stage == "removed" and tomb.files and tomb.lineage is None
    assert [e["action"] for e in reg.events("m", "0.1.0")] == ["add", "promote", "remove"]
    assert reg.events("m", "0.1.0")[-1]["details"] == {"stage": "archived", "by": "retain --keep 1"}
    s = reg.show("m", "0.1.0")
    assert s["record"]["removed"] and s["record"]["removed_at"]
    with pytest.raises(RegistryError, match="removed .*files are gone"):
        reg.materialize(tomb, tmp_path / "out")
    with pytest.raises(RegistryError, match="already removed"):
        reg.remove("m", "0.1.0")
    with pytest.raises(RegistryError, match="was removed"):
        reg.promote("m", "0.1.0", "dev")

    res = reg.remove("m", "0.1.1", force=True)
    assert res.removed == ["m:0.1.1"] and res.freed_bytes == sizes["m:0.1.1"]
    assert [v.version for v in reg.versions("m")] == ["0.1.2", "0.1.4"]
    assert len(reg.versions("m", include_removed=True)) == 5
    assert reg.add(_model(tmp_path / "new.onnx", 99), "m").record.version == "0.1.5"
    # a removed model added again becomes a new version (the tombstone keeps its number)
    assert reg.add(paths[3], "m").record.version == "0.1.6"
    assert reg.retain("m", 10).removed == []


def test_attach_bench_reports_show_and_compare(reg, tmp_path):
    from edgeops.bench.measure import Settings, bench

    a, b = _model(tmp_path / "a.onnx", 1), _model(tmp_path / "b.onnx", 2)
    reg.add(a, "m", metrics={"accuracy": 0.9})
    reg.add(b, "m", metrics={"accuracy": 0.95})
    measured = bench(a, settings=Settings(runs=10, warmup=1)).to_dict()
    predicted = bench(b, target="rpi4", predict=True).to_dict()
    assert reg.attach("m", "0.1.0", None, measured) == {"ref": "m:0.1.0", "id": 1, "kind": "bench",
                                                        "key": "host"}
    assert reg.attach("m", "0.1.1", None, predicted)["key"] == "rpi4"
    with pytest.raises(RegistryError, match="measured another model"):
        reg.attach("m", "0.1.1", "bench", measured)
    with pytest.raises(RegistryError, match="cannot tell what kind"):
        reg.attach("m", "0.1.1", None, {"loss": 1})
    reg.attach("m", "0.1.1", "evaluation", {"loss": 1}, key="holdout")
    assert [x["kind"] for x in reg.attachments("m", "0.1.1")] == ["bench", "evaluation"]
    assert reg.attachments("m", "0.1.0", "bench")[0]["data"] == measured
    assert reg.show("m", "0.1.0")["attachments"][0]["key"] == "host"
    assert [e["action"] for e in reg.events("m", "0.1.1")] == ["add", "attach", "attach"]

    d = reg.compare("m:0.1.0", "m:0.1.1")
    rows = {r["key"]: r for r in d["rows"]}
    assert d["a"] == "m:0.1.0" and d["b"] == "m:0.1.1"
    assert rows["metric accuracy"]["delta"] == pytest.approx(0.05)
    assert rows["latency host p50 ms"]["a"] == measured["measurement"]["latency_ms"]["p50"]
    assert rows["latency host p50 ms"]["b"] is None
    assert rows["latency rpi4 p50 ms (predicted)"]["b"] == predicted["prediction"]["p50_ms"]
    assert rows["size"]["delta"] == 0 and rows["format"]["a"] == "onnx"


def test_bundle_counters_and_records(reg, tmp_path):
    assert [reg.next_bundle_counter("m") for _ in range(3)] == [1, 2, 3]
    # one sequence for every model: an old bundle of another model can never look newer
    assert reg.next_bundle_counter("other") == 4
    reg.add(_model(tmp_path / "a.onnx"), "m")
    reg.record_bundle("m", "0.1.0", "rpi4", 3, "ab" * 32, tmp_path / "m.bundle",
                      "2030-01-01T00:00:00+00:00", ["key1"])
    b = reg.show("m")["bundles"]
    assert b[0]["counter"] == 3 and b[0]["keyids"] == ["key1"] and b[0]["target"] == "rpi4"
    assert reg.events("m")[-1]["action"] == "bundle"
    with pytest.raises(RegistryError):
        reg.record_bundle("m", "9.9.9", "rpi4", 4, "ab" * 32, "x", None, [])
    # an explicit counter above the sequence moves it on
    reg.record_bundle("m", "0.1.0", "rpi4", 40, "cd" * 32, tmp_path / "m2.bundle", None, [])
    assert reg.next_bundle_counter("m") == 41


def test_storage_urls(home, tmp_path, monkeypatch):
    for url in ("postgresql://db/registry", "sqlite://host/x.db"):
        with pytest.raises(RegistryError, match="sqlite://") as e:
            open_registry(url)
        assert e.value.exit_code == 2
    with pytest.raises(RegistryError, match=r"only file:// is implemented"):
        open_blob_store("s3://bucket/blobs")
    monkeypatch.setenv("EDGEOPS_REGISTRY_URL", "mysql://x")
    with pytest.raises(RegistryError, match="unsupported registry URL 'mysql://x'"):
        open_registry()
    monkeypatch.setenv("EDGEOPS_REGISTRY_URL", f"sqlite://{tmp_path}/elsewhere/r.db")
    monkeypatch.setenv("EDGEOPS_BLOBS_URL", (tmp_path / "store").as_uri())
    with open_registry() as r:
        rec = r.add(_model(tmp_path / "a.onnx"), "m").record
        url = r.db.execute("SELECT url FROM blobs").fetchone()[0]
    assert (tmp_path / "elsewhere" / "r.db").is_file() and not (home / "registry.db").exists()
    assert url == (tmp_path / "store" / "sha256" / rec.sha256[:2] / rec.sha256).as_uri()


_WORKER = """
import sys, time
from pathlib import Path
from edgeops.registry import open_registry
go, mine, shared = Path(sys.argv[1]), sys.argv[2:7], sys.argv[7]
Path(mine[0] + ".ready").touch()
while not go.exists():
    time.sleep(0.005)
reg = open_registry()
for i, p in enumerate(mine):
    print("add", reg.add(p, "conc").record.version)
    print("shared", reg.add(shared, "conc").record.version)
    print("counter", reg.next_bundle_counter("conc"))
    print("counter", reg.next_bundle_counter("conc"))
"""


def test_concurrent_processes_serialize(home, tmp_path):
    n_proc, per = 6, 5
    shared = _model(tmp_path / "shared.onnx", 99_999)
    models = [[_model(tmp_path / f"p{p}_{i}.onnx", p * 100 + i) for i in range(per)]
              for p in range(n_proc)]
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(go), *map(str, ms), str(shared)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "EDGEOPS_HOME": str(home)})
             for ms in models]
    deadline = time.monotonic() + 60
    while not all(Path(f"{ms[0]}.ready").exists() for ms in models) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # all processes imported and waiting: they start writing together
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    lines = [line.split() for out, _ in outs for line in out.splitlines()]
    counters = sorted(int(v) for k, v in lines if k == "counter")
    assert counters == list(range(1, 2 * n_proc * per + 1))

    with open_registry() as reg:
        vs = reg.versions("conc")
        assert sorted((int(v.version.split(".")[2]) for v in vs)) == list(range(n_proc * per + 1))
        assert len({v.sha256 for v in vs}) == len(vs) == n_proc * per + 1
        added = [v for k, v in lines if k == "add"]
        assert len(added) == len(set(added)) == n_proc * per
        # every concurrent add of the shared file got the same, single version
        assert {v for k, v in lines if k == "shared"} == {
            v.version for v in vs if v.sha256 == sha256_path(shared)}
        assert reg.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert len(_blob_files(home)) == n_proc * per + 1
    assert not [p for p in (home / "blobs").rglob(".tmp-*")]
    db = sqlite3.connect(home / "registry.db")
    assert db.execute("SELECT COUNT(*) FROM events WHERE action = 'add'").fetchone()[0] == len(vs)
    db.close()


# ----------------------------------------------------------------------------- CLI

def _run(*args):
    r = CliRunner().invoke(cli, ["registry", *map(str, args)])
    return r.exit_code, r.output


def test_cli_wiring_and_exit_codes(home, tmp_path):
    from edgeops.bench.measure import Settings, bench

    a, b = _model(tmp_path / "a.onnx", 1), _model(tmp_path / "b.onnx", 2)
    code, out = _run("add", a, "--name", "m", "--metric", "acc=0.9", "--tag", "x", "--json")
    assert code == 0, out
    d = json.loads(out)
    assert d["ref"] == "m:0.1.0" and d["created"] is True and d["metrics"] == {"acc": 0.9}
    code, out = _run("add", a, "--name", "m", "--json")
    assert code == 0 and json.loads(out)["created"] is False
    code, out = _run("add", b, "--name", "m", "--version", "1.0.0")
    assert code == 0 and "added m:1.0.0" in out
    for args, needle in ((("add", tmp_path / "nope.onnx", "--name", "m"), "no such file"),
                         (("add", b, "--name", "m", "--metric", "acc=high"), "not a number"),
                         (("add", b, "--name", "m", "--metric", "acc"), "KEY=VALUE"),
                         (("add", b, "--name", "m", "--version", "1.2"), "bad version"),
                         (("show", "m:9.9.9"), "no version 9.9.9"),
                         (("show", "nope"), "no model named"),
                         (("promote", "m", "--stage", "staging"), "name the version"),
                         (("attach", "m:1.0.0", a), "not JSON"),
                         (("remove", "m:1.0.0", "--keep", "1"), "--keep applies to a NAME")):
        code, out = _run(*args)
        assert code == 2, (args, out)
        assert needle in out and "Traceback" not in out

    code, out = _run("promote", "m:1.0.0", "--stage", "production")
    assert code == 0 and "production" in out
    code, out = _run("remove", "m:1.0.0")
    assert code == 2 and "in production" in out
    rep = tmp_path / "bench.json"
    rep.write_text(json.dumps(bench(b, settings=Settings(runs=5, warmup=1)).to_dict()))
    code, out = _run("attach", "m:1.0.0", rep, "--json")
    assert code == 0 and json.loads(out)["kind"] == "bench"

    code, out = _run("list", "--json")
    assert code == 0 and json.loads(out)[0] == {
        "name": "m", "latest": "1.0.0", "stage": "production", "versions": 2, "removed": 0,
        "created": json.loads(out)[0]["created"]}
    code, out = _run("list", "m", "--json")
    assert code == 0 and [v["version"] for v in json.loads(out)] == ["0.1.0", "1.0.0"]
    code, out = _run("compare", "m:0.1.0", "m:1.0.0", "--json")
    assert code == 0 and any(r["key"] == "latency host p50 ms" for r in json.loads(out)["rows"])
    code, out = _run("compare", "m:0.1.0", "m:1.0.0")
    assert code == 0 and "latency host p50 ms" in out
    code, out = _run("show", "m:1.0.0")
    assert code == 0 and "bench" in out and "history" in out

    code, out = _run("remove", "m:1.0.0", "--force", "--json")
    assert code == 0 and json.loads(out)["removed"] == ["m:1.0.0"]
    code, out = _run("remove", "m", "--keep", "0")
    assert code == 0 and "removed m:0.1.0: freed" in out
    code, out = _run("show", "m:0.1.0", "--json")
    assert code == 0 and json.loads(out)["record"]["removed"] is True
    code, out = _run("show", "m:0.1.0")
    assert code == 0 and "files are gone" in out
    code, out = _run("list", "--all")
    assert code == 0 and "2 removed" in out
    assert not _blob_files(home)
