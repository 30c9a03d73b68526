"""The MQTT side: a paho client (v5, persistent session, manual acks) feeding a bounded inbox.

paho runs its network loop in its own thread. Messages are handed to the asyncio loop through
`Inbox`; when the inbox is full the network thread waits, so the service stops reading from
the broker instead of growing without bound. A message is acknowledged only when the service
calls `ack()` after the batch holding it is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import threading
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt import _packet as paho_packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from kubiot_ingest.config import IngestSettings
from kubiot_ingest.records import InboundMessage

log = logging.getLogger(__name__)

QOS = 1
PUBACK_HEAD = 0x4002_0000  # a PUBACK's fixed header, above its 16-bit packet id
# Reconnection waits 0.25 s, then doubles up to 1 s: back within a second of the broker
# returning, since devices that publish before the subscriptions are back get "no matching
# subscribers" and must send again. A few replicas per tenant trying once a second costs the
# broker nothing, however long it is away.
RECONNECT_MIN_DELAY_S = 0.25
RECONNECT_MAX_DELAY_S = 1.0


class Inbox:
    """A bounded hand-off from paho's thread to the event loop."""

    def __init__(self, maxsize: int, loop: asyncio.AbstractEventLoop) -> None:
        self.maxsize = maxsize
        self._loop = loop
        self._items: deque[InboundMessage] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._ready = asyncio.Event()
        self._signalled = False
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: InboundMessage) -> bool:
        """Called by the network thread; waits while full. False once the inbox is closed."""
        with self._cond:
            while len(self._items) >= self.maxsize and not self._closed:
                self._cond.wait(0.5)
            if self._closed:
                return False
            self._items.append(item)
            if not self._signalled:
                # One wake-up per burst, not one per message.
                self._signalled = True
                self._loop.call_soon_threadsafe(self._ready.set)
            return True

    def drain(self, limit: int) -> list[InboundMessage]:
        """Take up to `limit` items without waiting."""
        with self._cond:
            count = min(limit, len(self._items))
            items = [self._items.popleft() for _ in range(count)]
            if not self._items:
                self._signalled = False
                self._ready.clear()
            self._cond.notify_all()
        return items

    async def wait(self, within: float | None) -> None:
        """Until something is in the inbox, or `within` seconds have passed."""
        if self._items:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), within)

    def wake(self) -> None:
        """Release `wait()` early (called on the event loop)."""
        self._ready.set()

    def close(self) -> None:
        """Refuse further messages and release a waiting network thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _PublishProperties(Properties):
    """paho's Properties, made cheap for what nearly every PUBLISH carries: no properties.

    paho decodes the properties of each MQTT 5 PUBLISH into a new Properties object whose
    constructor and `unpack()` cost more than the rest of decoding the packet; at thousands of
    messages a second that is the largest single cost. Instances share the (read-only) tables
    of a template, and an empty property block is recognised without parsing it.
    """

    _tables: dict[int, dict[str, Any]] = {}

    def __init__(self, packetType: int) -> None:
        tables = self._tables.get(packetType)
        if tables is None:
            tables = dict(Properties(packetType).__dict__)  # type: ignore[no-untyped-call]
            self._tables[packetType] = tables
        self.__dict__.update(tables)

    def unpack(self, buffer: bytes) -> tuple[Properties, int]:
        if buffer[:1] == b"\x00":  # property length 0: nothing to read
            return self, 1
        result: tuple[Properties, int] = super().unpack(buffer)  # type: ignore[no-untyped-call]
        return result


def use_fast_publish_properties() -> None:
    """Have paho decode PUBLISH properties with `_PublishProperties` (process-wide)."""
    # paho's packet decoder looks the class up in its module's globals at each call.
    setattr(paho_packet, "Properties", _PublishProperties)  # noqa: B010


class ReadAheadClient(mqtt.Client):
    """A paho client that reads the socket in 64 KiB chunks and hands QoS 1 messages over lean.

    paho reads every packet with several small `recv()` calls (type, each length byte, body),
    which costs more than the rest of receiving a message. This reads ahead and hands paho its
    bytes from memory; a packet already whole in memory is cut out in one step. After a read,
    packets already buffered are processed too, since the socket will not signal readiness for
    data that has left it.

    With `on_delivery` set, a QoS 1 PUBLISH (manual acknowledgement, MQTT 5) is passed on as
    `(mid, topic, payload)` without paho's per-message object, lock, logging and topic
    matching; everything else goes through paho as usual.
    """

    _ahead: bytes = b""
    _ahead_pos: int = 0
    _ahead_sock: object = None
    READ_SIZE = 65536
    on_delivery: Callable[[int, bytes, bytes | bytearray], object] | None = None

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._ahead_sock is not self._sock:  # a new connection: forget the old bytes
            self._ahead, self._ahead_pos, self._ahead_sock = b"", 0, self._sock
        if self._ahead_pos >= len(self._ahead):
            data = super()._sock_recv(self.READ_SIZE)
            if not data:
                return data
            self._ahead, self._ahead_pos = data, 0
        end = self._ahead_pos + bufsize
        chunk = self._ahead[self._ahead_pos:end]
        self._ahead_pos = end
        return chunk

    def _buffered(self) -> bool:
        return (self._sock is not None and self._ahead_sock is self._sock
                and self._ahead_pos < len(self._ahead))

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._buffered():
            rc = super().loop_read(1)
        return rc

    def _packet_read(self) -> MQTTErrorCode:
        whole = self._whole_packet()
        if whole is None:
            return super()._packet_read()  # paho reads it piece by piece
        command, body = whole
        self._in_packet = _in_packet(command, body)
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = _in_packet(0, b"")
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()
        return rc

    def _whole_packet(self) -> tuple[int, bytes] | None:
        """The next packet, if paho has not started on it and it is all in memory; consumed."""
        if (self._in_packet["command"] != 0 or self._ahead_sock is not self._sock
                or self._sock is None):
            return None
        data, pos = self._ahead, self._ahead_pos
        # Fixed header: the packet type, then the remaining length in 1 to 4 bytes.
        length, shift, cursor = 0, 0, pos + 1
        while True:
            if cursor >= len(data) or shift > 21:
                return None  # incomplete here (or malformed: paho's reader says so)
            byte = data[cursor]
            cursor += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        end = cursor + length
        if end > len(data):
            return None
        self._ahead_pos = end
        return data[pos], data[cursor:end]

    def _handle_publish(self) -> MQTTErrorCode:
        deliver = self.on_delivery
        command, body = self._in_packet["command"], self._in_packet["packet"]
        if (deliver is None or (command & 0x06) >> 1 != QOS or not self._manual_ack
                or self._protocol != mqtt.MQTTv5):
            return super()._handle_publish()
        publish = paho_packet.decode_publish(command, body, self._protocol)
        deliver(publish.mid, publish.topic, publish.payload)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


def _in_packet(command: int, body: bytes) -> Any:
    """paho's state of the packet being read: `body` whole, or nothing yet."""
    return {"command": command, "have_remaining": 1 if command else 0, "remaining_count": [],
            "remaining_mult": 1, "remaining_length": len(body),
            "packet": body if command else bytearray(), "to_process": 0, "pos": 0}


class Subscriber:
    """The tenant's broker connection: subscribe to the shared subscriptions, ack on demand."""

    def __init__(self, settings: IngestSettings, topic_filters: list[str], inbox: Inbox,
                 on_connection: Callable[[bool], object]) -> None:
        self.settings = settings
        self.topic_filters = topic_filters
        self.inbox = inbox
        self._on_connection = on_connection
        self._taking = True
        self._connected = threading.Event()
        use_fast_publish_properties()
        self._client = self._make_client()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _make_client(self) -> ReadAheadClient:
        s = self.settings
        client = ReadAheadClient(CallbackAPIVersion.VERSION2, client_id=s.mqtt_client_id,
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
        # paho annotates whole seconds, but its wait takes any number of them.
        client.reconnect_delay_set(min_delay=RECONNECT_MIN_DELAY_S,  # type: ignore[arg-type]
                                   max_delay=RECONNECT_MAX_DELAY_S)  # type: ignore[arg-type]
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_delivery = self._handle_delivery
        client.on_subscribe = self._handle_subscribe
        return client

    def start(self) -> None:
        s = self.settings
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = s.session_expiry_s
        # The broker sends at most this many unacknowledged messages: the queue bound.
        properties.ReceiveMaximum = s.queue_max
        self._client.connect_async(s.broker_host, s.broker_port, keepalive=s.broker_keepalive_s,
                                   clean_start=False, properties=properties)
        self._client.loop_start()

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                        reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
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
            self._connected.set()
            self._on_connection(True)

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                           reason: Any, properties: Any) -> None:
        if self._taking and self._connected.is_set():
            log.warning("disconnected from the broker: %s", reason)
        self._connected.clear()
        self._on_connection(False)

    def _handle_message(self, client: mqtt.Client, userdata: Any,
                        message: mqtt.MQTTMessage) -> None:
        self._handle_delivery(message.mid, message._topic, message.payload)

    def _handle_delivery(self, mid: int, topic: bytes, payload: bytes | bytearray) -> None:
        if not self._taking:
            return  # left unacknowledged: the broker delivers it again to this session
        try:
            name = topic.decode()
        except UnicodeDecodeError:
            name = bytes(topic).decode("utf-8", "replace")
        self.inbox.put(InboundMessage(mid, name, bytes(payload), datetime.now(UTC)))

    def stop_taking(self) -> None:
        """Stop accepting new messages; those already in the inbox are still processed."""
        self._taking = False

    def ack(self, mids: list[int]) -> None:
        """Acknowledge committed messages, in the order they were received."""
        if not mids:
            return
        # One queued write for the whole batch instead of one packet (and one send() and one
        # wake-up of the network thread) per message. Each PUBACK is 4 bytes: type 0x40,
        # remaining length 2, the packet id; MQTT 5 lets the success reason code be omitted.
        pubacks = struct.pack(f"!{len(mids)}I", *[PUBACK_HEAD | mid for mid in mids])
        client: Any = self._client
        client._packet_queue(mqtt.PUBACK, pubacks, 0, QOS)

    def disconnect(self, timeout: float = 5.0) -> None:
        """Send what is queued (acknowledgements first), disconnect, stop the network thread."""
        self.inbox.close()
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
