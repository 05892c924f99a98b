"""The Prometheus text exposition of the telemetry store (`edgeops telemetry serve`), written with
prometheus-client's own metric families so the format is the library's, not ours.

    edgeops_requests_total{device,model,version}                counter (all stored windows)
    edgeops_errors_total{device,model,version,kind}             counter
    edgeops_latency_seconds{device,model,version}               histogram (4 buckets per decade;
                                                                the store keeps 20, merged exactly)
    edgeops_drift_psi{device,model,version,tensor}              gauge, over the last --window
    edgeops_device_load1 / _memory_available_bytes / _disk_free_bytes / _temperature_celsius{zone}
    edgeops_telemetry_dropped_total{device,kind}                records the device's spool dropped
    edgeops_telemetry_pending{device}                           records waiting on the device at last contact
    edgeops_telemetry_last_seen_timestamp_seconds{device}
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..agent import profile as P
from . import analysis as A

EXPORT_EVERY = 5        # of the store's 20 buckets per decade


class StoreCollector:
    def __init__(self, store, window_s: float = 900.0, cache_s: float = 1.0):
        self.store, self.window_s, self.cache_s = store, window_s, cache_s
        self._lock = threading.Lock()
        self._cached: tuple[float, list] | None = None

    def collect(self):
        with self._lock:
            if self._cached and time.time() - self._cached[0] < self.cache_s:
                return iter(self._cached[1])
            fams = self._families()
            self._cached = (time.time(), fams)
            return iter(fams)

    def _families(self) -> list:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        lab = ["device", "model", "version"]
        req = CounterMetricFamily("edgeops_requests", "Inference requests recorded on the device", labels=lab)
        err = CounterMetricFamily("edgeops_errors", "Failed requests by kind (exception, shape, nonfinite)",
                                  labels=lab + ["kind"])
        lat = HistogramMetricFamily("edgeops_latency_seconds", "Inference latency on the device", labels=lab)
        psi = GaugeMetricFamily("edgeops_drift_psi", "PSI against the version's reference profile over the last window",
                                labels=lab + ["tensor"])
        store = self.store
        for (m, v, d), a in sorted(A.aggregate(store).items()):
            key = [d, m or "", v or ""]
            req.add_metric(key, a.count)
            for k, n in sorted(a.errors.items()):
                err.add_metric(key + [k], n)
            buckets, cum = [], 0
            counts = {int(k): n for k, n in a.lat.items()}
            for i, bound in enumerate(P.BOUNDS):
                cum += counts.get(i, 0)
                if i % EXPORT_EVERY == 0:
                    buckets.append((f"{bound:.6g}", cum))
            buckets.append(("+Inf", sum(counts.values())))
            total = sum(P.quantile({k: n}, 0.5) * n for k, n in counts.items())  # bucket midpoints
            lat.add_metric(key, buckets, total)
        profs = A.profiles(store)
        recent = A.aggregate(store, since=time.time() - self.window_s)
        for (m, v, d), a in sorted(recent.items()):
            for tensor, x in sorted(A.drift(a, (profs.get((m, v)) or {}).get("profile")).items()):
                if x["psi"] is not None:
                    psi.add_metric([d, m or "", v or "", tensor], x["psi"])
        load = GaugeMetricFamily("edgeops_device_load1", "1-minute load average", labels=["device"])
        mem = GaugeMetricFamily("edgeops_device_memory_available_bytes", "MemAvailable", labels=["device"])
        disk = GaugeMetricFamily("edgeops_device_disk_free_bytes", "Free bytes on the agent's filesystem",
                                 labels=["device"])
        temp = GaugeMetricFamily("edgeops_device_temperature_celsius", "Thermal zones (where the device has them)",
                                 labels=["device", "zone"])
        drop = CounterMetricFamily("edgeops_telemetry_dropped", "Records the device's spool dropped under its cap",
                                   labels=["device", "kind"])
        pend = GaugeMetricFamily("edgeops_telemetry_pending", "Records waiting in the device's spool at last contact",
                                 labels=["device"])
        seen = GaugeMetricFamily("edgeops_telemetry_last_seen_timestamp_seconds", "Last collection or ingest",
                                 labels=["device"])
        for dev in store.devices():
            d = dev["device"]
            h = dev.get("health") or {}
            if h.get("load"):
                load.add_metric([d], h["load"][0])
            if h.get("mem_available") is not None:
                mem.add_metric([d], h["mem_available"])
            if h.get("disk_free") is not None:
                disk.add_metric([d], h["disk_free"])
            for zone, c in sorted((h.get("temperature_c") or {}).items()):
                temp.add_metric([d, zone], c)
            for kind in ("sample", "health", "event", "window", "profile"):
                drop.add_metric([d, kind], (dev.get("dropped") or {}).get(kind, 0))
            if dev.get("pending") is not None:
                pend.add_metric([d], dev["pending"])
            if dev.get("seen"):
                seen.add_metric([d], dev["seen"])
        return [req, err, lat, psi, load, mem, disk, temp, drop, pend, seen]


def make_server(store, host: str = "127.0.0.1", port: int = 9464, window_s: float = 900.0) -> ThreadingHTTPServer:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, window_s))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            if self.path.split("?")[0] != "/metrics":
                self.send_response(404)
                self.end_headers()
                self.wfile.write(b"only /metrics here\n")
                return
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer((host, port), Handler)
    srv.daemon_threads = True
    return srv
