"""Everything the ingest does with a device's bytes returns a value or a typed refusal, in
bounded time, and what it returns can be written to PostgreSQL."""

from __future__ import annotations

import json
import math
import tracemalloc
from datetime import datetime, timedelta

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from kubiot_contract.device_json import MAX_DOCUMENT_DEPTH, document_problem, parse_device_json
from kubiot_contract.health import (
    AnomalyRules,
    BoundsRule,
    HealthRejected,
    HealthReport,
    SilenceRule,
    ZScoreRule,
    parse_health,
)
from kubiot_contract.telemetry import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    RejectReason,
    Sample,
    TelemetryRejected,
    parse_payload,
)
from kubiot_contract.topics import NAME_MAX_LENGTH, ContractError, ParsedTopic, parse_topic
from kubiot_ingest.anomaly import AnomalyDetector, judge_stored
from kubiot_ingest.batcher import Batch
from kubiot_ingest.records import (
    DeadLetter,
    DeviceUpdate,
    InboundMessage,
    Outcome,
    StoredWindow,
    TelemetryRecords,
    classify,
    parse_presence,
    parse_reported,
)
from tests.fuzz.hostile import (
    ARRIVAL,
    FUZZ,
    TENANT,
    arrivals,
    attempt,
    device_payloads,
    telemetry_texts,
    telemetry_topics,
    topics,
    within,
)

WINDOW = StoredWindow()


def assert_storable_text(text: str) -> None:
    """What PostgreSQL text accepts: UTF-8 without NUL."""
    assert "\x00" not in text
    text.encode("utf-8")


def _refuse_constant(name: str) -> None:
    raise AssertionError(f"{name} in stored JSON")


def assert_storable(outcome: object, message: InboundMessage) -> None:
    if isinstance(outcome, TelemetryRecords):
        assert outcome.rows
        for ts, device, stream, seq, metric, value, text in outcome.rows:
            assert ts.tzinfo is not None
            assert WINDOW.refusal(ts, message.received_at) is None
            assert 0 <= seq < 2**63
            for name in (device, metric, stream):
                assert_storable_text(name)
            assert (value is None) != (text is None)
            if value is not None:
                assert math.isfinite(value)
            if text is not None:
                assert_storable_text(text)
        assert outcome.latest == max(row[0] for row in outcome.rows)
    elif isinstance(outcome, DeviceUpdate):
        assert outcome.seen_at == message.received_at
        if outcome.reported is not None:
            assert_storable_text(outcome.reported)
            assert isinstance(json.loads(outcome.reported, parse_constant=_refuse_constant), dict)
    else:
        assert isinstance(outcome, DeadLetter)
        assert outcome.reason is not RejectReason.QUARANTINED
        assert outcome.payload == message.payload
        assert outcome.detail
        assert_storable_text(outcome.topic)
        assert_storable_text(outcome.detail)


@FUZZ
@given(topic=topics, payload=device_payloads, received_at=arrivals)
@example(topic=f"{TENANT}/devices/pump-1/telemetry",
         payload=b'{"ts": 1, "values": {"a": 1' + b"0" * 400 + b"}}", received_at=ARRIVAL)
@example(topic=f"{TENANT}/devices/pump-1/telemetry",
         payload=b'{"ts": "9999-12-31T23:30:00-01:00", "values": {"a": 1}}', received_at=ARRIVAL)
@example(topic=f"{TENANT}/devices/pump-1/state/reported",
         payload=b"[" * 100_000 + b"]" * 100_000, received_at=ARRIVAL)
@example(topic=f"{TENANT}/devices/pump-1\n/telemetry",
         payload=b'{"ts": "2026-11-25T11:00:00Z", "values": {"a": 1}}', received_at=ARRIVAL)
def test_every_message_is_stored_or_a_dead_letter(topic: str, payload: bytes,
                                                  received_at: datetime) -> None:
    message = InboundMessage(1, topic, payload, received_at)
    with within():
        outcome = classify(message, TENANT, DEFAULT_MAX_PAYLOAD_BYTES, WINDOW)
    assert_storable(outcome, message)
    # The batch a message joins takes it as it is.
    batch = Batch()
    batch.add(message, outcome)
    batch.device_updates()


@FUZZ
@given(topic=telemetry_topics, payload=telemetry_texts.map(str.encode))
def test_every_telemetry_message_is_rows_or_a_dead_letter(topic: str, payload: bytes) -> None:
    message = InboundMessage(1, topic, payload, ARRIVAL)
    with within():
        outcome = classify(message, TENANT, DEFAULT_MAX_PAYLOAD_BYTES, WINDOW)
    assert_storable(outcome, message)


@FUZZ
@given(kinds=st.lists(st.sampled_from(["telemetry", "state/reported", "presence"]), min_size=1,
                      max_size=4),
       payloads=st.lists(device_payloads, min_size=4, max_size=4))
def test_a_batch_of_hostile_messages_builds(kinds: list[str], payloads: list[bytes]) -> None:
    batch = Batch()
    for mid, (kind, payload) in enumerate(zip(kinds, payloads, strict=False)):
        message = InboundMessage(mid, f"{TENANT}/devices/pump-{mid % 2}/{kind}", payload, ARRIVAL)
        outcome = classify(message, TENANT, DEFAULT_MAX_PAYLOAD_BYTES, WINDOW)
        assert_storable(outcome, message)
        batch.add(message, outcome)
    assert batch.messages == len(kinds)
    for update in batch.device_updates():
        assert update.device in ("pump-0", "pump-1")


@FUZZ
@given(payload=st.one_of(telemetry_texts.map(str.encode), device_payloads))
def test_telemetry_parses_to_samples_or_a_reason(payload: bytes) -> None:
    samples = attempt(lambda: parse_payload(payload), TelemetryRejected)
    if isinstance(samples, TelemetryRejected):
        assert isinstance(samples.reason, RejectReason)
        assert samples.message
        return
    assert samples
    for sample in samples:
        assert isinstance(sample, Sample)
        assert 1 <= sample.ts.year <= 9999
        for value in sample.values.values():
            if not isinstance(value, str):
                assert math.isfinite(float(value))


@FUZZ
@given(payload=device_payloads)
def test_device_json_is_a_bounded_value_or_a_reason(payload: bytes) -> None:
    value = attempt(lambda: parse_device_json(payload), TelemetryRejected)
    if isinstance(value, TelemetryRejected):
        assert value.reason in (RejectReason.BAD_JSON, RejectReason.BAD_SCHEMA,
                                RejectReason.TOO_LARGE)
        return
    assert document_problem(value, MAX_DOCUMENT_DEPTH) is None
    # Whatever was accepted can be written back as strict JSON, in UTF-8.
    json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")


@FUZZ
@given(payload=device_payloads)
def test_presence_and_reported_state_parse_or_say_why(payload: bytes) -> None:
    online = attempt(lambda: parse_presence(payload), TelemetryRejected)
    assert isinstance(online, bool | TelemetryRejected)
    reported = attempt(lambda: parse_reported(payload, DEFAULT_MAX_PAYLOAD_BYTES),
                       TelemetryRejected)
    if isinstance(reported, str):
        assert_storable_text(reported)
        assert isinstance(json.loads(reported), dict)


@FUZZ
@given(topic=topics)
def test_topics_parse_to_contract_names_or_a_contract_error(topic: str) -> None:
    parsed = attempt(lambda: parse_topic(topic), ContractError)
    if isinstance(parsed, ContractError):
        return
    assert isinstance(parsed, ParsedTopic)
    for name in (parsed.tenant, parsed.name, parsed.stream or "x"):
        assert name.isascii() and name == name.strip()
        assert 0 < len(name) <= NAME_MAX_LENGTH
        assert all(c.islower() or c.isdigit() or c == "-" for c in name)


_LIMIT = DEFAULT_MAX_PAYLOAD_BYTES
_WIDE_SAMPLE = (b'{"ts":"2026-11-25T11:00:00Z","values":{'
                + b",".join(b'"m%d":1' % i for i in range(256)) + b"}}")
#: The most expensive payloads of the largest size a tenant accepts by default.
WORST_CASES = {
    "deep telemetry": ("telemetry", b"[" * (_LIMIT // 2) + b"]" * (_LIMIT // 2)),
    "deep reported state": ("state/reported", b"{" + b'"a":{' * (_LIMIT // 6)),
    "most rows": ("telemetry", b"[" + b",".join(
        [_WIDE_SAMPLE] * (_LIMIT // (len(_WIDE_SAMPLE) + 1))) + b"]"),
    "widest reported state": ("state/reported", b"{" + b",".join(
        b'"k%d":[]' % i for i in range(_LIMIT // 12)) + b"}"),
    "longest string": ("telemetry", b'{"ts":1,"values":{"a":"' + b"x" * (_LIMIT - 40) + b'"}}'),
    "biggest numbers": ("state/reported", b'{"a":[' + b",".join([b"9" * 4300] * 60) + b"]}"),
}


@pytest.mark.parametrize("case", list(WORST_CASES))
def test_the_worst_payloads_are_bounded_in_time_and_memory(case: str) -> None:
    channel, payload = WORST_CASES[case]
    assert len(payload) <= _LIMIT
    message = InboundMessage(1, f"{TENANT}/devices/pump-1/{channel}", payload, ARRIVAL)
    with within():
        outcome = classify(message, TENANT, _LIMIT, WINDOW)
    assert_storable(outcome, message)
    tracemalloc.start()
    try:
        classify(message, TENANT, _LIMIT, WINDOW)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Measured at 6 MB at most: a parser that copies or expands per byte would pass 32.
    assert peak < 32 * 1024 * 1024, f"{case}: peak {peak / 1e6:.1f} MB"


_JUDGING_RULES = AnomalyRules(
    bounds=[BoundsRule(metric=name, min=-1.0, max=1.0) for name in ("a", "b", "x", "value")],
    zscore=[ZScoreRule(metric="*", warmup_samples=2, half_life_samples=2)],
    silence=SilenceRule(interval_seconds=0.1, min_silence_seconds=0))


@FUZZ
@given(payloads=st.lists(telemetry_texts.map(str.encode), min_size=1, max_size=6))
def test_whatever_telemetry_is_stored_the_detector_judges_it_and_reports_readably(
        payloads: list[bytes]) -> None:
    detector = AnomalyDetector(_JUDGING_RULES)
    entries: list[tuple[InboundMessage, Outcome]] = []
    for mid, payload in enumerate(payloads):
        message = InboundMessage(mid, f"{TENANT}/devices/pump-1/telemetry", payload,
                                 ARRIVAL + timedelta(seconds=mid))
        entries.append((message, classify(message, TENANT, DEFAULT_MAX_PAYLOAD_BYTES, WINDOW)))
    with within():
        found = judge_stored(detector, entries) + judge_stored(detector, entries)
        found += detector.silences(ARRIVAL + timedelta(hours=1))
        reports = detector.reports_due(ARRIVAL + timedelta(hours=1))
    for finding in found:
        for number in (finding.anomaly.value, finding.anomaly.low, finding.anomaly.high):
            assert number is None or math.isfinite(number)
    for _, report in reports:
        assert parse_health(report.encode()) == report


@FUZZ
@given(payload=st.one_of(device_payloads, telemetry_texts.map(str.encode)))
@example(payload=b'{"v": 1, "time": "2026-11-25T12:00:00Z", "anomalies": {"silent": -1}}')
@example(payload=b'{"v": 1, "time": "2026-11-25T12:00:00Z", "metrics": {"a": 1e400}}')
def test_a_health_report_from_anyone_parses_or_is_refused(payload: bytes) -> None:
    report = attempt(lambda: parse_health(payload), HealthRejected)
    if isinstance(report, HealthReport):
        assert report.time.tzinfo is not None
        assert report.anomaly_count >= 0
        assert all(math.isfinite(value) for value in report.metrics.values())
