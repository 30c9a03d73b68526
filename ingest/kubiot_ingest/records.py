"""From an MQTT message to what gets stored: telemetry rows, a device update or a dead letter.

Pure: no I/O, no clock (the receive time travels with the message).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from kubiot_contract.device_json import parse_device_json
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
    """A message as received: `mid` (0 for QoS 0) is what gets acknowledged once it is
    stored, and only on `connection`, the broker connection it arrived on."""

    mid: int
    topic: str
    payload: bytes
    received_at: datetime
    connection: int = 0
    #: Why the MQTT codec could not read the packet (raw_publish.py), if it could not: the
    #: message is then only kept as a dead letter.
    unreadable: tuple[RejectReason, str] | None = None

    @property
    def receipt(self) -> Receipt:
        return (self.connection, self.mid)


#: (connection, packet id): what acknowledges a message, on the connection it came by.
Receipt = tuple[int, int]


# (time, device, stream, seq, metric, value, text): the column order of the telemetry table.
TelemetryRow = tuple[datetime, str, str, int, str, float | None, str | None]
TELEMETRY_COLUMNS = ("time", "device", "stream", "seq", "metric", "value", "text")
#: What identifies a telemetry row: (device, metric, stream, time, seq), its primary key.
SampleKey = tuple[str, str, str, datetime, int]


def sample_key(row: TelemetryRow) -> SampleKey:
    return (row[1], row[4], row[2], row[0], row[3])


@dataclass(frozen=True, slots=True)
class TelemetryRecords:
    kind: IdentityKind
    device: str
    rows: list[TelemetryRow]
    latest: datetime  # the newest sample's timestamp
    #: Metrics sent as booleans (stored as 1 and 0): not measurements to judge.
    booleans: frozenset[str] = frozenset()


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


@dataclass(frozen=True, slots=True)
class StoredWindow:
    """Which sample times are stored, relative to when their message arrived.

    A sample older than the retention would be deleted by the next retention pass, and one far
    ahead of its arrival comes from a device whose clock is wrong: both are dead-lettered at
    once, so nothing is acknowledged and then silently lost.
    """

    retention: timedelta = timedelta(days=90)
    max_future_skew: timedelta = timedelta(hours=1)

    def refusal(self, ts: datetime, received_at: datetime) -> str | None:
        """Why a sample taken at `ts` is not stored, or None when it is inside the window."""
        # A difference of two datetimes cannot overflow, unlike `received_at - retention`.
        age = received_at - ts
        if age > self.retention:
            return (f"sample time {ts.isoformat()} is older than the retention of "
                    f"{self.retention.days} days")
        if -age > self.max_future_skew:
            return (f"sample time {ts.isoformat()} is more than "
                    f"{int(self.max_future_skew.total_seconds())} s ahead of its arrival")
        return None


DEFAULT_WINDOW = StoredWindow()


@functools.lru_cache(maxsize=TOPIC_CACHE_SIZE)
def _parse_topic(topic: str) -> ParsedTopic | str:
    """parse_topic, remembered: a device sends on the same few topics all the time."""
    try:
        return parse_topic(topic)
    except ContractError as exc:
        return str(exc)


def classify(message: InboundMessage, tenant: str, max_payload_bytes: int,
             window: StoredWindow = DEFAULT_WINDOW) -> Outcome:
    """Decide what one message becomes; never raises for anything a device can send."""
    if message.unreadable is not None:
        return dead_letter(message, *message.unreadable)
    parsed = _parse_topic(message.topic)
    if isinstance(parsed, str):
        return dead_letter(message, RejectReason.BAD_TOPIC, parsed)
    if parsed.tenant != tenant:
        return dead_letter(message, RejectReason.BAD_TOPIC,
                     f"topic belongs to tenant {parsed.tenant!r}, not {tenant!r}")
    if len(message.payload) > max_payload_bytes:
        return dead_letter(message, RejectReason.TOO_LARGE,
                     f"payload is {len(message.payload)} bytes, the limit is {max_payload_bytes}")
    try:
        if parsed.channel is Channel.TELEMETRY:
            booleans: set[str] = set()
            rows = telemetry_rows(parsed.name, parsed.stream, message.payload, max_payload_bytes,
                                  booleans)
            latest = max(r[0] for r in rows)
            for ts in {min(r[0] for r in rows), latest}:
                refusal = window.refusal(ts, message.received_at)
                if refusal is not None:
                    return dead_letter(message, RejectReason.OUTSIDE_WINDOW, refusal)
            return TelemetryRecords(parsed.kind, parsed.name, rows, latest,
                                    frozenset(booleans))
        if parsed.channel is Channel.PRESENCE:
            return DeviceUpdate(parsed.kind, parsed.name, message.received_at,
                                online=parse_presence(message.payload))
        if parsed.channel is Channel.STATE_REPORTED:
            return DeviceUpdate(parsed.kind, parsed.name, message.received_at,
                                reported=parse_reported(message.payload, max_payload_bytes))
    except TelemetryRejected as exc:
        return dead_letter(message, exc.reason, exc.message)
    return dead_letter(message, RejectReason.BAD_TOPIC,
                 f"channel {parsed.channel.value!r} is not read by the ingest service")


def telemetry_rows(device: str, stream: str | None, payload: bytes,
                   max_payload_bytes: int, booleans: set[str] | None = None,
                   ) -> list[TelemetryRow]:
    """One row per metric of every sample; booleans are stored as 1 and 0 (and their
    metrics added to `booleans`)."""
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
                if booleans is not None and (value is True or value is False):
                    booleans.add(metric)
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


def parse_reported(payload: bytes, max_payload_bytes: int) -> str:
    """The reported state: any JSON object jsonb can store, returned as canonical JSON text."""
    # Bounded depth, finite numbers, no NUL and no lone surrogates: what jsonb refuses is
    # refused here, so the batch it joins stays writable.
    value = parse_device_json(payload, max_bytes=max_payload_bytes)
    if not isinstance(value, dict):
        raise TelemetryRejected(RejectReason.BAD_SCHEMA, "reported state must be a JSON object")
    return json.dumps(value, separators=(",", ":"))


def dead_letter(message: InboundMessage, reason: RejectReason, detail: str) -> DeadLetter:
    """The dead letter of a message, with text the dead-letter table can always store."""
    return DeadLetter(message.received_at, storable_text(message.topic), message.payload, reason,
                      storable_text(detail[:MAX_DETAIL_LENGTH]))


def storable_text(text: str) -> str:
    """`text` with what PostgreSQL text refuses (NUL, lone surrogates) replaced."""
    if text.isascii() and "\x00" not in text:
        return text
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


