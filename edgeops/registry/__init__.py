"""The model registry: named, versioned models with lineage, metrics, stages and history.

    from edgeops.registry import open_registry
    reg = open_registry()                    # $EDGEOPS_REGISTRY_URL or $EDGEOPS_HOME/registry.db
    rec = reg.add("digits.onnx", "digits").record
    reg.promote("digits", rec.version, "staging")
    reg.materialize(reg.get("digits"), "out/")

store.py keeps the metadata (SQLite, WAL), blobs.py the files (content-addressed by sha256),
lineage.py turns lineage JSON into linked steps. Not covered: bundles and signing
(edgeops.bundle records its bundles here through `next_bundle_counter` / `record_bundle`),
and printing (edgeops.cli.registry).
"""

from .blobs import FileBlobStore, RegistryError, open_blob_store
from .store import (STAGES, AddResult, Registry, RemoveResult, VersionRecord, open_registry,
                    parse_ref)

__all__ = ["STAGES", "AddResult", "FileBlobStore", "Registry", "RegistryError", "RemoveResult",
           "VersionRecord", "open_blob_store", "open_registry", "parse_ref"]
