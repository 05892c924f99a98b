"""The rollout's plan and abort rule: pure logic, no devices, no clocks of its own (callers pass
`now`), so every scheduling decision is unit-tested deterministically.

Selection: device names (`d1,d2`), a label selector (`site=lab,hw=rpi4`: every pair must
match), or all enrolled devices. Devices are grouped per target (one bundle per target).

Waves (hawkBit groups, flightctl batch sequences, Mender phases): a canary wave with one device
of each hardware class (target x device runtime), then `--waves`: a percentage is the
*cumulative* share of the selected fleet reached at the end of that wave (`10%,50%,100%`), a
bare number is that wave's own size; the last wave always takes the remainder. A wave that
comes out empty is refused when the plan is made, never discovered mid-rollout.

Abort rule (AWS IoT Jobs' abortConfig): per failure type, `--max-failures` (a percentage of the
finished devices, or a count), evaluated once `--min-devices` have finished. Retries only for
transient types (a device that answered VERIFY, HEALTH or SLO will answer it again).

Rate (AWS exponential rollout): `--rate N/min` spaces device starts; after every N successes the
rate is multiplied by `ramp` (default 2), so a healthy rollout speeds up.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import UsageError

FAILURE_TYPES = ("UNREACHABLE", "PREFLIGHT", "TRANSFER", "VERIFY", "HEALTH", "SLO", "SWITCH", "TIMEOUT")
TRANSIENT = frozenset({"UNREACHABLE", "TRANSFER", "TIMEOUT"})


@dataclass(frozen=True)
class Member:
    """What the plan needs to know about a device."""
    name: str
    target: str
    labels: tuple = ()                   # sorted (key, value) pairs
    runtime: str = ""                    # e.g. "x86_64/onnxruntime 1.32.0"

    @property
    def hw_class(self) -> tuple[str, str]:
        return (self.target, self.runtime)

    def label(self, key: str) -> str | None:
        return dict(self.labels).get(key)


# ----------------------------------------------------------------------------- selection

def parse_selector(text: str) -> tuple[list[str], dict[str, str]]:
    """`d1,d2` -> names; `site=lab,hw=rpi4` -> labels (all must match). Not both."""
    parts = [p.strip() for p in (text or "").split(",") if p.strip()]
    if not parts:
        raise UsageError("--devices is empty", hint="names (d1,d2) or labels (site=lab,hw=rpi4), or --all")
    labeled = [p for p in parts if "=" in p]
    if labeled and len(labeled) != len(parts):
        raise UsageError(f"--devices {text!r} mixes names and labels", hint="use names or K=V labels, not both")
    if not labeled:
        return parts, {}
    out = {}
    for p in labeled:
        k, _, v = p.partition("=")
        if not k.strip():
            raise UsageError(f"--devices: {p!r} has no label name")
        out[k.strip()] = v.strip()
    return [], out


def select(devices: list[Member], names: list[str] | None = None, labels: dict | None = None,
           everything: bool = False) -> list[Member]:
    by = {d.name: d for d in devices}
    if everything:
        chosen = list(devices)
    elif names:
        missing = [n for n in names if n not in by]
        if missing:
            raise UsageError(f"unknown or not enrolled device(s): {', '.join(missing)}",
                             hint="edgeops devices list shows the inventory; enrol with edgeops devices enrol")
        if len(set(names)) != len(names):
            raise UsageError("a device is named twice in --devices")
        chosen = [by[n] for n in names]
    elif labels:
        chosen = [d for d in devices if all(d.label(k) == v for k, v in labels.items())]
    else:
        raise UsageError("no devices selected", hint="--devices NAMES|K=V,... or --all")
    if not chosen:
        raise UsageError("the selection matches no enrolled device")
    return sorted(chosen, key=lambda d: d.name)


def by_target(devices: list[Member]) -> dict[str, list[Member]]:
    out: dict[str, list[Member]] = {}
    for d in devices:
        out.setdefault(d.target, []).append(d)
    return out


# ----------------------------------------------------------------------------- waves

@dataclass(frozen=True)
class WaveSpec:
    value: float
    percent: bool

    def text(self) -> str:
        return f"{self.value:g}%" if self.percent else f"{int(self.value)}"


def parse_waves(text: str | None) -> list[WaveSpec]:
    if not text:
        return [WaveSpec(100, True)]
    out = []
    for p in text.split(","):
        p = p.strip()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)%", p)
        if m:
            v = float(m.group(1))
            if not 0 < v <= 100:
                raise UsageError(f"--waves: {p} is not in (0, 100]%")
            out.append(WaveSpec(v, True))
        elif re.fullmatch(r"\d+", p) and int(p) > 0:
            out.append(WaveSpec(int(p), False))
        else:
            raise UsageError(f"--waves: {p!r} is not a percentage (10%) or a device count (5)")
    pcts = [w.value for w in out if w.percent]
    if pcts != sorted(pcts):
        raise UsageError(f"--waves {text}: percentages are cumulative shares and must not decrease")
    return out


@dataclass
class Wave:
    index: int
    name: str
    devices: list[Member]


def make_waves(devices: list[Member], specs: list[WaveSpec], canary: bool = True) -> list[Wave]:
    """Canary (one device per hardware class), then the specs; the last wave takes the rest."""
    total = len(devices)
    left = list(devices)
    waves: list[Wave] = []
    if canary and total > 1:
        seen, first = set(), []
        for d in left:
            if d.hw_class not in seen:
                seen.add(d.hw_class)
                first.append(d)
        if len(first) < total:          # a canary of the whole fleet is just one wave
            waves.append(Wave(0, "canary", first))
            left = [d for d in left if d not in first]
    done = total - len(left)
    for i, spec in enumerate(specs):
        last = i == len(specs) - 1
        if last:
            n = len(left)
        elif spec.percent:
            n = math.ceil(spec.value / 100 * total) - done
        else:
            n = int(spec.value)
        n = min(n, len(left))
        if n <= 0:
            raise UsageError(f"wave {i + 1} ({spec.text()}) has no devices: {done} of {total} are already in "
                             "earlier waves", hint="use fewer or larger waves (--waves)")
        waves.append(Wave(len(waves), f"wave {i + 1} ({spec.text()})", left[:n]))
        left = left[n:]
        done += n
        if not left and not last:
            raise UsageError(f"--waves: the fleet of {total} is used up by wave {i + 1}; "
                             f"the later waves would be empty", hint="use fewer waves")
    return waves


# ----------------------------------------------------------------------------- abort rule

@dataclass(frozen=True)
class Threshold:
    value: float
    percent: bool

    @classmethod
    def parse(cls, text: str) -> "Threshold":
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", str(text))
        if not m:
            raise UsageError(f"--max-failures {text!r} is not a percentage (10%) or a count (3)")
        v, pct = float(m.group(1)), bool(m.group(2))
        if pct and v > 100:
            raise UsageError(f"--max-failures {text}: above 100%")
        return cls(v, pct)

    def exceeded(self, failures: int, finished: int) -> bool:
        if self.percent:
            return finished > 0 and 100.0 * failures / finished > self.value
        return failures > self.value

    def text(self) -> str:
        return f"{self.value:g}%" if self.percent else f"{int(self.value)}"


@dataclass
class AbortRule:
    max_failures: Threshold = field(default_factory=lambda: Threshold(10, True))
    min_devices: int = 1

    def breach(self, failures: dict[str, int], finished: int) -> str | None:
        """Why the rollout must halt now, or None. FAILURES counts final failures per type."""
        if finished < self.min_devices:
            return None
        for t in FAILURE_TYPES:
            n = failures.get(t, 0)
            if n and self.max_failures.exceeded(n, finished):
                return (f"{n} {t} failure(s) among {finished} finished device(s) exceed --max-failures "
                        f"{self.max_failures.text()}")
        return None


def should_retry(reason: str | None, attempts: int, retries: int) -> bool:
    """Retry a transient failure while attempts (so far, including this one) <= retries."""
    return reason in TRANSIENT and attempts <= retries


# ----------------------------------------------------------------------------- rate

@dataclass
class Rate:
    per_minute: float | None = None      # None: no limit
    ramp: float = 2.0

    @classmethod
    def parse(cls, text: str | None, ramp: float = 2.0) -> "Rate":
        if not text:
            return cls(None, ramp)
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(/\s*min)?\s*", text)
        if not m or float(m.group(1)) <= 0:
            raise UsageError(f"--rate {text!r} is not N/min")
        if ramp < 1:
            raise UsageError("--ramp must be >= 1")
        return cls(float(m.group(1)), ramp)

    def current(self, succeeded: int) -> float | None:
        """Starts per minute after SUCCEEDED successes: x ramp after every `per_minute` successes."""
        if self.per_minute is None:
            return None
        steps = int(succeeded // max(1, int(self.per_minute)))
        return self.per_minute * (self.ramp ** min(steps, 30))

    def next_start(self, last_start: float | None, succeeded: int) -> float:
        """The earliest time the next device may start (0 when unlimited)."""
        r = self.current(succeeded)
        if r is None or last_start is None:
            return 0.0
        return last_start + 60.0 / r


# ----------------------------------------------------------------------------- scheduler

@dataclass
class DeviceRun:
    member: Member
    wave: int
    state: str = "pending"               # pending, running, succeeded, failed, skipped
    attempts: int = 0
    reason: str | None = None
    message: str = ""


@dataclass
class GateCheck:
    """The bake after WAVE is over and a telemetry gate applies: the caller judges the wave and
    calls `clear(wave)` or `halt(why)` before anything else may start."""
    wave: int


class Scheduler:
    """Which device starts next, and when the rollout halts. Pure: the caller reports
    completions and passes the time; the scheduler never sleeps or talks to a device."""

    def __init__(self, waves: list[Wave], *, parallel: int = 4, rule: AbortRule | None = None,
                 retries: int = 0, rate: Rate | None = None, bake: float = 0.0, gated: bool = False):
        if parallel < 1:
            raise UsageError("--parallel must be at least 1")
        if retries < 0:
            raise UsageError("--retries must be >= 0")
        self.waves, self.parallel, self.rule = waves, parallel, rule or AbortRule()
        self.retries, self.rate, self.bake = retries, rate or Rate(), bake
        self.runs = {d.name: DeviceRun(d, w.index) for w in waves for d in w.devices}
        self.wave = 0
        self.wave_done_at: float | None = None
        self.halted: str | None = None
        self.last_start: float | None = None
        self.gated = gated and bake > 0
        self.cleared = -1                # the last wave a gate passed

    # -- queries
    def running(self) -> list[DeviceRun]:
        return [r for r in self.runs.values() if r.state == "running"]

    def failures(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.runs.values():
            if r.state == "failed":
                out[r.reason or "UNKNOWN"] = out.get(r.reason or "UNKNOWN", 0) + 1
        return out

    def finished(self) -> int:
        return sum(1 for r in self.runs.values() if r.state in ("succeeded", "failed"))

    def succeeded(self) -> int:
        return sum(1 for r in self.runs.values() if r.state == "succeeded")

    def done(self) -> bool:
        if self.running():
            return False
        if self.halted:
            return True
        if self.gated and self.cleared < len(self.waves) - 1:
            return False                 # the last wave's bake and gate are still ahead
        return all(r.state in ("succeeded", "failed", "skipped") for r in self.runs.values())

    # -- decisions
    def next(self, now: float) -> DeviceRun | None | float | GateCheck:
        """A device to start now, None if nothing can start (wait for a completion), a time
        (float) before which nothing may start (rate or bake), or a GateCheck when a bake ended
        and its telemetry gate must be judged first."""
        if self.halted or len(self.running()) >= self.parallel:
            return None
        while self.wave < len(self.waves):
            pending = [self.runs[d.name] for d in self.waves[self.wave].devices
                       if self.runs[d.name].state == "pending"]
            if pending:
                break
            if any(self.runs[d.name].state == "running" for d in self.waves[self.wave].devices):
                return None              # a wave finishes before the next one starts
            if self.wave_done_at is None:
                self.wave_done_at = now
            last = self.wave + 1 >= len(self.waves)
            # a gated bake follows every wave, the last one too (its verdict can still halt, and
            # --on-halt rollback undo, the whole rollout); an ungated bake only separates waves
            if (self.gated or not last) and now < self.wave_done_at + self.bake:
                return self.wave_done_at + self.bake
            if self.gated and self.cleared < self.wave:
                return GateCheck(self.wave)
            self.wave += 1
            self.wave_done_at = None
        else:
            return None
        at = self.rate.next_start(self.last_start, self.succeeded())
        if at > now:
            return at
        r = pending[0]
        r.state, r.attempts = "running", r.attempts + 1
        self.last_start = now
        return r

    def complete(self, name: str, ok: bool, reason: str | None = None, message: str = "") -> str:
        """Record a device's result; returns 'succeeded', 'retry' or 'failed'. Checks the abort
        rule: once breached, no device starts again (those running finish)."""
        r = self.runs[name]
        if r.state != "running":
            raise ValueError(f"{name} is not running")
        r.reason, r.message = (None, message) if ok else (reason or "UNKNOWN", message)
        if ok:
            r.state = "succeeded"
        elif should_retry(reason, r.attempts, self.retries) and not self.halted:
            r.state = "pending"
            return "retry"
        else:
            r.state = "failed"
        if not self.halted:
            why = self.rule.breach(self.failures(), self.finished())
            if why:
                self.halted = why
        return r.state

    def clear(self, wave: int) -> None:
        """The telemetry gate passed WAVE: the next wave may start."""
        self.cleared = max(self.cleared, wave)

    def baking(self) -> int | None:
        """The wave whose bake is under way (finished, not yet followed by the next), if any."""
        if self.wave_done_at is None or self.wave >= len(self.waves):
            return None
        return self.wave if (self.gated or self.wave + 1 < len(self.waves)) else None

    def halt(self, why: str) -> None:
        self.halted = self.halted or why

    def skip_pending(self) -> list[str]:
        """After a halt: the devices that never started."""
        out = []
        for r in self.runs.values():
            if r.state == "pending":
                r.state = "skipped"
                out.append(r.member.name)
        return out
