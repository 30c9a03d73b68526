"""A stand-in for the tenant ingest's health reports, for tests of the operator's side.

Imitates what `kubiot_contract.health` specifies the ingest publishes: per device, retained
QoS 1 `HealthReport`s on `{tenant}/devices/{device}/health`, connected as the tenant's ingest
identity (its username, client id and password), with a fixed bounds rule, "silent" after a
fixed time without telemetry, a report at once on a change and a heartbeat while a device
sends. Not imitated: the z-score detector, learnt intervals, shared subscriptions across
replicas, anything stored in PostgreSQL. The real reports come from the ingest (kubiot_ingest).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiomqtt

from kubiot_contract.health import Anomaly, AnomalyRule, HealthReport
from kubiot_contract.topics import device_root, health_topic, ingest_client_id, ingest_username


@dataclass
class _Device:
    received_at: datetime
    metrics: dict[str, float] = field(default_factory=dict)
    new_anomalies: int = 0
    latest: Anomaly | None = None
    silent: bool = False
    sent_since_report: bool = True


@dataclass
class HealthReporter:
    """Reads the tenant's telemetry and reports each device's health, as its ingest would."""

    tenant: str
    host: str
    port: int
    password: str
    metric: str = "temperature"
    high: float = 60.0  # the bounds rule: `metric` above this is an anomaly
    silent_after: float = 2.0  # seconds without telemetry
    tick: float = 0.5  # how often silence and heartbeats are looked at
    instance: str | None = None  # the replica's own client id, as `ingest_client_id` takes it
    devices: dict[str, _Device] = field(default_factory=dict)
    published: int = 0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[HealthReporter]:
        async with aiomqtt.Client(self.host, self.port, username=ingest_username(self.tenant),
                                  password=self.password,
                                  identifier=ingest_client_id(self.tenant, self.instance),
                                  protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.subscribe(f"{self.tenant}/devices/+/telemetry", qos=1)
            tasks = [asyncio.create_task(self._read(client)),
                     asyncio.create_task(self._report(client))]
            try:
                yield self
            finally:
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await task

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            now = datetime.now(UTC)
            name = str(message.topic).split("/")[2]
            payload = message.payload if isinstance(message.payload, bytes) else b"{}"
            values = json.loads(payload).get("values") or {}
            device = self.devices.setdefault(name, _Device(now))
            device.received_at, device.sent_since_report = now, True
            value = values.get(self.metric)
            if isinstance(value, int | float):
                device.metrics[self.metric] = float(value)
                if value > self.high:
                    device.new_anomalies += 1
                    device.latest = Anomaly(rule=AnomalyRule.BOUNDS, metric=self.metric,
                                            time=now, value=float(value), high=self.high)
            if device.silent:
                device.silent = False
                await self._publish(client, name, device, now)

    async def _report(self, client: aiomqtt.Client) -> None:
        while True:
            await asyncio.sleep(self.tick)
            now = datetime.now(UTC)
            for name, device in list(self.devices.items()):
                went_silent = not device.silent and \
                    (now - device.received_at).total_seconds() > self.silent_after
                if went_silent:
                    device.silent = True
                if went_silent or device.sent_since_report or device.new_anomalies:
                    await self._publish(client, name, device, now)

    async def _publish(self, client: aiomqtt.Client, name: str, device: _Device,
                       now: datetime) -> None:
        anomalies = {AnomalyRule.BOUNDS: device.new_anomalies} if device.new_anomalies else {}
        if device.silent:
            anomalies[AnomalyRule.SILENT] = 1
        report = HealthReport(time=now, received_at=device.received_at,
                              last_telemetry=device.received_at, silent=device.silent,
                              anomalies=anomalies, latest=device.latest,
                              metrics=dict(device.metrics))
        device.new_anomalies, device.sent_since_report = 0, False
        await client.publish(health_topic(device_root(self.tenant, name)), report.encode(),
                             qos=1, retain=True)
        self.published += 1
