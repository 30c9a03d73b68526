"""What the operator knows of each device's health, and the health gate of firmware rollouts.

`HealthTracker` keeps, per device, what the reports the operator already reads say about it:
presence (online, offline, since when), and the tenant's ingest health reports (last
telemetry, silent, anomalies with their times, the latest metric values). It is fed by the
report buffer as messages arrive and read by the FirmwareRelease controller as a snapshot
(`TelemetryHealth`). `judge_device` decides, from a snapshot, whether an updated device passes
a release's `HealthGate`. Pure: no I/O, time is passed in.

The tracker lives in memory. After a restart it is rebuilt from the retained presence and
health messages the broker re-delivers on subscribe: the latest state of each device comes
back, the anomaly history before the restart does not (see `observed_since`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from kubiot_contract.health import Anomaly, AnomalyRule, HealthReport
from kubiot_operator.models.firmware import GateName, HealthGate

#: Health reports remembered per device (their times and anomaly counts).
MAX_EVENTS_PER_DEVICE = 256
#: Devices tracked at most; beyond it the least recently heard of are forgotten.
MAX_TRACKED_DEVICES = 1_000_000


@dataclass(frozen=True)
class AnomalyEvent:
    """Anomalies one health report announced (silences left out), at the report's time."""

    time: datetime
    count: int


@dataclass(frozen=True)
class TelemetryHealth:
    """One device's health as the operator knows it now."""

    online: bool | None = None
    presence_changed: datetime | None = None  # when the operator saw online/offline change
    reported_at: datetime | None = None  # time of the newest health report
    received_at: datetime | None = None  # when the device's newest telemetry arrived
    silent: bool = False
    latest: Anomaly | None = None
    anomalies: tuple[AnomalyEvent, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)

    def anomalies_since(self, since: datetime) -> int:
        return sum(e.count for e in self.anomalies if e.time >= since)


@dataclass
class _Record:
    online: bool | None = None
    presence_changed: datetime | None = None
    report: HealthReport | None = None
    events: deque[AnomalyEvent] = field(
        default_factory=lambda: deque(maxlen=MAX_EVENTS_PER_DEVICE))

    def snapshot(self) -> TelemetryHealth:
        report = self.report
        if report is None:
            return TelemetryHealth(self.online, self.presence_changed, anomalies=tuple(self.events))
        return TelemetryHealth(
            online=self.online, presence_changed=self.presence_changed,
            reported_at=report.time, received_at=report.received_at, silent=report.silent,
            latest=report.latest, anomalies=tuple(self.events), metrics=dict(report.metrics))


def value_anomalies(report: HealthReport) -> int:
    """The anomalies of a report found in values (bounds, zscore): silence is judged apart."""
    return sum(n for rule, n in report.anomalies.items() if rule is not AnomalyRule.SILENT)


class HealthTracker:
    """Per device (tenant, name): presence and health reports, bounded in devices and events."""

    def __init__(self, started: datetime, max_devices: int = MAX_TRACKED_DEVICES) -> None:
        #: Since when this tracker watches: anything before it is unknown to it.
        self.observed_since = started
        self._max_devices = max_devices
        self._records: OrderedDict[tuple[str, str], _Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def presence(self, tenant: str, device: str, online: bool, now: datetime) -> None:
        record = self._record(tenant, device)
        if record.online is not online:
            record.online, record.presence_changed = online, now

    def health(self, tenant: str, device: str, report: HealthReport) -> None:
        record = self._record(tenant, device)
        if record.report is not None and report.time < record.report.time and \
                report.anomaly_count == 0:
            return  # an older replica's heartbeat says nothing newer
        if record.report is None or report.time >= record.report.time:
            record.report = report
        counted = value_anomalies(report)
        if counted:
            record.events.append(AnomalyEvent(report.time, counted))

    def get(self, tenant: str, device: str) -> TelemetryHealth | None:
        record = self._records.get((tenant, device))
        return record.snapshot() if record is not None else None

    def forget(self, tenant: str, device: str) -> None:
        self._records.pop((tenant, device), None)

    def _record(self, tenant: str, device: str) -> _Record:
        key = (tenant, device)
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = _Record()
            while len(self._records) > self._max_devices:
                self._records.popitem(last=False)
        self._records.move_to_end(key)
        return record


# --- the gate ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unhealthy:
    """Why one updated device fails the gate."""

    device: str
    gate: GateName
    message: str


def judge_device(gate: HealthGate, name: str, health: TelemetryHealth | None, *,
                 updated_by: datetime, soak_start: datetime, soak_over: bool
                 ) -> Unhealthy | None:
    """Whether an updated device fails `gate`, judged now.

    `updated_by` is when its wave completed (the device runs the new version by then);
    `soak_start` when the soak window opened; `soak_over` whether it has closed. Offline,
    silent, too many anomalies and metrics out of bounds fail at once; "no telemetry since
    the update" only once the soak is over (the first report may take a heartbeat).
    """
    health = health or TelemetryHealth()
    if gate.require_online and health.online is False:
        return Unhealthy(name, GateName.ONLINE, f"offline since {_when(health.presence_changed)}")
    if gate.require_telemetry:
        if health.silent:
            last = _when(health.received_at)
            return Unhealthy(name, GateName.TELEMETRY, f"silent: no telemetry since {last}")
        if soak_over and (health.received_at is None or health.received_at < updated_by):
            return Unhealthy(name, GateName.TELEMETRY,
                             f"no telemetry since the update (last {_when(health.received_at)})")
    found = health.anomalies_since(soak_start)
    if found > gate.max_anomalies_per_device:
        latest = f"; latest {describe_anomaly(health.latest)}" if health.latest else ""
        return Unhealthy(name, GateName.ANOMALIES, f"{found} anomalies during the soak, "
                         f"{gate.max_anomalies_per_device} allowed{latest}")
    fresh = health.reported_at is not None and health.reported_at >= updated_by
    for bound in gate.metrics if fresh else ():
        value = health.metrics.get(bound.metric)
        if value is None:
            continue
        if (bound.min is not None and value < bound.min) or \
                (bound.max is not None and value > bound.max):
            return Unhealthy(name, GateName.METRICS, f"{bound.metric} = {value:g} outside "
                             f"{_range(bound.min, bound.max)}")
    return None


def describe_anomaly(anomaly: Anomaly) -> str:
    """`bounds: temperature = 95 outside [0, 60] at 2026-11-30T12:00:00Z` and the like."""
    when = _when(anomaly.time)
    if anomaly.rule is AnomalyRule.SILENT:
        return f"silent at {when}"
    value = f" = {anomaly.value:g}" if anomaly.value is not None else ""
    expected = f" outside {_range(anomaly.low, anomaly.high)}" \
        if anomaly.low is not None or anomaly.high is not None else ""
    return f"{anomaly.rule.value}: {anomaly.metric or 'value'}{value}{expected} at {when}"


def _range(low: float | None, high: float | None) -> str:
    return f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"


def _when(value: datetime | None) -> str:
    return value.isoformat().replace("+00:00", "Z") if value is not None else "never"
