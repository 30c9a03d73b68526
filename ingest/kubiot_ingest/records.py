"""From an MQTT message to what gets stored: telemetry rows, a device update or a dead letter.

Pure: no I/O, no clock (the receive time travels with the message).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime

from kubiot_contract.telemetry import RejectReason, TelemetryRejected, parse_payload
from kubiot_contract.topics import (
    PRESENCE_OFFLINE,
    PRESENCE_ONLINE,
    Channel,
    ContractError,
    IdentityKind,
    ParsedTopic,
    parse_topic,
)

#: The stream name stored for `telemetry` without a stream level; part of the primary key, so
#: it is a value rather than NULL.
DEFAULT_STREAM = ""
MAX_DETAIL_LENGTH = 1000
TOPIC_CACHE_SIZE = 65536


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A QoS 1 message as received: `mid` is what gets acknowledged once it is stored."""

    mid: int
    topic: str
    payload: bytes
    received_at: datetime


# (time, device, stream, seq, metric, value, text): the column order of the telemetry table.
TelemetryRow = tuple[datetime, str, str, int, str, float | None, str | None]
TELEMETRY_COLUMNS = ("time", "device", "stream", "seq", "metric", "value", "text")


@dataclass(frozen=True, slots=True)
class TelemetryRecords:
    kind: IdentityKind
    device: str
    rows: list[TelemetryRow]
    latest: datetime  # the newest sample's timestamp


@dataclass(frozen=True, slots=True)
class DeviceUpdate:
    """What a presence or state/reported message says about a device or gateway."""

    kind: IdentityKind
    device: str
    seen_at: datetime
    online: bool | None = None
    reported: str | None = None  # a JSON object, already validated


@dataclass(frozen=True, slots=True)
class DeadLetter:
    received_at: datetime
    topic: str
    payload: bytes
    reason: RejectReason
    detail: str


Outcome = TelemetryRecords | DeviceUpdate | DeadLetter


@functools.lru_cache(maxsize=TOPIC_CACHE_SIZE)
def _parse_topic(topic: str) -> ParsedTopic | str:
    """parse_topic, remembered: a device sends on the same few topics all the time."""
    try:
        return parse_topic(topic)
    except ContractError as exc:
        return str(exc)


def classify(message: InboundMessage, tenant: str, max_payload_bytes: int) -> Outcome:
    """Decide what one message becomes; never raises for anything a device can send."""
    parsed = _parse_topic(message.topic)
    if isinstance(parsed, str):
        return _dead(message, RejectReason.BAD_TOPIC, parsed)
    if parsed.tenant != tenant:
        return _dead(message, RejectReason.BAD_TOPIC,
                     f"topic belongs to tenant {parsed.tenant!r}, not {tenant!r}")
    if len(message.payload) > max_payload_bytes:
        return _dead(message, RejectReason.TOO_LARGE,
                     f"payload is {len(message.payload)} bytes, the limit is {max_payload_bytes}")
    try:
        if parsed.channel is Channel.TELEMETRY:
            rows = telemetry_rows(parsed.name, parsed.stream, message.payload, max_payload_bytes)
            return TelemetryRecords(parsed.kind, parsed.name, rows, max(r[0] for r in rows))
        if parsed.channel is Channel.PRESENCE:
            return DeviceUpdate(parsed.kind, parsed.name, message.received_at,
                                online=parse_presence(message.payload))
        if parsed.channel is Channel.STATE_REPORTED:
            return DeviceUpdate(parsed.kind, parsed.name, message.received_at,
                                reported=parse_reported(message.payload))
    except TelemetryRejected as exc:
        return _dead(message, exc.reason, exc.message)
    return _dead(message, RejectReason.BAD_TOPIC,
                 f"channel {parsed.channel.value!r} is not read by the ingest service")


def telemetry_rows(device: str, stream: str | None, payload: bytes,
                   max_payload_bytes: int) -> list[TelemetryRow]:
    """One row per metric of every sample; booleans are stored as 1 and 0."""
    stream_name = stream or DEFAULT_STREAM
    rows: list[TelemetryRow] = []
    for sample in parse_payload(payload, max_payload_bytes):
        for metric, value in sample.values.items():
            if isinstance(value, str):
                if "\x00" in value:
                    # PostgreSQL text cannot hold NUL; refusing here keeps the batch writable.
                    raise TelemetryRejected(RejectReason.BAD_SCHEMA,
                                            f"values.{metric}: contains a NUL character")
                rows.append((sample.ts, device, stream_name, sample.seq, metric, None, value))
            else:
                rows.append((sample.ts, device, stream_name, sample.seq, metric,
                             float(value), None))
    return rows


def parse_presence(payload: bytes) -> bool:
    """`online` or `offline`, bare or as a JSON string."""
    try:
        text = payload.decode().strip()
    except UnicodeDecodeError as exc:
        raise TelemetryRejected(RejectReason.BAD_SCHEMA, "presence is not UTF-8 text") from exc
    if text.startswith('"'):
        try:
            text = str(json.loads(text))
        except ValueError as exc:
            raise TelemetryRejected(RejectReason.BAD_JSON, str(exc)) from exc
    if text == PRESENCE_ONLINE:
        return True
    if text == PRESENCE_OFFLINE:
        return False
    raise TelemetryRejected(RejectReason.BAD_SCHEMA,
                            f"presence must be {PRESENCE_ONLINE!r} or {PRESENCE_OFFLINE!r}")


def parse_reported(payload: bytes) -> str:
    """The reported state: any JSON object, returned as canonical JSON text."""
    try:
        value = json.loads(payload, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise TelemetryRejected(RejectReason.BAD_JSON, str(exc)) from exc
    if not isinstance(value, dict):
        raise TelemetryRejected(RejectReason.BAD_SCHEMA, "reported state must be a JSON object")
    text = json.dumps(value, separators=(",", ":"))
    if "\\u0000" in text:
        # jsonb refuses NUL; refusing here keeps the batch writable.
        raise TelemetryRejected(RejectReason.BAD_SCHEMA, "reported state contains a NUL character")
    return text


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _dead(message: InboundMessage, reason: RejectReason, detail: str) -> DeadLetter:
    return DeadLetter(message.received_at, message.topic, message.payload, reason,
                      detail[:MAX_DETAIL_LENGTH])
