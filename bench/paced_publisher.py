"""Paced QoS 1 telemetry for the live phase of bench_ingest.py, as a separate process.

    python bench/paced_publisher.py HOST PORT USERNAME PASSWORD TENANT PREFIX DEVICES RATE SECONDS

One MQTT 5 connection per device (`{PREFIX}-{i}`), `RATE` messages per second in all, for
`SECONDS`. Every 5 ms each device is owed its share; it stamps those samples with the time
and sends them at once, never holding more unacknowledged than the broker's receive maximum
(what does not fit waits in the device, and its wait counts as latency). Prints the number of
messages sent once every one of them is acknowledged, and fails if the broker refused any.

Why not `mosquitto_pub -l`: a device sending thousands of messages a second through a window
of 20 (Mosquitto's receive maximum) turns into one round trip per PUBACK, and the publisher's
and the broker's cost of that ping-pong, on the two cores the ingest and PostgreSQL share,
outweighs the ingest's own. Spreading the same rate over enough devices that the window never
fills, and writing each tick's messages in one go, leaves the broker and the ingest the same
messages to handle with much less said about them.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections import deque

import mqtt5

from kubiot_contract.topics import device_root

TICK_S = 0.005
REFUSED = 0x80


def payload(seq: int, ts: float) -> bytes:
    """The same sample as bench_ingest's backlog lines."""
    return (b'{"ts":%.6f,"seq":%d,"values":{"temp":%.2f,"humidity":%d,"ok":true}}'
            % (ts, seq, 20 + (seq % 100) / 10, 40 + seq % 20))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_packet(topic: bytes, packet_id: int, body: bytes) -> bytes:
    """A QoS 1 PUBLISH without properties (MQTT 5, 3.3), `topic` already length-prefixed."""
    rest = topic + packet_id.to_bytes(2, "big") + b"\x00" + body
    return b"\x32" + _varint(len(rest)) + rest


class Device(asyncio.Protocol):
    def __init__(self, topic: str) -> None:
        encoded = topic.encode()
        self.topic = len(encoded).to_bytes(2, "big") + encoded
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.receive_max = 65535
        self.in_flight = 0
        #: PUBACKs with a failure reason code (0x80 and up).
        self.refused = 0
        self.waiting: deque[bytes] = deque()
        self._next_id = 1
        self._idle = asyncio.Event()
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connected.done():
            self.connected.set_exception(ConnectionError("connection closed before CONNACK"))
        elif self.waiting or self.in_flight:
            print(f"connection lost with {self.in_flight + len(self.waiting)} messages "
                  "unacknowledged", file=sys.stderr)

    def send(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data
        used = 0
        while used < len(buffer):
            try:
                packet, size = mqtt5.read(memoryview(buffer)[used:])
            except IndexError:
                break  # the rest of the packet is still on its way
            used += size
            if isinstance(packet, mqtt5.PubAckPacket):
                self.in_flight -= 1
                if int(packet.reason_code) >= REFUSED:
                    self.refused += 1
            elif isinstance(packet, mqtt5.ConnAckPacket):
                if packet.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
                    self.connected.set_exception(ConnectionError(
                        f"the broker refused the connection: {packet.reason_code.name}"))
                    return
                self.receive_max = packet.receive_max or 65535
                self.connected.set_result(None)
            else:
                raise RuntimeError(f"unexpected packet {packet!r}")
        self._buffer = buffer[used:]
        self.flush()
        if not self.waiting and not self.in_flight:
            self._idle.set()

    async def settled(self) -> None:
        """Until everything given to this device is acknowledged."""
        if self.waiting or self.in_flight:
            self._idle.clear()
            await self._idle.wait()

    def flush(self) -> None:
        """Send what the receive maximum allows, in one write."""
        out = []
        while self.waiting and self.in_flight < self.receive_max:
            out.append(publish_packet(self.topic, self._next_id, self.waiting.popleft()))
            self._next_id = self._next_id % 65535 + 1
            self.in_flight += 1
        if out:
            self.send(b"".join(out))


async def run(host: str, port: int, username: str, password: str, tenant: str, prefix: str,
              devices: int, rate: float, seconds: float) -> int:
    loop = asyncio.get_running_loop()
    fleet: list[Device] = []
    for index in range(devices):
        name = f"{prefix}-{index}"
        topic = f"{device_root(tenant, name)}/telemetry"
        _, device = await loop.create_connection(functools.partial(Device, topic), host, port)
        device.send(mqtt5.ConnectPacket(client_id=f"bench-{name}", username=username,
                                        password=password.encode(), clean_start=True).write())
        await device.connected
        fleet.append(device)
    per_tick = rate * TICK_S / devices
    owed = [0.0] * devices
    seqs = [0] * devices
    sent = 0
    started = next_tick = time.monotonic()
    while time.monotonic() - started < seconds:
        for index, device in enumerate(fleet):
            owed[index] += per_tick
            count = int(owed[index])
            if count:
                owed[index] -= count
                now = time.time()
                device.waiting.extend(payload(seqs[index] + k, now) for k in range(count))
                device.flush()
                seqs[index] += count
                sent += count
        next_tick += TICK_S
        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
    await asyncio.gather(*(device.settled() for device in fleet))
    refused = sum(device.refused for device in fleet)
    if refused:
        raise RuntimeError(f"the broker refused {refused} of {sent} messages")
    return sent


def main() -> int:
    host, port, username, password, tenant, prefix, devices, rate, seconds = sys.argv[1:10]
    sent = asyncio.run(run(host, int(port), username, password, tenant, prefix, int(devices),
                           float(rate), float(seconds)))
    print(sent, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
