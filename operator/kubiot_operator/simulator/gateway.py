"""A simulated edge gateway: one mutual-TLS session that speaks for the devices behind it
(Modbus or BLE sensors without an IP of their own), as the topic contract allows a gateway."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

import aiomqtt

from kubiot_operator.contract import (
    PRESENCE_OFFLINE,
    PRESENCE_ONLINE,
    IdentityKind,
    device_root,
    presence_topic,
    telemetry_topic,
)
from kubiot_operator.telemetry import CURRENT_VERSION

from .credentials import DeviceCredentials

log = logging.getLogger(__name__)


def gateway_credentials(data: Mapping[str, bytes]) -> DeviceCredentials:
    """A gateway's Secret data as credentials (the same files a device gets)."""
    return DeviceCredentials.from_secret_data(data, IdentityKind.GATEWAY)


class SimulatedGateway:
    """`run()` stays connected until cancelled, publishing presence and telemetry for its
    children on their own topics."""

    def __init__(self, credentials: DeviceCredentials, children: Sequence[str], *,
                 telemetry_seconds: float = 5.0, check_hostname: bool = True,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.credentials = credentials
        self.children = list(children)
        self._telemetry_seconds = telemetry_seconds
        self._tls: ssl.SSLContext = credentials.tls_context(check_hostname=check_hostname)
        self._clock = clock
        self.telemetry_sent = 0
        self.connected = asyncio.Event()

    @property
    def name(self) -> str:
        return self.credentials.name

    async def run(self, reconnect_seconds: float = 1.0) -> None:
        while True:
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                log.debug("gateway %s lost its session: %s", self.name, exc)
            finally:
                self.connected.clear()
            await asyncio.sleep(reconnect_seconds)

    async def _session(self) -> None:
        root = self.credentials.topic_root
        client = aiomqtt.Client(
            self.credentials.broker_host, self.credentials.broker_port,
            username=self.credentials.username, identifier=self.credentials.username,
            protocol=aiomqtt.ProtocolVersion.V5, tls_context=self._tls, keepalive=30,
            will=aiomqtt.Will(presence_topic(root), PRESENCE_OFFLINE, qos=1, retain=True))
        async with client:
            await client.publish(presence_topic(root), PRESENCE_ONLINE, qos=1, retain=True)
            child_roots = [device_root(self.credentials.tenant, c) for c in self.children]
            for child in child_roots:
                await client.publish(presence_topic(child), PRESENCE_ONLINE, qos=1, retain=True)
            self.connected.set()
            try:
                seq = 0
                while True:
                    for child in child_roots:
                        sample = {"v": CURRENT_VERSION, "ts": self._clock().isoformat(),
                                  "seq": seq, "values": {
                                      "flow_lpm": round(120 + 15 * math.sin(seq / 7), 2),
                                      "via": self.name}}
                        await client.publish(telemetry_topic(child), json.dumps(sample), qos=1)
                        self.telemetry_sent += 1
                    seq += 1
                    await asyncio.sleep(self._telemetry_seconds)
            finally:
                with contextlib.suppress(aiomqtt.MqttError):
                    for child in child_roots:
                        await client.publish(presence_topic(child), PRESENCE_OFFLINE, qos=1,
                                             retain=True)
