"""Batches bounded by size and age, and which message ids a committed batch acknowledges.

Pure: the caller passes the clock in, and does the writing and acknowledging.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from kubiot_contract.topics import IdentityKind
from kubiot_ingest.records import (
    DeadLetter,
    DeviceUpdate,
    InboundMessage,
    Outcome,
    Receipt,
    TelemetryRecords,
    TelemetryRow,
)

DeviceKey = tuple[IdentityKind, str]

#: How far `last_seen` may lag behind the newest message of a device that only sends
#: telemetry: far below the minutes after which a device counts as offline, and it spares the
#: database an upsert per device per batch.
LAST_SEEN_RESOLUTION = timedelta(seconds=10)


@dataclass
class Batch:
    """What one database transaction writes, and the messages it settles."""

    #: What acknowledges each message once the batch is committed, in arrival order.
    receipts: list[Receipt] = field(default_factory=list)
    #: Kept so that a batch the database refuses can be retried message by message.
    entries: list[tuple[InboundMessage, Outcome]] = field(default_factory=list)
    #: The newest sample time of each telemetry message, for the lag histogram.
    sample_times: list[datetime] = field(default_factory=list)
    telemetry: list[TelemetryRow] = field(default_factory=list)
    #: Presence and reported state, merged per device in arrival order.
    updates: dict[DeviceKey, DeviceUpdate] = field(default_factory=dict)
    #: When each device (or gateway) was last heard from, telemetry included.
    seen: dict[DeviceKey, datetime] = field(default_factory=dict)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    started_at: float = 0.0

    @property
    def messages(self) -> int:
        return len(self.receipts)

    @property
    def rows(self) -> int:
        return len(self.telemetry) + len(self.seen) + len(self.dead_letters)

    def add(self, message: InboundMessage, outcome: Outcome) -> None:
        self.receipts.append(message.receipt)
        self.entries.append((message, outcome))
        if isinstance(outcome, TelemetryRecords):
            self.telemetry.extend(outcome.rows)
            self.sample_times.append(outcome.latest)
            self._seen((outcome.kind, outcome.device), message.received_at)
        elif isinstance(outcome, DeviceUpdate):
            key = (outcome.kind, outcome.device)
            previous = self.updates.get(key)
            self.updates[key] = outcome if previous is None else merge_updates(previous, outcome)
            self._seen(key, outcome.seen_at)
        else:
            self.dead_letters.append(outcome)

    def _seen(self, key: DeviceKey, at: datetime) -> None:
        previous = self.seen.get(key)
        if previous is None or at > previous:
            self.seen[key] = at

    def device_updates(self) -> list[DeviceUpdate]:
        """One update per device heard from, in a stable order (so replicas never deadlock)."""
        result = []
        for key in sorted(self.seen):
            update = self.updates.get(key)
            seen_at = self.seen[key]
            result.append(DeviceUpdate(key[0], key[1], seen_at) if update is None
                          else replace(update, seen_at=seen_at))
        return result


def merge_updates(earlier: DeviceUpdate, later: DeviceUpdate) -> DeviceUpdate:
    """The net effect of two updates of one device, applied in order."""
    return replace(
        earlier,
        seen_at=max(earlier.seen_at, later.seen_at),
        online=later.online if later.online is not None else earlier.online,
        reported=later.reported if later.reported is not None else earlier.reported,
    )


class Batcher:
    """Collects outcomes into a batch until it holds `max_rows` rows or is `max_delay_s` old."""

    def __init__(self, max_rows: int, max_delay_s: float) -> None:
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self._batch = Batch()

    @property
    def pending_messages(self) -> int:
        return self._batch.messages

    def add(self, message: InboundMessage, outcome: Outcome, now: float) -> None:
        if not self._batch.receipts:
            self._batch.started_at = now
        self._batch.add(message, outcome)

    def room(self) -> int:
        """How many more messages to take before the batch is checked again (at least 1)."""
        return max(1, self.max_rows - self._batch.rows)

    def is_full(self) -> bool:
        return self._batch.rows >= self.max_rows

    def is_due(self, now: float) -> bool:
        return bool(self._batch.receipts) and (
            self.is_full() or now - self._batch.started_at >= self.max_delay_s)

    def deadline(self) -> float | None:
        """When the pending batch must be written, or None when nothing is pending."""
        return self._batch.started_at + self.max_delay_s if self._batch.receipts else None

    def peek(self) -> Batch:
        return self._batch

    def take(self) -> Batch:
        batch, self._batch = self._batch, Batch()
        return batch


class LastSeenMemo:
    """What this writer last stored for each device, so that a batch skips the upserts that
    would change nothing but `last_seen`, and that by less than `resolution`."""

    def __init__(self, resolution: timedelta = LAST_SEEN_RESOLUTION) -> None:
        self.resolution = resolution
        self._stored: dict[DeviceKey, datetime] = {}

    def due(self, updates: list[DeviceUpdate]) -> list[DeviceUpdate]:
        """The updates worth writing: presence or reported state, or `last_seen` moved on."""
        result = []
        for update in updates:
            stored = self._stored.get((update.kind, update.device))
            if (stored is None or update.online is not None or update.reported is not None
                    or update.seen_at - stored >= self.resolution):
                result.append(update)
        return result

    def written(self, updates: list[DeviceUpdate]) -> None:
        """Remember updates once their transaction is committed."""
        for update in updates:
            key = (update.kind, update.device)
            stored = self._stored.get(key)
            if stored is None or update.seen_at > stored:
                self._stored[key] = update.seen_at

    def forget(self) -> None:
        self._stored.clear()


def single(message: InboundMessage, outcome: Outcome) -> Batch:
    """A batch of one message."""
    batch = Batch()
    batch.add(message, outcome)
    return batch
