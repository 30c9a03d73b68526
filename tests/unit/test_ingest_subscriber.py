"""The MQTT side: the bounded hand-off to the event loop, and cheap PUBLISH decoding."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from typing import Any

from kubiot_ingest.records import InboundMessage
from kubiot_ingest.subscriber import Inbox


def item(mid: int) -> InboundMessage:
    return InboundMessage(mid, "acme/devices/pump-1/telemetry", b"{}", datetime.now(UTC))


async def test_messages_put_by_another_thread_wake_the_loop_in_order() -> None:
    inbox = Inbox(10, asyncio.get_running_loop())
    threading.Thread(target=lambda: [inbox.put(item(i)) for i in range(5)]).start()
    taken: list[int] = []
    while len(taken) < 5:
        await asyncio.wait_for(inbox.wait(None), 5)
        taken += [m.mid for m in inbox.drain(100)]
    assert taken == [0, 1, 2, 3, 4]
    assert len(inbox) == 0


async def test_a_full_inbox_holds_the_network_thread_back() -> None:
    inbox = Inbox(2, asyncio.get_running_loop())
    done = threading.Event()

    def produce() -> None:
        for i in range(4):
            inbox.put(item(i))
        done.set()

    threading.Thread(target=produce).start()
    await asyncio.sleep(0.2)
    assert len(inbox) == 2
    assert not done.is_set()  # waiting for room, not reading further
    taken = [m.mid for m in inbox.drain(2)]
    assert taken == [0, 1]
    assert await asyncio.to_thread(done.wait, 5)
    assert [m.mid for m in inbox.drain(10)] == [2, 3]


async def test_closing_releases_a_waiting_thread_and_refuses_more() -> None:
    inbox = Inbox(1, asyncio.get_running_loop())
    assert inbox.put(item(1))
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(inbox.put(item(2))))
    thread.start()
    inbox.close()
    await asyncio.to_thread(thread.join, 5)
    assert results == [False]
    assert not inbox.put(item(3))


async def test_waiting_gives_up_after_the_given_time() -> None:
    inbox = Inbox(1, asyncio.get_running_loop())
    await asyncio.wait_for(inbox.wait(0.05), 2)
    inbox.wake()
    await asyncio.wait_for(inbox.wait(None), 2)


def test_publish_packets_decode_the_same_with_the_fast_properties() -> None:
    from paho.mqtt import _packet as paho_packet
    from paho.mqtt.enums import MQTTProtocolVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from kubiot_ingest.subscriber import use_fast_publish_properties

    use_fast_publish_properties()
    topic = b"acme/devices/pump-1/telemetry"
    head = len(topic).to_bytes(2, "big") + topic + (7).to_bytes(2, "big")
    plain = paho_packet.decode_publish(0x32, head + b"\x00" + b'{"ts":1}',
                                       MQTTProtocolVersion.MQTTv5)
    assert (plain.mid, plain.topic, plain.payload) == (7, topic, b'{"ts":1}')
    with_props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    with_props.ContentType = "application/json"
    packed = with_props.pack()  # type: ignore[no-untyped-call]
    decoded = paho_packet.decode_publish(0x32, head + packed + b"{}", MQTTProtocolVersion.MQTTv5)
    assert decoded.payload == b"{}"
    assert decoded.properties is not None
    assert decoded.properties.ContentType == "application/json"  # type: ignore[attr-defined]


def publish(mid: int, topic: str, payload: bytes, qos: int = 1,
            properties: bytes = b"\x00") -> bytes:
    """An MQTT 5 PUBLISH packet as a broker sends it."""
    name = topic.encode()
    body = len(name).to_bytes(2, "big") + name
    body += (mid.to_bytes(2, "big") if qos else b"") + properties + payload
    length, remaining = bytearray(), len(body)
    while True:
        remaining, digit = divmod(remaining, 128)
        length.append(digit | (0x80 if remaining else 0))
        if not remaining:
            return bytes([0x30 | qos << 1]) + bytes(length) + body


def test_the_client_hands_over_whole_split_and_unusual_packets_in_order() -> None:
    import socket

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from kubiot_ingest.subscriber import ReadAheadClient, use_fast_publish_properties

    use_fast_publish_properties()
    client = ReadAheadClient(CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5,
                             manual_ack=True)
    delivered: list[tuple[int, bytes, bytes | bytearray]] = []
    client.on_delivery = lambda mid, topic, payload: delivered.append((mid, topic, payload))
    plain: list[tuple[int, str, bytes | bytearray]] = []
    client.on_message = lambda _c, _u, m: plain.append((m.qos, m.topic, m.payload))
    with_props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    with_props.ContentType = "application/json"
    props = with_props.pack()  # type: ignore[no-untyped-call]
    topic = "acme/devices/pump-1/telemetry"
    big = b'{"values":{"x":"' + b"y" * 300 + b'"}}'  # a two-byte remaining length
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    client._sock = reader
    try:
        writer.sendall(publish(1, topic, b"{}") + publish(2, topic, big)
                       + publish(3, topic, b"[]", properties=props)
                       + publish(0, topic, b"q0", qos=0))
        assert client.loop_read() == 0
        split = publish(4, topic, b'{"split":true}')
        for part in (split[:1], split[1:9], split[9:]):  # paho reads what is not whole
            writer.sendall(part)
            assert client.loop_read() == 0
        writer.sendall(publish(5, topic, b"{}"))
        assert client.loop_read() == 0
    finally:
        client._sock = None
        reader.close()
        writer.close()
    name = topic.encode()
    assert delivered == [(1, name, b"{}"), (2, name, big), (3, name, b"[]"),
                         (4, name, b'{"split":true}'), (5, name, b"{}")]
    assert plain == [(0, topic, b"q0")]


async def test_a_batch_is_acknowledged_with_one_write_of_pubacks() -> None:
    from kubiot_ingest.config import IngestSettings
    from kubiot_ingest.subscriber import Subscriber

    settings = IngestSettings.model_validate(
        {"tenant": "acme", "database_dsn": "postgresql://localhost/x"})
    subscriber = Subscriber(settings, [], Inbox(10, asyncio.get_running_loop()), lambda _: None)
    client: Any = subscriber._client
    subscriber.ack([1, 300, 65535])
    subscriber.ack([])
    queued = list(client._out_packet)
    assert len(queued) == 1
    assert queued[0]["packet"] == (b"\x40\x02\x00\x01" + b"\x40\x02\x01\x2c"
                                   + b"\x40\x02\xff\xff")


async def test_subscriptions_are_renewed_on_every_connect_even_with_a_session() -> None:
    from paho.mqtt.client import ConnectFlags
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from kubiot_ingest.config import IngestSettings
    from kubiot_ingest.subscriber import Subscriber

    settings = IngestSettings.model_validate(
        {"tenant": "acme", "database_dsn": "postgresql://localhost/x"})
    filters = ["$share/kubiot-ingest-acme/acme/devices/+/telemetry"]
    subscriber = Subscriber(settings, filters, Inbox(10, asyncio.get_running_loop()),
                            lambda _: None)

    class Broker:
        def __init__(self) -> None:
            self.subscribed: list[list[str]] = []

        def subscribe(self, topics: list[tuple[str, Any]]) -> None:
            self.subscribed.append([topic for topic, _ in topics])

    broker = Broker()
    accepted = ReasonCode(PacketTypes.CONNACK, identifier=0)  # type: ignore[no-untyped-call]
    for session_present in (False, True, True):
        subscriber._handle_connect(broker, None, ConnectFlags(session_present),  # type: ignore[arg-type]
                                   accepted, None)
    # A broker restored the session without its shared subscriptions: asked for again each time.
    assert broker.subscribed == [filters] * 3
