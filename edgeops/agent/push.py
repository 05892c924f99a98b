"""Push mode: a device that cannot be reached over SSH publishes its spool to MQTT.

QoS 1 on a persistent session (clean_session off, client id edgeops-DEVICE). A broker's PUBACK only
says the broker has the message (and a broker drops messages for a subscriber whose queue is full,
or that has no session yet), so records leave the spool only on the CONTROLLER's acknowledgement:
`edgeops telemetry ingest` stores a batch, commits, then publishes the batch's sequence range on
edgeops/telemetry-ack/DEVICE (QoS 1; the device's persistent session keeps it while the device is
away). What was not acknowledged is published again by the next push, and the store's key
(device, spool, seq) makes the repeat a no-op: exactly once end to end. Data: edgeops/telemetry/DEVICE.

paho-mqtt is the one package this mode adds to the device (pure Python); the rest of the agent
does not import it. Without it, push mode refuses in one line.
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlparse

from .spool import Spool

TOPIC = "edgeops/telemetry/{device}"
ACK_TOPIC = "edgeops/telemetry-ack/{device}"


class PushError(Exception):
    pass


def parse_url(url: str) -> tuple[str, int]:
    u = urlparse(url)
    if u.scheme not in ("mqtt", "tcp") or not u.hostname:
        raise PushError(f"--mqtt {url!r}: expected mqtt://HOST[:PORT]")
    return u.hostname, u.port or 1883


def connect(url: str, client_id: str, *, clean: bool = False, manual_ack: bool = False, timeout: float = 10.0,
            on_message=None):
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise PushError("push mode needs paho-mqtt on the device (pip install paho-mqtt)") from None
    host, port = parse_url(url)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                    protocol=mqtt.MQTTv311, manual_ack=manual_ack)
    c.max_inflight_messages_set(20)
    c.max_queued_messages_set(0)
    ready = {}
    if on_message is not None:      # before connecting: a persistent session delivers at once
        c.on_message = on_message
    c.on_connect = lambda cl, ud, flags, rc, props=None: ready.update(rc=rc, present=flags.session_present)
    try:
        c.connect(host, port, keepalive=30)
    except OSError as exc:
        raise PushError(f"cannot reach the MQTT broker at {host}:{port} ({exc})") from None
    c.loop_start()
    t_end = time.time() + timeout
    while "rc" not in ready and time.time() < t_end:
        time.sleep(0.01)
    if ready.get("rc") is None or ready["rc"].is_failure:
        c.loop_stop()
        raise PushError(f"the MQTT broker at {host}:{port} refused the connection ({ready.get('rc', 'timeout')})")
    return c


def push(spool: Spool, url: str, *, batch: int = 500, timeout: float = 30.0, ack_wait: float = 10.0) -> dict:
    """Publish what SPOOL holds, batch by batch, then wait up to ACK_WAIT seconds for the
    controller's acknowledgements; delete what they cover. Returns counts, with `unacked`: records
    still in the spool (they go again next time)."""
    import queue

    acks: queue.Queue = queue.Queue()
    c = connect(url, f"edgeops-{spool.device}", on_message=lambda cl, ud, msg: acks.put(msg.payload))
    topic = TOPIC.format(device=spool.device)
    acked = 0
    pending: list[list[int]] = []

    def take(wait: float, until_done: bool) -> None:
        """Apply acknowledgements for WAIT seconds (UNTIL_DONE: or until nothing is pending)."""
        nonlocal acked, pending
        t_end = time.time() + wait
        while True:
            left = t_end - time.time()
            if left <= 0 or (until_done and not pending):
                return
            try:
                payload = acks.get(timeout=min(0.1, left))
            except queue.Empty:
                continue
            try:
                doc = json.loads(payload)
                ranges = [(int(a), int(b)) for a, b in doc["ranges"]] if doc.get("spool") == spool.id else []
            except (ValueError, KeyError, TypeError):
                continue
            for a, b in ranges:
                acked += spool.ack_range(a, b, spool.id)
            pending = [r for r in pending if not any(a <= r[0] and r[1] <= b for a, b in ranges)]

    sent = batches = nbytes = 0
    try:
        c.subscribe(ACK_TOPIC.format(device=spool.device), qos=1)
        take(0.5, False)            # acknowledgements the broker kept since the last push
        after = 0
        infos = []
        while True:
            doc = spool.read(after, limit=batch, raw=True)
            if not doc["records"]:
                break
            payload = json.dumps({"device": doc["device"], "spool": doc["spool"], "records": doc["records"],
                                  "dropped": doc["dropped"]}, separators=(",", ":"))
            infos.append(c.publish(topic, payload, qos=1))
            pending.append([doc["records"][0]["seq"], doc["last"]])
            after = doc["last"]
            sent += len(doc["records"])
            batches += 1
            nbytes += len(payload)
        for info in infos:
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise PushError(f"the broker did not take a batch within {timeout:.0f}s; the records stay in the spool")
        if pending:
            take(ack_wait, True)
    finally:
        c.disconnect()          # first: the network thread then ends at once
        c.loop_stop()
    st = spool.stats()
    return {"records": sent, "batches": batches, "bytes": nbytes, "acknowledged": acked,
            "unacked": st["pending"], "topic": topic}
