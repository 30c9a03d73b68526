"""A simulated edge gateway: one mutual-TLS session that speaks for the devices behind it
(Modbus or BLE sensors without an IP of their own), as the topic contract allows a gateway.

Its children's telemetry is delivered as a device's is: sampled at a steady rate, kept until a
PUBACK with reason 0 (see `outbox.py`), with each child's `seq` going on across sessions. It
answers its children's commands on their behalf, as a simulated device answers its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

import aiomqtt

from kubiot_contract.telemetry import CURRENT_VERSION
from kubiot_contract.topics import (
    PRESENCE_OFFLINE,
    PRESENCE_ONLINE,
    Channel,
    IdentityKind,
    device_root,
    presence_topic,
    state_reported_topic,
    telemetry_topic,
    topic_spec,
)

from .commands import Answer, Effect
from .credentials import DeviceCredentials
from .outbox import DEFAULT_CAPACITY, PendingTelemetry, RetryPolicy, TelemetryOutbox
from .puback import PubackPublisher
from .responder import CommandResponder
from .sender import RECONNECT, TELEMETRY_RETRY, TelemetrySender, stop_task, until_one_ends

log = logging.getLogger(__name__)


def gateway_credentials(data: Mapping[str, bytes]) -> DeviceCredentials:
    """A gateway's Secret data as credentials (the same files a device gets)."""
    return DeviceCredentials.from_secret_data(data, IdentityKind.GATEWAY)


class SimulatedGateway:
    """`run()` stays connected until cancelled, publishing presence and telemetry for its
    children on their own topics."""

    def __init__(self, credentials: DeviceCredentials, children: Sequence[str], *,
                 telemetry_seconds: float = 5.0, check_hostname: bool = True,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 telemetry_retry: RetryPolicy = TELEMETRY_RETRY,
                 reconnect: RetryPolicy = RECONNECT,
                 outbox_capacity: int = DEFAULT_CAPACITY,
                 jitter: Callable[[], float] = random.random,
                 reboot_seconds: float = 1.0) -> None:
        self.credentials = credentials
        self.children = list(children)
        self._telemetry_seconds = telemetry_seconds
        self._tls: ssl.SSLContext = credentials.tls_context(check_hostname=check_hostname)
        self._clock = clock
        self._reconnect = reconnect
        self._jitter = jitter
        self._telemetry = TelemetrySender(f"gateway {credentials.name}", retry=telemetry_retry,
                                          capacity=outbox_capacity, jitter=jitter)
        self.telemetry_sampled = 0  # rounds of samples, one per child; also their seq
        self.connected = asyncio.Event()
        self.connects = 0
        self.commands = CommandResponder(clock=clock, jitter=jitter)
        self._reboot_seconds = reboot_seconds
        self._booted = time.monotonic()
        self._client: aiomqtt.Client | None = None

    @property
    def name(self) -> str:
        return self.credentials.name

    @property
    def outbox(self) -> TelemetryOutbox:
        """The children's telemetry sampled and not yet delivered, oldest first."""
        return self._telemetry.outbox

    @property
    def telemetry_sent(self) -> int:
        """Telemetry messages delivered (PUBACK reason 0), all children together."""
        return self.outbox.delivered

    async def run(self) -> None:
        """Sample telemetry and stay connected; reconnect, backing off, after losing the
        session or failing to get one."""
        sampling = asyncio.create_task(self._sample_telemetry())
        failures = 0
        try:
            while True:
                before = self.connects
                try:
                    await self._session()
                except aiomqtt.MqttError as exc:
                    log.debug("gateway %s lost its session: %s", self.name, exc)
                finally:
                    self.connected.clear()
                failures = 0 if self.connects > before else failures + 1
                await asyncio.sleep(self._reconnect.delay(failures, self._jitter()))
        finally:
            await stop_task(sampling)

    def _child_roots(self) -> list[str]:
        return [device_root(self.credentials.tenant, c) for c in self.children]

    async def _sample_telemetry(self) -> None:
        """A sample per child every `telemetry_seconds`, on a fixed schedule, connected or not."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            seq = self.telemetry_sampled
            for child in self._child_roots():
                sample = {"v": CURRENT_VERSION, "ts": self._clock().isoformat(), "seq": seq,
                          "values": {"flow_lpm": round(120 + 15 * math.sin(seq / 7), 2),
                                     "via": self.name}}
                self._telemetry.add(PendingTelemetry(seq, telemetry_topic(child),
                                                     json.dumps(sample).encode()))
            self.telemetry_sampled += 1
            await asyncio.sleep(max(0.0, started + self.telemetry_sampled * self._telemetry_seconds
                                    - loop.time()))

    async def _session(self) -> None:
        root = self.credentials.topic_root
        client = aiomqtt.Client(
            self.credentials.broker_host, self.credentials.broker_port,
            username=self.credentials.username, identifier=self.credentials.username,
            protocol=aiomqtt.ProtocolVersion.V5, tls_context=self._tls, keepalive=30,
            will=aiomqtt.Will(presence_topic(root), PRESENCE_OFFLINE, qos=1, retain=True))
        publisher = PubackPublisher(client)
        async with client:
            self._client = client
            await client.publish(presence_topic(root), PRESENCE_ONLINE, qos=1, retain=True)
            child_roots = self._child_roots()
            for child in child_roots:
                await client.subscribe(f"{child}/{topic_spec(Channel.COMMAND).filter}", qos=1)
                await client.publish(presence_topic(child), PRESENCE_ONLINE, qos=1, retain=True)
            self.connects += 1
            self.connected.set()
            try:
                # The message stream ends only when the connection does, which is how a lost
                # connection ends the session.
                await until_one_ends(self._receive(client), self._telemetry.run(publisher),
                                     self.commands.deliver(publisher))
            finally:
                self._client = None
                with contextlib.suppress(aiomqtt.MqttError):
                    for child in child_roots:
                        await client.publish(presence_topic(child), PRESENCE_OFFLINE, qos=1,
                                             retain=True)


    # --- commands for the children ------------------------------------------------------------

    async def _receive(self, client: aiomqtt.Client) -> None:
        roots = {root: name for name, root in zip(self.children, self._child_roots(),
                                                  strict=True)}
        async for message in client.messages:
            topic = str(message.topic)
            root, _, rest = topic.rpartition("/cmd/")
            child = roots.get(root)
            if child is None or "/" in rest:
                continue
            payload = message.payload if isinstance(message.payload, bytes) else b""
            correlation = getattr(message.properties, "CorrelationData", None)
            response_topic = getattr(message.properties, "ResponseTopic", None)
            given = self.commands.on_command(
                child, root, rest, payload,
                bytes(correlation) if correlation is not None else None,
                str(response_topic) if response_topic else None,
                uptime_seconds=time.monotonic() - self._booted, seq=self.telemetry_sampled,
                delivered=self._after_delivery(root))
            if given is not None and given.effect is Effect.REPORT_STATE:
                await client.publish(state_reported_topic(root), json.dumps(
                    self.commands.settings.get(child, {}), sort_keys=True), qos=1, retain=True)

    def _after_delivery(self, root: str) -> Callable[[Answer], Callable[[], None] | None]:
        """What to do once a child's answer is delivered: reboot it, when that was asked."""
        def reboot() -> None:
            task = asyncio.ensure_future(self._reboot_child(root))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

        def after(given: Answer) -> Callable[[], None] | None:
            return reboot if given.effect is Effect.REBOOT else None
        return after

    async def _reboot_child(self, root: str) -> None:
        for presence, pause in ((PRESENCE_OFFLINE, self._reboot_seconds), (PRESENCE_ONLINE, 0)):
            if self._client is None:
                return
            await self._client.publish(presence_topic(root), presence, qos=1, retain=True)
            await asyncio.sleep(pause)
