"""What devices report (presence, reported state, firmware progress), folded into status patches.

Ten thousand devices coming online at once must not become ten thousand API calls per second:
reports are merged per device (the latest wins) and drained in rate-limited batches.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubiot_contract.device_json import parse_device_json
from kubiot_contract.telemetry import TelemetryRejected
from kubiot_contract.topics import (
    PRESENCE_OFFLINE,
    PRESENCE_ONLINE,
    Channel,
    ContractError,
    IdentityKind,
    parse_topic,
)

MAX_REPORTED_BYTES = 64 * 1024


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

    def status_patch(self) -> dict[str, Any]:
        patch: dict[str, Any] = {}
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
class Ignored:
    """A message that changes no status, and why (counted, never raised)."""

    topic: str
    reason: str


class ReportBuffer:
    """Latest report per device, in arrival order, ready to drain as status patches."""

    def __init__(self) -> None:
        self._pending: OrderedDict[ReportKey, PendingReport] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, topic: str, payload: bytes, now: datetime) -> Ignored | None:
        """Fold one MQTT message in; returns Ignored when it carries nothing usable."""
        try:
            parsed = parse_topic(topic)
        except ContractError as exc:
            return Ignored(topic, str(exc))
        key = ReportKey(parsed.tenant, parsed.kind, parsed.name)
        report = self._pending.get(key) or PendingReport()
        match parsed.channel:
            case Channel.PRESENCE:
                text = payload.decode(errors="replace").strip()
                if text not in (PRESENCE_ONLINE, PRESENCE_OFFLINE):
                    return Ignored(topic, f"presence must be online or offline, not {text[:32]!r}")
                report.online = text == PRESENCE_ONLINE
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
                if isinstance(status, str) or not isinstance(status.get("state"), str):
                    return Ignored(topic, "ota/status must be a JSON object with a state")
                report.ota_state = status["state"][:64]
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

    def drain(self, limit: int) -> list[tuple[ReportKey, PendingReport]]:
        """Up to `limit` reports, oldest first; they leave the buffer."""
        drained: list[tuple[ReportKey, PendingReport]] = []
        while self._pending and len(drained) < limit:
            drained.append(self._pending.popitem(last=False))
        return drained


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
