"""The hand reader of PUBLISH packets the MQTT codec cannot decode (raw_publish.py)."""

from __future__ import annotations

import mqtt5
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubiot_ingest.raw_publish import NotAPublish, RawPublish, read_raw_publish
from tests.support.mqtt_wire import publish_packet


def read(packet: bytes) -> tuple[RawPublish, int]:
    return read_raw_publish(memoryview(packet))


# The codec's panic leaves the UnicodeDecodeError it came from unraisable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_publish_whose_topic_is_not_utf8_is_read_where_the_codec_panics() -> None:
    packet = publish_packet(7, b"acme/devices/d1/telemetry/\xff", b'{"v":1}')
    with pytest.raises(BaseException):  # noqa: B017, PT011 - a Rust panic, a BaseException
        mqtt5.read(memoryview(packet))
    raw, size = read(packet + b"next packet")
    assert size == len(packet)
    assert raw == RawPublish(7, b"acme/devices/d1/telemetry/\xff", b'{"v":1}')
    assert raw.topic_text == "acme/devices/d1/telemetry/\\xff"
    assert not raw.topic_is_utf8


@given(topic=st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
                     min_size=1, max_size=300),
       payload=st.binary(max_size=400), qos=st.sampled_from([0, 1]),
       packet_id=st.integers(1, 65535))
def test_it_reads_any_well_formed_publish_as_the_codec_does(
        topic: str, payload: bytes, qos: int, packet_id: int) -> None:
    packet = publish_packet(packet_id, topic, payload, qos=qos)
    decoded, size = mqtt5.read(memoryview(packet))
    assert isinstance(decoded, mqtt5.PublishPacket)
    raw, raw_size = read(packet)
    assert raw_size == size
    assert (raw.packet_id, raw.topic_text, raw.payload) == (
        decoded.packet_id or 0, decoded.topic, decoded.payload)


def test_properties_are_skipped() -> None:
    name = b"acme/devices/d1/telemetry"
    properties = b"\x03\x00\x10application/json"  # content type
    body = (len(name).to_bytes(2, "big") + name + (9).to_bytes(2, "big")
            + bytes([len(properties)]) + properties + b"{}")
    packet = bytes([0x32, len(body)]) + body
    assert read(packet)[0] == RawPublish(9, name, b"{}")


@pytest.mark.parametrize("cut", [1, 2, 5, 20])
def test_a_packet_not_all_here_yet_says_so_as_the_codec_does(cut: int) -> None:
    packet = publish_packet(3, "acme/devices/d1/telemetry", b"x" * 200)
    with pytest.raises(IndexError):
        read(packet[:cut])


@pytest.mark.parametrize(("packet", "why"), [
    (bytes([0x40, 0x02, 0x00, 0x01]), "not PUBLISH"),  # a PUBACK
    (bytes([0x36, 0x00]), "QoS 3"),
    (bytes([0x32, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]), "four bytes"),
    (bytes([0x32, 0x03, 0x00, 0x10, 0x61]), "past the packet's end"),  # topic runs past
    (bytes([0x32, 0x06, 0x00, 0x01, 0x61, 0x00, 0x00, 0x00]), "packet id is 0"),
])
def test_what_is_not_a_well_framed_publish_is_refused(packet: bytes, why: str) -> None:
    with pytest.raises(NotAPublish, match=why):
        read(packet)


@given(st.binary(min_size=1, max_size=200))
def test_any_bytes_are_a_publish_or_a_refusal(data: bytes) -> None:
    try:
        raw, size = read(data)
    except (IndexError, NotAPublish):
        return
    assert 0 < size <= len(data)
    assert len(raw.topic) + len(raw.payload) < size
