"""The one report schema of `edgeops bench`, whichever way the latency was obtained.

  mode "measured": `measurement` holds phases and statistics from the runner
                   (edgeops/agent/bench_runner.py) and `environment` the machine it ran on,
                   this one (where = "local") or a device (where = "device").
  mode "predicted": `prediction` holds the estimate from a target profile; `measurement` and
                   `environment` are null. Predicted numbers never appear under `measurement`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEMA = "edgeops.bench/1"
PERCENTILES = ("min", "mean", "p50", "p90", "p95", "p99", "p99.9", "max")


@dataclass
class BenchReport:
    mode: str                          # "measured" | "predicted"
    where: str                         # "local" | "device" | "target"
    model: dict
    settings: dict
    measurement: dict | None = None
    environment: dict | None = None
    prediction: dict | None = None
    target: dict | None = None
    device: dict | None = None
    budget: dict | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def breached(self) -> bool:
        return bool(self.budget and self.budget["verdict"] == "BREACH")

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "mode": self.mode, "where": self.where, "model": self.model,
                "settings": self.settings, "measurement": self.measurement,
                "environment": self.environment, "prediction": self.prediction,
                "target": self.target, "device": self.device, "budget": self.budget,
                "warnings": self.warnings, "seconds": round(self.seconds, 3)}


def predicted_value(pred: dict) -> tuple[str, float]:
    """(statistic, ms) of a prediction: the median, or the mean when the profile was
    calibrated on means."""
    stat = pred.get("statistic", "p50")
    return stat, pred[f"{stat}_ms"]


def apply_budget(report: BenchReport, budget_ms: float, percentile: str) -> dict:
    """Measured: the percentile against the budget. Predicted: the predicted median's interval
    against the budget (meets / BREACH / uncertain), since tails cannot be predicted."""
    if report.mode == "measured":
        value = report.measurement["latency_ms"][percentile]
        verdict = "BREACH" if value > budget_ms else "meets"
        b = {"ms": budget_ms, "percentile": percentile, "value_ms": value, "verdict": verdict,
             "basis": f"measured {percentile}"}
    else:
        p = report.prediction
        stat, value = predicted_value(p)
        lo, hi = p["interval_ms"]
        verdict = "BREACH" if lo > budget_ms else "meets" if hi <= budget_ms else "uncertain"
        b = {"ms": budget_ms, "percentile": percentile, "value_ms": value,
             "interval_ms": [lo, hi], "verdict": verdict,
             "basis": f"predicted {stat} and its interval"}
        if percentile != stat:
            report.warnings.append(
                f"the budget is on {percentile}, but the prediction estimates the {stat} only; "
                "tails depend on the device's load: measure on it (--device) to check "
                f"{percentile}")
        if verdict == "uncertain":
            report.warnings.append(
                f"the budget {budget_ms:g} ms lies inside the predicted interval "
                f"{lo:.3g}-{hi:.3g} ms: the prediction cannot decide; measure on the device")
    report.budget = b
    return b
