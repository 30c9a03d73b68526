"""A small synchronous MQTT v5 client for tests: says plainly whether the broker refused."""

from __future__ import annotations

import queue
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

#: Reason codes below 0x80 mean success (MQTT v5, 2.4).
_FAILURE = 0x80


class ConnectRefused(ConnectionError):
    """The TLS handshake (`stage` "tls") or the MQTT CONNECT (`stage` "mqtt") failed."""

    def __init__(self, message: str, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


def tls_handshake_succeeds(context: ssl.SSLContext, host: str, port: int,
                           timeout: float = 5.0) -> bool:
    """Complete a TLS handshake only (no MQTT): False when the server refuses the certificate.

    Under TLS 1.2 the server checks the client certificate (and its CRL) before it finishes the
    handshake, so a refused certificate fails right here.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            tls.do_handshake()
            # Under TLS 1.3 a refusal would only arrive as the first record: look for it.
            tls.settimeout(0.2)
            try:
                return tls.recv(1) != b""
            except TimeoutError:
                return True
    except (ssl.SSLError, ConnectionError):
        return False


@dataclass(frozen=True)
class Outcome:
    """What the broker answered to a PUBLISH (PUBACK) or SUBSCRIBE (SUBACK)."""

    reason_code: int
    reason: str

    @property
    def accepted(self) -> bool:
        return self.reason_code < _FAILURE


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


class MqttTestClient:
    """One connection; every call blocks until the broker answers or `timeout` passes."""

    def __init__(self, host: str, port: int, *, client_id: str,
                 tls_context: ssl.SSLContext | None = None, username: str | None = None,
                 password: str | None = None, timeout: float = 5.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.messages: queue.Queue[Received] = queue.Queue()
        self._acks: dict[int, queue.Queue[Outcome]] = {}
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self._connack: queue.Queue[int] = queue.Queue()
        self._lock = threading.Lock()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=mqtt.MQTTv5)
        if tls_context is not None:
            self._client.tls_set_context(tls_context)
        if username is not None:
            self._client.username_pw_set(username, password)
        # Never reconnect on its own: a test must see the session the broker ended stay ended.
        self._client.reconnect_delay_set(min_delay=3600, max_delay=3600)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # --- callbacks (paho's network thread) ----------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: ReasonCode,
                    properties: Any = None) -> None:
        self._connack.put(rc.value)
        if rc.value < _FAILURE:
            self._disconnected.clear()
            self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: ReasonCode,
                       properties: Any = None) -> None:
        self._connected.clear()
        self._disconnected.set()
        self._connack.put(rc.value if rc.value >= _FAILURE else _FAILURE)

    def _ack_queue(self, mid: int) -> queue.Queue[Outcome]:
        with self._lock:
            return self._acks.setdefault(mid, queue.Queue())

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: ReasonCode,
                    properties: Any = None) -> None:
        self._ack_queue(mid).put(Outcome(rc.value, str(rc)))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: list[ReasonCode],
                      properties: Any = None) -> None:
        self._ack_queue(mid).put(Outcome(rcs[0].value, str(rcs[0])))

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(Received(message.topic, bytes(message.payload), bool(message.retain)))

    # --- the test's side ----------------------------------------------------------------------

    def connect(self, *, clean_start: bool = True, session_expiry_s: int = 0) -> MqttTestClient:
        """Connect or raise ConnectRefused (a failed TLS handshake included)."""
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = session_expiry_s
        try:
            self._client.connect(self.host, self.port, keepalive=30, clean_start=clean_start,
                                 properties=properties)
        except ssl.SSLError as exc:
            raise ConnectRefused(f"TLS handshake failed: {exc!r}", "tls") from exc
        except OSError as exc:
            raise ConnectRefused(f"connection failed: {exc!r}", "tcp") from exc
        self._client.loop_start()
        try:
            code = self._connack.get(timeout=self.timeout)
        except queue.Empty:
            self.close()
            raise ConnectRefused("no CONNACK", "mqtt") from None
        if code >= _FAILURE:
            self.close()
            raise ConnectRefused(f"CONNECT refused with reason code {code:#x}", "mqtt")
        return self

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_disconnected(self, timeout: float) -> bool:
        """True once the broker has ended the session (within `timeout`)."""
        return self._disconnected.wait(timeout)

    def publish(self, topic: str, payload: bytes | str = b"{}", *, qos: int = 1,
                retain: bool = False) -> Outcome:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return Outcome(_FAILURE, f"not sent: {mqtt.error_string(info.rc)}")
        return self._wait_ack(info.mid, "PUBACK")

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> Outcome:
        """Subscribe and return the SUBACK's reason code."""
        rc, mid = self._client.subscribe(topic_filter, qos=qos)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return Outcome(_FAILURE, f"not sent: {mqtt.error_string(rc)}")
        return self._wait_ack(mid, "SUBACK")

    def _wait_ack(self, mid: int, what: str) -> Outcome:
        try:
            return self._ack_queue(mid).get(timeout=self.timeout)
        except queue.Empty:
            if not self.connected:
                return Outcome(_FAILURE, f"disconnected before the {what}")
            raise AssertionError(f"no {what} within {self.timeout}s") from None
        finally:
            with self._lock:
                self._acks.pop(mid, None)

    def next_message(self, timeout: float | None = None) -> Received | None:
        try:
            return self.messages.get(timeout=self.timeout if timeout is None else timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> MqttTestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
