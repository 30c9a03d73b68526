"""Backoff and circuit breaker, with an injected clock and sleep."""

from __future__ import annotations

import pytest

from kubiot_operator.brokers import (
    Backoff,
    BrokerRejected,
    BrokerUnavailable,
    CircuitBreaker,
    CircuitOpen,
)


class Recorder:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def test_delays_grow_exponentially_up_to_the_cap() -> None:
    backoff = Backoff(base_delay=1, factor=2, max_delay=5, random=lambda: 1.0)
    assert [backoff.delay(n) for n in range(5)] == [1, 2, 4, 5, 5]
    low = Backoff(base_delay=1, factor=2, max_delay=5, random=lambda: 0.0)
    assert [low.delay(n) for n in range(3)] == [0.5, 1, 2]  # jitter keeps the upper half


async def test_retries_unavailable_then_succeeds() -> None:
    sleeps, calls = Recorder(), []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise BrokerUnavailable("busy")
        return "done"

    backoff = Backoff(attempts=5, base_delay=1, random=lambda: 1.0, sleep=sleeps)
    assert await backoff.run(flaky) == "done"
    assert sleeps.delays == [1, 2]


async def test_rejections_and_open_circuits_are_not_retried() -> None:
    sleeps = Recorder()
    backoff = Backoff(sleep=sleeps)

    async def rejected() -> None:
        raise BrokerRejected("no")

    async def open_circuit() -> None:
        raise CircuitOpen("open")

    with pytest.raises(BrokerRejected):
        await backoff.run(rejected)
    with pytest.raises(CircuitOpen):
        await backoff.run(open_circuit)
    assert sleeps.delays == []


async def test_breaker_opens_after_threshold_and_closes_after_a_good_trial() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=2, cool_down=10, clock=lambda: now[0])

    async def down() -> None:
        raise BrokerUnavailable("down")

    async def up() -> str:
        return "up"

    for _ in range(2):
        with pytest.raises(BrokerUnavailable):
            await breaker.call(down)
    with pytest.raises(CircuitOpen, match="not trying again"):
        await breaker.call(up)
    now[0] = 10.5
    with pytest.raises(BrokerUnavailable):
        await breaker.call(down)  # the trial fails: open again for a full cool-down
    now[0] = 15
    with pytest.raises(CircuitOpen):
        await breaker.call(up)
    now[0] = 21
    assert await breaker.call(up) == "up"
    assert breaker.failures == 0
    assert not breaker.open


def test_errors_carry_reasons_for_status_conditions() -> None:
    assert BrokerUnavailable("x").reason == "BrokerUnavailable"
    assert CircuitOpen("x").reason == "BrokerCircuitOpen"
    assert CircuitOpen("x").retryable
    assert not BrokerRejected("x").retryable
    assert BrokerRejected("x", reason="BrokerIdentityMissing").reason == "BrokerIdentityMissing"
