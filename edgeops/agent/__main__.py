"""The agent's command line on the device: one JSON document on stdout per command.

    python -m <agent package> [--root DIR] init --name N --target T [--label K=V ...] [--trust ROOT.json]
    python -m <agent package> [--root DIR] status
    python -m <agent package> [--root DIR] install BUNDLE [--timeout S] [--threads N] [--runs N]
    python -m <agent package> [--root DIR] rollback NAME
    python -m <agent package> [--root DIR] chunks                 (delta: chunk names held here)
    python -m <agent package> [--root DIR] assemble DELTA --out ROOT/incoming/X.bundle --sha256 H
    python -m <agent package> [--root DIR] recover | gc | version
    python -m <agent package> [--root DIR] infer NAME --random N [--shift X] [--interval-ms MS] [--for S]
    python -m <agent package> [--root DIR] serve NAME [--host 127.0.0.1] [--port 8000] [--for S]
    python -m <agent package> [--root DIR] telemetry read [--after SEQ] [--limit N] | ack --upto SEQ --spool ID
                                                     | stats | push --mqtt URL [--every S] [--for S]

DIR is --root, else $EDGEOPS_AGENT_ROOT, else the folder the agent was installed into
(DIR/agent/versions/V/<package>). Every install-side command first finishes or undoes a
transaction a crash left (install.recover); `telemetry ...` touches only the spool. Exit codes: 0 ok, 1 refused or rolled back (the JSON says why),
2 usage, 3 the device's own state or environment is unusable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# install (and through it verifier -> cryptography) is imported by main() only for the commands
# that need it: `telemetry read/ack/stats` start with the standard library alone (a collector
# calls them on every device, often)
I = S = v = None  # noqa: E741

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


def _init(agent, args) -> int:
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
    p = sub.add_parser("infer", help="N requests on generated inputs through the runtime (recorded like real traffic)")
    p.add_argument("name")
    p.add_argument("--random", type=int, required=True, metavar="N")
    p.add_argument("--shift", type=float, default=0.0, help="shift float inputs by this many standard deviations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interval-ms", type=float, default=0.0, help="pause between requests (per stream)")
    p.add_argument("--concurrency", type=int, default=1, help="request streams in parallel (threads)")
    p.add_argument("--pool", type=int, default=0,
                   help="reuse N generated inputs per stream (cheap load generation; 0: fresh inputs, for drift)")
    p.add_argument("--for", dest="seconds", type=float, help="stop after this many seconds")
    _runtime_args(p)
    p = sub.add_parser("serve", help="KServe v2 REST server for one model (localhost by default)")
    p.add_argument("name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--for", dest="seconds", type=float, help="stop after this many seconds")
    _runtime_args(p)
    p = sub.add_parser("telemetry")
    tsub = p.add_subparsers(dest="tcmd", required=True)
    q = tsub.add_parser("read")
    q.add_argument("--after", type=int, default=0)
    q.add_argument("--limit", type=int, default=2000)
    q = tsub.add_parser("ack")
    q.add_argument("--upto", type=int, required=True)
    q.add_argument("--spool", required=True)
    tsub.add_parser("stats")
    q = tsub.add_parser("push")
    q.add_argument("--mqtt", required=True, metavar="URL")
    q.add_argument("--every", type=float, help="keep pushing every S seconds (default: once)")
    q.add_argument("--for", dest="seconds", type=float, help="with --every: stop after S seconds")
    sub.add_parser("version")
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    if args.cmd == "telemetry":
        return _spool_cmd(_root(args.root), args)
    global I, S, v
    from . import install as I  # noqa: E741
    from . import state as S
    from . import verifier as v
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
        if args.cmd in ("infer", "serve"):
            return _telemetry_cmd(agent, args)
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


def _runtime_args(p) -> None:
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--flush", type=float, default=10.0, help="seconds between spool writes")
    p.add_argument("--cap-bytes", type=int, help="set the spool's byte cap (kept in the spool; default 64 MiB)")
    p.add_argument("--capture", type=float, default=0.0, help="share of requests whose raw inputs are kept")
    p.add_argument("--capture-bytes", type=int, default=0, help="cap on raw inputs kept per flush")
    p.add_argument("--no-telemetry", action="store_true")


def _runtime(agent, args):
    from .runtime import Runtime

    return Runtime(agent.layout.root, args.name, threads=args.threads, flush_s=args.flush,
                   cap_bytes=args.cap_bytes, capture=args.capture, capture_bytes=args.capture_bytes,
                   telemetry=not args.no_telemetry)


def _spool_cmd(root: Path, args) -> int:
    """telemetry read / ack / stats / push: the spool alone (standard library; push adds paho)."""
    import time

    from . import spool as SP

    try:
        sp = SP.Spool(SP.default_path(root))
    except SP.SpoolError as exc:
        return _emit({"ok": False, "error": str(exc)}, EXIT_ENV)
    try:
        if args.tcmd == "read":
            doc = sp.read(args.after, args.limit, raw=True)
            doc["health_now"] = SP.device_health(root, sp)
            return _emit({"ok": True, **doc}, EXIT_OK)
        if args.tcmd == "ack":
            try:
                n = sp.ack(args.upto, args.spool)
            except SP.SpoolError as exc:
                return _emit({"ok": False, "error": str(exc)}, EXIT_REFUSED)
            return _emit({"ok": True, "deleted": n, **sp.stats()}, EXIT_OK)
        if args.tcmd == "stats":
            return _emit({"ok": True, "device": sp.device, "spool": sp.id, **sp.stats()}, EXIT_OK)
        from .push import PushError, push

        total = {"records": 0, "batches": 0, "bytes": 0, "acknowledged": 0}
        t_end = time.time() + (args.seconds or 0)
        last_error = None
        while True:
            try:
                r = push(sp, args.mqtt)
                last_error = None
                for k in total:
                    total[k] += r[k]
            except Exception as exc:  # noqa: BLE001 - PushError, or the broker going away mid-push
                last_error = str(exc) if isinstance(exc, PushError) else f"{type(exc).__name__}: {exc}"
                if not args.every:
                    return _emit({"ok": False, "error": last_error, **total, **sp.stats()}, EXIT_ENV)
                sys.stderr.write(f"edgeops agent: push failed ({last_error}); retrying in {args.every:g}s\n")
            if not args.every or (args.seconds and time.time() >= t_end):
                break
            time.sleep(args.every)
        st = sp.stats()
        if st["pending"]:
            return _emit({"ok": False, "error": f"{st['pending']} record(s) not acknowledged by the controller "
                                                "(is `edgeops telemetry ingest` running?); they stay in the spool "
                                                "and go again with the next push", **total, **st}, EXIT_REFUSED)
        return _emit({"ok": True, **total, **st}, EXIT_OK)
    finally:
        sp.close()


def _telemetry_cmd(agent, args) -> int:
    import signal
    import time

    from .runtime import NoModel

    try:
        rt = _runtime(agent, args)
    except NoModel as exc:
        return _emit({"ok": False, "error": str(exc)}, EXIT_REFUSED)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    try:
        if args.cmd == "serve":
            from .serve import serve

            def ready(addr):
                sys.stderr.write(f"serving {args.name} {rt.version} on http://{addr[0]}:{addr[1]}/v2\n")
                sys.stderr.flush()
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            try:
                serve(rt, args.host, args.port, args.seconds, ready)
            except KeyboardInterrupt:
                pass
            except OSError as exc:
                return _emit({"ok": False, "error": f"cannot listen on {args.host}:{args.port} ({exc})"}, EXIT_ENV)
            return _emit({"ok": True, "served": args.name, "version": rt.version, "reloads": rt.reloads,
                          "telemetry_error": rt.telemetry_error}, EXIT_OK)
        import threading

        import numpy as np

        from . import profile as P
        from .runtime import random_inputs

        hist, versions = {}, {}
        counts = {"done": 0, "errors": 0}
        lock = threading.Lock()
        t_end = time.time() + args.seconds if args.seconds else None
        budget = iter(range(max(args.random, 0)))

        def stream(seed: int) -> None:
            rng = np.random.default_rng(seed)
            pool, pool_version, i = [], None, 0
            while not stop and not (t_end and time.time() >= t_end):
                with lock:
                    if next(budget, None) is None:
                        return
                if args.pool > 0:
                    if pool_version != rt.version:        # another model: other input shapes
                        pool_version = rt.version
                        pool = [random_inputs(rt.model.manifest, rng, args.shift) for _ in range(args.pool)]
                    feeds = pool[i % len(pool)]
                    i += 1
                else:
                    feeds = random_inputs(rt.model.manifest, rng, args.shift)
                t = time.perf_counter()
                err = 0
                try:
                    version = rt.infer(feeds)[1]
                except Exception as exc:  # noqa: BLE001 - recorded by the runtime; counted here
                    err, version = 1, getattr(exc, "edgeops_version", rt.version)
                b = P.bucket(time.perf_counter() - t)
                with lock:
                    hist[b] = hist.get(b, 0) + 1
                    versions[version] = versions.get(version, 0) + 1
                    counts["done"] += 1
                    counts["errors"] += err
                if args.interval_ms:
                    time.sleep(args.interval_ms / 1e3)

        workers = [threading.Thread(target=stream, args=(args.seed + i,)) for i in range(max(1, args.concurrency))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        q = lambda x: round(P.quantile(hist, x) * 1e3, 4) if hist else None  # noqa: E731
        return _emit({"ok": True, "model": args.name, "requests": counts["done"], "errors": counts["errors"],
                      "versions": versions, "reloads": rt.reloads, "p50_ms": q(0.5), "p99_ms": q(0.99),
                      "telemetry_error": rt.telemetry_error}, EXIT_OK)
    finally:
        rt.close()


if __name__ == "__main__":
    sys.exit(main())
