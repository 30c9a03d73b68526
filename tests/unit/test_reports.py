"""Device reports are merged per device and drained at a bounded rate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kubiot_contract.topics import IdentityKind
from kubiot_operator.reconcile.reports import ReportBuffer, ReportKey, TokenBucket

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def test_latest_report_per_device_wins_and_becomes_one_patch() -> None:
    buffer = ReportBuffer()
    assert buffer.add("acme/devices/p1/presence", b"online", T0) is None
    assert buffer.add("acme/devices/p1/state/reported",
                      b'{"firmware": "2.4.0", "valve": "open"}', T0 + timedelta(seconds=1)) is None
    assert buffer.add("acme/devices/p1/presence", b"offline", T0 + timedelta(seconds=2)) is None
    assert len(buffer) == 1
    ((key, report),) = buffer.drain(10)
    assert key == ReportKey("acme", IdentityKind.DEVICE, "p1")
    assert report.status_patch() == {
        "online": False,
        "lastSeen": "2026-11-24T12:00:02Z",
        "reported": {"firmware": "2.4.0", "valve": "open"},
        "firmware": {"current": "2.4.0"},
    }
    assert len(buffer) == 0


def test_garbage_is_ignored_with_a_reason() -> None:
    buffer = ReportBuffer()
    assert "online or offline" in buffer.add("acme/devices/p1/presence", b"maybe", T0).reason
    assert "JSON object" in buffer.add("acme/devices/p1/state/reported", b"[1]", T0).reason
    assert "not under" in buffer.add("acme/p1/presence", b"online", T0).reason
    assert "not a report" in buffer.add("acme/devices/p1/telemetry", b"{}", T0).reason
    assert len(buffer) == 0


@pytest.mark.parametrize("payload", [
    b"[" * 100_000 + b"]" * 100_000,          # raised RecursionError out of the MQTT session
    b'{"a": ' * 40 + b"1" + b"}" * 40,        # deeper than a status patch needs
    b'{"firmware": "1.0", "load": 1e400}',   # infinity: no valid JSON for the API server
    b'{"state": "installing", "note": "\\ud800"}',  # a lone surrogate cannot be sent as UTF-8
])
@pytest.mark.parametrize("channel", ["state/reported", "ota/status"])
def test_reports_the_api_server_would_refuse_are_ignored(channel: str, payload: bytes) -> None:
    buffer = ReportBuffer()
    ignored = buffer.add(f"acme/devices/p1/{channel}", payload, T0)
    assert ignored is not None
    assert len(buffer) == 0


def test_drain_is_oldest_first_and_bounded() -> None:
    buffer = ReportBuffer()
    for i in range(5):
        buffer.add(f"acme/devices/d{i}/presence", b"online", T0)
    buffer.add("acme/devices/d0/presence", b"offline", T0)  # d0 moves to the back
    assert [k.name for k, _ in buffer.drain(3)] == ["d1", "d2", "d3"]
    assert [k.name for k, _ in buffer.drain(3)] == ["d4", "d0"]


def test_token_bucket_limits_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=20, now=0.0)
    assert bucket.take(100, now=0.0) == 20
    assert bucket.take(100, now=0.5) == 5
    assert bucket.take(100, now=10.0) == 20
