"""Anomaly detection on the telemetry stream, and each device's health report.

Pure: no I/O; the caller passes in what was stored and what time it is. `AnomalyDetector`
keeps, per device (and gateway), what the tenant's `AnomalyRules` need: the moving mean and
variance of each metric a z-score rule covers, the device's telemetry interval, whether it is
silent, and what its next health report says. It holds at most `max_devices` devices; beyond
that the least recently heard from are forgotten (and start afresh if they come back).

Only numeric values are judged: text values and booleans are not measurements to detect
anomalies in.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from kubiot_contract.health import (
    MAX_REPORTED_METRICS,
    Anomaly,
    AnomalyRule,
    AnomalyRules,
    HealthReport,
    ZScoreRule,
)
from kubiot_contract.topics import IdentityKind
from kubiot_ingest.records import (
    InboundMessage,
    Outcome,
    SampleKey,
    TelemetryRecords,
    TelemetryRow,
    sample_key,
)

DeviceKey = tuple[IdentityKind, str]

#: A device's health report goes out at most this often, however much changes.
MIN_REPORT_GAP_S = 1.0
#: Metrics of one device a wildcard z-score rule follows at most: a device that invents
#: metric names cannot grow the detector's memory without bound.
MAX_SCORED_METRICS = 64
#: Gaps between a device's messages seen before its interval counts as learnt.
LEARN_INTERVAL_AFTER = 3
#: The weight of each new gap in a device's learnt interval.
INTERVAL_WEIGHT = 0.1
#: A standard deviation is never taken as smaller than this share of the mean (nor than
#: MIN_DEVIATION): a metric that has been constant is not flagged for a rounding difference.
MIN_RELATIVE_DEVIATION = 1e-9
MIN_DEVIATION = 1e-12
#: Seconds since the epoch of a device never reported (so that the first report is due).
_NEVER = -math.inf
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Finding:
    """An anomaly of one device (or gateway)."""

    kind: IdentityKind
    device: str
    anomaly: Anomaly


class _Moments:
    """The exponentially weighted mean and variance of one metric of one device, and the run
    of anomalous values since the last normal one (its own mean and spread)."""

    __slots__ = ("mean", "n", "run", "run_m2", "run_mean", "var")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.var = 0.0
        self.run = 0
        self.run_mean = 0.0
        self.run_m2 = 0.0


class _Device:
    __slots__ = (
        "counts",
        "gaps",
        "interval",
        "kind",
        "last_report",
        "last_sample",
        "latest",
        "metrics",
        "moments",
        "name",
        "received",
        "silent",
    )

    def __init__(self, kind: IdentityKind, name: str) -> None:
        self.kind = kind
        self.name = name
        #: When the newest message arrived (seconds since the epoch, the ingest's clock).
        self.received = _NEVER
        self.last_sample: datetime | None = None
        self.interval = 0.0
        self.gaps = 0
        self.silent = False
        self.moments: dict[str, _Moments] = {}
        self.metrics: dict[str, float] = {}
        self.counts: dict[AnomalyRule, int] = {}
        self.latest: Anomaly | None = None
        self.last_report = _NEVER


def _seconds(moment: datetime) -> float:
    return (moment - _EPOCH).total_seconds()


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class AnomalyDetector:
    """A tenant's anomaly rules evaluated on its stream; one per ingest process."""

    def __init__(self, rules: AnomalyRules) -> None:
        self.rules = rules
        self._bounds: dict[str, list[tuple[float | None, float | None]]] = {}
        for bound in rules.bounds:
            self._bounds.setdefault(bound.metric, []).append((bound.min, bound.max))
        self._scored: dict[str, ZScoreRule] = {}
        self._scored_any: ZScoreRule | None = None
        for rule in rules.zscore:
            if rule.metric == "*":
                self._scored_any = rule
            else:
                self._scored[rule.metric] = rule
        self._alpha = {rule.metric: rule.alpha for rule in rules.zscore}
        self._silence = rules.silence
        self._devices: OrderedDict[DeviceKey, _Device] = OrderedDict()
        #: Devices whose report is due: something changed, or their heartbeat came round.
        self._due: dict[DeviceKey, None] = {}
        self._silent = 0

    # --- what the ingest asks --------------------------------------------------------------

    @property
    def devices(self) -> int:
        """Devices whose state is kept."""
        return len(self._devices)

    @property
    def silent_devices(self) -> int:
        return self._silent

    def observe(self, kind: IdentityKind, device: str, rows: Iterable[TelemetryRow],
                received_at: datetime, booleans: frozenset[str] = frozenset()) -> list[Finding]:
        """Judge the stored rows of one telemetry message; returns the anomalies in them."""
        now = _seconds(received_at)
        state = self._state(kind, device)
        found: list[Finding] = []
        if state.silent:
            # Back from silence: the gap says nothing about the device's usual interval.
            state.silent = False
            self._silent -= 1
            self._due[(kind, device)] = None
        elif state.received != _NEVER and now > state.received:
            gap = now - state.received
            state.gaps += 1
            state.interval = gap if state.gaps == 1 else (
                state.interval + INTERVAL_WEIGHT * (gap - state.interval))
        if now > state.received:
            state.received = now
        metrics, bounds, scored, scored_any = (state.metrics, self._bounds, self._scored,
                                               self._scored_any)
        newest = state.last_sample
        for row in rows:
            ts = row[0]
            if newest is None or ts > newest:
                newest = ts
            value = row[5]
            metric = row[4]
            if value is None or metric in booleans:
                continue
            if metric in metrics or len(metrics) < MAX_REPORTED_METRICS:
                metrics[metric] = value
            ranges = bounds.get(metric)
            if ranges is not None:
                for low, high in ranges:
                    if (low is not None and value < low) or (high is not None and value > high):
                        found.append(Finding(kind, device, Anomaly(
                            rule=AnomalyRule.BOUNDS, metric=metric, time=ts, value=value,
                            low=low, high=high)))
            rule = scored.get(metric) or scored_any
            if rule is not None:
                expected = self._score(state, metric, value, rule)
                if expected is not None:
                    found.append(Finding(kind, device, Anomaly(
                        rule=AnomalyRule.ZSCORE, metric=metric, time=ts, value=value,
                        low=_finite(expected[0]), high=_finite(expected[1]))))
        state.last_sample = newest
        if found:
            self._found(state, [f.anomaly for f in found])
        if now - state.last_report >= self.rules.report_seconds:
            self._due[(kind, device)] = None
        return found

    def silences(self, now: datetime) -> list[Finding]:
        """The devices that fell silent by `now` (each silence is found once)."""
        silence = self._silence
        if silence is None:
            return []
        at = _seconds(now)
        found: list[Finding] = []
        # In the order they were last heard from: the first one heard from too recently to be
        # silent ends the search.
        for state in self._devices.values():
            if at - state.received <= silence.min_silence_seconds:
                break
            if state.silent:
                continue
            interval = silence.interval_seconds or (
                state.interval if state.gaps >= LEARN_INTERVAL_AFTER else None)
            if interval is None:
                continue
            allowed = max(silence.min_silence_seconds, silence.intervals * interval)
            if at - state.received > allowed:
                state.silent = True
                self._silent += 1
                anomaly = Anomaly(rule=AnomalyRule.SILENT, time=_EPOCH + timedelta(
                    seconds=state.received), value=at - state.received, high=allowed)
                self._found(state, [anomaly])
                found.append(Finding(state.kind, state.name, anomaly))
        return found

    def reports_due(self, now: datetime) -> list[tuple[DeviceKey, HealthReport]]:
        """The health reports to publish now: a device whose state changed (unless reported
        within the last second) or whose heartbeat came round while it sends."""
        at = _seconds(now)
        reports: list[tuple[DeviceKey, HealthReport]] = []
        for key in list(self._due):
            state = self._devices.get(key)
            if state is None:
                del self._due[key]  # forgotten meanwhile
                continue
            if at - state.last_report < MIN_REPORT_GAP_S:
                continue
            del self._due[key]
            reports.append((key, HealthReport(
                time=now, last_telemetry=state.last_sample,
                received_at=_EPOCH + timedelta(seconds=state.received),
                silent=state.silent, anomalies=state.counts, latest=state.latest,
                metrics=state.metrics)))
            state.counts = {}
            state.last_report = at
        return reports

    # --- inside ----------------------------------------------------------------------------

    def _state(self, kind: IdentityKind, device: str) -> _Device:
        key = (kind, device)
        devices = self._devices
        state = devices.get(key)
        if state is not None:
            devices.move_to_end(key)
            return state
        state = devices[key] = _Device(kind, device)
        if len(devices) > self.rules.max_devices:
            _, forgotten = devices.popitem(last=False)
            if forgotten.silent:
                self._silent -= 1
        return state

    def _found(self, state: _Device, anomalies: list[Anomaly]) -> None:
        counts = state.counts
        for anomaly in anomalies:
            counts[anomaly.rule] = counts.get(anomaly.rule, 0) + 1
        state.latest = anomalies[-1]
        self._due[(state.kind, state.name)] = None

    def _score(self, state: _Device, metric: str, value: float,
               rule: ZScoreRule) -> tuple[float, float] | None:
        """Judge one value against the metric's moving mean and variance; learn it when it is
        normal. Returns the expected range when the value is anomalous."""
        m = state.moments.get(metric)
        if m is None:
            if len(state.moments) >= MAX_SCORED_METRICS:
                return None
            m = state.moments[metric] = _Moments()
        n = m.n
        if n >= rule.warmup_samples:
            mean = m.mean
            spread = rule.threshold * max(math.sqrt(m.var), MIN_RELATIVE_DEVIATION * abs(mean),
                                          MIN_DEVIATION)
            if not -spread <= value - mean <= spread:
                # Anomalous: not learnt, so that a spike teaches nothing. A run of them as long
                # as the half-life is a new normal: its mean (and wider spread) is adopted.
                m.run += 1
                delta = value - m.run_mean
                m.run_mean += delta / m.run
                m.run_m2 += delta * (value - m.run_mean)
                if m.run >= rule.half_life_samples:
                    m.mean, m.var = m.run_mean, max(m.var, m.run_m2 / m.run)
                    m.run, m.run_mean, m.run_m2 = 0, 0.0, 0.0
                return mean - spread, mean + spread
            if m.run:
                m.run, m.run_mean, m.run_m2 = 0, 0.0, 0.0
        # Plain mean and variance until the weights of the moving ones take over: a moving
        # variance started from one value underestimates the spread for a long while.
        weight = max(self._alpha[rule.metric], 1.0 / (n + 1))
        diff = value - m.mean
        increment = weight * diff
        m.mean += increment
        m.var = (1.0 - weight) * (m.var + diff * increment)
        m.n = n + 1
        if not (math.isfinite(m.mean) and math.isfinite(m.var)):
            # Values near the limits of a double: start again rather than carry inf or nan.
            state.moments[metric] = _Moments()
        return None


def judge_stored(detector: AnomalyDetector, entries: Sequence[tuple[InboundMessage, Outcome]],
                 fresh: frozenset[SampleKey] | None = None) -> list[Finding]:
    """Judge the telemetry of messages just stored: all of it, or only the samples in `fresh`
    (those a redelivered batch added; the others were judged when they were new)."""
    found: list[Finding] = []
    for message, outcome in entries:
        if type(outcome) is not TelemetryRecords:
            continue
        rows = outcome.rows if fresh is None else [
            row for row in outcome.rows if sample_key(row) in fresh]
        if rows:
            found += detector.observe(outcome.kind, outcome.device, rows, message.received_at,
                                      outcome.booleans)
    return found
