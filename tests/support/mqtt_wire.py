"""A broker's side of subscriber connections, at the packet level, on a loopback port.

Stands in for an MQTT 5 broker (Mosquitto 2.0) where a test must choose packet ids and drop
connections itself: it answers CONNECT with CONNACK, SUBSCRIBE with SUBACK (granting QoS 1),
PINGREQ with PINGRESP, records each PUBACK with the connection it came on, records the
PUBLISH packets the client sends (and acknowledges them, unless told not to), and sends the
PUBLISH packets it is given. It does not imitate authentication, sessions, redelivery,
receive-maximum accounting, retained messages or any validation of what a client sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass


def remaining_length(value: int) -> bytes:
    encoded = bytearray()
    while True:
        value, digit = divmod(value, 128)
        encoded.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(encoded)


def publish_packet(mid: int, topic: str | bytes, payload: bytes, qos: int = 1) -> bytes:
    """An MQTT 5 PUBLISH as a broker sends it (no properties); a topic given as bytes is sent
    as it is, UTF-8 or not."""
    name = topic if isinstance(topic, bytes) else topic.encode()
    body = len(name).to_bytes(2, "big") + name
    body += (mid.to_bytes(2, "big") if qos else b"") + b"\x00" + payload
    return bytes([0x30 | qos << 1]) + remaining_length(len(body)) + body


def _variable_length(data: bytes, pos: int) -> tuple[int, int]:
    """A variable byte integer at `pos`: (value, position after it)."""
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


@dataclass(frozen=True)
class ClientPublish:
    connection: int
    packet_id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class WireBroker:
    """`acks` holds (connection number, packet id) in the order PUBACKs arrived; `published`
    what the client published, in order. `ack_publishes` False leaves them unacknowledged."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.acks: list[tuple[int, int]] = []
        self.published: list[ClientPublish] = []
        self.ack_publishes = True
        self.connections = 0
        self.subscribed = 0
        self.port = 0
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Condition()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def send(self, data: bytes) -> None:
        """Write packets to the current connection."""
        assert self._writer is not None, "no client connected"
        self._writer.write(data)

    async def flush(self) -> None:
        if self._writer is not None:
            await self._writer.drain()

    def drop(self) -> None:
        """Close the current connection, as a broker restart or a network fault would."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def wait_for(self, what: str, value: int, within: float = 10.0) -> None:
        """Until `connections`, `subscribed`, `len(acks)` or `len(published)` reaches
        `value`."""
        def reached() -> bool:
            current = (len(self.acks) if what == "acks" else len(self.published)
                       if what == "published" else getattr(self, what))
            return bool(current >= value)
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(reached), within)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._writer = writer
        try:
            while True:
                head = await reader.readexactly(1)
                length, shift = 0, 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                kind = head[0] & 0xF0
                if kind == 0x10:  # CONNECT
                    writer.write(b"\x20\x03\x00\x00\x00")
                elif kind == 0x80:  # SUBSCRIBE: one QoS 1 grant per filter
                    filters = 0
                    props, pos = _variable_length(body, 2)
                    pos += props
                    while pos < len(body):
                        pos += 2 + int.from_bytes(body[pos:pos + 2], "big") + 1
                        filters += 1
                    suback = body[:2] + b"\x00" + b"\x01" * filters
                    writer.write(b"\x90" + remaining_length(len(suback)) + suback)
                    self.subscribed += 1
                elif kind == 0x30:  # PUBLISH from the client
                    qos = (head[0] >> 1) & 3
                    pos = 2 + int.from_bytes(body[:2], "big")
                    topic = body[2:pos].decode()
                    packet_id = int.from_bytes(body[pos:pos + 2], "big") if qos else 0
                    pos += 2 if qos else 0
                    props, pos = _variable_length(body, pos)
                    self.published.append(ClientPublish(number, packet_id, topic,
                                                        body[pos + props:], qos,
                                                        bool(head[0] & 1)))
                    if qos and self.ack_publishes:
                        writer.write(b"\x40\x02" + packet_id.to_bytes(2, "big"))
                elif kind == 0x40:  # PUBACK
                    self.acks.append((number, int.from_bytes(body[:2], "big")))
                elif kind == 0xC0:  # PINGREQ
                    writer.write(b"\xd0\x00")
                elif kind == 0xE0:  # DISCONNECT
                    break
                await self._notify()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            await self._notify()


@contextlib.asynccontextmanager
async def wire_broker(tls: ssl.SSLContext | None = None) -> AsyncIterator[WireBroker]:
    broker = WireBroker(tls)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()
