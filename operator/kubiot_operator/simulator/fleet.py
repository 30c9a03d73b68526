"""Many simulated devices in one asyncio loop, for tests, benchmarks and the local stack."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

from .credentials import DeviceCredentials
from .device import SimulatedDevice

CONCURRENT_CONNECTS = 32  # TLS handshakes at once: a fleet coming up must not flood the broker


class Fleet:
    """`async with Fleet(devices):` runs every device until the block ends."""

    def __init__(self, devices: Iterable[SimulatedDevice]) -> None:
        self.devices = {device.name: device for device in devices}
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_bundles(cls, bundles: Mapping[str, Mapping[str, bytes]], **options: Any) -> Fleet:
        """One device per credential bundle (Secret data), all with the same options."""
        limit = asyncio.Semaphore(CONCURRENT_CONNECTS)
        return cls(SimulatedDevice(DeviceCredentials.from_secret_data(data),
                                   connect_limit=limit, **options)
                   for _, data in sorted(bundles.items()))

    def __getitem__(self, name: str) -> SimulatedDevice:
        return self.devices[name]

    def __len__(self) -> int:
        return len(self.devices)

    async def __aenter__(self) -> Fleet:
        self.start()
        return self

    def start(self) -> None:
        """Run every device (again, after `stop()`: they keep their firmware and state)."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(device.run(), name=f"device-{name}")
                           for name, device in self.devices.items()]

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        # Cancelled again until they end: the MQTT client can absorb a cancellation.
        while pending := [task for task in self._tasks if not task.done()]:
            await asyncio.wait(pending, timeout=0.1)
            for task in pending:
                task.cancel()
        self._tasks.clear()

    async def wait_connected(self, seconds: float = 30.0) -> None:
        """Return once every device has a session; raise TimeoutError naming those without."""
        try:
            await asyncio.wait_for(asyncio.gather(
                *(d.connected.wait() for d in self.devices.values())), seconds)
        except TimeoutError:
            missing = sorted(n for n, d in self.devices.items() if not d.connected.is_set())
            raise TimeoutError(f"{len(missing)} devices did not connect: {missing[:5]}") from None

    def firmware(self) -> dict[str, str]:
        """The firmware each device runs."""
        return {name: device.firmware for name, device in self.devices.items()}
