"""A PUBLISH the MQTT codec cannot decode, read by hand so that it can be dead-lettered.

MQTT 5 requires topics and string properties to be UTF-8, and `mqtt5` fails on a packet that
breaks this, with a Rust panic (`PanicException`, a BaseException) rather than an error. A
broker that does not check (EMQX outside `strict_mode`, for one) passes such a PUBLISH on
when a topic filter with a wildcard lets it through, for example a device's own
`telemetry/{stream}`. Refusing the packet would drop the connection, and the broker would send
the same unacknowledged message again on the next one, for ever: so the ingest reads just
enough of it here (packet id, topic bytes, payload) to keep it as a dead letter and
acknowledge it.

Pure: bytes in, fields out.
"""

from __future__ import annotations

from dataclasses import dataclass

PUBLISH = 3
MAX_VARIABLE_BYTES = 4  # a variable byte integer has at most four bytes (MQTT 5, 1.5.5)


@dataclass(frozen=True, slots=True)
class RawPublish:
    """What the ingest needs of an undecodable PUBLISH; `packet_id` is 0 for QoS 0."""

    packet_id: int
    topic: bytes
    payload: bytes

    @property
    def topic_text(self) -> str:
        """The topic as text, bytes that are not UTF-8 written as `\\xNN`."""
        return self.topic.decode("utf-8", "backslashreplace")

    @property
    def topic_is_utf8(self) -> bool:
        try:
            self.topic.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True


class NotAPublish(ValueError):
    """The bytes are not a PUBLISH packet this reader can make sense of."""


def _variable_integer(data: memoryview, at: int) -> tuple[int, int]:
    """The variable byte integer at `at`, and where it ends. IndexError: not all here yet."""
    value = 0
    for index in range(MAX_VARIABLE_BYTES):
        byte = data[at + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, at + index + 1
    raise NotAPublish("a variable byte integer longer than four bytes")


def read_raw_publish(data: memoryview) -> tuple[RawPublish, int]:
    """The PUBLISH at the start of `data`, and its size in bytes.

    Raises IndexError while the packet is not all here (as `mqtt5.read` does), NotAPublish for
    anything else than a whole, well-framed PUBLISH.
    """
    if data[0] >> 4 != PUBLISH:
        raise NotAPublish(f"packet type {data[0] >> 4}, not PUBLISH")
    qos = (data[0] >> 1) & 0x03
    if qos == 3:
        raise NotAPublish("QoS 3")
    length, start = _variable_integer(data, 1)
    end = start + length
    if end > len(data):
        raise IndexError("the rest of the packet is still on its way")
    try:
        return _publish(data[start:end], qos), end
    except IndexError:
        raise NotAPublish("its fields run past the packet's end") from None


def _publish(body: memoryview, qos: int) -> RawPublish:
    """The variable header and payload of a PUBLISH (MQTT 5, 3.3.2 and 3.3.3)."""
    topic_length = int.from_bytes(body[0:2], "big")
    at = 2 + topic_length
    packet_id = 0
    if qos:
        packet_id = int.from_bytes(body[at:at + 2], "big")
        at += 2
    properties, at = _variable_integer(body, at)
    at += properties
    if at > len(body) or len(body) < 2 or (qos and not packet_id):
        raise NotAPublish("its fields run past the packet's end, or its packet id is 0")
    return RawPublish(packet_id, bytes(body[2:2 + topic_length]), bytes(body[at:]))
