"""The ingest's health reports: folded into the Device's status (health block and
TelemetryHealthy), rate-limited per device, heartbeats that change nothing patch nothing, and
the health tracker fed on the way."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubiot_contract.health import Anomaly, AnomalyRule, HealthReport
from kubiot_operator.controllers.reports import ReportPump
from kubiot_operator.kube.client import DEVICES
from kubiot_operator.metrics import OperatorMetrics
from kubiot_operator.models.device import DeviceStatus
from kubiot_operator.reconcile.health import HealthTracker
from kubiot_operator.reconcile.reports import ReportBuffer, admissible_status
from tests.support.firmware_env import Clock, MemoryObjects, device_body, tenant_objects

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
TOPIC = "acme/devices/p1/health"
SPIKE = Anomaly(rule=AnomalyRule.BOUNDS, metric="temperature", time=T0, value=95.0, low=0.0,
                high=60.0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def health(seconds: float, **fields: Any) -> bytes:
    """A health report sent `seconds` after T0, of telemetry received just before it."""
    return HealthReport(time=at(seconds), received_at=at(seconds - 0.5),
                        last_telemetry=at(seconds - 0.6), **fields).encode()


def drained_health(buffer: ReportBuffer, seconds: float) -> list[dict[str, Any]]:
    buffer.promote(at(seconds))
    return [report.health for _, report in buffer.drain(100, at(seconds))
            if report.health is not None]


def test_an_anomaly_becomes_the_health_block_and_a_false_condition() -> None:
    tracker = HealthTracker(T0)
    buffer = ReportBuffer(tracker, health_seconds=30)

    assert buffer.add(TOPIC, health(1, anomalies={"bounds": 2}, latest=SPIKE,
                                    metrics={"temperature": 95.0}), at(1)) is None
    ((_, report),) = buffer.drain(10, at(1))

    assert report.status_patch() == {"health": {
        "anomalyCount": 2, "countedSince": "2026-11-30T12:00:01Z", "silent": False,
        "reportedAt": "2026-11-30T12:00:01Z", "lastTelemetry": "2026-11-30T12:00:00.500000Z",
        "latestAnomaly": {"rule": "bounds", "metric": "temperature",
                          "time": "2026-11-30T12:00:00Z", "value": 95.0, "low": 0.0,
                          "high": 60.0}}}
    assert admissible_status(report.status_patch(), DeviceStatus).rejected == ()
    condition = report.health_condition
    assert condition is not None
    assert (condition.type, condition.ok, condition.reason) == (
        "TelemetryHealthy", False, "AnomalyDetected")
    assert condition.message == ("2 new anomalies; latest bounds: temperature = 95 outside "
                                 "[0, 60] at 2026-11-30T12:00:00Z")
    assert report.online is None and report.last_seen is None  # the ingest spoke, not the device
    tracked = tracker.get("acme", "p1")
    assert tracked is not None and tracked.metrics == {"temperature": 95.0}


def test_heartbeats_that_change_nothing_patch_nothing() -> None:
    buffer = ReportBuffer(HealthTracker(T0), health_seconds=30)
    buffer.add(TOPIC, health(1), at(1))
    assert len(drained_health(buffer, 1)) == 1

    for beat in range(1, 10):  # a heartbeat a minute for nine minutes, telemetry flowing
        buffer.add(TOPIC, health(1 + 60 * beat), at(1 + 60 * beat))
        assert drained_health(buffer, 1 + 60 * beat) == []
    assert len(buffer) == 0 and buffer.held == 0


def test_changes_are_written_at_most_once_per_interval_per_device() -> None:
    buffer = ReportBuffer(HealthTracker(T0), health_seconds=30)
    buffer.add(TOPIC, health(1), at(1))
    drained_health(buffer, 1)

    buffer.add(TOPIC, health(5, anomalies={"bounds": 1}, latest=SPIKE), at(5))
    buffer.add(TOPIC, health(6, silent=True), at(6))
    assert drained_health(buffer, 6) == [] and buffer.held == 1
    buffer.add("acme/devices/p2/health", health(7, silent=True), at(7))  # another device: at once
    assert len(buffer) == 1
    buffer.drain(10, at(7))

    (block,) = drained_health(buffer, 31)  # 30 s after p1's last health patch
    assert (block["silent"], block["anomalyCount"]) == (True, 1)
    assert block["latestAnomaly"]["rule"] == "bounds"


def test_the_condition_turns_healthy_again_with_a_quiet_report() -> None:
    buffer = ReportBuffer(HealthTracker(T0))
    buffer.add(TOPIC, health(1, silent=True), at(1))
    ((_, silent),) = buffer.drain(10, at(1))
    assert silent.health_condition is not None and silent.health_condition.reason == "Silent"
    assert silent.health_condition.message == "no telemetry since 2026-11-30T12:00:00.500000Z"

    buffer.add(TOPIC, health(20), at(20))
    ((_, back),) = buffer.drain(10, at(20))

    assert back.health_condition is not None
    assert (back.health_condition.ok, back.health_condition.reason) == (True, "Healthy")


def test_presence_feeds_the_tracker_as_it_arrives() -> None:
    tracker = HealthTracker(T0)
    buffer = ReportBuffer(tracker)
    buffer.add("acme/devices/p1/presence", b"offline", at(3))
    buffer.add("acme/gateways/gw/presence", b"online", at(3))
    tracked = tracker.get("acme", "p1")
    assert tracked is not None and (tracked.online, tracked.presence_changed) == (False, at(3))
    assert tracker.get("acme", "gw") is None


@pytest.mark.parametrize(("topic", "payload", "why"), [
    (TOPIC, b"not json", "not JSON"),
    (TOPIC, b'{"v": 2, "time": "2026-11-30T12:00:00Z"}', "v = 1"),
    (TOPIC, b'{"v": 1, "time": "2026-11-30T12:00:00Z", "anomalies": {"bounds": -1}}',
     "invalid health report"),
    (TOPIC, b'{"v": 1, "time": "2026-11-30T12:00:00Z", "metrics": {"t": 1e400}}',
     "invalid health report"),
    ("acme/gateways/gw/health", health(1), "devices only"),
])
def test_bad_health_reports_are_ignored_with_a_reason(topic: str, payload: bytes,
                                                      why: str) -> None:
    tracker = HealthTracker(T0)
    buffer = ReportBuffer(tracker)
    ignored = buffer.add(topic, payload, T0)
    assert ignored is not None and why in ignored.reason
    assert len(buffer) == 0 and len(tracker) == 0


async def test_the_pump_keeps_the_devices_other_conditions_and_the_token_bucket() -> None:
    objects = MemoryObjects()
    tenant_objects(objects)
    body = device_body("p1")
    body["status"]["conditions"] = [{"type": "Ready", "status": "True", "reason": "Reconciled",
                                     "message": "", "lastTransitionTime": "2026-11-30T11:00:00Z"}]
    objects.put(body)
    clock = Clock(at(1))
    pump = ReportPump(objects, OperatorMetrics(), flush_seconds=1, patches_per_second=1,
                      clock=clock, health=HealthTracker(T0), health_seconds=30)
    pump.on_message(TOPIC, health(1, anomalies={"bounds": 1}, latest=SPIKE))
    pump.on_message("acme/devices/p1/health", b"{}")

    assert await pump.flush() == 1

    status = objects.items[(DEVICES.plural, "acme", "p1")]["status"]
    assert status["health"]["anomalyCount"] == 1
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True", "TelemetryHealthy": "False"}
    assert pump.ignored == 1
