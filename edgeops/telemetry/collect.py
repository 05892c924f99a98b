"""Exactly-once collection: pull over a device link (SSH today), push over MQTT.

Pull, per device, until its spool has nothing newer:
    read   `telemetry read --after CURSOR`  (the device's records after what the store holds)
    store  one transaction: the records (a record already stored is ignored) + the cursor
    ack    `telemetry ack --upto SEQ`       (only after the commit; the device deletes <= SEQ)
A collector killed anywhere in between loses nothing (the device deletes only what was
acknowledged, and it acknowledges only what was committed) and duplicates nothing (the store's
key is (device, spool, seq)). tests/test_telemetry_fleet.py kills it at every one of these points.

Push: devices publish batches to MQTT (agent/push.py, QoS 1); `ingest` subscribes on a persistent
session with manual acknowledgement, stores each batch with the same key, commits, publishes the
batch's sequence range back to the device (edgeops/telemetry-ack/DEVICE, which is what lets the
device delete it), and only then sends its PUBACK: a redelivery, or a batch the device publishes
again because no acknowledgement reached it, is ignored by the key.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field

from .store import Store

KILL_POINTS = ("read", "store", "commit", "ack")


def _kill_at(point: str) -> None:
    """Fault injection for the exactly-once tests: EDGEOPS_COLLECT_KILL_AT=POINT[:N] SIGKILLs this
    process the N-th time (default 1st) it reaches POINT."""
    spec = os.environ.get("EDGEOPS_COLLECT_KILL_AT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _kill_at.seen = getattr(_kill_at, "seen", 0) + 1
    if _kill_at.seen >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Pulled:
    device: str
    ok: bool = True
    records: int = 0
    inserted: int = 0
    duplicates: int = 0
    bytes: int = 0
    rounds: int = 0
    seconds: float = 0.0
    pending: int | None = None
    dropped: dict = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def pull(link, store: Store, device: str, *, limit: int = 5000, max_rounds: int = 1000) -> Pulled:
    """Collect everything DEVICE's spool holds, through LINK (transport.DeviceLink)."""
    out = Pulled(device)
    t = time.monotonic()
    spool, after = store.cursor(device)
    for _ in range(max_rounds):
        code, doc = link.agent("telemetry", "read", "--after", str(after), "--limit", str(limit), timeout=300)
        if code != 0 or not doc.get("ok"):
            raise RuntimeError(doc.get("error") or f"telemetry read exited {code}")
        if doc["spool"] != spool:
            # a spool this store has not seen (first contact, or re-created on the device): read it
            # again from what the store holds of THAT spool (usually nothing)
            spool = doc["spool"]
            _, after = store.cursor_for(device, spool)
            continue
        _kill_at("read")
        out.rounds += 1
        out.bytes += len(json.dumps(doc["records"], separators=(",", ":")))     # as they crossed the link
        recs = doc["records"]
        r = store.insert(device, spool, recs, via="ssh", stats=doc, before_commit=lambda: _kill_at("store"))
        _kill_at("commit")
        out.records += len(recs)
        out.inserted += r["inserted"]
        out.duplicates += r["duplicates"]
        out.dropped = doc.get("dropped") or {}
        top = max([after] + [x["seq"] for x in recs])
        # acknowledge what was stored now, or what an earlier run stored but was killed before acking
        if recs or doc.get("acked", 0) < after:
            code, ack = link.agent("telemetry", "ack", "--upto", str(top), "--spool", spool, timeout=120)
            if code != 0 or not ack.get("ok"):
                raise RuntimeError(ack.get("error") or f"telemetry ack exited {code}")
            out.pending = ack.get("pending")
        _kill_at("ack")
        after = top
        if not doc.get("more"):
            break
    out.seconds = time.monotonic() - t
    return out


def collect(devices, store: Store, *, parallel: int = 8, link_for=None, progress=lambda m: None,
            batch: int = 5000) -> list[Pulled]:
    """Pull from every device in DEVICES (inventory Devices), PARALLEL at a time. A device that
    fails is reported (ok False, error) and the others go on."""
    from ..fleet.deploy import link_for as ssh_link
    from ..fleet.rollout import classify

    link_for = link_for or ssh_link

    def one(dev) -> Pulled:
        try:
            link = link_for(dev)
        except Exception as exc:  # noqa: BLE001
            return Pulled(dev.name, ok=False, error=f"{classify(exc)[0]}: {classify(exc)[1]}")
        try:
            p = pull(link, store, dev.name, limit=batch)
            progress(f"{dev.name}: {p.inserted} new record(s)" + (f", {p.duplicates} already stored" if p.duplicates else ""))
            return p
        except Exception as exc:  # noqa: BLE001
            progress(f"{dev.name}: failed ({classify(exc)[1][:160]})")
            return Pulled(dev.name, ok=False, error=f"{classify(exc)[0]}: {classify(exc)[1]}")
        finally:
            link.close()

    with cf.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(one, devices))


# ---------------------------------------------------------------------- MQTT ingest
KINDS = ("sample", "health", "event", "window", "profile")


def _check_record(r) -> None:
    """A record as a device sends it, or ValueError."""
    if not isinstance(r, dict) or not isinstance(r.get("seq"), int) or isinstance(r.get("seq"), bool) \
            or not isinstance(r.get("boot"), str) or r.get("kind") not in KINDS \
            or not isinstance(r.get("t"), (int, float)) or not isinstance(r.get("body"), (str, dict)):
        raise ValueError(f"malformed record {str(r)[:80]}")

TOPIC_FILTER = "edgeops/telemetry/+"


@dataclass
class Ingested:
    messages: int = 0
    records: int = 0
    inserted: int = 0
    duplicates: int = 0
    rejected: int = 0
    seconds: float = 0.0
    devices: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def ingest(url: str, store: Store, *, client_id: str = "edgeops-ingest", seconds: float | None = None,
           idle: float | None = None, until_records: int | None = None, progress=lambda m: None,
           batch: int = 64) -> Ingested:
    """Subscribe to every device's telemetry topic and store it, acknowledging each message only
    after its records are committed. Stops after SECONDS, after IDLE seconds without a message, or
    once UNTIL_RECORDS new records were stored (whichever comes first); else runs until SIGINT."""
    import queue

    from ..agent.push import ACK_TOPIC, PushError, connect, parse_url
    from ..errors import UsageError
    from .store import TelemetryUnavailable as EnvError

    try:
        parse_url(url)
    except PushError as exc:            # a malformed URL is a usage error, not an unreachable broker
        raise UsageError(str(exc)) from None
    q: queue.Queue = queue.Queue()
    try:
        c = connect(url, client_id, clean=False, manual_ack=True, on_message=lambda cl, ud, msg: q.put(msg))
    except PushError as exc:
        raise EnvError(str(exc)) from None
    c.subscribe(TOPIC_FILTER, qos=1)
    out = Ingested()
    t0 = time.monotonic()
    last = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if seconds is not None and now - t0 >= seconds:
                break
            if idle is not None and now - last >= idle:
                break
            if until_records is not None and out.inserted >= until_records:
                break
            try:
                msgs = [q.get(timeout=0.2)]
            except queue.Empty:
                continue
            except KeyboardInterrupt:       # Ctrl-C ends a foreground ingest with its summary
                break
            while len(msgs) < batch:
                try:
                    msgs.append(q.get_nowait())
                except queue.Empty:
                    break
            last = time.monotonic()
            good = []
            for m in msgs:
                try:
                    doc = json.loads(m.payload)
                    dev, spool, recs = doc["device"], doc["spool"], doc["records"]
                    if m.topic != f"edgeops/telemetry/{dev}" or not isinstance(spool, str) or not isinstance(recs, list):
                        raise ValueError(f"device {dev!r} on topic {m.topic!r}")
                    for r in recs:
                        _check_record(r)
                    good.append((m, dev, spool, recs, doc))
                except (ValueError, KeyError, TypeError) as exc:
                    # never storable: counted, acknowledged (so the broker stops resending it), said
                    out.rejected += 1
                    progress(f"rejected a message on {m.topic}: {str(exc)[:120]}")
            # one transaction per device; then the device's acknowledgement; then the PUBACKs
            by_dev: dict[tuple, list] = {}
            for m, dev, spool, recs, doc in good:
                by_dev.setdefault((dev, spool), []).append((recs, doc))
            for (dev, spool), items in by_dev.items():
                recs = [r for rs, _ in items for r in rs]
                r = store.insert(dev, spool, recs, via="mqtt", stats={"dropped": items[-1][1].get("dropped") or {}},
                                 before_commit=lambda: _kill_at("store"))
                out.records += len(recs)
                out.inserted += r["inserted"]
                out.duplicates += r["duplicates"]
                out.devices[dev] = out.devices.get(dev, 0) + r["inserted"]
            _kill_at("commit")
            for (dev, spool), items in by_dev.items():
                ranges = [[min(x["seq"] for x in rs), max(x["seq"] for x in rs)] for rs, _ in items if rs]
                c.publish(ACK_TOPIC.format(device=dev), json.dumps({"spool": spool, "ranges": ranges}), qos=1)
            for m in msgs:
                c.ack(m.mid, m.qos)
            out.messages += len(msgs)
    finally:
        out.seconds = time.monotonic() - t0
        c.disconnect()
        c.loop_stop()
    return out
