"""The device side of telemetry delivery: a message is kept until a PUBACK with reason 0.

In MQTT 5 a PUBACK only says the broker received the message. Its reason code says more:
0 means it was delivered to (or queued for) a subscriber; 16, "no matching subscribers", is
also a success code, yet the message went nowhere, which is what a device sees while the
tenant's ingest is reconnecting after a broker restart. A reason of 0x80 or above is a
refusal (not authorised, quota exceeded, too large). So a device keeps each telemetry message,
in order, until a PUBACK with reason 0, and sends it again after a pause otherwise: the same
bytes, with the same `seq` and `ts`, so the ingest, which stores a sample under
(device, stream, ts, seq), keeps it once however often it arrives.

Pure: no I/O, no clock, no randomness of its own.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

PUBACK_SUCCESS = 0
NO_MATCHING_SUBSCRIBERS = 16
DEFAULT_CAPACITY = 10_000


@dataclass(frozen=True)
class PendingTelemetry:
    """One telemetry message, encoded once: every attempt sends the same bytes."""

    seq: int
    topic: str
    payload: bytes


@dataclass
class TelemetryOutbox:
    """Telemetry not yet delivered, oldest first.

    Bounded, as a device's memory is: when full, the oldest message is given up (and counted
    in `dropped`) to make room for the newest.
    """

    capacity: int = DEFAULT_CAPACITY
    delivered: int = 0
    dropped: int = 0
    # PUBACK reason codes other than 0, by code: what made the device send again.
    refusals: Counter[int] = field(default_factory=Counter)
    _pending: deque[PendingTelemetry] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("an outbox holds at least one message")

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, message: PendingTelemetry) -> None:
        if len(self._pending) >= self.capacity:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(message)

    def next(self) -> PendingTelemetry | None:
        """The message to send now: the oldest one not delivered."""
        return self._pending[0] if self._pending else None

    def settle(self, message: PendingTelemetry, reason_code: int) -> bool:
        """Record the PUBACK of `message`; True when it is delivered and leaves the outbox."""
        if reason_code != PUBACK_SUCCESS:
            self.refusals[reason_code] += 1
            return False
        if self._pending and self._pending[0] is message:
            self._pending.popleft()
        self.delivered += 1
        return True


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: `first` seconds, doubling up to `ceiling`."""

    first: float
    ceiling: float

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.ceiling:
            raise ValueError("a retry waits more than 0 s, and first <= ceiling")

    def delay(self, attempt: int, jitter: float) -> float:
        """The pause before retry `attempt` (0-based), `jitter` in [0, 1) picking a point in the
        upper half of the step, so a fleet that failed together does not retry together."""
        step = min(self.ceiling, self.first * 2.0 ** min(attempt, 32))
        return step / 2 + jitter * step / 2
