"""The pickle gate: many payload styles refused, none executed; legit files load.

Every payload would create a marker file if it ran; each test asserts the marker is
absent afterwards. `test_payloads_really_are_payloads` proves each one does create it
when loaded without the gate, so the refusals are not vacuous."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib

import joblib
import numpy as np
import pytest

from edgeops import formats as F
from edgeops import safety
from edgeops.errors import FormatError, UnsafePickleError


def _reduce(fn, *args):
    class P:
        def __reduce__(self):
            return (fn, args)
    return P()


def _u(s: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4+)."""
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def _touch_call(marker: str) -> bytes:
    """Protocol 4 ops that call posix.system('touch MARKER') and leave its result."""
    return _u("posix") + _u("system") + b"\x93" + _u(f"touch {marker}") + b"\x85R"


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
        "subprocess.check_output p3": pickle.dumps(_reduce(subprocess.check_output, ["touch", marker]),
                                                   protocol=3),
        "builtins.eval p1": pickle.dumps(_reduce(builtins.eval, code), protocol=1),
        "builtins.exec p5": pickle.dumps(_reduce(builtins.exec, code), protocol=5),
        # protocol 0 text opcodes: GLOBAL + REDUCE, and INST
        "protocol0 GLOBAL": f"cos\nsystem\n(V{touch}\ntR.".encode(),
        "protocol0 INST": f"(V{touch}\nios\nsystem\n.".encode(),
        # Python 2 module names are mapped by the unpickler: __builtin__ -> builtins
        "protocol0 __builtin__.eval": f"c__builtin__\neval\n(V{code}\ntR.".encode(),
        # getattr(__import__('os'), 'system')('touch ...'), all from builtins
        "getattr + __import__ chain": (
            b"\x80\x02cbuiltins\ngetattr\ncbuiltins\n__import__\nX\x02\x00\x00\x00os\x85R"
            b"X\x06\x00\x00\x00system\x86R"
            + b"X" + struct.pack("<I", len(touch)) + touch.encode() + b"\x85R."),
        # STACK_GLOBAL whose strings come back from the memo, not from the adjacent pushes
        "memo STACK_GLOBAL": (
            b"\x80\x04" + _u("posix") + b"\x94" + _u("system") + b"\x94" + b"0" + b"0"
            + b"h\x00h\x01\x93" + _u(touch) + b"\x85R."),
        # the same with PUT/GET text opcodes and BINPUT/BINGET mixed
        "memo PUT + BINGET": (
            b"\x80\x04" + _u("posix") + b"p7\n" + _u("system") + b"q\x09" + b"00"
            + b"g7\nh\x09\x93" + _u(touch) + b"\x85R."),
        # the module name is computed at load time (str('posix')): cannot be judged statically
        "computed STACK_GLOBAL name": (
            b"\x80\x04" + _u("builtins") + _u("str") + b"\x93" + _u("posix") + b"\x85R"
            + _u("system") + b"\x93" + _u(touch) + b"\x85R."),
    }
    return p


def _check_refused(path, marker, match="refusing to load"):
    with pytest.raises(UnsafePickleError, match=match) as info:
        safety.require_safe_pickle(path)
    assert "--trust-pickle" in (info.value.hint or "")
    with pytest.raises(UnsafePickleError):
        safety.safe_load(path)
    assert not os.path.exists(marker), "the payload ran"


def _joblib_desync(marker: str, via_newobj: bool) -> bytes:
    """A hand-made joblib stream: a NumpyArrayWrapper of 2 raw bytes, b'C' + len(P), then P.

    joblib reads the 2 bytes as array data and then runs P (posix.system). A scanner that
    does not know joblib's format reads them as SHORT_BINBYTES and swallows P as data."""
    P = _touch_call(marker)
    if via_newobj:   # the wrapper built by a listed helper instead of NEWOBJ
        wrapper = (_u("sklearn.neighbors._ball_tree") + _u("newObj") + b"\x93"
                   + _u("joblib.numpy_pickle") + _u("NumpyArrayWrapper") + b"\x93\x85R")
    else:
        wrapper = _u("joblib.numpy_pickle") + _u("NumpyArrayWrapper") + b"\x93)\x81"
    dtype = (_u("numpy") + _u("dtype") + b"\x93" + _u("u1") + b"\x89\x88\x87R"
             + b"(K\x03" + _u("|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    state = (b"}(" + _u("subclass") + _u("numpy") + _u("ndarray") + b"\x93"
             + _u("shape") + b"K\x02\x85" + _u("order") + _u("C")
             + _u("dtype") + dtype + _u("allow_mmap") + b"\x89u")
    return b"\x80\x04" + wrapper + state + b"b" + b"C" + bytes([len(P)]) + P + b"0."


def test_payload_styles_are_refused_and_never_run(tmp_path):
    marker = str(tmp_path / "MARKER")
    for i, (name, data) in enumerate(payloads(marker).items()):
        p = tmp_path / f"{i}.pkl"
        p.write_bytes(data)
        scan = safety.scan_pickle(p)
        assert safety.unsafe_globals(scan), name
        _check_refused(p, marker)


def test_refusal_names_the_globals(tmp_path):
    marker = str(tmp_path / "MARKER")
    cases = {"os.system p2": "posix.system", "subprocess.Popen p4": "subprocess.Popen",
             "builtins.exec p5": "builtins.exec", "protocol0 __builtin__.eval": "builtins.eval",
             "memo STACK_GLOBAL": "posix.system",
             "getattr + __import__ chain": "builtins.getattr, builtins.__import__",
             "computed STACK_GLOBAL name": "a global whose name is computed at load time"}
    data = payloads(marker)
    for name, expected in cases.items():
        p = tmp_path / "x.pkl"
        p.write_bytes(data[name])
        with pytest.raises(UnsafePickleError) as info:
            safety.require_safe_pickle(p)
        msg = str(info.value)
        assert msg.startswith(f"refusing to load x.pkl: it references {expected}"), msg
        assert "(not on the allow-list); a pickle runs code when it is loaded" in msg
    # many offenders: at most four are listed
    many = b"".join(pickle.dumps(_reduce(f, "x"), protocol=2)
                    for f in (os.system, eval, exec, os.remove, os.rmdir, os.unlink))
    p = tmp_path / "many.pkl"
    p.write_bytes(many)
    with pytest.raises(UnsafePickleError, match=r"and \d more \(not on the allow-list\)"):
        safety.require_safe_pickle(p)
    assert not os.path.exists(marker)


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
    for via_newobj in (False, True):
        p = tmp_path / "desync.joblib"
        p.write_bytes(_joblib_desync(marker, via_newobj))
        joblib.load(p)
        assert os.path.exists(marker), "the joblib desync file is not a working payload"
        os.remove(marker)


def test_payload_hidden_behind_joblib_array_bytes(tmp_path):
    """joblib reads raw array bytes itself; the scan must skip exactly those bytes and see
    what follows -- with the static check alone, no unpickler involved."""
    marker = str(tmp_path / "MARKER")
    obj = {"weights": np.arange(1000, dtype=np.float64), "evil": _reduce(os.system, f"touch {marker}")}
    p = tmp_path / "hidden.joblib"
    joblib.dump(obj, p)
    scan = safety.scan_pickle(p)
    assert scan.complete and scan.arrays == 1 and ("posix", "system") in scan.globals
    _check_refused(p, marker, match="posix.system")
    for via_newobj, match in ((False, "posix.system"), (True, "array wrapper passed to sklearn")):
        p = tmp_path / f"desync_{via_newobj}.joblib"
        p.write_bytes(_joblib_desync(marker, via_newobj))
        _check_refused(p, marker, match=match)


def test_restricted_unpickler_is_a_second_line(tmp_path, monkeypatch):
    """If the static walk ever missed a global, the unpickler's find_class still refuses it."""
    marker = str(tmp_path / "MARKER")
    p = tmp_path / "evil.joblib"
    p.write_bytes(payloads(marker)["posix.system p5"])
    monkeypatch.setattr(safety, "unsafe_globals", lambda *a, **k: [])
    with pytest.raises(UnsafePickleError, match="posix.system"):
        safety.safe_load(p)
    assert not os.path.exists(marker)


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
    for compress in (0, 3, "gzip", "bz2", "xz", "lzma"):
        p = tmp_path / f"poisoned_{compress}.joblib"
        joblib.dump(pipe, p, compress=compress)
        assert F.detect(p).id == "sklearn"
        with pytest.raises(UnsafePickleError, match=r"posix\.system"):
            F.runner(p).run({"X": X[:2].astype(np.float32)})
        _check_refused(p, str(marker), match=r"posix\.system")
    # the same estimator as a plain pickle, protocols 0 and 5
    for proto in (0, 5):
        p = tmp_path / f"poisoned_p{proto}.pkl"
        p.write_bytes(pickle.dumps(pipe, protocol=proto))
        _check_refused(p, str(marker), match=r"posix\.system")
    assert not marker.exists()


def test_compressed_payloads(tmp_path):
    marker = str(tmp_path / "MARKER")
    data = payloads(marker)["os.system p2"]
    for name, blob in {"gz": gzip.compress(data), "zlib": zlib.compress(data),
                       "gz-2-members": gzip.compress(pickle.dumps([1, 2])) + gzip.compress(data)}.items():
        p = tmp_path / f"evil.{name}"
        p.write_bytes(blob)
        _check_refused(p, marker, match="posix.system")


def test_detection_routes_unsafe_pickles_to_the_gate(tmp_path):
    marker = str(tmp_path / "MARKER")
    data = payloads(marker)
    for name in ("builtins.exec p5", "protocol0 GLOBAL", "computed STACK_GLOBAL name"):
        p = tmp_path / "model.onnx"         # misleading name
        p.write_bytes(data[name])
        assert F.detect(p).id == "sklearn", name
        with pytest.raises(UnsafePickleError):
            F.runner(p)
    assert not os.path.exists(marker)


def test_plain_data_pickle_is_refused_as_not_a_model(tmp_path):
    p = tmp_path / "data.pkl"
    p.write_bytes(pickle.dumps({"a": [1, 2, 3], "w": np.ones(3)}))
    with pytest.raises(FormatError, match="neither"):
        F.detect(p)


def test_truncated_and_corrupt_files(tmp_path):
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    X, y = load_iris(return_X_y=True)
    rf = RandomForestClassifier(n_estimators=3, random_state=0).fit(X, y)
    for compress in (0, 3):
        p = tmp_path / f"rf{compress}.joblib"
        joblib.dump(rf, p, compress=compress)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        with pytest.raises(FormatError, match="truncated or corrupt") as info:
            safety.safe_load(p)
        assert not isinstance(info.value, UnsafePickleError)
    p = tmp_path / "old.joblib"
    p.write_bytes(b"ZF0x1234           " + zlib.compress(b"x"))
    with pytest.raises(FormatError, match="before joblib 0.9.3"):
        safety.safe_load(p)


def test_legit_files_load_and_trust_overrides(tmp_path):
    from fractions import Fraction

    from sklearn.datasets import load_iris
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import KBinsDiscretizer

    X, y = load_iris(return_X_y=True)
    rf = RandomForestClassifier(n_estimators=3, random_state=0).fit(X, y)
    for compress in (0, 3, "gzip", "bz2", "xz", "lzma"):
        p = tmp_path / f"rf_{compress}.joblib"
        joblib.dump(rf, p, compress=compress)
        scan = safety.require_safe_pickle(p)
        assert scan.complete and scan.arrays > 0 and scan.references("sklearn")
        assert np.array_equal(safety.safe_load(p).predict(X), rf.predict(X))
    for proto in range(6):
        p = tmp_path / f"rf_p{proto}.pkl"
        p.write_bytes(pickle.dumps(rf, protocol=proto))
        assert np.array_equal(safety.safe_load(p).predict(X), rf.predict(X)), proto
        p = tmp_path / f"rf_p{proto}.joblib"   # joblib's wrapper in every protocol
        joblib.dump(rf, p, protocol=proto)
        assert np.array_equal(safety.safe_load(p).predict(X), rf.predict(X)), proto

    # estimators whose pickles need the less obvious entries: Cython __pyx_unpickle_*,
    # the ball tree's newObj, a bit generator, structured and object arrays in joblib
    others = [HistGradientBoostingClassifier(max_iter=3).fit(X, y),
              KNeighborsClassifier(algorithm="ball_tree").fit(X, y),
              make_pipeline(KBinsDiscretizer(n_bins=3), RandomForestClassifier(2)).fit(X, y)]
    for m in others:
        p = tmp_path / "m.joblib"
        joblib.dump(m, p, compress=3)
        assert np.array_equal(safety.safe_load(p).predict(X), m.predict(X)), type(m).__name__

    # a class off the list (as a user's own class would be): loadable only when trusted
    p = tmp_path / "custom.pkl"
    p.write_bytes(pickle.dumps(Fraction(1, 3)))
    with pytest.raises(UnsafePickleError, match="fractions.Fraction"):
        safety.safe_load(p)
    assert safety.safe_load(p, trust=True) == Fraction(1, 3)
    assert safety.require_safe_pickle(p, trust=True).globals == [("fractions", "Fraction")]
    # ... or when the caller lists it (how the torch family passes its own globals)
    for extra in ([("fractions", "Fraction")], ["fractions.Fraction"], ["fractions."]):
        assert safety.safe_load(p, allow_extra=extra) == Fraction(1, 3)


def test_allow_list_rules():
    ok = safety.is_allowed
    assert ok("sklearn.linear_model._logistic", "LogisticRegression")
    assert ok("sklearn._loss._loss", "__pyx_unpickle_CyHalfMultinomialLoss")
    assert ok("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence")
    assert ok("numpy", "log1p") and ok("scipy.special._special_ufuncs", "expit")   # ufuncs
    assert ok("numpy", "float64") and ok("numpy._core.multiarray", "_reconstruct")
    assert ok("numpy.core.multiarray", "_reconstruct")
    assert ok("builtins", "set") and not ok("builtins", "getattr")
    assert not ok("sklearn.datasets", "fetch_openml")            # a function, not a class
    assert not ok("sklearn.utils", "Bunch.__init__")             # attribute chains
    assert not ok("sklearn.utils", "__builtins__")
    assert not ok("sklearn.utils.parallel", "Parallel")          # runs what it is handed
    assert not ok("sklearn.base", "defaultdict")                 # imported into, not defined in, sklearn
    assert not ok("sklearn.utils._testing", "TempMemmap")        # test helpers
    assert not ok("numpy", "memmap") and not ok("numpy", "load")
    assert not ok("joblib.numpy_pickle_compat", "NDArrayWrapper")   # np.load(allow_pickle=True)
    assert not ok("numpy", "ndarray.tofile")
    assert not ok("?", "?")
