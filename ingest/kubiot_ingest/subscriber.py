"""The MQTT side: a paho client (v5, persistent session, manual acks) run on the event loop.

paho's public external-loop interface is used as aiomqtt 2 uses it: the socket is watched by
the asyncio loop (`on_socket_open`, `on_socket_register_write`, ...), which calls
`loop_read()`, `loop_write()` and `loop_misc()`; there is no network thread. Only connecting
(DNS, TCP, TLS handshake: blocking calls) runs in a worker thread. A QoS 1 message is
acknowledged with `Client.ack()` once the batch holding it is committed, and only on the
connection it arrived on: packet ids belong to a connection, and after a reconnect the broker
may give the same id to another message. What a lost connection leaves unacknowledged the
broker delivers again, and the write path stores it once.

Flow control is the broker's: the CONNECT asks for at most `queue_max` unacknowledged
messages (MQTT 5 receive maximum), which bounds what the service holds. Should a broker send
more, reading pauses until the inbox has room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from kubiot_ingest.config import IngestSettings
from kubiot_ingest.records import InboundMessage, Receipt

log = logging.getLogger(__name__)

QOS = 1
# Reconnection waits 0.25 s, then doubles up to 1 s: back within a second of the broker
# returning, since devices that publish before the subscriptions are back get "no matching
# subscribers" and must send again. A few replicas per tenant trying once a second costs the
# broker nothing, however long it is away.
RECONNECT_MIN_DELAY_S = 0.25
RECONNECT_MAX_DELAY_S = 1.0
#: Keepalive pings and their timeout are checked this often (paho's `loop_misc()`).
HOUSEKEEPING_INTERVAL_S = 1.0
#: Packets read in one turn of the event loop before other tasks get theirs.
PACKETS_PER_TURN = 1000
#: Stands in for a topic that is not UTF-8, so that the message is dead-lettered as such.
UNREADABLE_TOPIC = "\ufffd"


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
                 on_connection: Callable[[bool], object]) -> None:
        self.settings = settings
        self.topic_filters = topic_filters
        self.inbox = inbox
        self._on_connection = on_connection
        self._taking = True
        self._stopping = False
        self._subscribed = False
        #: Counts connections; messages carry the one they arrived on.
        self._connections = 0
        #: The connection acknowledgements go to; None while there is none.
        self._live: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._fd: int | None = None
        self._sock: Any = None
        self._reading = False
        self._writing = False
        self._received = 0
        self._lost: asyncio.Event | None = None
        #: Whether the last connection got as far as its subscriptions (backoff resets).
        self._was_subscribed = False
        #: Acknowledgements not sent because their connection had ended.
        self.left_for_redelivery = 0
        self._client = self._make_client()
        inbox.on_room = self._resume_reading

    @property
    def connected(self) -> bool:
        return self._subscribed

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=s.mqtt_client_id,
                             protocol=mqtt.MQTTv5, manual_ack=True)
        if s.broker_username:
            password = s.broker_password.get_secret_value() if s.broker_password else None
            client.username_pw_set(s.broker_username, password)
        if s.broker_tls_ca_file or s.broker_tls_cert_file:
            context = ssl.create_default_context(cafile=s.broker_tls_ca_file)
            if s.broker_tls_cert_file and s.broker_tls_key_file:
                context.load_cert_chain(s.broker_tls_cert_file, s.broker_tls_key_file)
            client.tls_set_context(context)
        client.max_inflight_messages_set(1)  # the service publishes nothing
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        client.on_socket_open = self._socket_opened
        client.on_socket_close = self._socket_closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._written
        return client

    # --- connecting ----------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected (reconnecting with backoff) until `disconnect()`."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        s = self.settings
        delay = RECONNECT_MIN_DELAY_S
        while not self._stopping:
            lost = self._lost = asyncio.Event()
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = s.session_expiry_s
            # The broker sends at most this many unacknowledged messages: the queue bound.
            properties.ReceiveMaximum = s.queue_max
            try:
                # Blocking (name lookup, TCP and TLS handshakes): kept off the event loop.
                await asyncio.to_thread(self._client.connect, s.broker_host, s.broker_port,
                                        keepalive=s.broker_keepalive_s, clean_start=False,
                                        properties=properties)
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.warning("cannot reach the broker at %s:%s: %s", s.broker_host,
                            s.broker_port, exc)
                await self._pause(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY_S)
                continue
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), HOUSEKEEPING_INTERVAL_S)
                if not lost.is_set():
                    self._client.loop_misc()
            delay = RECONNECT_MIN_DELAY_S if self._was_subscribed else min(
                delay * 2, RECONNECT_MAX_DELAY_S)
            if not self._stopping:
                await self._pause(delay)

    async def _pause(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                        reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        self._connections += 1
        self._live = self._connections
        self._was_subscribed = False
        log.info("connected to %s:%s as %s (session present: %s)", self.settings.broker_host,
                 self.settings.broker_port, self.settings.mqtt_client_id, flags.session_present)
        # Subscribe even when the session is present: a broker may restore a session without
        # its shared subscriptions (Mosquitto 2.0 does after a restart).
        client.subscribe([(f, SubscribeOptions(qos=QOS)) for f in self.topic_filters])

    def _handle_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                          reasons: list[Any], properties: Any) -> None:
        refused = [f for f, r in zip(self.topic_filters, reasons, strict=False) if r.is_failure]
        for topic_filter, reason in zip(self.topic_filters, reasons, strict=False):
            if reason.is_failure:
                log.error("the broker refused the subscription %s: %s", topic_filter, reason)
        if not refused:
            # Connected counts from here: a session without its subscriptions reads nothing.
            log.info("subscribed to %d topic filters", len(self.topic_filters))
            self._subscribed = self._was_subscribed = True
            self._on_connection(True)

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                           reason: Any, properties: Any) -> None:
        if self._taking and self._subscribed:
            log.warning("disconnected from the broker: %s", reason)
        self._on_loop(self._connection_ended)

    def _connection_ended(self) -> None:
        self._live = None
        was_up, self._subscribed = self._subscribed, False
        if was_up:
            self._on_connection(False)
        if self._lost is not None:
            self._lost.set()

    # --- the socket, watched by the event loop -------------------------------------------

    def _on_loop(self, action: Callable[..., object], *args: Any) -> None:
        """Run `action` on the event loop: now when called there, else as soon as it can."""
        if self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            action(*args)
        else:
            self._loop.call_soon_threadsafe(action, *args)

    def _socket_opened(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._watch, sock)

    def _socket_closed(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._unwatch, sock)

    def _want_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._watch_writable, sock)

    def _written(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._unwatch_writable, sock)

    def _watch(self, sock: Any) -> None:
        assert self._loop is not None
        self._unwatch(self._sock)
        # The descriptor is kept: once paho has closed the socket, its fileno() is -1.
        self._sock, self._fd = sock, sock.fileno()
        self._resume_reading()

    def _unwatch(self, sock: Any) -> None:
        if self._loop is None or self._fd is None or sock is not self._sock:
            return
        if self._reading:
            self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
        self._reading = self._writing = False
        self._sock = self._fd = None

    def _watch_writable(self, sock: Any) -> None:
        if self._loop is not None and self._fd is not None and sock is self._sock \
                and not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._writable)

    def _unwatch_writable(self, sock: Any) -> None:
        if self._loop is not None and self._fd is not None and sock is self._sock \
                and self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _resume_reading(self) -> None:
        if self._loop is not None and self._fd is not None and not self._reading:
            self._reading = True
            self._loop.add_reader(self._fd, self._readable)

    def _pause_reading(self) -> None:
        if self._loop is not None and self._fd is not None and self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _readable(self) -> None:
        client, sock = self._client, self._sock
        # paho reads one packet per call; keep going while packets come, so that a burst is
        # taken in one turn rather than one turn of the loop per message.
        for _ in range(PACKETS_PER_TURN):
            before = self._received
            if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS or sock is not self._sock:
                return
            if self.inbox.full:
                self._pause_reading()
                return
            if self._received == before and not _tls_pending(sock):
                return  # nothing more in the socket now (or not a message): wait for it
        if _tls_pending(sock) and self._loop is not None:
            # Bytes already decrypted do not make the socket readable again.
            self._loop.call_soon(self._readable)

    def _writable(self) -> None:
        self._client.loop_write()

    # --- messages ------------------------------------------------------------------------

    def _handle_message(self, client: mqtt.Client, userdata: Any,
                        message: mqtt.MQTTMessage) -> None:
        self._received += 1
        if not self._taking or self._live is None:
            return  # left unacknowledged: the broker delivers it again to this session
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = UNREADABLE_TOPIC
        # A QoS 0 message needs no acknowledgement: packet id 0 is never acknowledged.
        mid = message.mid if message.qos else 0
        self.inbox.put(InboundMessage(mid, topic, bytes(message.payload), datetime.now(UTC),
                                      self._live))

    def stop_taking(self) -> None:
        """Stop accepting new messages; those already in the inbox are still processed."""
        self._taking = False

    def ack(self, receipts: Sequence[Receipt]) -> int:
        """Acknowledge committed messages, in the order they were received.

        Only those that arrived on the current connection are acknowledged; the others are
        left for the broker to deliver again. Returns how many were acknowledged.
        """
        live, client = self._live, self._client
        acked = 0
        for connection, mid in receipts:
            if mid and connection == live:
                client.ack(mid, QOS)
                acked += 1
        stale = sum(1 for connection, mid in receipts if mid and connection != live)
        if stale:
            self.left_for_redelivery += stale
            log.info("%d committed messages arrived on an earlier connection; the broker "
                     "delivers them again", stale)
        return acked

    async def disconnect(self, within: float = 5.0) -> None:
        """Send what is queued (acknowledgements first), disconnect, and end `run()`."""
        self._stopping = True
        self._taking = False
        lost = self._lost
        if self._live is not None and lost is not None:
            # DISCONNECT is queued behind the acknowledgements; the event loop writes both,
            # and paho closes the socket once DISCONNECT is sent.
            self._client.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), within)
        self._unwatch(self._sock)
        self._connection_ended()


def _tls_pending(sock: Any) -> bool:
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
