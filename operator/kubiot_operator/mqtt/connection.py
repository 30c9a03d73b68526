"""One long-lived MQTT v5 session for the operator, reconnected with backoff.

Publishes (desired state, firmware jobs, commands) wait a bounded time for the session; reports
arriving on the subscribed filters are handed to a callback, never dropped by a slow reconcile.
Command results go to their own callback with the MQTT v5 correlation data they carry.
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
#: topic, payload, MQTT v5 correlation data (None when the sender set none)
ResultHandler = Callable[[str, bytes, bytes | None], None]


class MessengerUnavailable(RuntimeError):
    """The broker could not be reached in time; the caller retries later."""


class OperatorMqtt:
    """`run()` keeps the session up until cancelled; `publish()` uses it."""

    def __init__(self, host: str, port: int, username: str, password: str, *,
                 client_id: str = REPORTS_CLIENT_ID, tls: ssl.SSLContext | None = None,
                 subscriptions: list[str] | None = None, on_message: MessageHandler | None = None,
                 on_command_result: ResultHandler | None = None,
                 publish_timeout: float = 10.0, max_backoff: float = 30.0) -> None:
        self._host, self._port = host, port
        self._username, self._password = username, password
        self._client_id = client_id
        self._tls = tls
        self._subscriptions = subscriptions or []
        self._on_message = on_message
        self._on_command_result = on_command_result
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

    async def publish(self, topic: str, payload: bytes, *, retain: bool, qos: int = 1,
                      correlation_data: bytes | None = None,
                      response_topic: str | None = None) -> None:
        await self.wait_connected(self._publish_timeout)
        assert self._client is not None
        properties = None
        if correlation_data is not None or response_topic is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if correlation_data is not None:
                properties.CorrelationData = correlation_data
            if response_topic is not None:
                properties.ResponseTopic = response_topic
        # Bounded here, not by aiomqtt or `asyncio.wait_for`: on Python 3.11 those swallow a
        # cancellation that lands just as the PUBACK arrives.
        try:
            async with asyncio.timeout(self._publish_timeout):
                await self._client.publish(topic, payload, qos=qos, retain=retain,
                                           properties=properties, timeout=math.inf)
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
                payload = message.payload
                data = payload if isinstance(payload, bytes) else str(payload).encode()
                topic = str(message.topic)
                if self._on_command_result is not None and is_command_result(topic):
                    correlation = getattr(message.properties, "CorrelationData", None)
                    self._on_command_result(
                        topic, data, bytes(correlation) if correlation is not None else None)
                elif self._on_message is not None:
                    self._on_message(topic, data)


def is_command_result(topic: str) -> bool:
    """`…/cmd/{name}/result`; the receiver checks the rest against the contract."""
    levels = topic.split("/")
    return len(levels) == 6 and levels[3] == "cmd" and levels[5] == "result"
