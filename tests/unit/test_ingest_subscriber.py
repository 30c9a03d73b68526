"""The MQTT side: the inbox, and paho driven by the event loop against a packet-level broker."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from kubiot_contract.telemetry import RejectReason
from kubiot_ingest.config import IngestSettings
from kubiot_ingest.records import InboundMessage
from kubiot_ingest.subscriber import Inbox, Subscriber
from tests.support.mqtt_wire import WireBroker, publish_packet, wire_broker
from tests.support.waiting import async_wait_until

TOPIC = "acme/devices/pump-1/telemetry"
FILTERS = ["$share/kubiot-ingest-acme/acme/devices/+/telemetry"]


def item(mid: int) -> InboundMessage:
    return InboundMessage(mid, TOPIC, b"{}", datetime.now(UTC))


async def test_the_inbox_hands_over_in_order_and_wakes_a_waiting_consumer() -> None:
    inbox = Inbox(10)
    waiting = asyncio.create_task(inbox.wait(None))
    await asyncio.sleep(0)
    for mid in range(5):
        inbox.put(item(mid))
    await asyncio.wait_for(waiting, 2)
    assert [m.mid for m in inbox.drain(3)] == [0, 1, 2]
    assert [m.mid for m in inbox.drain(10)] == [3, 4]
    assert len(inbox) == 0
    await asyncio.wait_for(inbox.wait(0.05), 2)  # gives up after the given time
    inbox.wake()
    await asyncio.wait_for(inbox.wait(None), 2)


async def test_a_full_inbox_says_when_it_has_room_again() -> None:
    inbox = Inbox(2)
    rooms: list[int] = []
    inbox.on_room = lambda: rooms.append(len(inbox))
    inbox.put(item(1))
    assert not inbox.full
    inbox.put(item(2))
    assert inbox.full
    inbox.drain(1)
    assert rooms == [1]
    inbox.drain(1)
    assert rooms == [1]  # only the way out of full counts


def settings(port: int, **extra: Any) -> IngestSettings:
    return IngestSettings.model_validate(
        {"tenant": "acme", "database_dsn": "postgresql://localhost/x",
         "broker_host": "127.0.0.1", "broker_port": port, "broker_keepalive_s": 5, **extra})


@contextlib.asynccontextmanager
async def running(subscriber: Subscriber) -> AsyncIterator[Subscriber]:
    """The subscriber's connection running, then disconnected."""
    task = asyncio.create_task(subscriber.run())
    try:
        yield subscriber
    finally:
        await subscriber.disconnect()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def subscribed(broker: WireBroker, inbox: Inbox, states: list[bool],
                     **extra: Any) -> AsyncIterator[Subscriber]:
    subscriber = Subscriber(settings(broker.port, **extra), FILTERS, inbox, states.append)
    async with running(subscriber):
        await broker.wait_for("subscribed", 1)
        await async_wait_until(_true(lambda: subscriber.connected), message="subscribed")
        yield subscriber


def _true(condition: Any) -> Any:
    async def check() -> bool:
        return bool(condition())
    return check


async def taken(inbox: Inbox, count: int) -> list[InboundMessage]:
    got: list[InboundMessage] = []

    async def enough() -> bool:
        got.extend(inbox.drain(count - len(got)))
        return len(got) >= count
    await async_wait_until(enough, message=f"{count} messages")
    return got


async def test_messages_arrive_in_order_and_a_batch_is_acknowledged() -> None:
    inbox, states = Inbox(100), []
    big = b'{"values":{"x":"' + b"y" * 300 + b'"}}'  # a two-byte remaining length
    async with wire_broker() as broker, subscribed(broker, inbox, states) as subscriber:
        broker.send(publish_packet(1, TOPIC, b"{}") + publish_packet(2, TOPIC, big)
                    + publish_packet(0, TOPIC, b"q0", qos=0) + publish_packet(3, TOPIC, b"[]"))
        messages = await taken(inbox, 4)
        assert [(m.mid, m.topic, m.payload) for m in messages] == [
            (1, TOPIC, b"{}"), (2, TOPIC, big), (0, TOPIC, b"q0"), (3, TOPIC, b"[]")]
        assert subscriber.ack([m.receipt for m in messages]) == 3  # QoS 0 needs none
        await broker.wait_for("acks", 3)
        assert broker.acks == [(1, 1), (1, 2), (1, 3)]
    assert states[0] is True


# The codec's panic leaves the UnicodeDecodeError it came from unraisable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_publish_the_codec_cannot_read_is_taken_and_acknowledged_not_fatal() -> None:
    # A broker that does not check UTF-8 passes on a device's `telemetry/<bytes>`: dropping
    # the connection would have the broker send it again on the next one, for ever.
    inbox, states = Inbox(100), []
    bad_topic = b"acme/devices/pump-1/telemetry/\xff\xfe"
    async with wire_broker() as broker, subscribed(broker, inbox, states) as subscriber:
        broker.send(publish_packet(1, TOPIC, b"{}") + publish_packet(2, bad_topic, b"\x00raw")
                    + publish_packet(3, TOPIC, b"[]"))
        messages = await taken(inbox, 3)
        assert [(m.mid, m.topic, m.payload) for m in messages] == [
            (1, TOPIC, b"{}"), (2, "acme/devices/pump-1/telemetry/\\xff\\xfe", b"\x00raw"),
            (3, TOPIC, b"[]")]
        assert [m.unreadable for m in messages] == [
            None, (RejectReason.BAD_TOPIC, "the topic is not valid UTF-8"), None]
        assert subscriber.ack([m.receipt for m in messages]) == 3
        await broker.wait_for("acks", 3)
        assert broker.acks == [(1, 1), (1, 2), (1, 3)]
        assert broker.connections == 1
    assert states == [True, False]


async def test_an_ack_goes_only_to_the_connection_the_message_came_on() -> None:
    inbox, states = Inbox(100), []
    async with wire_broker() as broker, subscribed(broker, inbox, states) as subscriber:
        broker.send(publish_packet(7, TOPIC, b'{"first":true}'))
        (first,) = await taken(inbox, 1)
        broker.drop()
        # Back on a new connection, subscribed again; the broker gives id 7 to another message.
        await broker.wait_for("subscribed", 2)
        await async_wait_until(_true(lambda: subscriber.connected), message="reconnected")
        broker.send(publish_packet(7, TOPIC, b'{"second":true}'))
        (second,) = await taken(inbox, 1)
        assert first.connection != second.connection
        assert subscriber.ack([first.receipt]) == 0  # would confirm the second message
        assert subscriber.left_for_redelivery == 1
        assert subscriber.ack([second.receipt]) == 1
        await broker.wait_for("acks", 1)
        assert broker.acks == [(2, 7)]
    assert states[:3] == [True, False, True]


async def test_subscriptions_are_renewed_on_every_connect() -> None:
    inbox: Inbox = Inbox(10)
    async with wire_broker() as broker, subscribed(broker, inbox, []) as subscriber:
        for connections in (2, 3):
            broker.drop()
            await broker.wait_for("subscribed", connections)
        await async_wait_until(_true(lambda: subscriber.connected), message="reconnected")
        assert broker.connections == broker.subscribed == 3


async def test_a_subscriber_stopped_while_the_broker_is_away_ends_promptly(
        caplog: pytest.LogCaptureFixture) -> None:
    async with wire_broker() as broker:
        port = broker.port
    subscriber = Subscriber(settings(port), FILTERS, Inbox(10), lambda _: None)
    running = asyncio.create_task(subscriber.run())
    await async_wait_until(_true(lambda: "cannot reach the broker" in caplog.text),
                           message="a failed attempt")
    await asyncio.wait_for(subscriber.disconnect(), 2)
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    assert not subscriber.connected


def self_signed_for_loopback(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context for 127.0.0.1 and the certificate file a client trusts."""
    from datetime import timedelta
    from ipaddress import IPv4Address

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "broker.pem", directory / "broker.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


async def test_the_connection_runs_over_tls_checking_the_brokers_certificate(
        tmp_path: Path) -> None:
    server, ca_file = self_signed_for_loopback(tmp_path)
    inbox, states = Inbox(10), []
    async with wire_broker(server) as broker, \
            subscribed(broker, inbox, states, broker_tls_ca_file=str(ca_file)) as subscriber:
        broker.send(publish_packet(3, TOPIC, b"{}"))
        (message,) = await taken(inbox, 1)
        assert subscriber.ack([message.receipt]) == 1
        await broker.wait_for("acks", 1)
        assert broker.acks == [(1, 3)]


# --- publishing health reports ---------------------------------------------------------------

HEALTH = "acme/devices/pump-1/health"


async def test_a_publish_is_retained_qos_1_with_its_own_packet_ids_and_acknowledged() -> None:
    inbox, outcomes = Inbox(10), []
    async with wire_broker() as broker:
        subscriber = Subscriber(settings(broker.port), FILTERS, inbox, lambda _: None,
                                lambda delivered, count: outcomes.append((delivered, count)))
        async with running(subscriber):
            await broker.wait_for("subscribed", 1)
            for i in range(3):
                subscriber.publish(HEALTH, b'{"v":1,"n":%d}' % i)
            await broker.wait_for("published", 3)
            await async_wait_until(_true(lambda: len(outcomes) == 3), message="acknowledged")
    assert [(p.topic, p.payload, p.qos, p.retain) for p in broker.published] == [
        (HEALTH, b'{"v":1,"n":%d}' % i, 1, True) for i in range(3)]
    ids = [p.packet_id for p in broker.published]
    assert len(set(ids)) == 3 and 1 not in ids  # 1 is the subscription's
    assert outcomes == [(True, 1)] * 3


async def test_publishes_wait_while_disconnected_and_those_in_flight_are_lost_not_resent() -> None:
    inbox, outcomes = Inbox(10), []
    async with wire_broker() as broker:
        broker.ack_publishes = False
        subscriber = Subscriber(settings(broker.port), FILTERS, inbox, lambda _: None,
                                lambda delivered, count: outcomes.append((delivered, count)))
        subscriber.publish(HEALTH, b"before")  # not connected yet: waits
        assert subscriber.publishes_waiting == 1
        async with running(subscriber):
            await broker.wait_for("published", 1)
            subscriber.publish(HEALTH, b"second")
            await broker.wait_for("published", 2)
            broker.drop()
            await async_wait_until(_true(lambda: outcomes), message="counted as lost")
            await broker.wait_for("subscribed", 2)
            broker.ack_publishes = True
            subscriber.publish(HEALTH, b"after")
            await broker.wait_for("published", 3)
            await async_wait_until(_true(lambda: len(outcomes) == 2), message="acknowledged")
    assert [p.payload for p in broker.published] == [b"before", b"second", b"after"]
    assert outcomes == [(False, 2), (True, 1)]
