"""The rollout's plan, abort rule, retries and rate: pure scheduling logic, no devices (the
behaviour that touches devices is tested on real sshd devices in the fleet tests)."""

from __future__ import annotations

import pytest

from edgeops.errors import UsageError
from edgeops.fleet.plan import (AbortRule, Member, Rate, Scheduler, Threshold, WaveSpec, make_waves,
                                parse_selector, parse_waves, select, should_retry)


def fleet(n: int, classes=(("rpi4", "arm64/ort 1.32"),)) -> list[Member]:
    out = []
    for i in range(n):
        t, rt = classes[i % len(classes)]
        out.append(Member(f"d{i:02d}", t, (("site", "lab" if i % 2 == 0 else "field"),), rt))
    return out


def test_selection_by_names_labels_and_all():
    f = fleet(6)
    assert parse_selector("d01,d03") == (["d01", "d03"], {})
    assert parse_selector("site=lab") == ([], {"site": "lab"})
    with pytest.raises(UsageError, match="mixes"):
        parse_selector("d01,site=lab")
    assert [d.name for d in select(f, labels={"site": "lab"})] == ["d00", "d02", "d04"]
    assert len(select(f, everything=True)) == 6
    with pytest.raises(UsageError, match="unknown or not enrolled device"):
        select(f, names=["d01", "zz"])
    with pytest.raises(UsageError, match="matches no"):
        select(f, labels={"site": "moon"})


def test_waves_canary_per_hardware_class_cumulative_percentages_and_remainder():
    f = fleet(20, classes=(("rpi4", "a"), ("rpi4", "b"), ("jetson", "a")))
    waves = make_waves(f, parse_waves("25%,50%,100%"))
    assert waves[0].name == "canary" and len(waves[0].devices) == 3       # one per (target, runtime)
    assert {d.hw_class for d in waves[0].devices} == {("rpi4", "a"), ("rpi4", "b"), ("jetson", "a")}
    # 10% of 20 = 2 <= the canary's 3: that wave would be empty, refused at plan time
    with pytest.raises(UsageError, match=r"wave 1 \(10%\) has no devices"):
        make_waves(f, parse_waves("10%,100%"))
    waves = make_waves(f, parse_waves("25%,50%,100%"))
    assert [len(w.devices) for w in waves] == [3, 2, 5, 10]
    # counts are a wave's own size; the last wave takes the remainder whatever it says
    waves = make_waves(f, parse_waves("4,1"), canary=False)
    assert [len(w.devices) for w in waves] == [4, 16]
    assert sorted(d.name for w in waves for d in w.devices) == [d.name for d in f]
    with pytest.raises(UsageError, match="must not decrease"):
        parse_waves("50%,10%")
    with pytest.raises(UsageError, match="not a percentage"):
        parse_waves("10%,abc")
    with pytest.raises(UsageError, match="used up"):
        make_waves(fleet(3), [WaveSpec(5, False), WaveSpec(100, True)], canary=False)


def test_abort_rule_per_type_after_min_devices():
    rule = AbortRule(Threshold.parse("20%"), min_devices=5)
    assert rule.breach({"SLO": 2}, 4) is None                 # too few finished to judge
    assert rule.breach({"SLO": 1, "HEALTH": 1}, 5) is None    # 20 % each: not above
    assert "SLO" in rule.breach({"SLO": 2}, 5)
    rule = AbortRule(Threshold.parse("1"), min_devices=1)
    assert rule.breach({"VERIFY": 1}, 3) is None and "VERIFY" in rule.breach({"VERIFY": 2}, 3)
    with pytest.raises(UsageError):
        Threshold.parse("ten")


def test_retries_only_for_transient_failures():
    assert should_retry("TRANSFER", 1, 2) and should_retry("UNREACHABLE", 2, 2)
    assert not should_retry("TRANSFER", 3, 2)
    for t in ("VERIFY", "HEALTH", "SLO", "PREFLIGHT"):
        assert not should_retry(t, 1, 5)


def run(s: Scheduler, results: dict, start_times: dict | None = None, now: float = 0.0) -> float:
    """Drive the scheduler with a deterministic in-process 'transport': each device finishes
    1 s after it starts with RESULTS[name] (a list of outcomes consumed per attempt)."""
    running: dict[str, float] = {}
    while not s.done():
        nxt = s.next(now)
        if isinstance(nxt, float):
            now = max(now, nxt) if not running else min(nxt, min(running.values()))
            if not running:
                continue
        elif nxt is not None:
            running[nxt.member.name] = now + 1.0
            if start_times is not None:
                start_times.setdefault(nxt.member.name, []).append(now)
            continue
        if not running:
            break
        name = min(running, key=running.get)
        now = max(now, running.pop(name))
        outcome = results.get(name, [None]).pop(0) if results.get(name) else None
        s.complete(name, outcome is None, outcome)
    return now


def test_halt_means_no_device_starts_after_the_breach():
    f = fleet(12)
    waves = make_waves(f, parse_waves("50%,100%"), canary=False)
    s = Scheduler(waves, parallel=2, rule=AbortRule(Threshold.parse("10%"), min_devices=3))
    starts: dict = {}
    # d01 and d03 fail SLO: after 4 finished, 2/4 = 50 % > 10 %
    run(s, {"d01": ["SLO"], "d03": ["SLO"]}, starts)
    assert s.halted and "SLO" in s.halted
    skipped = s.skip_pending()
    assert skipped and all(n not in starts for n in skipped)
    breach_time = max(t for n in ("d01", "d03") for t in starts[n]) + 1.0
    assert all(t < breach_time for ts in starts.values() for t in ts)


def test_transient_failures_are_retried_and_succeed():
    f = fleet(4)
    s = Scheduler(make_waves(f, parse_waves(None), canary=False), parallel=4, retries=2,
                  rule=AbortRule(Threshold.parse("0"), min_devices=1))
    starts: dict = {}
    run(s, {"d02": ["TRANSFER", "UNREACHABLE"]}, starts)
    assert not s.halted and s.succeeded() == 4 and len(starts["d02"]) == 3
    # HEALTH is not retried, and with a zero threshold it halts at once
    s = Scheduler(make_waves(fleet(4), parse_waves(None), canary=False), parallel=1, retries=3,
                  rule=AbortRule(Threshold.parse("0"), min_devices=1))
    starts = {}
    run(s, {"d00": ["HEALTH"]}, starts)
    assert s.halted and len(starts["d00"]) == 1 and list(starts) == ["d00"]


def test_waves_are_sequential_with_bake_and_rate_ramps():
    f = fleet(6)
    waves = make_waves(f, parse_waves("2,100%"), canary=False)
    s = Scheduler(waves, parallel=6, bake=10.0)
    starts: dict = {}
    run(s, {}, starts)
    first = [starts[d.name][0] for d in waves[0].devices]
    second = [starts[d.name][0] for d in waves[1].devices]
    assert max(first) + 1.0 + 10.0 <= min(second)            # wave 1 finished, then baked 10 s
    r = Rate.parse("2/min", ramp=2)
    assert r.current(0) == 2 and r.current(2) == 4 and r.current(4) == 8
    assert r.next_start(100.0, 0) == 130.0 and Rate.parse(None).next_start(5.0, 0) == 0.0
    s = Scheduler(make_waves(fleet(4), parse_waves(None), canary=False), parallel=4, rate=Rate.parse("60/min"))
    starts = {}
    run(s, {}, starts)
    times = sorted(t for ts in starts.values() for t in ts)
    assert all(b - a >= 1.0 - 1e-9 for a, b in zip(times, times[1:]))


def test_a_gated_bake_follows_every_wave_and_must_be_cleared():
    """With a telemetry gate, the scheduler stops after each wave's bake (the last one too) and
    asks for a verdict (GateCheck); nothing starts until it is cleared; a halt at the gate skips
    the rest. (The verdict itself comes from real telemetry: test_telemetry_fleet.py.)"""
    from edgeops.fleet.plan import GateCheck

    waves = make_waves(fleet(4), parse_waves("2,100%"), canary=False)
    s = Scheduler(waves, parallel=4, bake=10.0, gated=True)
    t = 0.0
    for _ in range(2):
        a = s.next(t)
        s.complete(a.member.name, True)
    assert s.next(t + 1) == t + 11.0 and s.baking() == 0            # baking wave 0 (done seen at 1)
    assert s.next(t + 11.5) == GateCheck(0) and not s.done()
    assert s.next(t + 11.7) == GateCheck(0)                         # asked again until cleared
    s.clear(0)
    for _ in range(2):
        a = s.next(t + 12)
        assert a.wave == 1
        s.complete(a.member.name, True)
    assert s.next(t + 13) == t + 23.0 and not s.done()               # the last wave bakes too
    assert s.next(t + 23.5) == GateCheck(1)
    s.clear(1)
    assert s.next(t + 23) is None and s.done()
    # a halt at the gate: the next wave never starts
    s = Scheduler(make_waves(fleet(4), parse_waves("2,100%"), canary=False), parallel=4, bake=5.0, gated=True)
    for _ in range(2):
        s.complete(s.next(0.0).member.name, True)
    assert s.next(1.0) == 6.0 and s.next(6.5) == GateCheck(0)
    s.halt("bake gate: LATENCY on d0")
    assert s.next(7.0) is None and s.done() and len(s.skip_pending()) == 2
    # ungated: no bake after the last wave
    s = Scheduler(make_waves(fleet(2), parse_waves(None), canary=False), parallel=2, bake=10.0)
    for _ in range(2):
        s.complete(s.next(0.0).member.name, True)
    assert s.next(1.0) is None and s.done()
