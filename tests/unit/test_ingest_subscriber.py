"""The MQTT side: the bounded hand-off to the event loop, and cheap PUBLISH decoding."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

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
