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

import heapq
import itertools
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
    DeviceUpdate,
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
#: Numeric metrics of one device followed at most (their latest value, their z-score): a
#: device that invents metric names cannot grow the detector's memory without bound.
MAX_TRACKED_METRICS = 64
#: Gaps between a device's messages seen before its interval counts as learnt.
LEARN_INTERVAL_AFTER = 3
#: Longest time between two looks at whether a sending device is silent.
MAX_CHECK_GAP_S = 60.0
#: The weight of each new gap in a device's learnt interval.
INTERVAL_WEIGHT = 0.1
#: A standard deviation is never taken as smaller than this share of the mean (nor than
#: MIN_DEVIATION): a metric that has been constant is not flagged for a rounding difference.
MIN_RELATIVE_DEVIATION = 1e-9
MIN_DEVIATION = 1e-12
#: Beyond this a moving mean or variance is taken as overflowing.
_LARGE = 1e300
#: Seconds since the epoch of a device never reported (so that the first report is due).
_NEVER = -math.inf
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class _Scoring:
    """A z-score rule in the form the hot path reads."""

    threshold: float
    #: threshold squared: a value is normal while (value - mean)^2 <= limit * variance.
    limit: float
    alpha: float
    #: Samples after which the moving weight `alpha` takes over from 1/(n+1).
    moving_after: int
    warmup: int
    half_life: int

    @classmethod
    def of(cls, rule: ZScoreRule) -> _Scoring:
        alpha = rule.alpha
        return cls(rule.threshold, rule.threshold ** 2, alpha, math.ceil(1.0 / alpha),
                   rule.warmup_samples, rule.half_life_samples)


@dataclass(frozen=True, slots=True)
class Finding:
    """An anomaly of one device (or gateway)."""

    kind: IdentityKind
    device: str
    anomaly: Anomaly


class _Metric:
    """One numeric metric of one device: its latest value, the rules that judge it, and the
    z-score's exponentially weighted mean and variance with the run of anomalous values since
    the last normal one (that run's own mean and spread)."""

    __slots__ = ("mean", "n", "ranges", "run", "run_m2", "run_mean", "scoring", "value", "var")

    def __init__(self, ranges: list[tuple[float, float]] | None,
                 scoring: _Scoring | None) -> None:
        self.ranges = ranges
        self.scoring = scoring
        self.value = 0.0
        self.n = 0
        self.mean = 0.0
        self.var = 0.0
        self.run = 0
        self.run_mean = 0.0
        self.run_m2 = 0.0


class _Device:
    """What the detector keeps of one device (or gateway)."""

    __slots__ = (
        "counts",
        "gaps",
        "interval",
        "kind",
        "last_report",
        "last_sample",
        "latest",
        "metrics",
        "name",
        "offline",
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
        #: It said `offline` on its presence topic (or its last will did): not expected to send.
        self.offline = False
        self.metrics: dict[str, _Metric] = {}
        self.counts: dict[AnomalyRule, int] = {}
        self.latest: Anomaly | None = None
        self.last_report = _NEVER


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class AnomalyDetector:
    """A tenant's anomaly rules evaluated on its stream; one per ingest process."""

    def __init__(self, rules: AnomalyRules) -> None:
        self.rules = rules
        self._bounds: dict[str, list[tuple[float, float]]] = {}
        for bound in rules.bounds:
            self._bounds.setdefault(bound.metric, []).append(
                (-math.inf if bound.min is None else bound.min,
                 math.inf if bound.max is None else bound.max))
        self._scored: dict[str, _Scoring] = {}
        self._scored_any: _Scoring | None = None
        for rule in rules.zscore:
            if rule.metric == "*":
                self._scored_any = _Scoring.of(rule)
            else:
                self._scored[rule.metric] = _Scoring.of(rule)
        self._silence = rules.silence
        self._report_seconds = rules.report_seconds
        self._devices: OrderedDict[DeviceKey, _Device] = OrderedDict()
        #: Devices whose report is due: something changed, or their heartbeat came round.
        self._due: dict[DeviceKey, None] = {}
        #: When to look at whether a device is silent: (time, order, device), a heap.
        self._schedule: list[tuple[float, int, _Device]] = []
        self._checks = itertools.count()
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
                received_at: datetime, booleans: frozenset[str] = frozenset(),
                latest: datetime | None = None) -> Sequence[Finding]:
        """Judge the stored rows of one telemetry message (whose newest sample is `latest`,
        when the caller knows it); returns the anomalies in them."""
        now = received_at.timestamp()
        key = (kind, device)
        state = self._devices.get(key)
        if state is None:
            state = self._new_state(kind, device, now)
        else:
            self._devices.move_to_end(key)
        found: list[Finding] | None = None
        received = state.received
        if state.silent or state.offline:
            # Back from silence, or from being offline: the gap says nothing about the device's
            # usual interval.
            self._resume(key, state, now)
        elif now > received > _NEVER:
            gaps = state.gaps = state.gaps + 1
            state.interval = now - received if gaps == 1 else (
                state.interval + INTERVAL_WEIGHT * (now - received - state.interval))
        if now > received:
            state.received = now
        metrics, large = state.metrics, _LARGE
        newest = state.last_sample
        if latest is None:
            for row in rows:
                if newest is None or row[0] > newest:
                    newest = row[0]
        elif newest is None or latest > newest:
            newest = latest
        for ts, _, _, _, metric, value, _ in rows:
            if value is None or metric in booleans:
                continue
            entry = metrics.get(metric)
            if entry is None:
                entry = self._track(metrics, metric)
            entry.value = value
            ranges = entry.ranges
            if ranges is not None:
                for low, high in ranges:
                    if value < low or value > high:
                        found = found or []
                        found.append(Finding(kind, device, Anomaly(
                            rule=AnomalyRule.BOUNDS, metric=metric, time=ts, value=value,
                            low=_finite(low), high=_finite(high))))
            scoring = entry.scoring
            if scoring is None:
                continue
            # The z-score, inline: this runs for every value of the stream.
            n = entry.n
            diff = value - entry.mean
            if n >= scoring.warmup and diff * diff > scoring.limit * entry.var:
                expected = _anomalous(entry, value, diff, scoring)
                if expected is not None:
                    found = found or []
                    found.append(Finding(kind, device, Anomaly(
                        rule=AnomalyRule.ZSCORE, metric=metric, time=ts, value=value,
                        low=_finite(expected[0]), high=_finite(expected[1]))))
                    continue
            if entry.run:
                entry.run, entry.run_mean, entry.run_m2 = 0, 0.0, 0.0
            # Plain mean and variance until the weights of the moving ones take over: a moving
            # variance started from one value underestimates the spread for a long while.
            weight = scoring.alpha if n >= scoring.moving_after else 1.0 / (n + 1)
            increment = weight * diff
            mean = entry.mean + increment
            var = (1.0 - weight) * (entry.var + diff * increment)
            if -large < mean < large and var < large:
                entry.mean, entry.var, entry.n = mean, var, n + 1
            else:
                # Values near the limits of a double: start again rather than carry inf or nan.
                entry.mean, entry.var, entry.n = 0.0, 0.0, 0
        state.last_sample = newest
        if now - state.last_report >= self._report_seconds:
            self._due[key] = None
        if found is None:
            return ()
        self._found(state, [f.anomaly for f in found])
        return found

    def silences(self, now: datetime, limit: int | None = None) -> list[Finding]:
        """The devices that fell silent by `now` (each silence is found once); at most `limit`
        of them, the others are found by the next call."""
        silence = self._silence
        if silence is None:
            return []
        at = now.timestamp()
        found: list[Finding] = []
        schedule, devices = self._schedule, self._devices
        # Only the devices whose check is due: a fleet that reports every few minutes costs a
        # check per device per silence period, not one per device per call.
        while schedule and schedule[0][0] <= at and (limit is None or len(found) < limit):
            _, _, state = heapq.heappop(schedule)
            if devices.get((state.kind, state.name)) is not state or state.silent \
                    or state.offline:
                continue  # forgotten meanwhile, silent already or offline (its return
                # reschedules it)
            allowed = self._allowed(state)
            if allowed is None:
                self._check(state, at + max(silence.min_silence_seconds, 1.0))
                continue
            deadline = state.received + allowed
            if at <= deadline:
                # The interval may still shrink: look again within MAX_CHECK_GAP_S at most.
                self._check(state, min(deadline, at + MAX_CHECK_GAP_S))
                continue
            state.silent = True
            self._silent += 1
            anomaly = Anomaly(rule=AnomalyRule.SILENT, time=_EPOCH + timedelta(
                seconds=state.received), value=at - state.received, high=allowed)
            self._found(state, [anomaly])
            found.append(Finding(state.kind, state.name, anomaly))
        return found

    def presence(self, kind: IdentityKind, device: str, online: bool,
                 received_at: datetime) -> None:
        """What the device's presence says. A device offline is not expected to send, so it is
        not silent (its Device status and KubiotDevicesOffline say it is offline), and a silence
        it was in ends; once online again, its silence is counted from then. A device deleted
        says offline last, so the detector stops expecting it."""
        key = (kind, device)
        state = self._devices.get(key)
        if state is None:
            return
        now = received_at.timestamp()
        if online:
            if state.offline:
                self._resume(key, state, now)
                state.received = max(state.received, now)
            return
        if not state.offline:
            state.offline = True
            if state.silent:
                state.silent = False
                self._silent -= 1
                self._due[key] = None

    def reports_due(self, now: datetime,
                    limit: int | None = None) -> list[tuple[DeviceKey, HealthReport]]:
        """The health reports to publish now: a device whose state changed (unless reported
        within the last second) or whose heartbeat came round while it sends. At most `limit`
        of them, the longest due first; the others stay due."""
        at = now.timestamp()
        reports: list[tuple[DeviceKey, HealthReport]] = []
        for key in list(self._due):
            if limit is not None and len(reports) >= limit:
                break
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
                metrics={name: entry.value for name, entry in itertools.islice(
                    state.metrics.items(), MAX_REPORTED_METRICS)})))
            state.counts = {}
            state.last_report = at
        return reports

    # --- inside ----------------------------------------------------------------------------

    def _new_state(self, kind: IdentityKind, device: str, now: float) -> _Device:
        devices = self._devices
        state = devices[(kind, device)] = _Device(kind, device)
        if len(devices) > self.rules.max_devices:
            _, forgotten = devices.popitem(last=False)
            if forgotten.silent:
                self._silent -= 1
        if self._silence is not None:
            self._check(state, now + self._silence.min_silence_seconds)
        return state

    def _resume(self, key: DeviceKey, state: _Device, now: float) -> None:
        """The device sends (or is online) again after a silence or being offline."""
        if state.silent:
            state.silent = False
            self._silent -= 1
            self._due[key] = None
        state.offline = False
        self._check(state, now + self._silence.min_silence_seconds
                    if self._silence is not None else now)

    def _check(self, state: _Device, at: float) -> None:
        """Look at whether the device is silent at `at` (it has one check scheduled at most)."""
        heapq.heappush(self._schedule, (at, next(self._checks), state))

    def _allowed(self, state: _Device) -> float | None:
        """How long the device may be silent; None while its interval is not learnt yet."""
        silence = self._silence
        assert silence is not None
        interval = silence.interval_seconds or (
            state.interval if state.gaps >= LEARN_INTERVAL_AFTER else None)
        if interval is None:
            return None
        return max(silence.min_silence_seconds, silence.intervals * interval)

    def _track(self, metrics: dict[str, _Metric], metric: str) -> _Metric:
        """A metric seen for the first time on a device: kept, unless the device already has
        MAX_TRACKED_METRICS (then judged by its bounds only, and not reported)."""
        entry = _Metric(self._bounds.get(metric), self._scored.get(metric, self._scored_any))
        if len(metrics) < MAX_TRACKED_METRICS:
            metrics[metric] = entry
        else:
            entry.scoring = None
        return entry

    def _found(self, state: _Device, anomalies: list[Anomaly]) -> None:
        counts = state.counts
        for anomaly in anomalies:
            counts[anomaly.rule] = counts.get(anomaly.rule, 0) + 1
        state.latest = anomalies[-1]
        self._due[(state.kind, state.name)] = None


def _anomalous(entry: _Metric, value: float, diff: float,
               scoring: _Scoring) -> tuple[float, float] | None:
    """A value beyond the threshold: the expected range, unless the deviation is within its
    floor after all. An anomalous value is not learnt, so that a spike teaches nothing; a run
    of them as long as the half-life is a new normal, and its mean (and wider spread) is
    adopted."""
    mean = entry.mean
    spread = scoring.threshold * max(math.sqrt(entry.var), MIN_RELATIVE_DEVIATION * abs(mean),
                                     MIN_DEVIATION)
    if -spread <= diff <= spread:
        return None
    entry.run += 1
    delta = value - entry.run_mean
    entry.run_mean += delta / entry.run
    entry.run_m2 += delta * (value - entry.run_mean)
    if entry.run >= scoring.half_life:
        entry.mean, entry.var = entry.run_mean, max(entry.var, entry.run_m2 / entry.run)
        entry.run, entry.run_mean, entry.run_m2 = 0, 0.0, 0.0
    return mean - spread, mean + spread


def judge_stored(detector: AnomalyDetector, entries: Sequence[tuple[InboundMessage, Outcome]],
                 fresh: frozenset[SampleKey] | None = None) -> list[Finding]:
    """Judge the telemetry of messages just stored: all of it, or only the samples in `fresh`
    (those a redelivered batch added; the others were judged when they were new)."""
    found: list[Finding] = []
    observe = detector.observe
    for message, outcome in entries:
        if type(outcome) is not TelemetryRecords:
            if type(outcome) is DeviceUpdate and outcome.online is not None:
                detector.presence(outcome.kind, outcome.device, outcome.online,
                                  message.received_at)
            continue
        if fresh is None:
            hit = observe(outcome.kind, outcome.device, outcome.rows, message.received_at,
                          outcome.booleans, outcome.latest)
        else:
            rows = [row for row in outcome.rows if sample_key(row) in fresh]
            if not rows:
                continue
            hit = observe(outcome.kind, outcome.device, rows, message.received_at,
                          outcome.booleans)
        if hit:
            found += hit
    return found
