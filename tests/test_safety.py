"""The pickle gate: many payload styles refused, none executed; legit files load.

Every payload would create a marker file if it ran; each test asserts the marker is
absent afterwards, through the static scan, the restricted loader and detection."""

from __future__ import annotations

import gzip
import os
import pickle
import zlib

import joblib
import numpy as np
import pytest

from edgeops import formats as F
from edgeops import safety
from edgeops.errors import UnsafePickleError


def _reduce(fn, *args):
    class P:
        def __reduce__(self):
            return (fn, args)
    return P()


def payloads(marker: str) -> dict[str, bytes]:
    import builtins
    import posix
    import subprocess

    touch = f"touch {marker}"
    code = f"open({marker!r}, 'w').close()"
    p = {
        "os.system p2": pickle.dumps(_reduce(os.system, touch), protocol=2),
        "posix.system p5": pickle.dumps(_reduce(posix.system, touch), protocol=5),
        "subprocess.Popen p4": pickle.dumps(_reduce(subprocess.Popen, ["touch", marker]), protocol=4),
        "subprocess.check_output": pickle.dumps(_reduce(subprocess.check_output, ["touch", marker])),
        "builtins.eval": pickle.dumps(_reduce(builtins.eval, code)),
        "builtins.exec": pickle.dumps(_reduce(builtins.exec, code)),
        # protocol 0 text opcodes: GLOBAL + REDUCE, and INST
        "protocol0 GLOBAL": f"cos\nsystem\n(V{touch}\ntR.".encode(),
        "protocol0 INST": f"(V{touch}\nios\nsystem\n.".encode(),
        # __import__('os').system(...) through getattr, all built from globals
        "getattr chain": (b"\x80\x02cbuiltins\ngetattr\ncbuiltins\n__import__\nX\x02\x00\x00\x00os"
                          b"\x85R" + b"X\x06\x00\x00\x00system\x86R" +
                          b"X" + len(touch).to_bytes(4, "little") + touch.encode() + b"\x85R."),
    }
    # STACK_GLOBAL whose strings come back from the memo, not from the adjacent pushes
    p["memo STACK_GLOBAL"] = (
        b"\x80\x04" + b"\x8c\x02os\x94" + b"\x8c\x06system\x94" + b"0" + b"0"
        + b"h\x00h\x01\x93" + b"\x8c" + bytes([len(touch)]) + touch.encode() + b"\x85R.")
    return p


def _check_refused(path, marker):
    with pytest.raises(UnsafePickleError, match="refusing to load"):
        safety.safe_load(path)
    with pytest.raises(UnsafePickleError):
        safety.require_safe_pickle(path)
    assert not os.path.exists(marker), "the payload ran"


def test_payload_styles_are_refused_and_never_run(tmp_path):
    marker = str(tmp_path / "MARKER")
    for name, data in payloads(marker).items():
        p = tmp_path / f"{name.replace(' ', '_')}.pkl"
        p.write_bytes(data)
        scan = safety.scan_pickle(p)
        assert safety.unsafe_globals(scan), name
        _check_refused(p, marker)


def test_payloads_really_are_payloads(tmp_path):
    """Guard against a vacuous test: each payload does run when loaded without the gate."""
    marker = str(tmp_path / "MARKER")
    for name, data in payloads(marker).items():
        try:
            obj = pickle.loads(data)
            if hasattr(obj, "wait"):   # Popen runs asynchronously
                obj.wait(timeout=30)
        except Exception:
            pass
        assert os.path.exists(marker), f"{name} is not a working payload"
        os.remove(marker)


def test_payload_inside_a_real_estimator(tmp_path):
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    marker = tmp_path / "MARKER"
    X, y = load_iris(return_X_y=True)
    pipe = make_pipeline(FunctionTransformer(np.log1p), LogisticRegression(max_iter=300)).fit(X, y)
    pipe.steps[0][1].func = os.system     # what a poisoned model looks like
    pipe.steps[0][1].kw_args = {"command": f"touch {marker}"}
    for compress in (0, 3, "gzip"):
        p = tmp_path / f"poisoned_{compress}.joblib"
        joblib.dump(pipe, p, compress=compress)
        assert F.detect(p).id == "sklearn"
        with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system"):
            F.runner(p).run({"X": X[:2].astype(np.float32)})
    assert not marker.exists()


def test_payload_after_joblib_raw_array_bytes_is_caught_at_load(tmp_path):
    """joblib writes raw array bytes between opcodes, which stops the static walk; a global
    hidden after them must still be refused by the restricted unpickler."""
    marker = tmp_path / "MARKER"
    obj = {"weights": np.arange(1000, dtype=np.float64), "evil": _reduce(os.system, f"touch {marker}")}
    p = tmp_path / "hidden.joblib"
    joblib.dump(obj, p)
    scan = safety.scan_pickle(p)
    assert not scan.complete               # the walk stopped at the array bytes
    with pytest.raises(UnsafePickleError):
        safety.safe_load(p)
    assert not marker.exists()


def test_compressed_payloads(tmp_path):
    marker = str(tmp_path / "MARKER")
    data = payloads(marker)["os.system p2"]
    for name, blob in {"gz": gzip.compress(data), "zlib": zlib.compress(data)}.items():
        p = tmp_path / f"evil.{name}"
        p.write_bytes(blob)
        _check_refused(p, marker)


def test_detection_routes_unsafe_pickles_to_the_gate(tmp_path):
    marker = str(tmp_path / "MARKER")
    p = tmp_path / "model.onnx"         # misleading name
    p.write_bytes(payloads(marker)["builtins.exec"])
    assert F.detect(p).id == "sklearn"
    with pytest.raises(UnsafePickleError):
        F.runner(p)
    assert not os.path.exists(marker)


def test_plain_data_pickle_is_refused_as_not_a_model(tmp_path):
    from edgeops.errors import FormatError

    p = tmp_path / "data.pkl"
    p.write_bytes(pickle.dumps({"a": [1, 2, 3]}))
    with pytest.raises(FormatError, match="neither"):
        F.detect(p)


def test_legit_files_load_and_trust_overrides(tmp_path):
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    X, y = load_iris(return_X_y=True)
    rf = RandomForestClassifier(n_estimators=3, random_state=0).fit(X, y)
    for compress in (0, 3, "gzip", "bz2", "xz"):
        p = tmp_path / f"rf_{compress}.joblib"
        joblib.dump(rf, p, compress=compress)
        m = safety.safe_load(p)
        assert np.array_equal(m.predict(X), rf.predict(X))
    p = tmp_path / "rf.pkl"
    p.write_bytes(pickle.dumps(rf, protocol=5))
    assert type(safety.safe_load(p)).__name__ == "RandomForestClassifier"

    # a class off the list (as a user's own class would be): loadable only when trusted
    from fractions import Fraction

    p = tmp_path / "custom.pkl"
    p.write_bytes(pickle.dumps(Fraction(1, 3)))
    with pytest.raises(UnsafePickleError, match="fractions.Fraction"):
        safety.safe_load(p)
    assert safety.safe_load(p, trust=True) == Fraction(1, 3)


def test_sklearn_functions_are_not_classes():
    assert safety.is_allowed("sklearn.linear_model._logistic", "LogisticRegression")
    assert safety.is_allowed("numpy", "log1p")                  # a ufunc
    assert not safety.is_allowed("sklearn.datasets", "fetch_openml")   # a function
    assert not safety.is_allowed("numpy", "memmap")
    assert not safety.is_allowed("numpy", "load")
    assert not safety.is_allowed("sklearn.utils", "__builtins__")
