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
    prev: dict = field(default_factory=dict)        # previous version -> {tensor: counts in ITS bins}
    n_prev: dict = field(default_factory=dict)
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
        op = body.get("outputs_prev") or {}
        if op.get("version"):
            into = self.prev.setdefault(op["version"], {})
            ns = self.n_prev.setdefault(op["version"], {})
            for k, v in (op.get("outputs") or {}).items():
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

    def __post_init__(self):
        # a gated bake always halts on failing requests: 1 % unless --max-error-rate says otherwise
        if self.active() and self.max_error_rate is None:
            self.max_error_rate = ERROR_ALERT

    def text(self) -> str:
        parts = []
        if self.slo_ms is not None:
            parts.append(f"{self.percentile} <= {self.slo_ms} ms")
        if self.max_error_rate is not None:
            parts.append(f"errors <= {self.max_error_rate * 100:g} %")
        if self.max_drift is not None:
            parts.append(f"output PSI vs the device's previous version <= {self.max_drift} (+ sampling noise)")
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
            if got is None:         # every request failed: nothing met the SLO
                res["breach"].append((dev, "LATENCY", f"none of {a.count} requests answered ({a.errors})"))
            elif got > gate.slo_ms:
                res["breach"].append((dev, "LATENCY", f"{gate.percentile} {got:.2f} ms > SLO {gate.slo_ms} ms "
                                                      f"over {a.count} requests"))
        if gate.max_error_rate is not None and fig["error_rate"] > gate.max_error_rate:
            res["breach"].append((dev, "ERRORS", f"error rate {fig['error_rate'] * 100:.2f} % > "
                                                 f"{gate.max_error_rate * 100:g} % ({a.errors})"))
        if gate.max_drift is not None:
            _drift_check(store, gate, model, version, dev, info, a, new_prof, profs, fig, res, final)
        res["checked"][dev] = fig
    return res


def _noise(counts_a: list, counts_b_n: int, n_a: int) -> float:
    """PSI that sampling alone reaches between two samples of one distribution, with margin:
    3 x (bins - 1) x (1/n_a + 1/n_b) (PSI ~ chi2(bins-1)/n for equal distributions)."""
    return 3 * (len(counts_a) - 1) * (1 / max(n_a, 1) + 1 / max(counts_b_n, 1))


def _drift_check(store, gate, model, version, dev, info, a, new_prof, profs, fig, res, final) -> None:
    """Output drift of VERSION on DEV against the same device's previous version: the runtime bins
    the new version's outputs with the previous version's reference bins too (`outputs_prev`), so
    the two are compared bin for bin. Without telemetry of the previous version on this device,
    against the new version's reference profile, and the verdict says so. A breach needs PSI above
    --max-drift plus what sampling noise alone reaches at these sample sizes."""
    prev = info.get("previous")
    old = aggregate(store, model=model, devices=[dev], version=prev, until=info.get("since")).get(
        (model, prev, dev)) if prev else None
    worst, basis, short = None, None, []
    for k, c in a.outputs.items():
        n_new = a.n_out.get(k, 0)
        paired = (a.prev.get(prev) or {}).get(k) if prev else None
        if paired is not None and old is not None and k in old.outputs:
            basis = f"{prev} on this device"
            n_new, n_old = (a.n_prev.get(prev) or {}).get(k, 0), old.n_out.get(k, 0)
            pairs = list(zip(old.outputs[k], paired))
        elif new_prof and k in (new_prof.get("outputs") or {}):
            basis = basis or "the reference profile (no telemetry of the previous version on this device)"
            ref = new_prof["outputs"][k]
            n_old = int(ref.get("samples") or 0)
            pairs = [([p * n_old for p in r], x) for r, x in zip(ref["ref"], c)]
        else:
            continue
        if min(n_new, n_old) < P.MIN_DRIFT_SAMPLES:
            short.append(f"{k}: {n_new}/{n_old} samples")
            continue
        for before, after in pairs:
            v = P.psi_between(before, after)
            if v is None:
                continue
            margin = _noise(before, n_new, n_old)
            if worst is None or v - margin > worst[1] - worst[2]:
                worst = (k, v, margin)
    fig["drift_basis"] = basis
    if worst is None:
        if final:
            res["breach"].append((dev, "NO_TELEMETRY", f"not enough output samples of {model}:{version} to judge drift "
                                                       f"(need {P.MIN_DRIFT_SAMPLES}: {', '.join(short) or 'none'})"))
        elif dev not in res["pending"]:
            res["pending"].append(dev)
        return
    fig["psi_out"], fig["psi_noise"] = worst[1], worst[2]
    if worst[1] > gate.max_drift + worst[2]:
        res["breach"].append((dev, "DRIFT", f"output {worst[0]} PSI {worst[1]:.2f} > {gate.max_drift} "
                                            f"(+{worst[2]:.2f} sampling noise) against {basis}"))


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
