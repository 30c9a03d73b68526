"""The MQTT side: an MQTT 5 session (persistent, manual acknowledgements) on the event loop.

Packets are encoded and decoded by `mqtt5`, a sans-I/O MQTT 5 codec (from aiomqtt's
maintainer); the connection is an asyncio protocol, so there is no network thread and no
client library's internals to lean on. A QoS 1 message is acknowledged with an explicit PUBACK
once the batch holding it is committed, and only on the connection it arrived on: packet ids
belong to a connection, and after a reconnect the broker may give the same id to another
message. What a lost connection leaves unacknowledged the broker delivers again, and the write
path stores it once.

The same connection publishes the service's health reports about devices (retained, QoS 1),
with packet ids of their own: they are sent as the broker's receive maximum allows, and one the
broker had not acknowledged when the connection ended is counted as lost, not sent again (the
next report of the device supersedes it). Publishing never waits: it queues (a bounded number,
the oldest dropped and counted as lost beyond it) and writes bytes on the connection.

Flow control is the broker's: the CONNECT asks for at most `queue_max` unacknowledged
messages (MQTT 5 receive maximum), which bounds what the service holds. Should a broker send
more, reading pauses until the inbox has room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import mqtt5

from kubiot_contract.telemetry import RejectReason
from kubiot_ingest.config import IngestSettings
from kubiot_ingest.raw_publish import NotAPublish, RawPublish, read_raw_publish
from kubiot_ingest.records import InboundMessage, Receipt

log = logging.getLogger(__name__)

QOS = mqtt5.QoS.AT_LEAST_ONCE
# Reconnection waits 0.25 s, then doubles up to 1 s: back within a second of the broker
# returning, since devices that publish before the subscriptions are back get "no matching
# subscribers" and must send again. A few replicas per tenant trying once a second costs the
# broker nothing, however long it is away.
RECONNECT_MIN_DELAY_S = 0.25
RECONNECT_MAX_DELAY_S = 1.0
#: Longest wait for TCP and TLS to connect, and then for the broker's CONNACK.
CONNECT_TIMEOUT_S = 10.0
SUBSCRIBE_PACKET_ID = 1
#: Packet ids of what the service publishes: all but the subscription's.
FIRST_PUBLISH_ID = 2
LAST_PUBLISH_ID = 65535
#: Publishes in flight (sent, not acknowledged) at most, whatever the broker allows.
MAX_PUBLISHES_IN_FLIGHT = 1000
#: Bytes the connection may hold unsent before publishes wait for it to drain.
MAX_SEND_BUFFER = 1024 * 1024
#: Publishes waiting to be sent at most (while disconnected, or the broker is slow).
MAX_PUBLISHES_WAITING = 10_000
#: Reason codes from 0x80 up say a request failed (MQTT 5, 2.4).
FAILURE = 0x80


class Inbox:
    """Messages received and not yet taken by the service (event loop only)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[InboundMessage] = deque()
        self._ready = asyncio.Event()
        #: Called when a full inbox has room again.
        self.on_room: Callable[[], object] | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) >= self.maxsize

    def put(self, item: InboundMessage) -> None:
        self._items.append(item)
        if not self._ready.is_set():
            self._ready.set()

    def drain(self, limit: int) -> list[InboundMessage]:
        """Take up to `limit` items without waiting."""
        was_full = self.full
        count = min(limit, len(self._items))
        items = [self._items.popleft() for _ in range(count)]
        if not self._items:
            self._ready.clear()
        if was_full and not self.full and self.on_room is not None:
            self.on_room()
        return items

    async def wait(self, within: float | None) -> None:
        """Until something is in the inbox, `wake()` is called, or `within` seconds pass."""
        if self._items:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), within)

    def wake(self) -> None:
        """Release `wait()` early."""
        self._ready.set()


class Subscriber:
    """The tenant's broker connection: subscribe to the shared subscriptions, ack on demand.

    `run()` connects and reconnects until `disconnect()`; `on_connection(up)` says when the
    subscriptions are in place and when the connection is lost.
    """

    def __init__(self, settings: IngestSettings, topic_filters: list[str], inbox: Inbox,
                 on_connection: Callable[[bool], object],
                 on_published: Callable[[bool, int], object] | None = None) -> None:
        self.settings = settings
        self.topic_filters = topic_filters
        self.inbox = inbox
        self._on_connection = on_connection
        #: Told (delivered, count) as publishes are acknowledged or lost.
        self._on_published = on_published
        #: Publishes waiting for room in flight: (topic, payload), oldest first.
        self._outgoing: deque[tuple[str, bytes]] = deque()
        #: Packet ids sent on the live connection and not acknowledged yet.
        self._in_flight: set[int] = set()
        self._publish_window = 0
        self._next_id = FIRST_PUBLISH_ID
        self._taking = True
        self._stopping = False
        #: Counts connections; messages carry the one they arrived on.
        self._connections = 0
        #: The connection acknowledgements go to, once its CONNACK came; None otherwise.
        self._live: _BrokerConnection | None = None
        self._current: _BrokerConnection | None = None
        self._subscribed = False
        #: Acknowledgements not sent because their connection had ended.
        self.left_for_redelivery = 0
        inbox.on_room = self._resume_reading

    @property
    def connected(self) -> bool:
        return self._subscribed

    # --- connecting ----------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected (reconnecting with backoff) until `disconnect()`."""
        loop = asyncio.get_running_loop()
        s = self.settings
        context = _tls_context(s)
        delay = RECONNECT_MIN_DELAY_S
        while not self._stopping:
            self._connections += 1
            connection = _BrokerConnection(self, self._connections)
            try:
                await asyncio.wait_for(loop.create_connection(
                    connection.itself, s.broker_host, s.broker_port, ssl=context),
                    CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                log.warning("cannot reach the broker at %s:%s: %s", s.broker_host,
                            s.broker_port, exc or type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY_S)
                continue
            self._current = connection
            connection.send(mqtt5.ConnectPacket(
                s.mqtt_client_id, username=s.broker_username,
                password=(s.broker_password.get_secret_value().encode()
                          if s.broker_password else None),
                clean_start=False, keep_alive=s.broker_keepalive_s,
                session_expiry_interval=s.session_expiry_s,
                # The broker sends at most this many unacknowledged messages: the queue bound.
                receive_max=s.queue_max).write())
            await connection.keep_alive(s.broker_keepalive_s)
            self._current = None
            delay = RECONNECT_MIN_DELAY_S if connection.subscribed else min(
                delay * 2, RECONNECT_MAX_DELAY_S)
            if not self._stopping:
                await asyncio.sleep(delay)

    def connection_accepted(self, connection: _BrokerConnection,
                            answer: mqtt5.ConnAckPacket) -> None:
        if int(answer.reason_code) >= FAILURE:
            log.warning("broker refused the connection: %s", answer.reason_code.name)
            connection.close()
            return
        self._live = connection
        self._publish_window = min(MAX_PUBLISHES_IN_FLIGHT, answer.receive_max)
        log.info("connected to %s:%s as %s (session present: %s)", self.settings.broker_host,
                 self.settings.broker_port, self.settings.mqtt_client_id,
                 answer.session_present)
        # Subscribe even when the session is present: a broker may restore a session without
        # its shared subscriptions (Mosquitto 2.0 does after a restart).
        filters = [mqtt5.TopicFilter(f, max_qos=QOS, retain_as_published=False)
                   for f in self.topic_filters]
        connection.send(mqtt5.SubscribePacket(SUBSCRIBE_PACKET_ID, filters).write())
        self.send_publishes()

    def subscription_answered(self, connection: _BrokerConnection,
                              answer: mqtt5.SubAckPacket) -> None:
        refused = False
        for topic_filter, reason in zip(self.topic_filters, answer.reason_codes, strict=False):
            if int(reason) >= FAILURE:
                refused = True
                log.error("the broker refused the subscription %s: %s", topic_filter,
                          reason.name)
        if not refused and connection is self._live:
            # Connected counts from here: a session without its subscriptions reads nothing.
            log.info("subscribed to %d topic filters", len(self.topic_filters))
            connection.subscribed = self._subscribed = True
            self._on_connection(True)

    def connection_ended(self, connection: _BrokerConnection, reason: str) -> None:
        if connection is not self._live and connection is not self._current:
            return
        if self._taking and self._subscribed:
            log.warning("disconnected from the broker: %s", reason)
        self._live = None
        was_up, self._subscribed = self._subscribed, False
        if self._in_flight:
            lost, self._in_flight = len(self._in_flight), set()
            self._published(False, lost)
        if was_up:
            self._on_connection(False)

    def acknowledges_on(self, connection: _BrokerConnection) -> bool:
        """Whether `connection` is the one acknowledgements go to (its CONNACK came)."""
        return connection is self._live

    # --- messages ------------------------------------------------------------------------

    def deliver(self, connection: _BrokerConnection, message: mqtt5.PublishPacket | RawPublish,
                received_at: datetime) -> None:
        if not self._taking or connection is not self._live:
            return  # left unacknowledged: the broker delivers it again to this session
        # A QoS 0 message needs no acknowledgement: packet id 0 is never acknowledged.
        if isinstance(message, RawPublish):
            self.inbox.put(InboundMessage(
                message.packet_id, message.topic_text, message.payload, received_at,
                connection.number, unreadable=_why_unreadable(message)))
        else:
            self.inbox.put(InboundMessage(message.packet_id or 0, message.topic,
                                          message.payload, received_at, connection.number))
        if self.inbox.full:
            connection.pause_reading()

    def _resume_reading(self) -> None:
        if self._live is not None:
            self._live.resume_reading()

    # --- publishing --------------------------------------------------------------------

    @property
    def publishes_waiting(self) -> int:
        return len(self._outgoing)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish a retained QoS 1 message as soon as the broker has room for it."""
        if len(self._outgoing) >= MAX_PUBLISHES_WAITING:
            self._outgoing.popleft()
            self._published(False, 1)
        self._outgoing.append((topic, payload))
        self.send_publishes()

    def send_publishes(self) -> None:
        """Send what waits, as far as the broker's window and the connection allow."""
        live = self._live
        if live is None:
            return
        outgoing, in_flight = self._outgoing, self._in_flight
        packets = []
        while outgoing and len(in_flight) < self._publish_window \
                and live.buffered() < MAX_SEND_BUFFER:
            topic, payload = outgoing.popleft()
            packet_id = self._next_id
            while packet_id in in_flight:
                packet_id = _following(packet_id)
            self._next_id = _following(packet_id)
            in_flight.add(packet_id)
            packets.append(mqtt5.PublishPacket(topic, payload, qos=QOS, retain=True,
                                               packet_id=packet_id).write())
        if packets:
            live.send(b"".join(packets))

    def publish_answered(self, connection: _BrokerConnection,
                         answer: mqtt5.PubAckPacket) -> None:
        if connection is not self._live or answer.packet_id not in self._in_flight:
            return
        self._in_flight.discard(answer.packet_id)
        delivered = int(answer.reason_code) < FAILURE
        if not delivered:
            log.warning("the broker refused a publish: %s", answer.reason_code.name)
        self._published(delivered, 1)
        self.send_publishes()

    def _published(self, delivered: bool, count: int) -> None:
        if self._on_published is not None:
            self._on_published(delivered, count)

    def stop_taking(self) -> None:
        """Stop accepting new messages; those already in the inbox are still processed."""
        self._taking = False

    def ack(self, receipts: Sequence[Receipt]) -> int:
        """Acknowledge committed messages, in the order they were received.

        Only those that arrived on the current connection are acknowledged; the others are
        left for the broker to deliver again. Returns how many were acknowledged.
        """
        live = self._live
        number = live.number if live is not None else None
        pubacks = [mqtt5.PubAckPacket(mid).write()
                   for connection, mid in receipts if mid and connection == number]
        if pubacks and live is not None:
            live.send(b"".join(pubacks))  # one write for the batch
        stale = sum(1 for connection, mid in receipts if mid and connection != number)
        if stale:
            self.left_for_redelivery += stale
            log.info("%d committed messages arrived on an earlier connection; the broker "
                     "delivers them again", stale)
        return len(pubacks)

    async def disconnect(self, within: float = 5.0) -> None:
        """Send what is queued (acknowledgements first), disconnect, and end `run()`."""
        self._stopping = True
        self._taking = False
        connection = self._current
        if connection is not None:
            if connection is self._live:
                connection.send(mqtt5.DisconnectPacket().write())
            connection.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(connection.closed.wait(), within)


class _BrokerConnection(asyncio.Protocol):
    """One TCP (or TLS) connection to the broker: packets in and out, and keepalive."""

    def __init__(self, subscriber: Subscriber, number: int) -> None:
        self.subscriber = subscriber
        self.number = number
        self.subscribed = False
        self.closed = asyncio.Event()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._ping_sent_at: float | None = None
        self._reason = "connection closed"

    def itself(self) -> _BrokerConnection:
        """The protocol factory for this connection's transport."""
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def buffered(self) -> int:
        """Bytes written and not yet handed to the network."""
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def pause_reading(self) -> None:
        if self._transport is not None and self._transport.is_reading():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing() \
                and not self._transport.is_reading():
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        used = 0
        packets: list[object] = []
        with memoryview(buffer) as view:
            while used < len(buffer):
                try:
                    decoded, size = mqtt5.read(view[used:])
                except IndexError:
                    break  # the rest of the packet is still on its way
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:  # the codec panics (a BaseException) on bad UTF-8
                    try:
                        raw, size = read_raw_publish(view[used:])
                    except IndexError:
                        break
                    except NotAPublish as why:
                        self._fail(f"the broker sent a malformed packet ({exc}; {why})")
                        return
                    log.warning("the MQTT codec could not read a PUBLISH on %r (%s: %s); it "
                                "is kept as a dead letter", raw.topic_text,
                                type(exc).__name__, exc)
                    packets.append(raw)
                else:
                    packets.append(decoded)
                used += size
        del buffer[:used]
        subscriber = self.subscriber
        received_at = datetime.now(UTC)  # one read, one arrival time for all it held
        for packet in packets:
            if isinstance(packet, mqtt5.PublishPacket | RawPublish):
                subscriber.deliver(self, packet, received_at)
            elif isinstance(packet, mqtt5.ConnAckPacket):
                subscriber.connection_accepted(self, packet)
            elif isinstance(packet, mqtt5.SubAckPacket):
                subscriber.subscription_answered(self, packet)
            elif isinstance(packet, mqtt5.PubAckPacket):
                subscriber.publish_answered(self, packet)
            elif isinstance(packet, mqtt5.PingRespPacket):
                self._ping_sent_at = None
            elif isinstance(packet, mqtt5.DisconnectPacket):
                self._fail(f"the broker ended the connection: {packet.reason_code.name}")
                return

    def _fail(self, reason: str) -> None:
        self._reason = reason
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self._reason if exc is None else f"{type(exc).__name__}: {exc}"
        self.subscriber.connection_ended(self, reason)
        self._transport = None
        self.closed.set()

    async def keep_alive(self, keepalive_s: int) -> None:
        """Ping every half keepalive until the connection ends; end it when the broker does
        not answer a CONNECT or a ping within a keepalive."""
        interval = keepalive_s / 2
        connect_sent = time.monotonic()
        while not self.closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), min(interval, CONNECT_TIMEOUT_S))
            if self.closed.is_set():
                return
            now = time.monotonic()
            if not self.subscriber.acknowledges_on(self):
                if now - connect_sent > CONNECT_TIMEOUT_S:
                    self._fail("no CONNACK from the broker")
                continue
            if self._ping_sent_at is not None:
                if now - self._ping_sent_at > keepalive_s:
                    self._fail("the broker stopped answering pings")
                continue
            self._ping_sent_at = now
            self.send(mqtt5.PingReqPacket().write())


def _why_unreadable(message: RawPublish) -> tuple[RejectReason, str]:
    if not message.topic_is_utf8:
        return RejectReason.BAD_TOPIC, "the topic is not valid UTF-8"
    return RejectReason.BAD_SCHEMA, "the MQTT properties are not valid (a string not in UTF-8?)"


def _following(packet_id: int) -> int:
    return FIRST_PUBLISH_ID if packet_id >= LAST_PUBLISH_ID else packet_id + 1


def _tls_context(settings: IngestSettings) -> ssl.SSLContext | None:
    if not (settings.broker_tls_ca_file or settings.broker_tls_cert_file):
        return None
    context = ssl.create_default_context(cafile=settings.broker_tls_ca_file)
    if settings.broker_tls_cert_file and settings.broker_tls_key_file:
        context.load_cert_chain(settings.broker_tls_cert_file, settings.broker_tls_key_file)
    return context
