"""Sending a device's telemetry outbox over a session, for simulated devices and gateways."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import aiomqtt

from .outbox import DEFAULT_CAPACITY, PendingTelemetry, RetryPolicy, TelemetryOutbox
from .puback import PubackPublisher

log = logging.getLogger(__name__)

# Resending telemetry without a subscriber: soon after the first miss (the ingest is usually
# back within a second of the broker), then no more than every 10 s while nothing consumes it.
TELEMETRY_RETRY = RetryPolicy(first=0.2, ceiling=10.0)
PUBACK_TIMEOUT_S = 10.0
# Reconnecting after a lost session or a failed connect: jittered and capped, so a fleet that
# lost its broker together does not come back in one burst.
RECONNECT = RetryPolicy(first=0.5, ceiling=10.0)


class TelemetrySender:
    """Holds telemetry in an outbox across sessions; `run()` sends it during one."""

    def __init__(self, name: str, *, retry: RetryPolicy = TELEMETRY_RETRY,
                 capacity: int = DEFAULT_CAPACITY, jitter: Callable[[], float],
                 puback_timeout: float = PUBACK_TIMEOUT_S) -> None:
        self.name = name
        self.outbox = TelemetryOutbox(capacity)
        self._retry = retry
        self._jitter = jitter
        self._puback_timeout = puback_timeout
        self._waiting = asyncio.Event()

    def add(self, message: PendingTelemetry) -> None:
        self.outbox.add(message)
        self._waiting.set()

    async def run(self, publisher: PubackPublisher) -> None:
        """Send the outbox in order, each message until its PUBACK has reason 0.

        Raises `aiomqtt.MqttError` when the session fails, or a PUBACK does not come in time.
        """
        misses = 0
        while True:
            message = self.outbox.next()
            if message is None:
                self._waiting.clear()
                await self._waiting.wait()
                continue
            try:
                async with asyncio.timeout(self._puback_timeout):
                    reason = await publisher.publish(message.topic, message.payload)
            except TimeoutError:
                raise aiomqtt.MqttError(
                    f"no PUBACK within {self._puback_timeout:.0f} s") from None
            if self.outbox.settle(message, reason):
                misses = 0
                continue
            log.debug("%s: PUBACK reason %d for telemetry seq %d on %s; sending it again",
                      self.name, reason, message.seq, message.topic)
            await asyncio.sleep(self._retry.delay(misses, self._jitter()))
            misses += 1


async def until_one_ends(*work: Coroutine[Any, Any, None]) -> None:
    """Run `work` together until one piece ends; stop the rest, and raise what it raised."""
    tasks = [asyncio.create_task(w) for w in work]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        errors = [task.exception() for task in done if not task.cancelled()]
        for error in errors:
            if error is not None:
                raise error
    finally:
        for task in tasks:
            await stop_task(task)
            if not task.cancelled():
                task.exception()  # seen: the first error is raised, the others end with it


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel a task and wait for it to end.

    Cancelling again until it ends: a cancellation that lands inside the MQTT client's publish
    can be absorbed there, and the task would then sleep on.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
