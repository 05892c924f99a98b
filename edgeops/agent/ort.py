"""The one onnxruntime session factory, for the host and the device, and onnxruntime errors
made readable.

Standard library + onnxruntime only (the agent package's rule). Every session edgeops creates
for verification, evaluation or timing comes from `session`, so thread counts, log level and
provider are set the same way everywhere. `describe` turns onnxruntime's multi-line,
prefix-laden exceptions into one line that keeps the part a person can act on (the node, the
tensor, the reason). Not covered: timing (bench_runner.py, a standalone script).
"""

from __future__ import annotations

import re
from pathlib import Path

_PREFIX = re.compile(r"^(\w+: )?\s*\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*")
_LOAD = re.compile(r"Load model from .*? failed:\s*", re.S)
_IN_NODE = re.compile(r'In Node, \("([^"]*)", ([\w.]+), "[^"]*", -?\d+\) : \(.*?\) -> \(.*?\) ?, Error ')
_SRC = re.compile(r"/onnxruntime_src/\S+:\d+ ")
_NODE_RUN = re.compile(r"Non-zero status code returned while running (\S+) node\. Name:'([^']*)'")


def session(model: str | Path | bytes, threads: int | None = None, *, optimization: str = "all",
            sequential: bool = True):
    """An onnxruntime CPU session for a model path (or serialized bytes). `threads` sets the
    intra-op pool (None: onnxruntime's default), inter-op is 1; `optimization` is all, basic,
    extended or disabled."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4       # errors come back as exceptions; no second copy on stderr
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if sequential:
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    src = model if isinstance(model, (bytes, bytearray)) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def describe(exc: BaseException, limit: int = 400) -> str:
    """One line from an onnxruntime exception: error-code prefix, 'Load model from ...' and
    'This is an invalid model.' removed, whitespace collapsed."""
    text = str(exc).strip() or type(exc).__name__
    text = _PREFIX.sub("", text)
    text = _LOAD.sub("", text)
    text = text.replace("This is an invalid model.", "").strip()
    text = " ".join(text.split())
    text = _IN_NODE.sub(lambda m: f'node "{m.group(1)}" ({m.group(2)}): ', text)
    # kernel messages: "<source>.h:61 <C++ signature> <check> was false. <what>" -> "<what>"
    text = _SRC.sub(lambda m: "", text)
    if " was false. " in text:
        head, _, tail = text.partition(" Status Message: ")
        body = tail or head
        body = body.split(" was false. ", 1)[1]
        text = (head + " Status Message: " + body) if tail else body
    return text[:limit] + ("..." if len(text) > limit else "")


def failing_node(exc: BaseException) -> tuple[str, str] | None:
    """(op type, node name) when onnxruntime says which node failed at run time."""
    m = _NODE_RUN.search(str(exc))
    return (m.group(1), m.group(2)) if m else None
