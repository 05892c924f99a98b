"""ONNX -> TensorFlow SavedModel and ONNX -> TFLite flatbuffer with onnx2tf, offline.

onnx2tf rebuilds the graph op by op as a tf_keras model, saves it as a SavedModel and
converts that with TFLiteConverter; one run writes both, and each edge keeps its half.

What this module adds around onnx2tf:
- Layout: onnx2tf turns NCHW image inputs into NHWC by default, so the converted model
  would take different arrays than the ONNX. Every rank 3-5 input is kept in its ONNX
  layout (`keep_ncw_or_nchw_or_ncdhw_input_names`), so verify compares like with like.
- Offline: for all-NHWC fixed-batch 3-channel inputs onnx2tf downloads a calibration
  image file from GitHub (`download_test_image_data`, used only for its own internal
  sanity inference). It is replaced, for the duration of a conversion, by seeded random
  data of the same shape, so nothing touches the network.
- Quiet: onnx2tf prints banners and TensorFlow logs to stdout/stderr at the file
  descriptor level; both are captured and put into the error when a conversion fails.
- Errors: ops onnx2tf has no converter for are found before TensorFlow starts and raise
  ConversionError naming them. onnx2tf ends some failures with sys.exit(1); that is
  turned into ConversionError too.

Not covered: INT8 / dynamic-range quantized TFLite (onnx2tf can write them; use
`edgeops optimize` on the ONNX side instead), Keras .h5 / .keras output, models whose
non-batch dimensions are symbolic (onnx2tf may need `overwrite_input_shape` then),
TFLite models that need the Flex delegate (SELECT_TF_OPS) -- they convert but the
LiteRT runtime used for verification cannot run them, so the hop fails verification.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np

from .. import extras
from ..errors import ConversionError
from ..formats.onnx import walk_nodes as _walk_nodes
from .context import ConvertContext

TOOL = "onnx2tf"


# ----------------------------------------------------------------------------- preflight


def unsupported_ops(model) -> list[str]:
    """Op types onnx2tf has no converter for.

    onnx2tf looks a node's converter up as the module `onnx2tf.ops.<op_type>` whatever
    the node's domain, so the same lookup here predicts its "OP is not yet implemented"
    failure without starting TensorFlow.
    """
    bad: set[str] = set()
    for n in _walk_nodes(model.graph):
        try:
            found = importlib.util.find_spec(f"onnx2tf.ops.{n.op_type}") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            bad.add(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}")
    return sorted(bad)


def _layout_inputs(model) -> list[str]:
    """Names of rank 3-5 graph inputs, as onnx2tf spells them (':' -> '__').

    onnx2tf asserts when a name in keep_ncw_or_nchw_or_ncdhw_input_names is not rank
    3-5, so only those are listed.
    """
    inits = {t.name for t in model.graph.initializer}
    names = []
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if tt.HasField("shape") and len(tt.shape.dim) in (3, 4, 5):
            names.append(vi.name.replace(":", "__"))
    return names


# ----------------------------------------------------------------------------- plumbing

class _Log:
    text: str = ""

    def tail(self, lines: int = 15) -> str:
        keep = [ln for ln in self.text.splitlines() if ln.strip()]
        return "\n".join(keep[-lines:])

    def error_line(self) -> str | None:
        """The last line onnx2tf flagged as an error, without its colour codes."""
        for ln in reversed(self.text.splitlines()):
            clean = _strip_ansi(ln).strip()
            if clean.startswith("ERROR:"):
                return clean[len("ERROR:"):].strip()[:300]
        return None


def _strip_ansi(s: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", s)


@contextmanager
def _captured():
    """Capture Python-level and file-descriptor-level stdout/stderr.

    onnx2tf prints through print(); TensorFlow and the TFLite converter log from C++
    straight to fd 2. Redirecting the descriptors is process-wide, which is acceptable
    for a conversion (the library never prints anything itself).
    """
    log = _Log()
    text = io.StringIO()
    sink = tempfile.TemporaryFile()
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except (AttributeError, ValueError, OSError):
            pass
    saved: list[tuple[int, int]] = []
    for fd in (1, 2):
        try:
            saved.append((fd, os.dup(fd)))
            os.dup2(sink.fileno(), fd)
        except OSError:
            pass
    try:
        with redirect_stdout(text), redirect_stderr(text):
            yield log
    finally:
        for fd, dup in saved:
            os.dup2(dup, fd)
            os.close(dup)
        sink.seek(0)
        raw = sink.read().decode("utf-8", "replace")
        sink.close()
        log.text = _strip_ansi(text.getvalue() + raw)


def _local_sample_images() -> np.ndarray:
    # Stand-in for onnx2tf's downloaded calibration set (20 RGB images, 128x128, values in
    # 0..1): it only feeds onnx2tf's internal ONNX-vs-TF sanity inference, so seeded noise
    # of the same shape and range does the same job without the network.
    return np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32)


@contextmanager
def _offline():
    main = sys.modules["onnx2tf.onnx2tf"]
    saved = main.download_test_image_data
    main.download_test_image_data = _local_sample_images
    try:
        yield
    finally:
        main.download_test_image_data = saved


def _failure(src: Path, log: _Log, exc: BaseException | None) -> ConversionError:
    mod = getattr(exc, "name", "") or ""
    if isinstance(exc, ModuleNotFoundError) and mod.startswith("onnx2tf.ops."):
        op = mod.rsplit(".", 1)[1]
        return ConversionError(
            f"ONNX op {op} is not supported by onnx2tf (ONNX -> TensorFlow)",
            hint="replace the op in the model, or convert the source model to TensorFlow directly")
    if exc is not None and not isinstance(exc, SystemExit):
        reason = _reason(exc)
    else:
        reason = log.error_line() or "it stopped without writing the model"
    node = getattr(exc, "onnx_op_name", None)  # onnx2tf tags the node it was converting
    where = f" at ONNX node {node}" if node else ""
    tail = log.tail()
    return ConversionError(f"onnx2tf failed to convert {src.name}{where}: {reason}",
                           hint=("onnx2tf log:\n" + tail) if tail else None)


def _reason(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # Keras wraps op errors in 'Exception encountered when calling layer ...'; the cause
    # is on the next line
    if len(lines) > 1 and lines[0].startswith("Exception encountered when calling layer"):
        lines = lines[1:]
    return lines[0][:300] if lines else type(exc).__name__


_TF_NAME = re.compile(r"[^A-Za-z0-9_.\\/>-]")


def _tf_safe_names(model, renamed: dict | None = None) -> int:
    """Node names TensorFlow accepts as scope names (leading "/" dropped, other characters
    replaced); graph inputs and outputs whose names TensorFlow refuses (an output named by a
    JSON string) get safe names too, recorded in RENAMED (they are matched by position
    afterwards). Returns how many names changed."""
    from ..normalize import rename_tensor

    used = {n.name for n in model.graph.node}
    changed = 0
    tensors = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    for k, v in enumerate(list(model.graph.input) + list(model.graph.output)):
        if re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.\\/>-]*", v.name):
            continue
        safe = _TF_NAME.sub("_", v.name).strip("_") or f"io_{k}"
        safe = safe if re.match(r"[A-Za-z]", safe) else f"t_{safe}"
        while safe in tensors:
            safe += "_"
        tensors.add(safe)
        if renamed is not None:
            renamed[v.name] = safe
        rename_tensor(model, v.name, safe)
        changed += 1
    for k, n in enumerate(model.graph.node):
        name = _TF_NAME.sub("_", n.name.lstrip("/"))
        if name and not re.match(r"[A-Za-z0-9.]", name[0]):
            name = "n" + name
        if name != n.name:
            while name in used:
                name += "_"
            used.add(name)
            n.name = name or f"node_{k}"
            changed += 1
    return changed


def _run(src: Path, ctx: ConvertContext) -> tuple[Path, dict]:
    """Run onnx2tf once into a fresh folder under ctx.workdir; return it and the facts."""
    onnx = extras.require("onnx", "onnx2tf", "ONNX -> TensorFlow")
    with _captured():  # importing onnx2tf imports TensorFlow, which logs to fd 2
        onnx2tf = extras.require("onnx2tf", "onnx2tf", "ONNX -> TensorFlow")
        tf = extras.require("tensorflow", "onnx2tf", "ONNX -> TensorFlow")

    try:
        model = onnx.load(str(src), load_external_data=False)
    except Exception as exc:
        raise ConversionError(f"{src}: onnx cannot read the model: {exc}") from exc
    bad = unsupported_ops(model)
    if bad:
        raise ConversionError(
            f"onnx2tf cannot convert ONNX op(s) {', '.join(bad)} (ONNX -> TensorFlow)",
            hint="replace those ops in the model, or convert the source model to TensorFlow "
                 "directly")
    keep_layout = _layout_inputs(model)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    renamed: dict[str, str] = {}
    if _tf_safe_names(model, renamed):
        keep_layout = [renamed.get(n, n) for n in keep_layout] if keep_layout else keep_layout
        # TensorFlow scope names must match ^[A-Za-z0-9.][A-Za-z0-9_.\/>-]*$: torch exports
        # name nodes "/block/Conv", and onnx2tf then fails writing the SavedModel
        src = Path(tempfile.mkdtemp(prefix="onnx2tf-src-", dir=ctx.workdir)) / Path(src).name
        onnx.save(model, str(src))
    del model

    out = Path(tempfile.mkdtemp(prefix="onnx2tf-", dir=ctx.workdir))
    t0 = time.perf_counter()
    with _captured() as log:
        err: BaseException | None = None
        try:
            with _offline():
                onnx2tf.convert(
                    input_onnx_file_path=str(src),
                    output_folder_path=str(out),
                    keep_ncw_or_nchw_or_ncdhw_input_names=keep_layout or None,
                    copy_onnx_input_output_names_to_tflite=True,
                    # onnxsim runs as a subprocess that is not installed (and not needed)
                    not_use_onnxsim=True,
                    verbosity="error",
                )
        except (Exception, SystemExit) as exc:  # onnx2tf ends some failures with sys.exit(1)
            err = exc
    seconds = time.perf_counter() - t0
    if err is not None or not (out / "saved_model.pb").is_file():
        shutil.rmtree(out, ignore_errors=True)
        raise _failure(src, log, err) from err
    facts = {
        "tool": TOOL,
        "onnx2tf": getattr(onnx2tf, "__version__", "?"),
        "tensorflow": tf.__version__,
        "layout": ("inputs kept in ONNX layout: " + ", ".join(keep_layout)) if keep_layout
                  else "no rank 3-5 inputs (no layout change)",
        "onnx2tf_seconds": round(seconds, 2),
    }
    if renamed:
        facts["note"] = ("names TensorFlow refuses were replaced (matched by position): " +
                         ", ".join(f"{a[:40]!r} -> {b!r}" for a, b in renamed.items()))
    return out, facts


def _place(src: Path, dst: Path) -> None:
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dst))


# ----------------------------------------------------------------------------- edges

def onnx_to_savedmodel(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    """SavedModel with a `serving_default` signature; inputs keep their ONNX layout and
    outputs keep their ONNX names."""
    out, facts = _run(Path(src), ctx)
    try:
        for p in out.glob("*.tflite"):
            p.unlink()
        _place(out, Path(dst))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return facts


def onnx_to_tflite(src: Path, dst: Path, ctx: ConvertContext) -> dict:
    """A .tflite flatbuffer with a `serving_default` signature carrying the ONNX input and
    output names. ctx.precision "fp16" keeps the float16-weight variant onnx2tf also
    writes (about 1e-4 max abs on small models); anything else keeps float32."""
    src = Path(src)
    out, facts = _run(src, ctx)
    try:
        want = "float16" if ctx.precision == "fp16" else "float32"
        found = sorted(out.glob(f"*_{want}.tflite"))
        if not found:
            raise ConversionError(
                f"onnx2tf wrote no {want} TFLite model for {src.name} "
                f"(it wrote: {', '.join(sorted(p.name for p in out.iterdir())) or 'nothing'})")
        _place(found[0], Path(dst))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    facts["precision"] = want
    return facts
