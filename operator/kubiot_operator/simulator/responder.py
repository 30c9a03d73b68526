"""Answering commands over a session, for simulated devices and for the children a simulated
gateway speaks for.

Each answer goes to the command's response topic with its correlation data and is kept until a
PUBACK with reason 0: 16 means the operator is not subscribed at that moment (it restarts), so
the same answer is sent again after a pause, until the command expires.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from kubiot_contract.commands import result_payload
from kubiot_contract.topics import command_result_topic

from .commands import Answer, AnswerMemory, Received, answer, read_command
from .outbox import PUBACK_SUCCESS, RetryPolicy
from .puback import PubackPublisher

# Sending an answer again while the operator is not subscribed: soon, and then no more than
# every 2 s, so the answer lands within moments of its return.
ANSWER_RETRY = RetryPolicy(first=0.2, ceiling=2.0)


@dataclass
class PendingAnswer:
    """A command's answer, kept until a PUBACK with reason 0 (or until the command expires)."""

    topic: str
    payload: bytes
    correlation: bytes
    expires_at: datetime | None
    delivered: Callable[[], None] | None = None  # what to do once it is delivered (reboot)


class CommandResponder:
    """Reads commands for one or more devices, acts once per correlation id, and delivers the
    answers during a session (`deliver`)."""

    def __init__(self, *, clock: Callable[[], datetime], jitter: Callable[[], float],
                 command_seconds: float = 0.0) -> None:
        self._clock = clock
        self._jitter = jitter
        self.command_seconds = command_seconds  # how long acting on a command takes
        self.received: list[tuple[str, Received]] = []  # (device, command), repeats included
        self.executed: list[tuple[str, Received]] = []
        self.settings: dict[str, dict[str, Any]] = {}  # what `set` changed, per device
        self._memory: dict[str, AnswerMemory] = {}
        self._pending: list[PendingAnswer] = []
        self._waiting = asyncio.Event()

    @property
    def pending(self) -> int:
        """Answers not yet taken by the operator."""
        return len(self._pending)

    def on_command(self, device: str, root: str, name: str, payload: bytes,
                   correlation: bytes | None, response_topic: str | None, *,
                   uptime_seconds: float, seq: int,
                   delivered: Callable[[Answer], Callable[[], None] | None] = lambda _: None,
                   ) -> Answer | None:
        """Act on a command (unless its id was seen) and queue its answer; the answer, so the
        caller can apply its effect, or None when the command carries no correlation id."""
        received = read_command(name, payload, correlation)
        if received is None:
            return None
        self.received.append((device, received))
        expires_at = _expiry(payload)
        if expires_at is not None and self._clock() > expires_at:
            return None  # nobody waits for this answer any more: neither act nor answer
        memory = self._memory.setdefault(device, AnswerMemory())
        given = memory.get(received.correlation)
        fresh = given is None
        if given is None:  # a repeated id is answered again, not acted on again
            given, self.settings[device] = answer(
                received, uptime_seconds=uptime_seconds, seq=seq,
                settings=self.settings.get(device, {}))
            memory.remember(received.correlation, given)
            self.executed.append((device, received))
        pending = PendingAnswer(
            response_topic or command_result_topic(root, name),
            result_payload(received.correlation, given.status, given.message, given.data),
            received.correlation.encode(), expires_at,
            delivered(given) if fresh else None)
        task = asyncio.ensure_future(self._queue_after_work(pending))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return given if fresh else None

    async def _queue_after_work(self, pending: PendingAnswer) -> None:
        if self.command_seconds:
            await asyncio.sleep(self.command_seconds)
        self._pending.append(pending)
        self._waiting.set()

    async def deliver(self, publisher: PubackPublisher) -> None:
        """Send each answer until a PUBACK with reason 0; runs for the session."""
        misses = 0
        while True:
            if not self._pending:
                self._waiting.clear()
                await self._waiting.wait()
                continue
            pending = self._pending[0]
            if pending.expires_at is not None and self._clock() > pending.expires_at:
                self._pending.pop(0)
                continue
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = pending.correlation
            reason = await publisher.publish(pending.topic, pending.payload, properties)
            if reason != PUBACK_SUCCESS:
                await asyncio.sleep(ANSWER_RETRY.delay(misses, self._jitter()))
                misses += 1
                continue
            misses = 0
            self._pending.pop(0)
            if pending.delivered is not None:
                pending.delivered()


def _expiry(payload: bytes) -> datetime | None:
    try:
        body = json.loads(payload)
        return datetime.fromisoformat(str(body["expiresAt"]).replace("Z", "+00:00"))
    except (ValueError, KeyError, TypeError):
        return None
