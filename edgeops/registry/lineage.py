"""Lineage JSON (see edgeops.lineage) as a chain of steps the registry can show and link.

A lineage record is the newest step with its `parent` chain; `chain` flattens it oldest
first, so it reads source -> convert -> optimize... Each step names the sha256 of its source,
which the store matches against its versions to link upstream and downstream artifacts.
`from_convert_report` turns a convert sidecar (`<model>.edgeops.json`) into a lineage record
for models that cannot carry one inside (Core ML, SavedModel...).

Not covered: reading lineage from files (edgeops.lineage) and the one-line text per step
(the CLI's `_lineage_lines`).
"""

from __future__ import annotations

MAX_DEPTH = 50  # a lineage chain longer than this is corrupt (or a cycle)


def chain(lineage: dict | None) -> list[dict]:
    """The steps oldest first: {"step", "source": {name, sha256, format}, "created", "status"}."""
    out: list[dict] = []
    node = lineage
    while isinstance(node, dict) and len(out) < MAX_DEPTH:
        src = node.get("source") if isinstance(node.get("source"), dict) else {}
        out.append({"step": str(node.get("step", "?")), "source": dict(src),
                    "created": node.get("created"), "status": status(node)})
        node = node.get("parent")
    return out[::-1]


def status(step: dict) -> str | None:
    """passed / failed / not-executed as the step recorded it (optimize steps nest it)."""
    if step.get("status"):
        return step["status"]
    for key in ("quantize", "prune", "distill"):
        d = step.get(key)
        if isinstance(d, dict) and "passed" in d:
            return "passed" if d["passed"] else "failed"
    return None


def source_sha256(lineage: dict | None) -> str | None:
    """The sha256 of the artifact this one was made from (its newest step's source)."""
    if not isinstance(lineage, dict) or not isinstance(lineage.get("source"), dict):
        return None
    return lineage["source"].get("sha256")


def label(lineage: dict | None) -> str:
    """`convert(torchscript->onnx) -> optimize.quantize`, or '-' without lineage."""
    parts = []
    node = lineage
    while isinstance(node, dict) and len(parts) < MAX_DEPTH:
        route = node.get("route")
        parts.append(f"{node.get('step', '?')}({'->'.join(route)})" if route else
                     str(node.get("step", "?")))
        node = node.get("parent")
    return " -> ".join(reversed(parts)) or "-"


def from_convert_report(report: dict) -> dict | None:
    """A lineage record rebuilt from a convert report, or None if it is not one."""
    if not isinstance(report, dict) or not report.get("route") or not report.get("source_sha256"):
        return None
    return {"schema_version": report.get("schema_version", 1), "step": "convert",
            "source": {"name": report.get("source"), "sha256": report["source_sha256"],
                       "format": report.get("source_format")},
            "route": report["route"], "status": report.get("status"),
            "hops": [{"from": h.get("source"), "to": h.get("target"), "tool": h.get("tool"),
                      "parity": h.get("parity")} for h in report.get("hops") or []],
            "end_to_end": report.get("end_to_end"), "from": "convert report"}
