"""Lineage that travels with the artifact: where a model came from and how it was checked.

Written into an ONNX model's `metadata_props` under `edgeops.*` keys (and into Core ML
user metadata by the coreml module). Later stages (optimize, registry, bundle) read it
back with `read_onnx_lineage` and append their own step, keeping the parent chain.

Not covered: the registry's database record (the registry copies this JSON).
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path

from . import __version__

SCHEMA_VERSION = 1
LINEAGE_KEY = "edgeops.lineage"

# the packages whose versions decide what a conversion produces
TRACKED_PACKAGES = ("numpy", "onnx", "onnxruntime", "onnxconverter-common", "scikit-learn",
                    "skl2onnx", "tensorflow-cpu", "tensorflow", "keras", "tf-keras", "tf2onnx",
                    "torch", "onnxscript", "onnx2torch", "coremltools")


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = importlib_metadata.version(n)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def make_record(step: str, source_path: str | Path, source_sha256: str, source_format: str,
                details: dict, parent: dict | None = None) -> dict:
    """One lineage step. `parent` is the lineage the source already carried, if any."""
    rec = {
        "schema_version": SCHEMA_VERSION,
        "step": step,
        "created": utc_now(),
        "edgeops_version": __version__,
        "source": {"name": Path(source_path).name, "sha256": source_sha256,
                   "format": source_format},
        "packages": package_versions(),
        "python": platform.python_version(),
        **details,
    }
    if parent:
        rec["parent"] = parent
    return rec


def write_onnx_lineage(path: str | Path, record: dict, extra: dict[str, str] | None = None) -> None:
    """Set edgeops.* metadata_props on an ONNX file in place (other keys are kept)."""
    import onnx

    from .formats import onnx as onnx_fmt

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props[LINEAGE_KEY] = json.dumps(record, sort_keys=True, default=str)
    props["edgeops.source_sha256"] = record["source"]["sha256"]
    for k, v in (extra or {}).items():
        props[k] = str(v)
    del model.metadata_props[:]
    for k in sorted(props):
        model.metadata_props.add(key=k, value=props[k])
    onnx_fmt.save(model, Path(path))


def read_onnx_lineage(path: str | Path) -> dict | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for p in model.metadata_props:
        if p.key == LINEAGE_KEY:
            try:
                return json.loads(p.value)
            except ValueError:
                return None
    return None
