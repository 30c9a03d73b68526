"""Messages to rows, device updates and dead letters: the pure half of the ingest."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from kubiot_contract.telemetry import RejectReason
from kubiot_contract.topics import IdentityKind
from kubiot_ingest.records import (
    DeadLetter,
    DeviceUpdate,
    InboundMessage,
    TelemetryRecords,
    classify,
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
