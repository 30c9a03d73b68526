"""The DeviceCommand controller over in-memory objects and a recording messenger."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubiot_contract.commands import ResultStatus, result_payload
from kubiot_operator.controllers.commands import CommandResults, reconcile_command
from kubiot_operator.controllers.platform import Outcome
from kubiot_operator.kube.client import DEVICES
from tests.support.firmware_env import (
    API,
    Clock,
    MemoryObjects,
    RecordingMessenger,
    device_body,
    memory_platform,
    tenant_objects,
)


def command_body(name: str = "ping-all", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "DeviceCommand",
            "metadata": {"name": name, "namespace": "acme"},
            "spec": {"targets": {"selector": {"matchLabels": {"fleet": "a"}}},
                     "command": "ping", "timeoutSeconds": 10, **spec}}


class Setup:
    def __init__(self) -> None:
        self.objects = MemoryObjects()
        self.messenger = RecordingMessenger()
        self.clock = Clock()
        self.platform = memory_platform(self.objects, self.messenger, self.clock)
        self.results = CommandResults()
        self.results.attach(self.platform)
        tenant_objects(self.objects)
        for name, online in (("pump-1", True), ("pump-2", False)):
            body = device_body(name)
            body["status"]["online"] = online
            self.objects.put(body)

    async def reconcile(self, name: str = "ping-all") -> Outcome:
        body = self.objects.items[("devicecommands", "acme", name)]
        return await reconcile_command(self.platform, body)

    def status(self, name: str = "ping-all") -> dict[str, Any]:
        return dict(self.objects.items[("devicecommands", "acme", name)]["status"])

    def targets(self, name: str = "ping-all") -> dict[str, str]:
        return {t["device"]: t["state"] for t in self.status(name)["runs"][-1]["targets"]}

    async def answer(self, index: int, status: ResultStatus, message: str,
                     *, in_body_only: bool = False) -> None:
        sent = self.messenger.published[index]
        correlation = json.loads(sent.payload)["id"]
        assert sent.response_topic is not None
        self.results.on_result(sent.response_topic,
                               result_payload(correlation, status, message),
                               None if in_body_only else sent.correlation_data)
        await self.results.flush()


@pytest.fixture
def setup() -> Setup:
    return Setup()


async def test_a_command_reaches_online_targets_and_their_answers_land_in_status(
        setup: Setup) -> None:
    setup.objects.put(command_body(offlinePolicy="Fail"))

    outcome = await setup.reconcile()

    [sent] = setup.messenger.published
    assert sent.topic == "acme/devices/pump-1/cmd/ping" and not sent.retain
    assert sent.response_topic == "acme/devices/pump-1/cmd/ping/result"
    body = json.loads(sent.payload)
    assert sent.correlation_data == body["id"].encode()
    assert body["id"].startswith("ping-all/1/pump-1/") and body["params"] == {}
    assert setup.targets() == {"pump-1": "Sent", "pump-2": "Offline"}
    assert [e.reason for e in outcome.events] == ["RunStarted"]
    assert outcome.retry_after is not None and outcome.retry_after <= 1

    await setup.answer(0, ResultStatus.OK, "pong")
    assert setup.targets()["pump-1"] == "Succeeded"
    outcome = await setup.reconcile()
    status = setup.status()
    assert status["phase"] == "Failed"  # pump-2 was offline
    assert status["counts"] == {"targeted": 2, "pending": 0, "sent": 0, "succeeded": 1,
                                "failed": 0, "timedOut": 0, "offline": 1, "cancelled": 0}
    assert [e.reason for e in outcome.events] == ["RunFailed"]
    assert outcome.retry_after is None
    again = await setup.reconcile()
    assert again.events == [] and len(setup.messenger.published) == 1  # announced once


async def test_queued_targets_are_sent_when_they_come_online_and_late_ones_time_out(
        setup: Setup) -> None:
    setup.objects.put(command_body())
    await setup.reconcile()
    assert setup.targets() == {"pump-1": "Sent", "pump-2": "Pending"}

    setup.clock.advance(3)
    await setup.objects.patch(DEVICES, "pump-2", {"status": {"online": True}}, "acme")
    await setup.reconcile()
    assert [p.topic for p in setup.messenger.published] == [
        "acme/devices/pump-1/cmd/ping", "acme/devices/pump-2/cmd/ping"]
    await setup.answer(1, ResultStatus.ERROR, "busy", in_body_only=True)

    setup.clock.advance(10)
    await setup.reconcile()
    assert setup.targets() == {"pump-1": "TimedOut", "pump-2": "Failed"}
    run = setup.status()["runs"][-1]
    assert run["targets"][1]["message"] == "busy"
    assert setup.status()["phase"] == "Failed"


async def test_a_restarted_operator_sends_nothing_twice(setup: Setup) -> None:
    setup.objects.put(command_body())
    await setup.reconcile()

    restarted = memory_platform(setup.objects, setup.messenger, setup.clock)
    setup.clock.advance(1)
    body = setup.objects.items[("devicecommands", "acme", "ping-all")]
    await reconcile_command(restarted, body)

    assert len(setup.messenger.published) == 1


async def test_forged_repeated_and_foreign_answers_are_ignored(setup: Setup) -> None:
    setup.objects.put(command_body())
    await setup.reconcile()
    sent = setup.messenger.published[0]
    correlation = json.loads(sent.payload)["id"]
    forged = correlation[:-4] + "AAAA"
    setup.results.on_result(sent.response_topic or "", result_payload(
        forged, ResultStatus.OK, "pong"), None)
    setup.results.on_result("acme/devices/pump-2/cmd/ping/result", result_payload(
        correlation, ResultStatus.OK, "pong"), None)  # pump-2 answering for pump-1
    setup.results.on_result(sent.response_topic or "", b"\x00garbage", None)
    await setup.results.flush()
    assert setup.targets()["pump-1"] == "Sent"
    assert setup.results.ignored == 3

    await setup.answer(0, ResultStatus.OK, "pong")
    await setup.answer(0, ResultStatus.ERROR, "again")
    assert setup.targets()["pump-1"] == "Succeeded"
    assert (setup.results.recorded, setup.results.ignored) == (1, 4)
    answers = setup.platform.metrics.command_answers
    assert {o: answers.labels(o)._value.get() for o in ("recorded", "refused", "unmatched",
                                                        "late")} == {
        "recorded": 1, "refused": 1, "unmatched": 2, "late": 1}


async def test_a_schedule_runs_on_time_and_keeps_its_history_limit(setup: Setup) -> None:
    setup.objects.put(command_body("every-minute", schedule="* * * * *",
                                   targets={"devices": ["pump-1"]},
                                   successfulRunsHistoryLimit=2, timeoutSeconds=5))
    outcome = await setup.reconcile("every-minute")
    assert "runs" not in setup.status("every-minute") or not setup.status("every-minute")["runs"]
    assert setup.status("every-minute")["nextRun"] == "2026-01-01T00:01:00Z"
    assert outcome.retry_after == 10  # looked at again soon, in case the clock moved

    for minute in range(1, 5):
        setup.clock.now = setup.clock.now.replace(minute=minute, second=1)
        await setup.reconcile("every-minute")
        await setup.answer(len(setup.messenger.published) - 1, ResultStatus.OK, "pong")
        await setup.reconcile("every-minute")

    status = setup.status("every-minute")
    assert [r["number"] for r in status["runs"]] == [3, 4]
    assert status["runsStarted"] == 4 and status["phase"] == "Scheduled"
    assert status["lastRun"] == "2026-01-01T00:04:01Z"
    assert status["nextRun"] == "2026-01-01T00:05:00Z"
    assert [r["scheduledAt"] for r in status["runs"]] == ["2026-01-01T00:03:00Z",
                                                         "2026-01-01T00:04:00Z"]


async def test_an_invalid_schedule_is_reported_not_retried(setup: Setup) -> None:
    setup.objects.put(command_body(schedule="61 * * * *"))
    outcome = await setup.reconcile()
    status = setup.status()
    assert status["phase"] == "Failed"
    ready = status["conditions"][0]
    assert (ready["reason"], ready["status"]) == ("InvalidSchedule", "False")
    assert "minute" in ready["message"] and outcome.retry_after is None


@given(topic=st.text(max_size=80) | st.sampled_from([
           "acme/devices/pump-1/cmd/ping/result", "acme/gateways/gw/cmd/ping/result",
           "acme/devices/pump-1/cmd/x/result/extra"]),
       payload=st.binary(max_size=300), correlation=st.none() | st.binary(max_size=100))
def test_whatever_arrives_on_a_result_topic_is_queued_or_ignored_never_raised(
        topic: str, payload: bytes, correlation: bytes | None) -> None:
    results = CommandResults()
    results.on_result(topic, payload, correlation)
    assert results.ignored + results.queued == 1


async def test_a_command_at_a_time_waits_for_it(setup: Setup) -> None:
    setup.objects.put(command_body(at="2026-01-01T00:10:00Z", targets={"devices": ["pump-1"]}))
    outcome = await setup.reconcile()
    assert (setup.status()["phase"], setup.status()["nextRun"]) == ("Pending",
                                                                    "2026-01-01T00:10:00Z")
    assert setup.messenger.published == [] and outcome.retry_after == 10

    setup.clock.now = setup.clock.now.replace(minute=10)
    await setup.reconcile()
    assert setup.targets() == {"pump-1": "Sent"}
    assert "nextRun" not in setup.status()


async def test_forbid_skips_a_due_run_and_replace_cancels_the_one_under_way(
        setup: Setup) -> None:
    for name, policy in (("forbid", "Forbid"), ("replace", "Replace")):
        setup.objects.put(command_body(name, schedule="* * * * *", concurrencyPolicy=policy,
                                       targets={"devices": ["pump-1"]}, timeoutSeconds=300))
    setup.clock.now = setup.clock.now.replace(minute=1, second=1)
    for name in ("forbid", "replace"):
        await setup.reconcile(name)
    setup.clock.now = setup.clock.now.replace(minute=2, second=1)  # nobody answered

    skipped = await setup.reconcile("forbid")
    replaced = await setup.reconcile("replace")

    assert [e.reason for e in skipped.events] == ["RunSkipped"]
    assert [r["number"] for r in setup.status("forbid")["runs"]] == [1]
    runs = setup.status("replace")["runs"]
    assert [(r["number"], r["phase"]) for r in runs] == [(1, "Failed"), (2, "Running")]
    assert runs[0]["counts"]["cancelled"] == 1
    assert "RunFailed" in [e.reason for e in replaced.events]


async def test_parameters_too_large_for_a_command_are_refused_in_status(setup: Setup) -> None:
    setup.objects.put(command_body(parameters={"blob": "x" * 9000}))
    outcome = await setup.reconcile()
    ready = setup.status()["conditions"][0]
    assert (ready["reason"], setup.status()["phase"]) == ("InvalidSpec", "Failed")
    assert "parameters are larger than 8192 bytes" in ready["message"]
    assert [e.reason for e in outcome.events] == ["InvalidSpec"]
    assert setup.messenger.published == []
