"""What the stored telemetry says: per model version and device, request counts, latency
quantiles from the merged histograms, error rates, PSI against the version's reference profile,
and alerts; and the rollout's bake gate, which compares a device's new version with the SAME
device's previous version (paired), never with a fleet average.

Alerts (defaults; Evidently's PSI bands):
    drift      a tensor's PSI > 0.25 over >= 200 samples (0.1-0.25 is shown as the band
               "moderate", not alerted: with 10 bins and up to 64 features, sampling noise alone
               reaches 0.1 on a few hundred requests)
    slo        the bundle's SLO percentile above its latency limit
    errors     error rate above 1 %
    dropped    the device's spool dropped records under its byte cap
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..agent import profile as P

ERROR_ALERT = 0.01
PCT = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}


@dataclass
class Agg:
    """Windows of one (model, version, device) merged."""
    count: int = 0
    errors: dict = field(default_factory=dict)
    lat: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)      # tensor -> merged counts
    outputs: dict = field(default_factory=dict)
    n_in: dict = field(default_factory=dict)
    n_out: dict = field(default_factory=dict)
    windows: int = 0
    first: float | None = None
    last: float | None = None
    first_error: str | None = None

    def add(self, body: dict, t: float) -> None:
        self.count += int(body.get("count", 0))
        for k, n in (body.get("errors") or {}).items():
            self.errors[k] = self.errors.get(k, 0) + int(n)
        P.merge_hist(self.lat, body.get("lat") or {})
        for side, into, ns in (("inputs", self.inputs, self.n_in), ("outputs", self.outputs, self.n_out)):
            for k, v in (body.get(side) or {}).items():
                into[k] = P.merge_counts(into.get(k), v["counts"])
                ns[k] = ns.get(k, 0) + int(v["n"])
        self.windows += 1
        t0 = body.get("t0", t)
        self.first = t0 if self.first is None else min(self.first, t0)
        self.last = t if self.last is None else max(self.last, t)
        self.first_error = self.first_error or body.get("first_error")

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())

    def ms(self, q: float) -> float | None:
        v = P.quantile(self.lat, q)
        return None if v is None else v * 1e3


def profiles(store, model: str | None = None) -> dict:
    """(model, version) -> {"profile", "slo"} from the profile records devices sent."""
    out = {}
    for r in store.records("profile", model=model):
        out[(r["model"], r["version"])] = r["body"]
    return out


def aggregate(store, *, model=None, devices=None, since=None, version=None, until=None) -> dict:
    aggs: dict[tuple, Agg] = {}
    for r in store.records("window", model=model, devices=devices, since=since, version=version):
        if until is not None and r["t"] > until:
            continue
        aggs.setdefault((r["model"], r["version"], r["device"]), Agg()).add(r["body"], r["t"])
    return aggs


def drift(agg: Agg, prof: dict | None) -> dict:
    """PSI per tensor of AGG against the version's reference profile."""
    out = {}
    if not prof:
        return out
    for side, counts, ns in (("inputs", agg.inputs, agg.n_in), ("outputs", agg.outputs, agg.n_out)):
        for k, c in counts.items():
            p = (prof.get(side) or {}).get(k)
            if p is None:
                continue
            r = P.tensor_psi(p, c)
            out[f"{side[:-1]}:{k}"] = {**r, "n": ns.get(k, 0), "band": P.band(r["psi"]) if ns.get(k, 0) >= P.MIN_DRIFT_SAMPLES else None}
    return out


def summarize(store, *, model=None, devices=None, since=None) -> list[dict]:
    profs = profiles(store, model)
    dev_info = {d["device"]: d for d in store.devices()}
    rows = []
    for (m, v, d), a in sorted(aggregate(store, model=model, devices=devices, since=since).items()):
        pf = profs.get((m, v)) or {}
        dr = drift(a, pf.get("profile"))
        slo = pf.get("slo") or None
        row = {"model": m, "version": v, "device": d, "count": a.count, "errors": a.errors,
               "error_rate": a.n_errors / a.count if a.count else 0.0,
               "p50_ms": a.ms(0.5), "p99_ms": a.ms(0.99), "windows": a.windows, "first": a.first, "last": a.last,
               "drift": dr, "slo": slo, "profile": bool(pf)}
        psi_in = [x["psi"] for k, x in dr.items() if k.startswith("input:") and x["psi"] is not None]
        psi_out = [x["psi"] for k, x in dr.items() if k.startswith("output:") and x["psi"] is not None]
        row["psi_in"] = max(psi_in) if psi_in else None
        row["psi_out"] = max(psi_out) if psi_out else None
        row["alerts"] = alerts(row, a, dev_info.get(d))
        rows.append(row)
    return rows


def alerts(row: dict, a: Agg, dev: dict | None) -> list[str]:
    out = []
    for k, x in row["drift"].items():
        if x["band"] == "drifted":
            out.append(f"drift: {k} PSI {x['psi']:.2f} > {P.PSI_ALERT} (feature {x['feature']}, n={x['n']})")
    slo = row.get("slo")
    if slo and slo.get("latency_ms"):
        q = PCT.get(slo.get("percentile", "p99"), 0.99)
        got = a.ms(q)
        if got is not None and got > slo["latency_ms"]:
            out.append(f"slo: {slo.get('percentile', 'p99')} {got:.2f} ms > {slo['latency_ms']} ms")
    if row["count"] and row["error_rate"] > ERROR_ALERT:
        out.append(f"errors: {row['error_rate'] * 100:.1f} % ({', '.join(f'{k} {n}' for k, n in sorted(a.errors.items()))})")
    if dev and any((dev.get("dropped") or {}).values()):
        out.append("dropped: the spool dropped " + ", ".join(f"{n} {k}" for k, n in sorted(dev["dropped"].items()) if n))
    return out


# ---------------------------------------------------------------------- the rollout's bake gate
@dataclass
class Gate:
    """Telemetry criteria a rollout's bake applies to its new version. None: criterion off."""
    slo_ms: float | None = None
    percentile: str = "p99"
    max_error_rate: float | None = None
    max_drift: float | None = None
    min_requests: int = 50

    def active(self) -> bool:
        return any(x is not None for x in (self.slo_ms, self.max_error_rate, self.max_drift))

    def text(self) -> str:
        parts = []
        if self.slo_ms is not None:
            parts.append(f"{self.percentile} <= {self.slo_ms} ms")
        if self.max_error_rate is not None:
            parts.append(f"errors <= {self.max_error_rate * 100:g} %")
        if self.max_drift is not None:
            parts.append(f"output PSI vs previous version <= {self.max_drift}")
        return ", ".join(parts) + f" (each device, >= {self.min_requests} requests)"


def judge(store, gate: Gate, model: str, version: str, devices: dict[str, dict], *, final: bool) -> dict:
    """The gate's verdict on DEVICES {name: {"since": install time, "previous": old version}}.
    Returns {"breach": [(device, reason, message)], "pending": [device], "checked": {device: figures}}.
    FINAL (the end of the bake): a device without enough requests is a NO_TELEMETRY breach, since a
    gate the user asked for is never passed on no data."""
    profs = profiles(store, model)
    new_prof = (profs.get((model, version)) or {}).get("profile")
    res = {"breach": [], "pending": [], "checked": {}}
    for dev, info in sorted(devices.items()):
        a = aggregate(store, model=model, devices=[dev], version=version, since=info.get("since")).get((model, version, dev))
        if a is None or a.count < gate.min_requests:
            n = a.count if a else 0
            if final:
                res["breach"].append((dev, "NO_TELEMETRY", f"{n} request(s) of {model}:{version} seen during the bake "
                                                           f"(need {gate.min_requests}); the gate cannot judge it"))
            else:
                res["pending"].append(dev)
            continue
        fig = {"requests": a.count, "error_rate": a.n_errors / a.count}
        if gate.slo_ms is not None:
            got = a.ms(PCT[gate.percentile])
            fig[gate.percentile + "_ms"] = got
            if got is not None and got > gate.slo_ms:
                res["breach"].append((dev, "LATENCY", f"{gate.percentile} {got:.2f} ms > SLO {gate.slo_ms} ms "
                                                      f"over {a.count} requests"))
        if gate.max_error_rate is not None and fig["error_rate"] > gate.max_error_rate:
            res["breach"].append((dev, "ERRORS", f"error rate {fig['error_rate'] * 100:.2f} % > "
                                                 f"{gate.max_error_rate * 100:g} % ({a.errors})"))
        if gate.max_drift is not None:
            prev = info.get("previous")
            old = aggregate(store, model=model, devices=[dev], version=prev, until=info.get("since")).get(
                (model, prev, dev)) if prev else None
            old_prof = (profs.get((model, prev)) or {}).get("profile") if prev else None
            worst = None
            basis = "previous version on this device"
            for k, c in a.outputs.items():
                p_new = (new_prof or {}).get("outputs", {}).get(k)
                if old is not None and old_prof and k in old.outputs and p_new:
                    before = P.rebin(old.outputs[k], old_prof["outputs"][k], p_new) if k in old_prof.get("outputs", {}) else None
                    if before is None:
                        continue
                    vals = [P.psi_between(b, x) for b, x in zip(before, c)]
                elif p_new:      # no previous-version telemetry here: against the reference, and said so
                    basis = "reference profile (no telemetry of the previous version on this device)"
                    vals = [P.psi(r, x) for r, x in zip(p_new["ref"], c)]
                else:
                    continue
                vals = [v for v in vals if v is not None]
                if vals and (worst is None or max(vals) > worst[1]):
                    worst = (k, max(vals))
            fig["drift_basis"] = basis
            if worst is None:
                res["breach"].append((dev, "NO_TELEMETRY", f"no output distribution to compare for {model}:{version}"))
            else:
                fig["psi_out"] = worst[1]
                if worst[1] > gate.max_drift:
                    res["breach"].append((dev, "DRIFT", f"output {worst[0]} PSI {worst[1]:.2f} > {gate.max_drift} "
                                                        f"against the {basis}"))
        res["checked"][dev] = fig
    return res


def parse_since(text: str | None) -> float | None:
    """'1h', '30m', '2d', '45s' -> an absolute time (now minus it)."""
    if not text:
        return None
    from ..errors import UsageError

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        n, u = float(text[:-1]), text[-1]
        if u not in units or n < 0:
            raise ValueError
    except (ValueError, IndexError):
        raise UsageError(f"--since {text!r}: expected a number and s, m, h or d (e.g. 1h)") from None
    return time.time() - n * units[u]
