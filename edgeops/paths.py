"""Where edgeops keeps its state: $EDGEOPS_HOME, default ~/.edgeops."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

REPO_TARGETS = Path(__file__).resolve().parents[1] / "targets"


def home() -> Path:
    """The state folder (created on first use by whoever writes to it)."""
    env = os.environ.get("EDGEOPS_HOME")
    return Path(env).expanduser() if env else Path.home() / ".edgeops"


_CWD_LOCK = threading.Lock()


@contextlib.contextmanager
def scratch_cwd():
    """Run a third-party call that drops files in the working directory inside a temporary one.
    onnxruntime's symbolic shape inference saves `sym_shape_infer_temp.onnx` plus a
    uuid-named external-data file into the cwd whenever inference is incomplete (and never
    removes them): without this, every `bench --predict` or `optimize --quantize` on such a
    model leaves tens of MB in the user's folder. The cwd is process-wide, hence the lock."""
    import tempfile

    with _CWD_LOCK, tempfile.TemporaryDirectory(prefix="edgeops-scratch-") as tmp:
        before = os.getcwd()
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(before)
