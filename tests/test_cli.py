"""CLI wiring: exact exit codes, one-line errors (no tracebacks), --json, start-up imports,
and missing extras simulated by hiding the framework module in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_core import _linear_onnx

HEAVY = ("torch", "tensorflow", "coremltools", "keras", "tf2onnx", "skl2onnx", "sklearn", "tf_keras")


def edgeops(*args, env=None, cwd=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "edgeops", *map(str, args)],
                          capture_output=True, text=True, env=e, cwd=cwd, timeout=300)


def test_startup_imports_no_framework():
    code = ("import sys, edgeops, edgeops.cli; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    imp = subprocess.run([sys.executable, "-X", "importtime", "-c", "import edgeops.cli"],
                         capture_output=True, text=True, check=True).stderr
    loaded = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in imp.splitlines() if "|" in line}
    assert not loaded & set(HEAVY)


def test_help_and_formats_import_no_framework():
    r = edgeops("--help")
    assert r.returncode == 0 and "convert" in r.stdout
    code = ("import sys; from click.testing import CliRunner; from edgeops.cli import cli; "
            "r = CliRunner().invoke(cli, ['formats', '--json']); assert r.exit_code == 0, r.output; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_formats_json_matrix():
    r = edgeops("formats", "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    row = {x["from"]: x for x in m["matrix"]}
    assert row["onnx"]["to"]["mlpackage"]["route"] == ["onnx", "torchscript", "mlpackage"]
    assert row["sklearn"]["to"]["onnx"]["hops"] == 1
    assert any(f["id"] == "torch-state-dict" for f in m["refused"])


@pytest.mark.parametrize("content,code,needle", [
    (None, 2, "no such file"),
    (b"", 2, "empty"),
    (b"\x00" * 3 + b"garbage" * 20, 2, "unknown format"),
])
def test_bad_input_one_line_exit_2(tmp_path, content, code, needle):
    p = tmp_path / "model.onnx"
    if content is not None:
        p.write_bytes(content)
    for cmd in (["inspect", p], ["convert", p, "-o", tmp_path / "out.onnx"]):
        r = edgeops(*cmd)
        assert r.returncode == code, r.stderr
        assert needle in r.stderr and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[0].startswith("error:")


def test_truncated_onnx_exit_2(tmp_path):
    p = _linear_onnx(tmp_path / "m.onnx")
    t = tmp_path / "t.onnx"
    t.write_bytes(p.read_bytes()[:40])
    r = edgeops("inspect", t)
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr


def test_inspect_json(tmp_path):
    p = _linear_onnx(tmp_path / "m.onnx", with_if=True)
    r = edgeops("inspect", p, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "onnx" and info["params"] == 25


def test_usage_errors_exit_2(tmp_path):
    p = _linear_onnx(tmp_path / "m.onnx")
    assert edgeops("convert", p).returncode == 2                       # -o missing
    r = edgeops("convert", p, "-o", tmp_path / "x.weird")
    assert r.returncode == 2 and "cannot tell the target format" in r.stderr
    r = edgeops("convert", p, "-o", tmp_path / "x.onnx")
    assert r.returncode == 2 and "already onnx" in r.stderr
    r = edgeops("convert", p, "-o", tmp_path / "x.pt", "--shape", "x=a")
    assert r.returncode == 2 and "--shape" in r.stderr


def _shadow(tmp_path: Path, module: str) -> dict:
    """A directory that hides `module`: importing it raises ImportError, as when absent."""
    d = tmp_path / "shadow"
    (d / module).mkdir(parents=True)
    (d / module / "__init__.py").write_text(f'raise ImportError("No module named {module!r}")\n')
    return {"PYTHONPATH": f"{d}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_missing_extra_exit_3(tmp_path):
    p = _linear_onnx(tmp_path / "m.onnx")
    r = edgeops("convert", p, "-o", tmp_path / "m.pt", env=_shadow(tmp_path, "torch"))
    assert r.returncode == 3, r.stderr
    assert "pip install 'edgeops[torch]'" in r.stderr and "Traceback" not in r.stderr


def test_missing_sklearn_extra_exit_3(tmp_path):
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True)
    p = tmp_path / "lr.joblib"
    joblib.dump(LogisticRegression(max_iter=300).fit(X, y), p)
    r = edgeops("inspect", p, env=_shadow(tmp_path, "sklearn"))
    assert r.returncode == 3, r.stderr
    assert "pip install 'edgeops[sklearn]'" in r.stderr and "Traceback" not in r.stderr


def test_inputs_that_do_not_fit_exit_2(tmp_path):
    import numpy as np

    p = _linear_onnx(tmp_path / "m.onnx")
    np.savez(tmp_path / "wrong.npz", x=np.zeros((3, 5), np.float32))   # the model takes [N, 4]
    r = edgeops("convert", p, "-o", tmp_path / "m.pt", "--inputs", tmp_path / "wrong.npz")
    assert r.returncode == 2, r.stderr
    assert "the model fails on the given inputs" in r.stderr and "Traceback" not in r.stderr
