"""Formats edgeops recognises only to refuse clearly, and the "unknown format" message.

Users point tools at whatever model file they have. Saying "this is a safetensors file:
weights only" is worth as much as a conversion; "unknown format" is
reserved for files nothing recognises, and then it says what the bytes look like.
"""

from __future__ import annotations

import json

from .base import FormatInfo, Probe

FORMATS = (
    FormatInfo("safetensors", "other", "safetensors weights file", None,
               refused="weights only, the model's code is needed: export the model to ONNX, "
                       "TorchScript or torch.export first"),
    FormatInfo("gguf", "other", "GGUF (llama.cpp) model", None,
               refused="GGUF models run in llama.cpp; edgeops does not convert them"),
    FormatInfo("numpy", "other", "NumPy array file (.npy/.npz)", None,
               refused="this is data, not a model (pass it with --inputs instead)"),
    FormatInfo("openvino-ir", "other", "OpenVINO IR (.xml)", None,
               refused="edgeops does not read OpenVINO IR; convert from the original model"),
    FormatInfo("tf-checkpoint", "other", "TensorFlow checkpoint", None,
               refused="weights only, the model's code is needed: save a SavedModel instead"),
    FormatInfo("onnx-text", "other", "ONNX text or JSON dump", None,
               refused="pass the binary .onnx file"),
    FormatInfo("pickle", "other", "Python pickle (not a scikit-learn or torch model)", None,
               refused="edgeops reads scikit-learn estimators and torch archives; this pickle "
                       "is neither"),
)


def detect(probe: Probe) -> str | None:
    head = probe.head
    if probe.is_dir:
        names = {p.name for p in probe.path.iterdir()}
        if "checkpoint" in names or any(n.endswith(".index") for n in names):
            return "tf-checkpoint"
        return None
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:6] == b"\x93NUMPY":
        return "numpy"
    if probe.is_zip and probe.zip_names and all(n.endswith(".npy") for n in probe.zip_names):
        return "numpy"
    if _is_safetensors(probe):
        return "safetensors"
    text = head.lstrip()[:200]
    if text.startswith(b"<?xml") and b"<net" in head:
        return "openvino-ir"
    if text.startswith(b"ir_version") or b'"irVersion"' in head[:400]:
        return "onnx-text"
    if probe.is_pickle:
        return "pickle"
    return None


def _is_safetensors(probe: Probe) -> bool:
    # 8-byte little-endian header length, then a JSON header
    head = probe.head
    if len(head) < 10:
        return False
    n = int.from_bytes(head[:8], "little")
    if not (2 <= n <= 100_000_000) or head[8:9] != b"{" or 8 + n > probe.size:
        return False
    if 8 + n <= len(head):
        try:
            json.loads(head[8:8 + n])
        except ValueError:
            return False
    return True


def describe_unknown(probe: Probe) -> str:
    """One line that says what the bytes look like, for the unknown-format error."""
    head = probe.head
    if probe.is_dir:
        return "unknown format: a directory that is neither a SavedModel nor a .mlpackage"
    if probe.is_zip:
        names = probe.zip_names
        if not names:
            return "corrupt or truncated zip archive"
        shown = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
        return f"unknown format: a zip archive holding {shown}"
    if probe.is_hdf5:
        return "unknown format: an HDF5 file that is not a Keras model"
    if probe.proto_fields is not None and probe.size > 16:
        return "unknown format: a protobuf message that is not ONNX, Core ML or a TensorFlow graph"
    if head[:2] in (b"\x1f\x8b",):
        return "unknown format: gzip-compressed data"
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head[:512])
    if head and printable / min(len(head), 512) > 0.95:
        first = head[:60].decode("ascii", "replace").splitlines()[0] if head else ""
        return f"unknown format: a text file starting {first!r}"
    return f"unknown format (first bytes {head[:8].hex(' ')}); truncated or not a model file?"
