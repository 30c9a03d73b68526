"""The command contract: correlation ids, and what a device may answer (hostile bytes included)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from kubiot_contract.commands import (
    MAX_RESULT_BYTES,
    Correlation,
    ParsedResult,
    ResultRefusal,
    ResultRefused,
    ResultStatus,
    correlation_id,
    parse_correlation,
    parse_result,
    result_payload,
)
from kubiot_contract.topics import command_result_topic, device_root, parse_topic

TOKEN = "Zq3-_abcdefghijklmnop"
CORRELATION = correlation_id("ping-pumps", 3, "pump-01", TOKEN)


def test_a_correlation_id_names_command_run_device_and_token() -> None:
    assert str(parse_correlation(CORRELATION)) == CORRELATION
    assert parse_correlation(CORRELATION) == Correlation("ping-pumps", 3, "pump-01", TOKEN)
    assert parse_correlation(CORRELATION.encode()) == parse_correlation(CORRELATION)


def test_malformed_correlation_ids_are_not_matched() -> None:
    for text in ("", "a/b/c/d", f"ping/x/pump-01/{TOKEN}", f"ping/1/Pump/{TOKEN}",
                 "ping/1/pump-01/short", f"ping/1/pump-01/{TOKEN}/extra", b"\xff\xfe",
                 f"ping/1/pump-01/{'a' * 500}"):
        assert parse_correlation(text) is None


def test_an_answer_in_the_documented_format_is_read() -> None:
    raw = result_payload(CORRELATION, ResultStatus.OK, "pong", {"uptimeSeconds": 12})
    parsed = parse_result(raw)
    assert isinstance(parsed, ParsedResult)
    assert parsed.correlation.device == "pump-01"
    assert parsed.result.ok and parsed.result.message == "pong"
    assert parsed.result.data == {"uptimeSeconds": 12}


def test_v5_correlation_data_wins_over_the_body() -> None:
    other = correlation_id("ping-pumps", 4, "pump-02", TOKEN)
    parsed = parse_result(b'{"status": "error", "message": "busy", "id": "ignored"}',
                          other.encode())
    assert isinstance(parsed, ParsedResult)
    assert (parsed.correlation.run, parsed.correlation.device) == (4, "pump-02")
    assert not parsed.result.ok


def test_refusals_say_why() -> None:
    cases = {
        b"not json": ResultRefusal.BAD_JSON,
        b"[1, 2]": ResultRefusal.BAD_SCHEMA,
        b'{"status": "maybe", "id": "x"}': ResultRefusal.BAD_SCHEMA,
        b'{"status": "ok", "data": [1]}': ResultRefusal.BAD_SCHEMA,
        b'{"status": "ok"}': ResultRefusal.NO_CORRELATION,
        b'{"status": "ok", "id": "nope"}': ResultRefusal.NO_CORRELATION,
        b" " * (MAX_RESULT_BYTES + 1): ResultRefusal.TOO_LARGE,
    }
    for raw, reason in cases.items():
        refused = parse_result(raw)
        assert isinstance(refused, ResultRefused) and refused.reason is reason, raw[:40]


def test_result_topics_are_in_the_contract() -> None:
    topic = command_result_topic(device_root("acme", "pump-01"), "ping")
    assert topic == "acme/devices/pump-01/cmd/ping/result"
    assert parse_topic(topic).stream == "ping"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


@given(raw=st.binary(max_size=2048), correlation=st.none() | st.binary(max_size=120))
def test_arbitrary_bytes_never_raise(raw: bytes, correlation: bytes | None) -> None:
    assert isinstance(parse_result(raw, correlation), ParsedResult | ResultRefused)


@given(body=st.dictionaries(st.sampled_from(["id", "status", "message", "data", "x"]),
                            json_values, max_size=5),
       correlation=st.none() | st.text(max_size=80).map(str.encode))
def test_arbitrary_json_objects_never_raise(body: dict[str, object],
                                            correlation: bytes | None) -> None:
    raw = json.dumps(body).encode()
    parsed = parse_result(raw, correlation)
    if isinstance(parsed, ParsedResult):
        assert parsed.result.status in ("ok", "error")


@given(depth=st.integers(min_value=1, max_value=5000))
def test_deep_nesting_is_refused_not_raised(depth: int) -> None:
    raw = (b'{"status": "ok", "id": "' + CORRELATION.encode() + b'", "data": {"a": '
           + b"[" * depth + b"]" * depth + b"}}")
    assert isinstance(parse_result(raw), ParsedResult | ResultRefused)
