"""Messages to rows, device updates and dead letters: the pure half of the ingest."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from kubiot_contract.telemetry import RejectReason
from kubiot_contract.topics import IdentityKind
from kubiot_ingest.records import (
    DeadLetter,
    DeviceUpdate,
    InboundMessage,
    StoredWindow,
    TelemetryRecords,
    classify,
    storable_text,
)

RECEIVED = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def message(topic: str, payload: bytes | str | object, mid: int = 1) -> InboundMessage:
    if isinstance(payload, str):
        body = payload.encode()
    elif isinstance(payload, bytes):
        body = payload
    else:
        body = json.dumps(payload).encode()
    return InboundMessage(mid, topic, body, RECEIVED)


def test_a_sample_becomes_one_row_per_metric() -> None:
    outcome = classify(message("acme/devices/pump-1/telemetry", {
        "ts": "2026-11-24T10:00:00Z", "seq": 7,
        "values": {"flow": 12.5, "pumps": 2, "open": True, "mode": "eco"}}), "acme", 1024)
    assert isinstance(outcome, TelemetryRecords)
    ts = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    assert sorted(outcome.rows) == sorted([
        (ts, "pump-1", "", 7, "flow", 12.5, None),
        (ts, "pump-1", "", 7, "pumps", 2.0, None),
        (ts, "pump-1", "", 7, "open", 1.0, None),
        (ts, "pump-1", "", 7, "mode", None, "eco"),
    ])
    assert outcome.latest == ts
    assert outcome.kind is IdentityKind.DEVICE


def test_a_batch_on_a_stream_of_a_gateway() -> None:
    outcome = classify(message("acme/gateways/hub-1/telemetry/vibration", [
        {"ts": 1795082400, "seq": 1, "values": {"rms": 0.1}},
        {"ts": 1795082410, "seq": 2, "values": {"rms": 0.2}},
    ]), "acme", 1024)
    assert isinstance(outcome, TelemetryRecords)
    assert outcome.kind is IdentityKind.GATEWAY
    assert [(r[1], r[2], r[3]) for r in outcome.rows] == [("hub-1", "vibration", 1),
                                                          ("hub-1", "vibration", 2)]
    assert outcome.latest == datetime.fromtimestamp(1795082410, UTC)


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    ("acme/devices/pump-1/telemetry", b"{oops", RejectReason.BAD_JSON),
    ("acme/devices/pump-1/telemetry", {"ts": 1, "values": {"flow": "x" * 2000}},
     RejectReason.BAD_SCHEMA),
    ("acme/devices/pump-1/telemetry", {"ts": 1, "values": {"flow": [1]}},
     RejectReason.BAD_SCHEMA),
    ("acme/devices/pump-1/telemetry", {"v": 2, "ts": 1, "values": {"flow": 1}},
     RejectReason.UNSUPPORTED_VERSION),
    ("acme/devices/pump-1/telemetry", {"ts": 1, "values": {"blob": "y" * 5000}},
     RejectReason.TOO_LARGE),
    ("acme/devices/pump-1/telemetry", {"ts": 1, "values": {"mode": "a\u0000b"}},
     RejectReason.BAD_SCHEMA),
    ("other/devices/pump-1/telemetry", {"ts": 1, "values": {"flow": 1}},
     RejectReason.BAD_TOPIC),
    ("acme/devices/pump-1/telemetry/Bad_Stream", {"ts": 1, "values": {"flow": 1}},
     RejectReason.BAD_TOPIC),
    ("acme/devices/pump-1/ota/status", {"state": "installing"}, RejectReason.BAD_TOPIC),
    ("acme/things/pump-1/telemetry", {"ts": 1, "values": {"flow": 1}},
     RejectReason.BAD_TOPIC),
    ("acme/devices/pump-1/presence", "maybe", RejectReason.BAD_SCHEMA),
    ("acme/devices/pump-1/state/reported", "[1, 2]", RejectReason.BAD_SCHEMA),
    ("acme/devices/pump-1/state/reported", "{nope", RejectReason.BAD_JSON),
    ("acme/devices/pump-1/state/reported", '{"x": NaN}', RejectReason.BAD_JSON),
    ("acme/devices/pump-1/state/reported", '{"x": "\\u0000"}', RejectReason.BAD_SCHEMA),
])
def test_what_cannot_be_stored_becomes_a_dead_letter(topic: str, payload: object,
                                                      reason: RejectReason) -> None:
    inbound = message(topic, payload)
    outcome = classify(inbound, "acme", 4096)
    assert isinstance(outcome, DeadLetter)
    assert outcome.reason is reason
    assert outcome.topic == topic
    assert outcome.payload == inbound.payload
    assert outcome.received_at == RECEIVED
    assert outcome.detail


@pytest.mark.parametrize(("payload", "online"), [
    ("online", True), ("offline", False), ('"online"', True), (" offline\n", False)])
def test_presence(payload: str, online: bool) -> None:
    outcome = classify(message("acme/devices/pump-1/presence", payload), "acme", 1024)
    assert outcome == DeviceUpdate(IdentityKind.DEVICE, "pump-1", RECEIVED, online=online)


def test_reported_state_is_kept_as_a_json_object() -> None:
    outcome = classify(message("acme/gateways/hub-1/state/reported",
                               {"firmware": "1.2.0", "children": 3}), "acme", 1024)
    assert isinstance(outcome, DeviceUpdate)
    assert outcome.kind is IdentityKind.GATEWAY
    assert outcome.online is None
    assert json.loads(outcome.reported or "") == {"firmware": "1.2.0", "children": 3}


# Each of these raised out of classify() before: the ingest exited, was restarted, received the
# same unacknowledged message and exited again.
@pytest.mark.parametrize(("topic", "payload", "reason"), [
    ("acme/devices/pump-1/telemetry",
     b'{"ts": "2026-11-24T10:00:00Z", "values": {"flow": 1' + b"0" * 400 + b"}}",
     RejectReason.BAD_SCHEMA),
    ("acme/devices/pump-1/telemetry",
     b'{"ts": "9999-12-31T23:30:00-01:00", "values": {"flow": 1}}', RejectReason.BAD_SCHEMA),
    ("acme/devices/pump-1/telemetry",
     b'{"ts": "0001-01-01T00:30:00+01:00", "values": {"flow": 1}}', RejectReason.BAD_SCHEMA),
    ("acme/devices/pump-1/state/reported", b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
     RejectReason.BAD_JSON),
    ("acme/devices/pump-1/state/reported", b"[" * 100_000 + b"]" * 100_000,
     RejectReason.BAD_JSON),
])
def test_hostile_payloads_are_dead_letters_not_exceptions(topic: str, payload: bytes,
                                                          reason: RejectReason) -> None:
    outcome = classify(message(topic, payload), "acme", 256 * 1024)
    assert isinstance(outcome, DeadLetter)
    assert outcome.reason is reason


# Accepted before, then refused by jsonb when the batch was written.
@pytest.mark.parametrize(("payload", "detail"), [
    (b'{"x": 1e400}', "beyond the range of a double"),
    (b'{"x": "\\ud800"}', "hex escape"),
    (b'{"x": "\xed\xa0\x80"}', "unicode"),
    (b'{"a": ' * 40 + b"1" + b"}" * 40, "nested deeper than 32 levels"),
])
def test_reported_state_jsonb_would_refuse_is_a_dead_letter(payload: bytes, detail: str) -> None:
    outcome = classify(message("acme/devices/pump-1/state/reported", payload), "acme", 4096)
    assert isinstance(outcome, DeadLetter)
    assert detail in outcome.detail


def test_reported_state_keeps_unicode_and_big_numbers() -> None:
    # JSON escapes, a surrogate pair among them: what a device's JSON encoder writes.
    payload = rb'{"name": "Pumpe \u00fc \ud83d\ude00", "big": 1' + b"0" * 100 + b"}"
    outcome = classify(message("acme/devices/pump-1/state/reported", payload), "acme", 4096)
    assert isinstance(outcome, DeviceUpdate)
    assert json.loads(outcome.reported or "") == {"name": "Pumpe \u00fc \U0001f600",
                                                  "big": 10**100}


def test_dead_letter_text_is_always_storable() -> None:
    outcome = classify(message("acme/devices/pump-1\x00\ud800/telemetry", b"{}"), "acme", 4096)
    assert isinstance(outcome, DeadLetter)
    assert outcome.reason is RejectReason.BAD_TOPIC
    for text in (outcome.topic, outcome.detail):
        assert "\x00" not in text
        text.encode()
    assert storable_text("pump-1") == "pump-1"
    assert storable_text("a\x00b\udc80") == "a\ufffdb?"


def test_a_message_the_codec_could_not_read_is_a_dead_letter_whatever_it_holds() -> None:
    # Its topic (as text) and payload would make rows: the reason it was unreadable wins.
    unreadable = InboundMessage(4, "acme/devices/pump-1/telemetry", b'{"ts":1,"values":{"a":1}}',
                                RECEIVED, unreadable=(RejectReason.BAD_TOPIC,
                                                      "the topic is not valid UTF-8"))
    outcome = classify(unreadable, "acme", 4096)
    assert isinstance(outcome, DeadLetter)
    assert (outcome.reason, outcome.detail) == (RejectReason.BAD_TOPIC,
                                                "the topic is not valid UTF-8")
    assert outcome.payload == unreadable.payload


WINDOW = StoredWindow(retention=timedelta(days=30), max_future_skew=timedelta(minutes=10))


def telemetry_at(*times: datetime) -> InboundMessage:
    return message("acme/devices/pump-1/telemetry", [
        {"ts": ts.isoformat(), "seq": seq, "values": {"flow": 1}} for seq, ts in enumerate(times)])


@pytest.mark.parametrize(("times", "detail"), [
    ((datetime(1970, 1, 1, tzinfo=UTC),), "older than the retention of 30 days"),
    ((RECEIVED - timedelta(days=30, seconds=1),), "older than the retention"),
    ((RECEIVED + timedelta(minutes=10, seconds=1),), "more than 600 s ahead"),
    ((datetime(9999, 12, 31, tzinfo=UTC),), "ahead of its arrival"),
    # One sample outside the window refuses the message, like any other broken rule.
    ((RECEIVED, datetime(2000, 1, 1, tzinfo=UTC)), "older than the retention"),
])
def test_samples_outside_the_stored_window_are_dead_letters(times: tuple[datetime, ...],
                                                            detail: str) -> None:
    outcome = classify(telemetry_at(*times), "acme", 4096, WINDOW)
    assert isinstance(outcome, DeadLetter)
    assert outcome.reason is RejectReason.OUTSIDE_WINDOW
    assert detail in outcome.detail


def test_samples_at_the_edges_of_the_window_are_stored() -> None:
    times = (RECEIVED - timedelta(days=30), RECEIVED + timedelta(minutes=10), RECEIVED)
    outcome = classify(telemetry_at(*times), "acme", 4096, WINDOW)
    assert isinstance(outcome, TelemetryRecords)
    assert sorted({row[0] for row in outcome.rows}) == sorted(times)
