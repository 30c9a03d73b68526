"""Paced QoS 1 telemetry for the live phase of bench_ingest.py, as a separate process.

    python bench/paced_publisher.py HOST PORT USERNAME PASSWORD TENANT PREFIX DEVICES RATE SECONDS

One MQTT 5 connection per device (`{PREFIX}-{i}`), `RATE` messages per second in all, for
`SECONDS`. Every 5 ms each device is owed its share; it stamps those samples with the time
and sends them at once, never holding more unacknowledged than the broker's receive maximum
(what does not fit waits in the device, and its wait counts as latency). Prints the number of
messages sent once every one of them is acknowledged, and fails if the broker refused any.

Why not `mosquitto_pub -l`: a device sending thousands of messages a second through a window
of 20 (Mosquitto's receive maximum) turns into one round trip per PUBACK, and the publisher's
and the broker's cost of that ping-pong, on the two CPUs the ingest and PostgreSQL share,
outweighs the ingest's own. Spreading the same rate over enough devices that one tick's
messages fit in the window, writing each tick's messages in one go, and reading the
acknowledgements once a tick (plain sockets, one process, asleep between ticks) leaves the
broker and the ingest the same messages to handle while the devices themselves cost the
machine little. Each device costs two system calls a tick whatever it sends, so more devices
than that cost more: at 15,000 msg/s against a bare broker this process measured 20 µs of CPU
a message with 30 devices, 14 µs with 10 and 9 µs with 5 (where a tick's 15 messages per
device come close to Mosquitto's window of 20). bench_ingest.py runs 10.
"""

from __future__ import annotations

import socket
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mqtt5

from kubiot_contract.topics import device_root
from tests.support.mqtt_wire import publish_packet

TICK_S = 0.005
CONNECT_TIMEOUT_S = 10.0
#: How long the last acknowledgements may take once everything is sent.
SETTLE_TIMEOUT_S = 60.0
#: Reason codes from 0x80 up say a request failed (MQTT 5, 2.4).
REFUSED = 0x80


def payload(seq: int, ts: float) -> bytes:
    """The same sample as bench_ingest's backlog lines."""
    return (b'{"ts":%.6f,"seq":%d,"values":{"temp":%.2f,"humidity":%d,"ok":true}}'
            % (ts, seq, 20 + (seq % 100) / 10, 40 + seq % 20))


class Device:
    """One device's connection: sends what the receive maximum allows, counts PUBACKs."""

    def __init__(self, host: str, port: int, client_id: str, username: str, password: str,
                 topic: str) -> None:
        self.topic = topic
        self.sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(mqtt5.ConnectPacket(client_id=client_id, username=username,
                                              password=password.encode(),
                                              clean_start=True).write())
        self.receive_max = self._connack()
        self.sock.setblocking(False)
        self.in_flight = 0
        #: PUBACKs with a failure reason code.
        self.refused = 0
        self.waiting: deque[bytes] = deque()
        self._next_id = 1
        self._buffer = b""
        self._unsent = b""

    def _connack(self) -> int:
        data = b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the broker closed the connection before its CONNACK")
            data += chunk
            try:
                answer, _ = mqtt5.read(memoryview(data))
            except IndexError:
                continue  # the rest of the CONNACK is still on its way
            if not isinstance(answer, mqtt5.ConnAckPacket):
                raise ConnectionError(f"expected a CONNACK, got {answer!r}")
            if answer.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
                raise ConnectionError(
                    f"the broker refused the connection: {answer.reason_code.name}")
            return int(answer.receive_max or 65535)

    def read_acks(self) -> None:
        """Take every acknowledgement that has arrived, without waiting for more."""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                raise ConnectionError(f"the broker closed the connection with {self.in_flight} "
                                      "messages unacknowledged")
            self._buffer += chunk
        used = 0
        with memoryview(self._buffer) as view:
            while used < len(self._buffer):
                try:
                    packet, size = mqtt5.read(view[used:])
                except IndexError:
                    break  # the rest of the packet is still on its way
                if not isinstance(packet, mqtt5.PubAckPacket):
                    raise ConnectionError(f"unexpected packet from the broker: {packet!r}")
                used += size
                self.in_flight -= 1
                if int(packet.reason_code) >= REFUSED:
                    self.refused += 1
        self._buffer = self._buffer[used:]

    @property
    def unsent(self) -> int:
        return len(self._unsent)

    def send(self) -> None:
        """Send what the receive maximum allows, in one write."""
        out = []
        while self.waiting and self.in_flight < self.receive_max:
            out.append(publish_packet(self._next_id, self.topic, self.waiting.popleft()))
            self._next_id = self._next_id % 65535 + 1
            self.in_flight += 1
        if out:
            self._unsent += b"".join(out)
        if self._unsent:
            try:
                done = self.sock.send(self._unsent)
            except BlockingIOError:
                done = 0  # the socket's buffer is full: the rest goes with the next tick
            self._unsent = self._unsent[done:]


def run(host: str, port: int, username: str, password: str, tenant: str, prefix: str,
        devices: int, rate: float, seconds: float) -> int:
    fleet = [Device(host, port, f"bench-{prefix}-{index}", username, password,
                    f"{device_root(tenant, f'{prefix}-{index}')}/telemetry")
             for index in range(devices)]
    per_tick = rate * TICK_S / devices
    owed = [0.0] * devices
    seqs = [0] * devices
    sent = 0
    started = next_tick = time.monotonic()
    while time.monotonic() - started < seconds:
        for index, device in enumerate(fleet):
            device.read_acks()
            owed[index] += per_tick
            count = int(owed[index])
            if count:
                owed[index] -= count
                now = time.time()
                device.waiting.extend(payload(seqs[index] + k, now) for k in range(count))
                seqs[index] += count
                sent += count
            device.send()
        next_tick += TICK_S
        time.sleep(max(0.0, next_tick - time.monotonic()))
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while any(device.waiting or device.in_flight or device.unsent for device in fleet):
        if time.monotonic() > deadline:
            raise TimeoutError("the broker did not acknowledge every message")
        time.sleep(TICK_S)
        for device in fleet:
            device.read_acks()
            device.send()
    refused = sum(device.refused for device in fleet)
    if refused:
        raise RuntimeError(f"the broker refused {refused} of {sent} messages")
    for device in fleet:
        device.sock.close()
    return sent


def main() -> int:
    host, port, username, password, tenant, prefix, devices, rate, seconds = sys.argv[1:10]
    print(run(host, int(port), username, password, tenant, prefix, int(devices), float(rate),
              float(seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
