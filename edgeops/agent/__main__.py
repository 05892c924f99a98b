"""The agent's command line on the device: one JSON document on stdout per command.

    python -m <agent package> [--root DIR] init --name N --target T [--label K=V ...] [--trust ROOT.json]
    python -m <agent package> [--root DIR] status
    python -m <agent package> [--root DIR] install BUNDLE [--timeout S] [--threads N] [--runs N]
    python -m <agent package> [--root DIR] rollback NAME
    python -m <agent package> [--root DIR] chunks                 (delta: chunk names held here)
    python -m <agent package> [--root DIR] assemble DELTA --out ROOT/incoming/X.bundle --sha256 H
    python -m <agent package> [--root DIR] recover | gc | version

DIR is --root, else $EDGEOPS_AGENT_ROOT, else the folder the agent was installed into
(DIR/agent/versions/V/<package>). Every command first finishes or undoes a transaction a crash
left (install.recover). Exit codes: 0 ok, 1 refused or rolled back (the JSON says why),
2 usage, 3 the device's own state or environment is unusable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import install as I
from . import state as S
from . import verifier as v

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_ENV = 0, 1, 2, 3


def _root(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    env = os.environ.get("EDGEOPS_AGENT_ROOT")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent      # DIR/agent/versions/V/<package>
    if here.parents[1].name == "versions" and here.parents[2].name == "agent":
        return here.parents[3]
    raise SystemExit(_emit({"ok": False, "error": "no agent root: pass --root or set EDGEOPS_AGENT_ROOT"},
                           EXIT_USAGE))


def _emit(doc: dict, code: int) -> int:
    sys.stdout.write(json.dumps(doc, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
    return code


def _init(agent: I.Agent, args) -> int:
    L = agent.layout
    labels = {}
    for item in args.label or []:
        k, sep, val = item.partition("=")
        if not sep or not k:
            return _emit({"ok": False, "error": f"--label {item!r} is not KEY=VALUE"}, EXIT_USAGE)
        labels[k] = val
    L.create()
    notes = []
    if args.trust:
        data = Path(args.trust).read_bytes()
        new = v.parse_root(data)[0]
        have = None
        if (L.trust / v.ROOT_FILE).exists():
            have = v.load_trust(L.trust)
        if have is None:
            v.save_trust(L.trust, data)
            notes.append(f"trust root v{new.version} installed")
        elif new.version == have.version and (L.trust / v.ROOT_FILE).read_bytes() == data:
            notes.append(f"trust root v{new.version} already installed")
        elif new.version > have.version:
            cur = have
            if new.version != have.version + 1:
                return _emit({"ok": False, "error": f"the device trusts root v{have.version}; root "
                                                    f"v{new.version} can only arrive through a bundle's root chain"},
                             EXIT_REFUSED)
            v.update_root(cur, data)
            v.save_trust(L.trust, data)
            notes.append(f"trust root v{have.version} -> v{new.version} (signed by the old root)")
        else:
            return _emit({"ok": False, "error": f"the device already trusts root v{have.version}; "
                                                f"refusing to replace it with v{new.version}"}, EXIT_REFUSED)
    dev = {"name": args.name, "target": args.target, "labels": labels, "agent": I.AGENT_VERSION}
    S.write_atomic(L.device_file, (json.dumps(dev, indent=1, sort_keys=True) + "\n").encode())
    return _emit({"ok": True, "device": dev, "notes": notes, "status": agent.status()}, EXIT_OK)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edgeops-agent", description="edgeops device agent (JSON output)")
    ap.add_argument("--root")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init")
    p.add_argument("--name", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--label", action="append")
    p.add_argument("--trust")
    p = sub.add_parser("status")
    p.add_argument("--chunks", action="store_true", help="also list the chunk names a delta may reuse")
    p.add_argument("--brief", action="store_true", help="skip the runtime versions (no onnxruntime import)")
    p = sub.add_parser("install")
    p.add_argument("bundle")
    p.add_argument("--timeout", type=float)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--allow-same-version", action="store_true")
    p = sub.add_parser("rollback")
    p.add_argument("name")
    sub.add_parser("chunks")
    p = sub.add_parser("assemble")
    p.add_argument("delta")
    p.add_argument("--out", required=True)
    p.add_argument("--sha256", required=True)
    sub.add_parser("recover")
    sub.add_parser("gc")
    sub.add_parser("version")
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    if args.cmd == "version":
        return _emit({"ok": True, "agent": I.AGENT_VERSION, "protocol": I.PROTOCOL, "schema": S.SCHEMA}, EXIT_OK)
    agent = I.Agent(_root(args.root))
    try:
        if args.cmd == "init":
            return _init(agent, args)
        if args.cmd == "status":
            recovered = agent.recover() if agent.layout.root.is_dir() else []
            doc = {"ok": True, "recovered": recovered, **agent.status(runtime=not args.brief)}
            if args.chunks:         # what a delta may reuse, in the same round trip
                from . import delta

                doc["chunks"] = sorted(delta.index(agent.delta_sources(), agent.chunk_cache))
            return _emit(doc, EXIT_OK)
        if args.cmd == "recover":
            return _emit({"ok": True, "recovered": agent.recover()}, EXIT_OK)
        if args.cmd == "chunks":
            from . import delta

            sources = agent.delta_sources()
            return _emit({"ok": True, "chunks": sorted(delta.index(sources, agent.chunk_cache)),
                          "sources": len(sources)}, EXIT_OK)
        if args.cmd == "assemble":
            from . import delta

            out = Path(args.out)
            if out.parent.resolve() != agent.layout.incoming.resolve() or not out.name.endswith(".bundle"):
                return _emit({"ok": False, "error": "assemble writes only ROOT/incoming/*.bundle"}, EXIT_USAGE)
            try:
                r = delta.apply(args.delta, agent.delta_sources(), out, args.sha256, cache=agent.chunk_cache)
            except delta.DeltaError as exc:
                return _emit({"ok": False, "error": str(exc)}, EXIT_REFUSED)
            finally:
                Path(args.delta).unlink(missing_ok=True)
            return _emit({"ok": True, **r}, EXIT_OK)
        if args.cmd == "gc":
            return _emit({"ok": True, **agent.gc()}, EXIT_OK)
        if args.cmd == "install":
            r = agent.install(args.bundle, timeout=args.timeout, threads=args.threads, health_runs=args.runs,
                              allow_same_version=args.allow_same_version)
            return _emit(r.to_dict(), EXIT_OK if r.ok else EXIT_REFUSED)
        if args.cmd == "rollback":
            r = agent.rollback(args.name)
            return _emit(r.to_dict(), EXIT_OK if r.ok else EXIT_REFUSED)
    except I.InstallFailed as exc:      # busy (the lock)
        return _emit({"ok": False, "reason": exc.reason, "message": exc.message}, EXIT_REFUSED)
    except (S.StateError, v.TrustError, v.Refused, OSError) as exc:
        return _emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"}, EXIT_ENV)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
