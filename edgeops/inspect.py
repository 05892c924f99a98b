"""`inspect_model` (what a model file is) and `format_matrix` (what converts to what).

Both return plain dicts for the CLI's table and --json output. `format_matrix` imports
no framework: it reads the edge table and checks extras with find_spec.
"""

from __future__ import annotations

from pathlib import Path

from . import extras
from . import formats as fmts
from .errors import EdgeopsError
from .formats.base import LoadOptions, path_size, sha256_path


def inspect_model(path: str | Path, shapes: dict | None = None, trust_pickle: bool = False) -> dict:
    path = Path(path)
    info = fmts.detect(path)
    mod = fmts.module_for(info.id)
    opts = LoadOptions(trust_pickle=trust_pickle, shapes=dict(shapes or {}))
    out: dict = {
        "path": str(path), "format": info.id, "description": info.description,
        "size": path_size(path), "sha256": sha256_path(path),
    }
    out.update(mod.inspect(path, info.id, opts) or {})
    try:
        out["signature"] = mod.signature(path, info.id, opts).to_dict()
    except EdgeopsError as exc:
        # e.g. TorchScript without --shape: the rest of the facts are still worth showing
        out["signature"] = None
        out["signature_error"] = exc.message + (f" ({exc.hint})" if exc.hint else "")
    return out


def format_matrix() -> dict:
    from .convert import edges, plan

    all_f = fmts.all_formats()
    usable = {k: v for k, v in all_f.items() if not v.refused}
    sources = sorted({e.source for e in edges()})
    targets = sorted({e.target for e in edges()})
    matrix = []
    for s in sources:
        row: dict = {"from": s, "to": {}}
        for t in targets:
            if s == t:
                continue
            try:
                route = plan(s, t)
                row["to"][t] = {"hops": len(route), "available": True,
                                "route": [route[0].source] + [e.target for e in route]}
            except EdgeopsError as exc:
                if exc.exit_code == 3:  # a route exists but needs a missing extra
                    from .convert import _shortest

                    r = _shortest(s, t, lambda e: True)
                    row["to"][t] = {"hops": len(r), "available": False,
                                    "route": [r[0].source] + [e.target for e in r],
                                    "missing": exc.hint}
        matrix.append(row)
    return {
        "extras": {name: extras.available(name) for name in extras.EXTRAS},
        "formats": [{"id": f.id, "description": f.description, "extra": f.extra,
                     "installed": f.extra is None or extras.available(f.extra)}
                    for f in usable.values()],
        "edges": [{"from": e.source, "to": e.target, "tool": e.tool, "extras": list(e.extras),
                   "atol": e.atol, "rtol": e.rtol, "note": e.note,
                   "available": all(extras.available(x) for x in e.extras)} for e in edges()],
        "sources": sources, "targets": targets, "matrix": matrix,
        "refused": [{"id": f.id, "description": f.description, "refused": f.refused}
                    for f in all_f.values() if f.refused],
    }
