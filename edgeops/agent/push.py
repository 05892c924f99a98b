"""Push mode: a device that cannot be reached over SSH publishes its spool to MQTT.

QoS 1 on a persistent session (clean_session off, client id edgeops-DEVICE): a batch of records
is deleted from the spool only after the broker's PUBACK for it. A crash between the PUBACK and
the delete publishes the batch again; the controller's store keys every record by
(device, spool, seq), so a redelivery is never a duplicate. Topic: edgeops/telemetry/DEVICE.

paho-mqtt is the one package this mode adds to the device (pure Python); the rest of the agent
does not import it. Without it, push mode refuses in one line.
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlparse

from .spool import Spool

TOPIC = "edgeops/telemetry/{device}"


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


def push(spool: Spool, url: str, *, batch: int = 500, timeout: float = 30.0, limit: int | None = None) -> dict:
    """Publish everything in SPOOL, batch by batch, deleting each batch after its PUBACK."""
    c = connect(url, f"edgeops-{spool.device}")
    topic = TOPIC.format(device=spool.device)
    sent = batches = nbytes = 0
    try:
        after = 0
        while True:
            doc = spool.read(after, limit=batch, raw=True)
            if not doc["records"]:
                break
            payload = json.dumps({"device": doc["device"], "spool": doc["spool"], "records": doc["records"],
                                  "dropped": doc["dropped"]}, separators=(",", ":"))
            info = c.publish(topic, payload, qos=1)
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise PushError(f"no PUBACK within {timeout:.0f}s for batch up to seq {doc['last']}; "
                                "the records stay in the spool")
            spool.ack(doc["last"], doc["spool"])
            after = doc["last"]
            sent += len(doc["records"])
            batches += 1
            nbytes += len(payload)
            if limit is not None and sent >= limit:
                break
    finally:
        c.disconnect()          # first: the network thread then ends at once
        c.loop_stop()
    return {"records": sent, "batches": batches, "bytes": nbytes, "topic": topic}
