"""What devices report (presence, reported state, firmware progress), and what the tenant's
ingest reports about them (telemetry health), folded into status patches.

Ten thousand devices coming online at once must not become ten thousand API calls per second:
reports are merged per device (the latest wins) and drained in rate-limited batches. Health
reports arrive as heartbeats too: one that changes nothing the status shows patches nothing,
and a device's health is written at most once per `health_seconds`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ValidationError

from kubiot_contract.device_json import parse_device_json
from kubiot_contract.health import Anomaly, HealthRejected, HealthReport, parse_health
from kubiot_contract.ota import OtaState
from kubiot_contract.telemetry import TelemetryRejected
from kubiot_contract.topics import (
    PRESENCE_OFFLINE,
    PRESENCE_ONLINE,
    Channel,
    ContractError,
    IdentityKind,
    parse_topic,
)
from kubiot_operator.reconcile.conditions import ConditionUpdate
from kubiot_operator.reconcile.health import HealthTracker, describe_anomaly

MAX_REPORTED_BYTES = 64 * 1024
OTA_STATES = frozenset(state.value for state in OtaState)


@dataclass(frozen=True)
class ReportKey:
    tenant: str
    kind: IdentityKind
    name: str


@dataclass
class PendingReport:
    """Everything learned about one device since its last status patch."""

    online: bool | None = None
    last_seen: datetime | None = None
    reported: dict[str, Any] | None = None
    firmware_current: str | None = None
    ota_state: str | None = None
    ota_version: str | None = None  # the job version the last `ota/status` was about
    ota_reason: str | None = None
    ota_detail: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] | None = None  # the `health` status block
    health_condition: ConditionUpdate | None = None  # TelemetryHealthy, merged by the caller

    def status_patch(self) -> dict[str, Any]:
        patch: dict[str, Any] = {}
        if self.health is not None:
            patch["health"] = self.health
        if self.online is not None:
            patch["online"] = self.online
        if self.last_seen is not None:
            patch["lastSeen"] = self.last_seen.isoformat().replace("+00:00", "Z")
        if self.reported is not None:
            patch["reported"] = self.reported
        firmware: dict[str, Any] = {k: v for k, v in (("current", self.firmware_current),
                                                      ("state", self.ota_state),
                                                      ("stateVersion", self.ota_version))
                                    if v is not None}
        if self.ota_state is not None:
            # Always written with a state, so a stale failure reason does not outlive it.
            firmware["reason"] = self.ota_reason
        if firmware:
            patch["firmware"] = firmware
        return patch


@dataclass(frozen=True)
class AdmissibleStatus:
    """A status patch cut down to what the status schema accepts, and the fields cut."""

    patch: dict[str, Any]
    rejected: tuple[str, ...]


def admissible_status(patch: Mapping[str, Any], model: type[BaseModel]) -> AdmissibleStatus:
    """The patch with every field the kind's status schema (`model`, the CRD's source) refuses
    taken out, so one bad value (firmware `"1.2.0 beta"`) does not make the API server refuse
    the whole patch and lose the good ones (online, lastSeen).

    Fields the kind has no place for (a gateway's reported state) are left out silently, as
    the API server would prune them; refused values are named in `rejected` (dotted paths)."""
    kept = {key: copy.deepcopy(value) for key, value in patch.items()
            if key in _wire_fields(model)}
    rejected: list[str] = []
    for _ in range(len(_leaves(kept)) + 1):
        try:
            model.model_validate(kept)
        except ValidationError as exc:
            for error in exc.errors():
                path = tuple(str(part) for part in error["loc"] if not isinstance(part, int))
                if _remove(kept, path):
                    rejected.append(".".join(path))
            continue
        break
    return AdmissibleStatus(kept, tuple(sorted(set(rejected))))


def _wire_fields(model: type[BaseModel]) -> set[str]:
    return {field.alias or name for name, field in model.model_fields.items()}


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)] or [value]
    return [value]


def _remove(patch: dict[str, Any], path: tuple[str, ...]) -> bool:
    """Delete `path` from nested dicts (emptied parents too); False when it is not there."""
    if not path or path[0] not in patch:
        return False
    if len(path) > 1 and isinstance(patch[path[0]], dict):
        if not _remove(patch[path[0]], path[1:]):
            # The error is about the parent as a whole (a wrong type): drop the parent.
            del patch[path[0]]
        elif not patch[path[0]]:
            del patch[path[0]]
        return True
    del patch[path[0]]
    return True


@dataclass(frozen=True)
class Ignored:
    """A message that changes no status, and why (counted, never raised)."""

    topic: str
    reason: str


TELEMETRY_HEALTHY = "TelemetryHealthy"


@dataclass
class _DeviceHealth:
    """What the health reports of one device said, and what of it status shows already."""

    counted_since: datetime
    report: HealthReport | None = None  # the newest
    latest: Anomaly | None = None
    total: int = 0  # anomalies reported since `counted_since`
    written: tuple[Any, ...] | None = None  # `signature()` as last drained
    written_at: datetime | None = None

    def signature(self) -> tuple[Any, ...]:
        """What a patch would change: a heartbeat that only moves lastTelemetry changes none."""
        condition = self.condition()
        return (self.report.silent if self.report else None, self.latest, self.total,
                condition.ok, condition.reason)

    def condition(self) -> ConditionUpdate:
        report = self.report
        if report is not None and report.silent:
            last = report.received_at.isoformat().replace("+00:00", "Z") \
                if report.received_at else "the operator started"
            return ConditionUpdate(TELEMETRY_HEALTHY, False, "Silent",
                                   f"no telemetry since {last}")
        if report is not None and report.anomaly_count:
            latest = f"; latest {describe_anomaly(self.latest)}" if self.latest else ""
            return ConditionUpdate(TELEMETRY_HEALTHY, False, "AnomalyDetected",
                                   f"{report.anomaly_count} new "
                                   f"{'anomaly' if report.anomaly_count == 1 else 'anomalies'}"
                                   f"{latest}")
        return ConditionUpdate(TELEMETRY_HEALTHY, True, "Healthy",
                               "telemetry arriving, no new anomaly")

    def block(self) -> dict[str, Any]:
        report = self.report
        block: dict[str, Any] = {"anomalyCount": self.total,
                                 "countedSince": _wire_time(self.counted_since)}
        if report is not None:
            block.update(silent=report.silent, reportedAt=_wire_time(report.time))
            if report.received_at is not None:
                block["lastTelemetry"] = _wire_time(report.received_at)
        if self.latest is not None:
            block["latestAnomaly"] = self.latest.model_dump(mode="json", by_alias=True,
                                                            exclude_none=True)
        return block


class ReportBuffer:
    """Latest report per device, in arrival order, ready to drain as status patches.

    Presence and health reports also feed `tracker` (what the health gate of a rollout
    judges) as they arrive, rate limit or not."""

    def __init__(self, tracker: HealthTracker | None = None,
                 health_seconds: float = 0.0) -> None:
        self._pending: OrderedDict[ReportKey, PendingReport] = OrderedDict()
        self.tracker = tracker
        self._health_interval = timedelta(seconds=health_seconds)
        self._health: dict[ReportKey, _DeviceHealth] = {}
        self._health_due: set[ReportKey] = set()  # pending with a health change
        self._held: dict[ReportKey, datetime] = {}  # health changes waiting for their interval

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def held(self) -> int:
        """Devices whose health change waits for its per-device interval."""
        return len(self._held)

    def promote(self, now: datetime) -> None:
        """Queue the held health changes whose interval has passed."""
        for key, due in list(self._held.items()):
            if due <= now:
                del self._held[key]
                self._queue_health(key)

    def forget(self, key: ReportKey) -> None:
        """A deleted device: nothing of it is kept."""
        self._pending.pop(key, None)
        self._health.pop(key, None)
        self._held.pop(key, None)
        self._health_due.discard(key)
        if self.tracker is not None:
            self.tracker.forget(key.tenant, key.name)

    def add(self, topic: str, payload: bytes, now: datetime) -> Ignored | None:
        """Fold one MQTT message in; returns Ignored when it carries nothing usable."""
        try:
            parsed = parse_topic(topic)
        except ContractError as exc:
            return Ignored(topic, str(exc))
        key = ReportKey(parsed.tenant, parsed.kind, parsed.name)
        if parsed.channel is Channel.HEALTH:
            return self._add_health(key, topic, payload, now)
        report = self._pending.get(key) or PendingReport()
        match parsed.channel:
            case Channel.PRESENCE:
                text = payload.decode(errors="replace").strip()
                if text not in (PRESENCE_ONLINE, PRESENCE_OFFLINE):
                    return Ignored(topic, f"presence must be online or offline, not {text[:32]!r}")
                report.online = text == PRESENCE_ONLINE
                if self.tracker is not None and key.kind is IdentityKind.DEVICE:
                    self.tracker.presence(key.tenant, key.name, report.online, now)
            case Channel.STATE_REPORTED:
                reported = _json_object(payload)
                if isinstance(reported, str):
                    return Ignored(topic, f"reported state must be a JSON object of at most "
                                   f"64 KiB: {reported}")
                report.reported = reported
                firmware = reported.get("firmware")
                if isinstance(firmware, str):
                    report.firmware_current = firmware[:64]
            case Channel.OTA_STATUS:
                status = _json_object(payload)
                if isinstance(status, str) or status.get("state") not in OTA_STATES:
                    return Ignored(topic, "ota/status must be a JSON object whose state is one "
                                          f"of {', '.join(sorted(OTA_STATES))}")
                report.ota_state = status["state"]
                version = status.get("version")
                report.ota_version = version[:64] if isinstance(version, str) else None
                reason = status.get("reason")
                report.ota_reason = reason[:256] if isinstance(reason, str) else None
                report.ota_detail = status
            case _:
                return Ignored(topic, f"{parsed.channel} is not a report")
        report.last_seen = now
        self._pending[key] = report
        self._pending.move_to_end(key)
        return None

    def _add_health(self, key: ReportKey, topic: str, payload: bytes, now: datetime
                    ) -> Ignored | None:
        if key.kind is not IdentityKind.DEVICE:
            return Ignored(topic, "health is reported for devices only")
        try:
            report = parse_health(payload)
        except HealthRejected as exc:
            return Ignored(topic, str(exc)[:200])
        if self.tracker is not None:
            self.tracker.health(key.tenant, key.name, report)
        health = self._health.setdefault(key, _DeviceHealth(counted_since=now))
        health.total += report.anomaly_count
        if report.latest is not None and (health.latest is None
                                          or report.latest.time >= health.latest.time):
            health.latest = report.latest
        if health.report is None or report.time >= health.report.time:
            health.report = report
        if health.signature() == health.written or key in self._health_due:
            return None
        due = health.written_at + self._health_interval if health.written_at else now
        if due <= now:
            self._held.pop(key, None)
            self._queue_health(key)
        else:
            self._held.setdefault(key, due)
        return None

    def _queue_health(self, key: ReportKey) -> None:
        if key not in self._pending:
            self._pending[key] = PendingReport()
        self._health_due.add(key)

    def drain(self, limit: int, now: datetime | None = None) -> list[tuple[ReportKey,
                                                                         PendingReport]]:
        """Up to `limit` reports, oldest first; they leave the buffer. `now` is when their
        health is written (it starts the device's health interval)."""
        drained: list[tuple[ReportKey, PendingReport]] = []
        while self._pending and len(drained) < limit:
            key, report = self._pending.popitem(last=False)
            if key in self._health_due:
                self._health_due.discard(key)
                health = self._health[key]
                report.health, report.health_condition = health.block(), health.condition()
                health.written = health.signature()
                health.written_at = now or (health.report.time if health.report
                                            else health.counted_since)
            drained.append((key, report))
        return drained


def _wire_time(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _json_object(payload: bytes) -> dict[str, Any] | str:
    """The JSON object of a report, or why there is none."""
    # Bounded in size and depth, finite numbers only: the object goes into a status patch,
    # which the API server must accept whatever the device sent.
    try:
        value = parse_device_json(payload, max_bytes=MAX_REPORTED_BYTES)
    except TelemetryRejected as exc:
        return exc.message[:200]
    return value if isinstance(value, dict) else "not an object"


class TokenBucket:
    """Rate limit with bursts; time is passed in so tests control it."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens, self._updated = burst, now

    def take(self, wanted: int, now: float) -> int:
        """How many of `wanted` may go now."""
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        granted = min(wanted, int(self._tokens))
        self._tokens -= granted
        return granted
