"""One long-lived MQTT v5 session for the operator, reconnected with backoff.

Publishes (desired state, firmware jobs) wait a bounded time for the session; reports arriving on
the subscribed filters are handed to a callback, never dropped by a slow reconcile.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import socket
import ssl
from collections.abc import Callable

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from kubiot_contract.topics import REPORTS_CLIENT_ID

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]


class MessengerUnavailable(RuntimeError):
    """The broker could not be reached in time; the caller retries later."""


class OperatorMqtt:
    """`run()` keeps the session up until cancelled; `publish()` uses it."""

    def __init__(self, host: str, port: int, username: str, password: str, *,
                 client_id: str = REPORTS_CLIENT_ID, tls: ssl.SSLContext | None = None,
                 subscriptions: list[str] | None = None, on_message: MessageHandler | None = None,
                 publish_timeout: float = 10.0, max_backoff: float = 30.0) -> None:
        self._host, self._port = host, port
        self._username, self._password = username, password
        self._client_id = client_id
        self._tls = tls
        self._subscriptions = subscriptions or []
        self._on_message = on_message
        self._publish_timeout = publish_timeout
        self._max_backoff = max_backoff
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self.connects = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._connected.wait()
        except TimeoutError:
            raise MessengerUnavailable(
                f"no MQTT session with {self._host}:{self._port} after {seconds:.0f} s") from None

    async def publish(self, topic: str, payload: bytes, *, retain: bool, qos: int = 1) -> None:
        await self.wait_connected(self._publish_timeout)
        assert self._client is not None
        # Bounded here, not by aiomqtt or `asyncio.wait_for`: on Python 3.11 those swallow a
        # cancellation that lands just as the PUBACK arrives.
        try:
            async with asyncio.timeout(self._publish_timeout):
                await self._client.publish(topic, payload, qos=qos, retain=retain,
                                           timeout=math.inf)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            raise MessengerUnavailable(f"publishing to {topic} failed: {exc}") from exc

    async def run(self) -> None:
        """Connect, subscribe and dispatch; reconnect with capped, jittered backoff."""
        delay = 0.5
        while True:
            before = self.connects
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                log.warning("MQTT session with %s:%s lost: %s; reconnecting in %.1f s",
                            self._host, self._port, exc, delay)
            finally:
                self._connected.clear()
                self._client = None
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # aiomqtt can swallow a cancellation that lands while it connects or closes;
                # honour it here, or the operator could never be stopped.
                raise asyncio.CancelledError
            if self.connects != before:
                delay = 0.5
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(self._max_backoff, delay * 2)

    async def _session(self) -> None:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
        client = aiomqtt.Client(
            self._host, self._port, username=self._username, password=self._password,
            identifier=self._client_id, protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=self._tls, keepalive=30, properties=properties,
            max_queued_outgoing_messages=100_000,
            # Each publish waits for its PUBACK; with Nagle's algorithm on, a publish right
            # after another one sits out the broker's delayed ACK (40 ms on Linux) first.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        async with client:
            self._client = client
            for topic_filter in self._subscriptions:
                await client.subscribe(topic_filter, qos=1)
            self._connected.set()
            self.connects += 1
            log.info("MQTT session with %s:%s established", self._host, self._port)
            async for message in client.messages:
                if self._on_message is not None:
                    payload = message.payload
                    data = payload if isinstance(payload, bytes) else str(payload).encode()
                    self._on_message(str(message.topic), data)
