"""The telemetry payload contract: what is accepted, what is refused and why."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from kubiot_contract.telemetry import (
    MAX_SAMPLES_PER_BATCH,
    RejectReason,
    TelemetryRejected,
    parse_payload,
    render_payload_json_schema,
)

ROOT = Path(__file__).resolve().parents[2]


def test_single_sample_with_every_kind_of_value() -> None:
    (sample,) = parse_payload(
        b'{"ts": "2026-11-24T10:00:00+01:00", "seq": 7,'
        b' "values": {"flow": 12.5, "pumps": 2, "open": true, "mode": "eco"}}'
    )
    assert sample.ts == datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
    assert sample.seq == 7
    assert sample.values == {"flow": 12.5, "pumps": 2, "open": True, "mode": "eco"}
    assert type(sample.values["pumps"]) is int and type(sample.values["open"]) is bool


def test_batch_and_epoch_timestamps() -> None:
    samples = parse_payload(json.dumps([
        {"ts": 1_790_000_000, "seq": 1, "values": {"t": 1}},
        {"ts": 1_790_000_000_500, "seq": 2, "values": {"t": 2}},
        {"ts": "2026-11-24T10:00:00", "values": {"t": 3}},
    ]).encode())
    assert [s.seq for s in samples] == [1, 2, 0]
    assert samples[1].ts.microsecond == 500_000
    assert samples[2].ts.tzinfo is UTC


def test_unknown_fields_are_ignored_so_additive_changes_keep_the_version() -> None:
    (sample,) = parse_payload(b'{"ts": 1, "values": {"a": 1}, "firmware": "2.4.1"}')
    assert sample.v == 1


@pytest.mark.parametrize(("raw", "reason", "detail"), [
    (b"{not json", RejectReason.BAD_JSON, "JSON"),
    (b'"hello"', RejectReason.BAD_SCHEMA, "payload"),
    (b'{"values": {"a": 1}}', RejectReason.BAD_SCHEMA, "ts"),
    (b'{"ts": 1, "values": {}}', RejectReason.BAD_SCHEMA, "values"),
    (b'{"ts": 1, "values": {"a": [1, 2]}}', RejectReason.BAD_SCHEMA, "values.a"),
    (b'{"ts": 1, "values": {"a": NaN}}', RejectReason.BAD_SCHEMA, "values.a"),
    (b'{"ts": 1, "values": {"bad key": 1}}', RejectReason.BAD_SCHEMA, "bad key"),
    (b'{"ts": 1, "seq": -1, "values": {"a": 1}}', RejectReason.BAD_SCHEMA, "seq"),
    (b'{"ts": "yesterday", "values": {"a": 1}}', RejectReason.BAD_SCHEMA, "ts"),
    (b"[]", RejectReason.BAD_SCHEMA, "at least 1"),
    (b'[{"ts": 1, "values": {"a": 1}}, {"ts": 1, "values": {"a": {}}}]',
     RejectReason.BAD_SCHEMA, "1.values.a"),
    (b'{"v": 2, "ts": 1, "values": {"a": 1}}', RejectReason.UNSUPPORTED_VERSION, "version 2"),
])
def test_refused_payloads_say_why(raw: bytes, reason: RejectReason, detail: str) -> None:
    with pytest.raises(TelemetryRejected) as caught:
        parse_payload(raw)
    assert caught.value.reason is reason
    assert detail in caught.value.message


def test_size_limits() -> None:
    with pytest.raises(TelemetryRejected) as caught:
        parse_payload(b'{"ts": 1, "values": {"a": "' + b"x" * 2000 + b'"}}', max_bytes=1000)
    assert caught.value.reason is RejectReason.TOO_LARGE
    too_many = json.dumps([{"ts": 1, "values": {"a": 1}}] * (MAX_SAMPLES_PER_BATCH + 1))
    with pytest.raises(TelemetryRejected):
        parse_payload(too_many.encode(), max_bytes=10**8)


def test_published_json_schema_is_current_and_agrees_with_the_parser() -> None:
    published = (ROOT / "docs" / "telemetry.schema.json").read_text()
    assert published == render_payload_json_schema(), "run `make crds`"
    schema = json.loads(published)
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    good = [{"ts": "2026-11-24T10:00:00Z", "seq": 1, "values": {"flow": 1.5, "on": True}}]
    assert not list(validator.iter_errors(good))
    assert list(validator.iter_errors({"ts": "2026-11-24T10:00:00Z", "values": {"a": [1]}}))


@pytest.mark.parametrize(("raw", "detail"), [
    # float() of an integer past the range of a double raises OverflowError.
    (b'{"ts": 1, "values": {"a": 1' + b"0" * 400 + b'}}', "values.a"),
    (b'{"ts": 1, "values": {"a": -1' + b"0" * 309 + b'}}', "values.a"),
    # An offset that moves the instant past year 9999 or before year 1 in UTC.
    (b'{"ts": "9999-12-31T23:30:00-01:00", "values": {"a": 1}}', "outside years 1 to 9999"),
    (b'{"ts": "0001-01-01T00:30:00+01:00", "values": {"a": 1}}', "outside years 1 to 9999"),
])
def test_values_beyond_what_is_stored_are_refused_not_raised(raw: bytes, detail: str) -> None:
    with pytest.raises(TelemetryRejected) as caught:
        parse_payload(raw)
    assert caught.value.reason is RejectReason.BAD_SCHEMA
    assert detail in caught.value.message


def test_the_largest_storable_integer_is_kept() -> None:
    (sample,) = parse_payload(b'{"ts": 1, "values": {"a": ' + str(2**1023).encode() + b"}}")
    assert sample.values["a"] == 2**1023
