"""Wait for a condition instead of sleeping a fixed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
               message: str = "condition") -> T:
    """Poll `condition` until it returns something truthy; return it, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} did not hold within {timeout:.1f}s")
        time.sleep(interval)


async def async_wait_until(condition: Callable[[], Awaitable[T]], timeout: float = 10.0,
                           interval: float = 0.05, message: str = "condition") -> T:
    """The same for a coroutine condition, without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while True:
        result = await condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} did not hold within {timeout:.1f}s")
        await asyncio.sleep(interval)
