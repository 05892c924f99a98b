"""Format plugins: detection by content, and one set of verbs per model family.

Each family is a module of this package (the module itself is the plugin, as MLflow's
flavors are). Every module defines:

    FORMATS: tuple[FormatInfo, ...]               formats it owns (planner graph nodes)
    detect(probe: Probe) -> str | None            format id from *content*; imports no framework
    load(path, fmt, opts: LoadOptions) -> object  the framework object
    save(obj, path, fmt) -> None
    signature(path, fmt, opts) -> Signature        input/output names, dtypes, shapes
    runner(path, fmt, opts) -> Runner              predict: run(feeds) -> outputs
    inspect(path, fmt, opts) -> dict               params, opset and format-specific facts

Frameworks are imported inside those functions only (via `edgeops.extras.require`).
The unsafe-load gate for pickles lives in one place, `edgeops.safety`, and the sklearn
and torch modules both call it -- never a copy per flavor.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from ..errors import FormatError
from .base import FormatInfo, LoadOptions, Probe, Runner, Signature, TensorSpec

__all__ = [
    "FAMILIES", "FormatInfo", "LoadOptions", "Probe", "Runner", "Signature", "TensorSpec",
    "all_formats", "detect", "family", "get_format", "format_for_suffix",
]

# Detection order matters only where two families could both claim a file: torch
# before sklearn, because torch's legacy save format is itself a pickle; "other"
# last, because it recognises formats edgeops refuses (safetensors, GGUF, ...).
FAMILIES = ("onnx", "coreml", "tensorflow", "keras", "torch", "sklearn", "tflite", "other")


@lru_cache(maxsize=None)
def family(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


@lru_cache(maxsize=1)
def all_formats() -> dict[str, FormatInfo]:
    out: dict[str, FormatInfo] = {}
    for fam in FAMILIES:
        for info in family(fam).FORMATS:
            if info.id in out:
                raise RuntimeError(f"format id {info.id!r} registered twice")
            out[info.id] = info
    return out


def get_format(fmt_id: str) -> FormatInfo:
    try:
        return all_formats()[fmt_id]
    except KeyError:
        known = ", ".join(sorted(k for k, v in all_formats().items() if not v.refused))
        raise FormatError(f"unknown format {fmt_id!r}", hint=f"known formats: {known}") from None


def format_for_suffix(path: str | Path) -> FormatInfo | None:
    """Guess a *target* format from an output path's suffix (never used for detection)."""
    name = str(path).rstrip("/").lower()
    best: FormatInfo | None = None
    for info in all_formats().values():
        if info.refused:
            continue
        for suf in info.suffixes:
            if name.endswith(suf) and (best is None or len(suf) > max(len(s) for s in best.suffixes)):
                best = info
    return best


def detect(path: str | Path) -> FormatInfo:
    """Identify a model file or directory by its content.

    Raises FormatError for a missing path, an unknown or corrupt file, or a format that
    edgeops recognises but refuses (the FormatInfo.refused reason becomes the message).
    """
    probe = Probe(path)
    if not probe.exists:
        raise FormatError(f"{path}: no such file or directory")
    if probe.path.is_file() and probe.size == 0:
        raise FormatError(f"{path}: file is empty")
    for fam in FAMILIES:
        fmt_id = family(fam).detect(probe)
        if fmt_id:
            info = get_format(fmt_id)
            if info.refused:
                raise FormatError(f"{path}: {info.description}: {info.refused}")
            return info
    raise FormatError(f"{path}: {family('other').describe_unknown(probe)}",
                      hint="run 'edgeops formats' to see what edgeops reads")


def module_for(fmt_id: str) -> ModuleType:
    return family(get_format(fmt_id).family)


def runner(path: str | Path, fmt: str | None = None, opts: LoadOptions | None = None) -> Runner:
    fmt = fmt or detect(path).id
    return module_for(fmt).runner(Path(path), fmt, opts or LoadOptions())


def signature(path: str | Path, fmt: str | None = None, opts: LoadOptions | None = None) -> Signature:
    fmt = fmt or detect(path).id
    return module_for(fmt).signature(Path(path), fmt, opts or LoadOptions())
