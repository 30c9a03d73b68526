"""Backoff with jitter and a circuit breaker, with injectable sleep and clock for tests."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from .errors import BrokerUnavailable, CircuitOpen

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


@dataclass
class Backoff:
    """Exponential backoff with full jitter over the upper half of each step.

    Only retryable errors (BrokerUnavailable, but not CircuitOpen) are retried; anything else
    propagates at once.
    """

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0
    factor: float = 2.0
    sleep: Sleep = asyncio.sleep
    random: Callable[[], float] = field(default=random.random)

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (0-based)."""
        ceiling = min(self.max_delay, self.base_delay * self.factor ** attempt)
        return ceiling / 2 + self.random() * ceiling / 2

    async def run(self, operation: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self.attempts):
            try:
                return await operation()
            except CircuitOpen:
                raise
            except BrokerUnavailable:
                if attempt == self.attempts - 1:
                    raise
                await self.sleep(self.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover


@dataclass
class CircuitBreaker:
    """Opens after `threshold` consecutive failures; one trial call is let through per cool-down."""

    threshold: int = 5
    cool_down: float = 30.0
    clock: Clock = time.monotonic
    failures: int = 0
    opened_at: float | None = None

    @property
    def open(self) -> bool:
        return self.opened_at is not None and self.clock() - self.opened_at < self.cool_down

    def before_call(self) -> None:
        if self.open:
            assert self.opened_at is not None
            left = self.cool_down - (self.clock() - self.opened_at)
            raise CircuitOpen(f"broker failed {self.failures} times in a row; "
                              f"not trying again for {left:.1f}s")

    def record_success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def record_failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            # (Re)start the cool-down: a failed trial call keeps the circuit open.
            self.opened_at = self.clock()

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T:
        self.before_call()
        try:
            result = await operation()
        except BrokerUnavailable:
            self.record_failure()
            raise
        self.record_success()
        return result
