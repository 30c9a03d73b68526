"""The anomaly detectors on the stream: bounds, z-scores with warm-up, silent devices, the
health reports they lead to, and bounded memory."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from kubiot_contract.health import (
    AnomalyRule,
    AnomalyRules,
    BoundsRule,
    SilenceRule,
    ZScoreRule,
    parse_health,
)
from kubiot_contract.topics import IdentityKind
from kubiot_ingest.anomaly import AnomalyDetector, Finding, judge_stored
from kubiot_ingest.records import (
    DeviceUpdate,
    InboundMessage,
    TelemetryRecords,
    TelemetryRow,
    sample_key,
)

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
DEVICE = IdentityKind.DEVICE


def rows(at: datetime, device: str = "pump-1", seq: int = 0, **values: float | None,
         ) -> list[TelemetryRow]:
    return [(at, device, "", seq, metric, value, None if value is not None else "text")
            for metric, value in values.items()]


def feed(detector: AnomalyDetector, values: list[float], *, metric: str = "temp",
         device: str = "pump-1", start: datetime = T0, every: float = 1.0) -> list[Finding]:
    found: list[Finding] = []
    for i, value in enumerate(values):
        at = start + timedelta(seconds=i * every)
        found += detector.observe(DEVICE, device, rows(at, device, i, **{metric: value}), at)
    return found


def test_a_value_outside_its_bounds_is_an_anomaly_with_the_range() -> None:
    detector = AnomalyDetector(AnomalyRules(bounds=[BoundsRule(metric="temp", min=-10, max=80)]))
    found = feed(detector, [20.0, 80.0, 81.5, -10.0, -11.0])
    assert [(f.anomaly.rule, f.anomaly.value, f.anomaly.low, f.anomaly.high) for f in found] == [
        (AnomalyRule.BOUNDS, 81.5, -10, 80), (AnomalyRule.BOUNDS, -11.0, -10, 80)]
    assert found[0].anomaly.time == T0 + timedelta(seconds=2)
    assert (found[0].kind, found[0].device, found[0].anomaly.metric) == (DEVICE, "pump-1", "temp")


def test_booleans_and_text_are_not_judged() -> None:
    detector = AnomalyDetector(AnomalyRules(bounds=[BoundsRule(metric="on", max=0.5),
                                                    BoundsRule(metric="mode", max=0.5)]))
    found = detector.observe(DEVICE, "pump-1", rows(T0, on=1.0, mode=None), T0,
                             booleans=frozenset({"on"}))
    assert not found


def test_nothing_is_flagged_during_the_warm_up() -> None:
    detector = AnomalyDetector(AnomalyRules(zscore=[ZScoreRule(metric="temp", warmup_samples=10)]))
    assert feed(detector, [20.0, 20.1, 19.9, 20.0, 500.0, 20.0, 19.8, 20.2, 20.1, 20.0]) == []


def noisy(count: int, rng: random.Random, mean: float = 20.0, sigma: float = 0.5) -> list[float]:
    return [rng.gauss(mean, sigma) for _ in range(count)]


def test_a_spike_is_flagged_and_does_not_teach_the_detector() -> None:
    rng = random.Random(1)
    detector = AnomalyDetector(AnomalyRules(zscore=[ZScoreRule(metric="temp", threshold=5)]))
    values = noisy(200, rng)
    values[150] = 40.0
    found = feed(detector, values)
    assert [f.anomaly.value for f in found] == [40.0]
    low, high = found[0].anomaly.low, found[0].anomaly.high
    assert low is not None and high is not None and low < 20 < high < 25
    # The same spike again right after is still as anomalous: the first one taught nothing.
    assert feed(detector, [40.0], start=T0 + timedelta(seconds=200))[0].anomaly.high == \
        pytest.approx(high, rel=0.05)


def test_a_lasting_shift_is_flagged_then_learnt() -> None:
    rng = random.Random(2)
    rule = ZScoreRule(metric="temp", threshold=5, half_life_samples=20)
    detector = AnomalyDetector(AnomalyRules(zscore=[rule]))
    found = feed(detector, noisy(100, rng) + noisy(200, rng, mean=30.0))
    flagged = [int((f.anomaly.time - T0).total_seconds()) for f in found]
    # Flagged from the first shifted value, for about a half-life, then the new level is normal.
    assert flagged[0] == 100
    assert len(flagged) <= 2 * rule.half_life_samples
    assert max(flagged) < 100 + 2 * rule.half_life_samples


def test_a_wildcard_rule_scores_every_metric_and_a_named_rule_overrides_it() -> None:
    detector = AnomalyDetector(AnomalyRules(zscore=[
        ZScoreRule(metric="*", threshold=5, warmup_samples=5),
        ZScoreRule(metric="rpm", threshold=100, warmup_samples=5)]))
    rng = random.Random(3)
    found: list[Finding] = []
    for i in range(40):
        at = T0 + timedelta(seconds=i)
        spike = i == 30
        found += detector.observe(DEVICE, "pump-1", rows(
            at, seq=i, temp=rng.gauss(20, 0.5) + (50 if spike else 0),
            rpm=rng.gauss(1000, 10) + (500 if spike else 0)), at)
    assert [(f.anomaly.metric, f.anomaly.rule) for f in found] == [("temp", AnomalyRule.ZSCORE)]


def test_a_constant_metric_is_not_flagged_for_rounding_but_is_for_a_change() -> None:
    detector = AnomalyDetector(AnomalyRules(zscore=[ZScoreRule(metric="mode", warmup_samples=5)]))
    found = feed(detector, [3.0] * 20 + [3.0 + 1e-12, 4.0], metric="mode")
    assert [f.anomaly.value for f in found] == [4.0]


def test_values_at_the_limits_of_a_double_do_not_break_the_detector() -> None:
    detector = AnomalyDetector(AnomalyRules(zscore=[ZScoreRule(metric="x", warmup_samples=2)]))
    found = feed(detector, [1.7e308, -1.7e308, 1.7e308, 1.0, 2.0, 1.0], metric="x")
    for finding in found:
        assert finding.anomaly.low is None or abs(finding.anomaly.low) < float("inf")


# --- silent devices ---------------------------------------------------------------------------

def every(seconds: float, count: int, start: datetime = T0) -> list[datetime]:
    return [start + timedelta(seconds=seconds * i) for i in range(count)]


def test_a_device_is_silent_after_missing_its_learnt_intervals_once_and_back_again() -> None:
    detector = AnomalyDetector(AnomalyRules(silence=SilenceRule(intervals=3,
                                                                min_silence_seconds=5)))
    times = every(10, 6)
    for at in times:
        detector.observe(DEVICE, "pump-1", rows(at, temp=1.0), at)
    last = times[-1]
    assert detector.silences(last + timedelta(seconds=29)) == []
    found = detector.silences(last + timedelta(seconds=31))
    assert [(f.device, f.anomaly.rule, f.anomaly.time, f.anomaly.high) for f in found] == [
        ("pump-1", AnomalyRule.SILENT, last, 30.0)]
    assert detector.silent_devices == 1
    # One silence, one anomaly: it is not found again while it lasts.
    assert detector.silences(last + timedelta(seconds=300)) == []
    (_, report), = detector.reports_due(last + timedelta(seconds=300))
    assert report.silent and report.anomalies == {AnomalyRule.SILENT: 1}
    back = last + timedelta(seconds=400)
    detector.observe(DEVICE, "pump-1", rows(back, temp=1.0), back)
    assert detector.silent_devices == 0
    (_, report), = detector.reports_due(back)
    assert not report.silent and report.anomalies == {}
    # The long gap was not learnt as the device's interval.
    after = back + timedelta(seconds=10)
    detector.observe(DEVICE, "pump-1", rows(after, temp=1.0), after)
    assert detector.silences(after + timedelta(seconds=31))


def test_an_offline_device_is_not_silent_and_is_expected_again_once_online() -> None:
    detector = AnomalyDetector(AnomalyRules(silence=SilenceRule(intervals=3,
                                                                min_silence_seconds=5)))
    times = every(10, 6)
    for at in times:
        detector.observe(DEVICE, "pump-1", rows(at, temp=1.0), at)
    last = times[-1]
    # Offline (its last will, or deleted): never silent, however long.
    detector.presence(DEVICE, "pump-1", False, last + timedelta(seconds=5))
    assert detector.silences(last + timedelta(hours=2)) == []
    # Online again but sending nothing: silent once its intervals have passed since then.
    online = last + timedelta(hours=3)
    detector.presence(DEVICE, "pump-1", True, online)
    assert detector.silences(online + timedelta(seconds=29)) == []
    assert [f.device for f in detector.silences(online + timedelta(seconds=31))] == ["pump-1"]
    # Going offline ends the silence, at once in its report.
    detector.presence(DEVICE, "pump-1", False, online + timedelta(seconds=40))
    assert detector.silent_devices == 0
    reports = detector.reports_due(online + timedelta(seconds=40))
    assert [report.silent for _, report in reports] == [False]


def test_presence_is_read_from_the_messages_judged() -> None:
    detector = AnomalyDetector(AnomalyRules(silence=SilenceRule(intervals=3,
                                                                min_silence_seconds=5)))
    times = every(10, 6)
    for at in times:
        detector.observe(DEVICE, "pump-1", rows(at, temp=1.0), at)
    offline = times[-1] + timedelta(seconds=1)
    message = InboundMessage(1, "acme/devices/pump-1/presence", b"offline", offline)
    judge_stored(detector, [(message, DeviceUpdate(DEVICE, "pump-1", offline, online=False))])
    assert detector.silences(offline + timedelta(hours=1)) == []


def test_silence_waits_for_the_interval_to_be_learnt_and_never_comes_before_the_minimum() -> None:
    detector = AnomalyDetector(AnomalyRules(silence=SilenceRule(intervals=2,
                                                                min_silence_seconds=60)))
    for at in every(1, 3):
        detector.observe(DEVICE, "fresh", rows(at, temp=1.0), at)
    # Two gaps: not learnt yet.
    assert detector.silences(T0 + timedelta(hours=1)) == []
    detector.observe(DEVICE, "fresh", rows(T0 + timedelta(hours=1), temp=1.0),
                     T0 + timedelta(hours=1))
    late = T0 + timedelta(hours=1)
    for at in every(1, 40, late):
        detector.observe(DEVICE, "quick", rows(at, temp=1.0), at)
    last_quick = late + timedelta(seconds=39)
    assert [f.device for f in detector.silences(last_quick + timedelta(seconds=59))] == []
    assert [f.device for f in detector.silences(last_quick + timedelta(seconds=61))] == [
        "quick"]


def test_a_set_interval_is_used_from_the_first_message() -> None:
    detector = AnomalyDetector(AnomalyRules(silence=SilenceRule(
        intervals=3, interval_seconds=10, min_silence_seconds=0)))
    detector.observe(DEVICE, "pump-1", rows(T0, temp=1.0), T0)
    assert detector.silences(T0 + timedelta(seconds=29)) == []
    assert len(detector.silences(T0 + timedelta(seconds=31))) == 1


# --- reports ---------------------------------------------------------------------------------

def test_reports_come_at_once_on_a_change_at_most_once_a_second_and_as_a_heartbeat() -> None:
    detector = AnomalyDetector(AnomalyRules(bounds=[BoundsRule(metric="temp", max=50)],
                                            report_seconds=60))
    detector.observe(DEVICE, "pump-1", rows(T0, temp=20.0, rpm=1200.0), T0)
    (key, first), = detector.reports_due(T0)
    assert key == (DEVICE, "pump-1")
    assert (first.metrics, first.anomalies, first.silent) == ({"temp": 20.0, "rpm": 1200.0},
                                                              {}, False)
    assert first.last_telemetry == T0 and first.received_at == T0
    # Two anomalies within the second: one report, after the second is over, counting both.
    for i in (1, 2):
        at = T0 + timedelta(milliseconds=300 * i)
        detector.observe(DEVICE, "pump-1", rows(at, seq=i, temp=60.0 + i), at)
    assert detector.reports_due(T0 + timedelta(milliseconds=700)) == []
    (_, second), = detector.reports_due(T0 + timedelta(seconds=1))
    assert second.anomalies == {AnomalyRule.BOUNDS: 2}
    assert second.latest is not None and second.latest.value == 62.0
    # Quiet data: nothing until the heartbeat, then the counts start again from 0.
    for s in range(2, 70):
        at = T0 + timedelta(seconds=s)
        detector.observe(DEVICE, "pump-1", rows(at, seq=s, temp=20.0), at)
        reports = detector.reports_due(at)
        assert (s >= 61) == bool(reports) or s > 61, s
        if reports:
            (_, beat), = reports
            assert beat.anomalies == {} and beat.latest == second.latest
            break
    # Every report is what the operator can read back.
    assert parse_health(second.encode()) == second


def test_a_report_carries_at_most_32_metrics() -> None:
    detector = AnomalyDetector(AnomalyRules(bounds=[BoundsRule(metric="m0", max=1)]))
    detector.observe(DEVICE, "pump-1", rows(T0, **{f"m{i}": float(i) for i in range(40)}), T0)
    (_, report), = detector.reports_due(T0)
    assert len(report.metrics) == 32


def test_state_is_kept_for_at_most_max_devices_the_least_recently_seen_go_first() -> None:
    detector = AnomalyDetector(AnomalyRules(
        zscore=[ZScoreRule(metric="*")],
        silence=SilenceRule(interval_seconds=1, min_silence_seconds=0), max_devices=100))
    for i in range(250):
        at = T0 + timedelta(milliseconds=i)
        detector.observe(DEVICE, f"d-{i}", rows(at, device=f"d-{i}", temp=1.0), at)
    assert detector.devices == 100
    silent = detector.silences(T0 + timedelta(seconds=10))
    assert sorted(f.device for f in silent) == sorted(f"d-{i}" for i in range(150, 250))
    detector.observe(DEVICE, "new", rows(T0 + timedelta(seconds=11), temp=1.0),
                     T0 + timedelta(seconds=11))
    # The forgotten device was silent: the gauge does not count it any more.
    assert detector.silent_devices == 99


# --- the stream of the issue: many devices, injected faults, no false positive --------------

SEED = 20261130
DEVICES = 60
SAMPLES = 600           # per device, one message every INTERVAL_S
INTERVAL_S = 5.0
SPIKE_RATE = 0.01       # share of a faulty device's samples that get a spike on `temp`
FAULTY_SHARE = 0.25     # devices with spikes; as many others drift, one falls silent
OUT_OF_RANGE_RATE = 0.005  # share of every device's `pressure` samples pushed past its bounds
SPIKE_SIGMAS = (12, 30)  # how far a spike goes, in standard deviations of the noise
DRIFT_SIGMAS = 20       # a drift's ramp, over DRIFT_SAMPLES samples
DRIFT_SAMPLES = 10
WARMUP = 40            # samples before the z-score rule judges; no spike is injected before


@dataclass
class Injected:
    spikes: set[tuple[str, int]] = field(default_factory=set)
    drifts: dict[str, int] = field(default_factory=dict)  # device -> first drifted sample
    out_of_range: set[tuple[str, int]] = field(default_factory=set)
    silent: str = ""
    silent_from: int = 0


def stream_rules() -> AnomalyRules:
    return AnomalyRules(
        bounds=[BoundsRule(metric="pressure", min=0.5, max=3.0)],
        zscore=[ZScoreRule(metric="temp", threshold=6, half_life_samples=50,
                           warmup_samples=WARMUP)],
        silence=SilenceRule(intervals=4, min_silence_seconds=10))


def test_a_seeded_stream_with_injected_faults_finds_each_with_its_rule_and_nothing_else() -> None:
    """60 devices, 600 samples each every 5 s, Gaussian noise; seed 20261130. A quarter of the
    devices get spikes on `temp` (1% of their samples after the warm-up, 12 to 30 sigma), a
    quarter drift (a 20-sigma ramp over 10 samples, from a random point on), every device has
    0.5% of its `pressure` samples pushed out of bounds, and one device falls silent two thirds
    of the way through. The other devices are clean."""
    rng = random.Random(SEED)
    names = [f"sensor-{i:02d}" for i in range(DEVICES)]
    spiky = set(names[:int(DEVICES * FAULTY_SHARE)])
    drifting = set(names[int(DEVICES * FAULTY_SHARE):int(2 * DEVICES * FAULTY_SHARE)])
    injected = Injected(silent=names[-1], silent_from=SAMPLES * 2 // 3)
    clean = set(names) - spiky - drifting - {injected.silent}
    base = {name: (rng.uniform(15, 30), rng.uniform(0.2, 1.0), rng.uniform(1.2, 2.0))
            for name in names}
    for name in sorted(drifting):
        injected.drifts[name] = rng.randrange(100, SAMPLES - 100)

    detector = AnomalyDetector(stream_rules())
    found: list[Finding] = []
    for step in range(SAMPLES):
        # Devices send in their own order, each a little off the tick.
        for name in rng.sample(names, len(names)):
            if name == injected.silent and step >= injected.silent_from:
                continue
            at = T0 + timedelta(seconds=step * INTERVAL_S + rng.uniform(0, 1))
            mean, sigma, pressure_mean = base[name]
            # A slow daily-like swing the moving mean must follow without flagging it.
            temp = mean + sigma * _swing(step) + rng.gauss(0, sigma)
            if name in spiky and step >= WARMUP and rng.random() < SPIKE_RATE:
                temp += rng.choice((-1, 1)) * rng.uniform(*SPIKE_SIGMAS) * sigma
                injected.spikes.add((name, step))
            if name in drifting and step >= injected.drifts[name]:
                temp += DRIFT_SIGMAS * sigma * min(1.0, (step - injected.drifts[name] + 1)
                                                   / DRIFT_SAMPLES)
            pressure = pressure_mean + rng.gauss(0, 0.05)
            if rng.random() < OUT_OF_RANGE_RATE:
                pressure = rng.choice((rng.uniform(-1, 0.4), rng.uniform(3.1, 5)))
                injected.out_of_range.add((name, step))
            found += detector.observe(DEVICE, name, rows(at, name, step, temp=temp,
                                                         pressure=pressure), at)
            found += detector.silences(at)

    def step_of(finding: Finding) -> int:
        return int((finding.anomaly.time - T0).total_seconds() // INTERVAL_S)

    zscore = [f for f in found if f.anomaly.rule is AnomalyRule.ZSCORE]
    bounds = {(f.device, step_of(f)) for f in found if f.anomaly.rule is AnomalyRule.BOUNDS}
    silent = [f for f in found if f.anomaly.rule is AnomalyRule.SILENT]

    assert len(injected.spikes) >= 40 and len(injected.out_of_range) >= 100  # the test bites
    # Every injected anomaly found, with its rule.
    assert bounds == injected.out_of_range
    found_spikes = {(f.device, step_of(f)) for f in zscore if f.device in spiky}
    assert found_spikes == injected.spikes
    for name, start in injected.drifts.items():
        steps = sorted(step_of(f) for f in zscore if f.device == name)
        assert steps, f"the drift of {name} from sample {start} was not found"
        assert start <= steps[0] < start + DRIFT_SAMPLES, (name, start, steps)
        # Flagged, then learnt: not flagged to the end of the stream.
        assert steps[-1] < start + DRIFT_SAMPLES + 2 * 50, (name, start, steps)
    assert [(f.device, step_of(f)) for f in silent] == [
        (injected.silent, injected.silent_from - 1)]
    # No false positive on the clean devices (nor on the others' clean metrics).
    assert not [f for f in zscore if f.device in clean | {injected.silent}]
    assert detector.silent_devices == 1


def _swing(step: int) -> float:
    return math.sin(2 * math.pi * step / SAMPLES)


def test_of_a_redelivered_batch_only_the_samples_it_added_are_judged() -> None:
    detector = AnomalyDetector(AnomalyRules(bounds=[BoundsRule(metric="temp", max=50)]))
    entries = []
    for seq in range(4):
        at = T0 + timedelta(seconds=seq)
        message = InboundMessage(seq + 1, "acme/devices/pump-1/telemetry", b"{}", at)
        entries.append((message, TelemetryRecords(DEVICE, "pump-1",
                                                  rows(at, seq=seq, temp=60.0 + seq), at)))
    stored_before = {sample_key(row) for _, outcome in entries[:2] for row in outcome.rows}
    added = frozenset(sample_key(row) for _, outcome in entries for row in outcome.rows
                      if sample_key(row) not in stored_before)
    found = judge_stored(detector, entries, added)
    assert [f.anomaly.value for f in found] == [62.0, 63.0]
    assert [f.anomaly.value for f in judge_stored(detector, entries[:1])] == [60.0]


def test_silences_and_reports_come_in_bounded_portions_and_none_is_lost() -> None:
    detector = AnomalyDetector(AnomalyRules(silence=SilenceRule(
        interval_seconds=1, min_silence_seconds=0)))
    for i in range(25):
        detector.observe(DEVICE, f"d-{i}", rows(T0, device=f"d-{i}", temp=1.0), T0)
    assert len(detector.reports_due(T0, limit=10)) == 10
    assert len(detector.reports_due(T0, limit=10)) == 10
    assert len(detector.reports_due(T0, limit=10)) == 5
    later = T0 + timedelta(seconds=10)
    portions = [detector.silences(later, limit=10) for _ in range(4)]
    assert [len(p) for p in portions] == [10, 10, 5, 0]
    assert {f.device for p in portions for f in p} == {f"d-{i}" for i in range(25)}
