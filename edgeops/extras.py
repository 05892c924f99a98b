"""Optional dependency groups ("extras") and the one place heavy frameworks are imported.

`available()` answers without importing anything (importlib.util.find_spec), so listing
the conversion matrix stays fast. `require()` imports a framework module on demand and
turns an ImportError into MissingExtraError with the pip command that fixes it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

from .errors import MissingExtraError

# extra name -> modules that must import for the extra to count as installed
EXTRAS: dict[str, tuple[str, ...]] = {
    "sklearn": ("sklearn", "skl2onnx"),
    "tensorflow": ("tensorflow", "tf2onnx", "h5py"),
    "torch": ("torch", "onnxscript", "onnx2torch", "torch_pruning"),
    "coreml": ("coremltools",),
    # onnx2tf itself must be installed with --no-deps (it pins old numpy/onnx/protobuf
    # and a second TensorFlow); the rest install normally
    "onnx2tf": ("onnx2tf", "tensorflow", "ai_edge_litert", "onnx_graphsurgeon", "sng4onnx", "psutil"),
    "tflite": ("ai_edge_litert",),
}

# module -> the extra that provides it (for error messages)
MODULE_EXTRA: dict[str, str] = {m: e for e, mods in EXTRAS.items() for m in mods}
MODULE_EXTRA.update({"tf_keras": "tensorflow", "keras": "tensorflow", "joblib": "sklearn"})


def _spec_present(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available(extra: str) -> bool:
    """True when every module of the extra can be found (nothing is imported)."""
    return all(_spec_present(m) for m in EXTRAS[extra])


def missing_modules(extra: str) -> list[str]:
    return [m for m in EXTRAS[extra] if not _spec_present(m)]


def _quiet_frameworks() -> None:
    # TensorFlow and coremltools print pages of log lines on import; users asked for
    # a conversion, not for that.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def require(module: str, extra: str | None = None, what: str | None = None) -> ModuleType:
    """Import `module` or raise MissingExtraError naming the extra to install."""
    extra = extra or MODULE_EXTRA.get(module.split(".")[0], "all")
    _quiet_frameworks()
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(extra, module.split(".")[0], what) from exc
