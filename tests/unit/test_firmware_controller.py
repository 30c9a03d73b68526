"""The FirmwareRelease controller over in-memory objects: jobs, waves, abort, rollback, pause."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import pytest

from kubiot_contract.health import HealthReport
from kubiot_operator.controllers.firmware import delete_release, reconcile_release
from kubiot_operator.controllers.platform import Outcome, Platform
from kubiot_operator.kube.client import DEVICES, FIRMWARERELEASES
from kubiot_operator.models.firmware import FirmwareReleaseSpec, ReleasePhase
from kubiot_operator.pki import PKIError, public_key_pem, verify_manifest
from kubiot_operator.reconcile.health import HealthTracker
from kubiot_operator.reconcile.release import DeviceView, ReleaseView, may_send
from kubiot_operator.reconcile.reports import ReportBuffer
from tests.support.firmware_env import (
    Clock,
    MemoryObjects,
    RecordingMessenger,
    device_body,
    memory_platform,
    merge,
    release_body,
    tenant_objects,
)

FAST: dict[str, Any] = {"canary": {"count": 1}, "waves": [50, 100], "pauseBetweenWavesSeconds": 0,
        "progressDeadlineSeconds": 60}


class Fleet:
    """Ten devices in tenant acme, a platform over them, and ways to make devices report."""

    def __init__(self, devices: int = 10) -> None:
        self.objects = MemoryObjects()
        self.messenger = RecordingMessenger()
        self.clock = Clock()
        self.platform: Platform = memory_platform(self.objects, self.messenger, self.clock)
        tenant_objects(self.objects)
        self.names = [f"dev-{i:02d}" for i in range(devices)]
        for name in self.names:
            self.objects.put(device_body(name))

    def add_release(self, name: str, version: str, **strategy: Any) -> None:
        self.objects.put(release_body(name, version, **strategy))

    def release(self, name: str) -> dict[str, Any]:
        return self.objects.items[("firmwarereleases", "acme", name)]

    def device(self, name: str) -> dict[str, Any]:
        return self.objects.items[("devices", "acme", name)]

    async def reconcile(self, name: str) -> Outcome:
        outcome = await reconcile_release(self.platform, json.loads(json.dumps(
            self.release(name))))
        merge(self.release(name), {"status": outcome.status})
        return outcome

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.release(name)["status"])

    def jobs(self) -> dict[str, dict[str, Any]]:
        """The retained job per device name."""
        return {topic.split("/")[2]: json.loads(payload)
                for topic, payload in self.messenger.retained.items()
                if topic.endswith("/ota/job")}

    def report(self, device: str, state: str, version: str, *, installed: bool = False,
               reason: str | None = None) -> None:
        """What the report pump would patch after the device published `ota/status`."""
        buffer = ReportBuffer()
        root = f"acme/devices/{device}"
        payload = {"version": version, "state": state, **({"reason": reason} if reason else {})}
        buffer.add(f"{root}/ota/status", json.dumps(payload).encode(), self.clock())
        if installed:
            buffer.add(f"{root}/state/reported", json.dumps({"firmware": version}).encode(),
                       self.clock())
        for _, report in buffer.drain(10):
            self.objects.fleet.observe(merge(self.device(device),
                                             {"status": report.status_patch()}))

    def answer_jobs(self, outcome: dict[str, str]) -> None:
        """Every device holding a job it has not answered reports `outcome.get(name, ok)`."""
        for name, job in self.jobs().items():
            firmware = self.device(name)["status"].get("firmware") or {}
            if firmware.get("stateVersion") == job["version"]:
                continue
            result = outcome.get(name, "succeeded")
            self.report(name, result, job["version"], installed=result == "succeeded",
                        reason="flash write error" if result == "failed" else None)

    async def until_settled(self, release: str, outcome: dict[str, str] | None = None,
                            rounds: int = 20) -> dict[str, Any]:
        for _ in range(rounds):
            await self.reconcile(release)
            if self.status(release)["phase"] not in ("Progressing",):
                return self.status(release)
            self.answer_jobs(outcome or {})
            self.clock.advance(1)
        return self.status(release)


def events(outcome: Outcome) -> list[str]:
    return [e.reason for e in outcome.events]


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


async def test_the_canary_alone_gets_a_signed_job_bound_to_it() -> None:
    fleet = Fleet()
    fleet.add_release("fw-2", "2.0.0", **FAST)

    outcome = await fleet.reconcile("fw-2")

    status = fleet.status("fw-2")
    assert (status["phase"], status["currentWave"], status["wavesTotal"]) == ("Progressing", 0, 3)
    assert status["targeted"] == 10 and status["progress"] == "0/10"
    assert events(outcome) == ["WaveStarted"]
    assert outcome.retry_after == pytest.approx(2.0)
    [(device, job)] = fleet.jobs().items()
    assert {k: job[k] for k in ("version", "release", "tenant", "device", "sha256", "size")} == {
        "version": "2.0.0", "release": "fw-2", "tenant": "acme", "device": device,
        "sha256": "a" * 64, "size": 1024}
    key = await fleet.platform.authority.signing_key("acme")
    verify_manifest(public_key_pem(key), job, job["signature"])
    with pytest.raises(PKIError):
        verify_manifest(public_key_pem(key), {**job, "device": "dev-other"}, job["signature"])
    assert fleet.device(device)["status"]["firmware"] == {
        "current": "1.0.0", "target": "2.0.0", "release": "fw-2"}


async def test_a_job_is_published_once_per_device_however_often_it_reconciles() -> None:
    fleet = Fleet()
    fleet.add_release("fw-2", "2.0.0", **FAST)
    for _ in range(3):
        await fleet.reconcile("fw-2")
    assert len(fleet.messenger.to("/ota/job")) == 1


async def test_waves_reach_every_device_and_the_release_succeeds() -> None:
    fleet = Fleet()
    fleet.add_release("fw-2", "2.0.0", **FAST)

    status = await fleet.until_settled("fw-2")

    assert status["phase"] == "Succeeded"
    assert status["progress"] == "10/10" and status["counts"]["succeeded"] == 10
    assert len(status["waveStartTimes"]) == 3
    assert sorted(fleet.jobs()) == fleet.names
    assert len(fleet.messenger.to("/ota/job")) == 10
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "Progressing")["status"] == "False"
    gauge = fleet.platform.metrics.rollout_devices.labels("acme", "fw-2", "succeeded")
    assert gauge._value.get() == 10


async def test_too_many_failures_abort_and_send_the_previous_release() -> None:
    fleet = Fleet()
    fleet.add_release("fw-1", "1.0.0", **FAST)
    assert (await fleet.until_settled("fw-1"))["phase"] == "Succeeded"
    fleet.add_release("fw-2", "2.0.0", canary={"count": 5}, waves=[100],
                      pauseBetweenWavesSeconds=0, failureBudget={"count": 1},
                      progressDeadlineSeconds=60)
    await fleet.reconcile("fw-2")
    canary = [name for name, job in fleet.jobs().items() if job["version"] == "2.0.0"]
    assert len(canary) == 5
    failing = {name: "failed" for name in canary[:2]}
    fleet.answer_jobs(failing)

    outcome = await fleet.reconcile("fw-2")

    status = fleet.status("fw-2")
    assert status["phase"] == "Aborted"
    assert events(outcome) == ["RolloutAborted"]
    assert status["counts"]["failed"] == 2 and status["counts"]["rolledBack"] == 2
    for name in failing:
        assert fleet.jobs()[name]["release"] == "fw-1"
        assert fleet.device(name)["status"]["firmware"]["target"] == "1.0.0"
    assert sum(job["version"] == "2.0.0" for job in fleet.jobs().values()) == 3
    assert condition(status, "Ready")["reason"] == "FailureBudgetExceeded"
    assert condition(status, "RolledBack")["status"] == "True"
    aborted = fleet.platform.metrics.rollouts_aborted.labels("acme", "fw-2")
    assert aborted._value.get() == 1

    # The devices answer the rollback; the tally of the abort stays, nothing is sent again.
    fleet.answer_jobs({})
    sent = len(fleet.messenger.published)
    again = await fleet.reconcile("fw-2")
    assert fleet.status("fw-2")["counts"]["failed"] == 2
    assert events(again) == [] and aborted._value.get() == 1
    assert len(fleet.messenger.published) == sent


async def test_halt_stops_without_rolling_back() -> None:
    fleet = Fleet()
    fleet.add_release("fw-2", "2.0.0", **{**FAST, "onFailure": "Halt"})
    await fleet.reconcile("fw-2")
    fleet.answer_jobs({name: "failed" for name in fleet.names})

    await fleet.reconcile("fw-2")

    status = fleet.status("fw-2")
    assert status["phase"] == "Aborted" and status["counts"]["failed"] == 1
    assert status["counts"]["rolledBack"] == 0
    assert [job["version"] for job in fleet.jobs().values()] == ["2.0.0"]


async def test_without_a_previous_release_the_failed_devices_are_reported_stranded() -> None:
    fleet = Fleet()
    fleet.add_release("fw-2", "2.0.0", **FAST)
    await fleet.reconcile("fw-2")
    fleet.answer_jobs({name: "failed" for name in fleet.names})

    await fleet.reconcile("fw-2")

    rolled = condition(fleet.status("fw-2"), "RolledBack")
    assert (rolled["status"], rolled["reason"]) == ("False", "NoPreviousRelease")


async def test_a_device_that_never_finishes_times_out() -> None:
    fleet = Fleet()
    fleet.add_release("fw-2", "2.0.0", **{**FAST, "progressDeadlineSeconds": 10})
    await fleet.reconcile("fw-2")
    [device] = fleet.jobs()
    fleet.report(device, "downloading", "2.0.0")
    await fleet.reconcile("fw-2")
    assert fleet.status("fw-2")["counts"]["downloading"] == 1

    fleet.clock.advance(11)
    await fleet.reconcile("fw-2")

    status = fleet.status("fw-2")
    assert status["counts"]["timedOut"] == 1 and status["phase"] == "Aborted"


async def test_pause_holds_the_next_wave_until_resumed() -> None:
    fleet = Fleet()
    fleet.add_release("fw-2", "2.0.0", **FAST, paused=True)
    first = await fleet.reconcile("fw-2")
    fleet.answer_jobs({})

    outcome = await fleet.reconcile("fw-2")
    fleet.clock.advance(30)
    await fleet.reconcile("fw-2")

    status = fleet.status("fw-2")
    assert status["phase"] == "Paused" and status["currentWave"] == 0
    assert events(first) == ["WaveStarted", "RolloutPaused"]
    assert events(outcome) == [] and outcome.retry_after is None
    assert len(fleet.jobs()) == 1

    fleet.release("fw-2")["spec"]["paused"] = False
    resumed = await fleet.reconcile("fw-2")
    assert fleet.status("fw-2")["phase"] == "Progressing"
    assert fleet.status("fw-2")["currentWave"] == 1 and len(fleet.jobs()) == 5
    assert events(resumed) == ["WaveStarted", "RolloutResumed"]


async def test_the_pause_between_waves_sets_when_to_come_back() -> None:
    fleet = Fleet()
    fleet.add_release("fw-2", "2.0.0", **{**FAST, "pauseBetweenWavesSeconds": 30})
    await fleet.reconcile("fw-2")
    fleet.answer_jobs({})
    fleet.clock.advance(5)

    outcome = await fleet.reconcile("fw-2")
    assert outcome.retry_after == pytest.approx(30)
    fleet.clock.advance(12)
    assert (await fleet.reconcile("fw-2")).retry_after == pytest.approx(18)
    fleet.clock.advance(18)
    await fleet.reconcile("fw-2")
    assert fleet.status("fw-2")["currentWave"] == 1


async def test_a_newer_release_for_the_same_devices_supersedes_the_older() -> None:
    fleet = Fleet()
    fleet.add_release("fw-2", "2.0.0", **FAST)
    await fleet.reconcile("fw-2")
    fleet.add_release("fw-3", "3.0.0", **FAST)
    await fleet.reconcile("fw-3")
    sent = len(fleet.messenger.published)

    outcome = await fleet.reconcile("fw-2")
    fleet.answer_jobs({})
    await fleet.reconcile("fw-2")

    status = fleet.status("fw-2")
    assert (status["phase"], status["supersededBy"]) == ("Superseded", "fw-3")
    assert events(outcome) == ["Superseded"]
    assert len(fleet.messenger.published) == sent


async def test_a_release_for_other_devices_does_not_supersede() -> None:
    fleet = Fleet()
    fleet.objects.put(device_body("cam-1", labels={"fleet": "b"}))
    fleet.add_release("fw-2", "2.0.0", **FAST)
    other = release_body("cam-2", "2.0.0", **FAST)
    other["spec"]["selector"] = {"matchLabels": {"fleet": "b"}}
    fleet.objects.put(other)

    await fleet.reconcile("fw-2")

    assert fleet.status("fw-2")["phase"] == "Progressing"


async def test_the_model_in_the_selector_narrows_the_devices() -> None:
    fleet = Fleet()
    fleet.objects.put(device_body("old-model", model="sensor-v1"))
    body = release_body("fw-2", "2.0.0", **FAST)
    body["spec"]["selector"]["model"] = "sensor-v2"
    fleet.objects.put(body)

    await fleet.reconcile("fw-2")

    assert fleet.status("fw-2")["targeted"] == 10


async def test_a_new_version_in_the_spec_starts_the_rollout_over() -> None:
    fleet = Fleet()
    fleet.add_release("fw-2", "2.0.0", **FAST)
    await fleet.until_settled("fw-2")
    fleet.release("fw-2")["spec"]["version"] = "2.0.1"

    await fleet.reconcile("fw-2")

    status = fleet.status("fw-2")
    assert (status["phase"], status["currentWave"], status["progress"]) == (
        "Progressing", 0, "0/10")


async def test_without_a_tenant_the_release_waits() -> None:
    fleet = Fleet()
    fleet.objects.items.pop(("tenants", None, "acme"))
    fleet.add_release("fw-2", "2.0.0", **FAST)

    outcome = await fleet.reconcile("fw-2")

    assert fleet.status("fw-2")["phase"] == "Pending"
    assert outcome.retry_reason == "TenantNotFound" and not fleet.messenger.published


async def test_no_matching_device_leaves_the_release_pending() -> None:
    fleet = Fleet(devices=0)
    fleet.add_release("fw-2", "2.0.0", **FAST)

    outcome = await fleet.reconcile("fw-2")

    status = fleet.status("fw-2")
    assert status["phase"] == "Pending" and status["targeted"] == 0
    assert condition(status, "Ready")["reason"] == "NoDevices" and outcome.retry_after is None


async def test_deleting_a_release_withdraws_jobs_not_yet_installed() -> None:
    fleet = Fleet()
    fleet.add_release("fw-2", "2.0.0", **{**FAST, "canary": {"count": 2}})
    await fleet.reconcile("fw-2")
    installed, waiting = sorted(fleet.jobs())
    fleet.report(installed, "succeeded", "2.0.0", installed=True)

    await delete_release(fleet.platform, fleet.release("fw-2"))

    assert sorted(fleet.jobs()) == [installed]
    assert "target" not in fleet.device(waiting)["status"]["firmware"]
    assert fleet.device(installed)["status"]["firmware"]["target"] == "2.0.0"


async def test_wave_start_times_round_trip_through_the_status() -> None:
    fleet = Fleet()
    fleet.add_release("fw-2", "2.0.0", **FAST)
    await fleet.reconcile("fw-2")
    [start] = fleet.status("fw-2")["waveStartTimes"]
    assert datetime.fromisoformat(start) == fleet.clock.now
    assert start.endswith("Z")
    await fleet.reconcile("fw-2")
    assert fleet.status("fw-2")["waveStartTimes"] == [start]


def test_kinds_used_are_the_registered_ones() -> None:
    assert (DEVICES.plural, FIRMWARERELEASES.plural) == ("devices", "firmwarereleases")


async def test_a_finished_release_never_replaces_a_newer_releases_job() -> None:
    fleet = Fleet()
    fleet.add_release("fw-1", "1.1.0", **FAST)
    assert (await fleet.until_settled("fw-1"))["phase"] == "Succeeded"
    fleet.add_release("fw-2", "2.0.0", **FAST)
    await fleet.reconcile("fw-2")
    [(canary, job)] = [(n, j) for n, j in fleet.jobs().items() if j["version"] == "2.0.0"]

    await fleet.reconcile("fw-1")

    assert fleet.jobs()[canary] == job
    assert fleet.device(canary)["status"]["firmware"]["release"] == "fw-2"


async def test_an_aborted_release_leaves_devices_a_newer_release_has_taken() -> None:
    fleet = Fleet()
    fleet.add_release("fw-1", "1.1.0", **FAST)
    await fleet.until_settled("fw-1")
    fleet.add_release("fw-2", "2.0.0", **{**FAST, "canary": {"count": 3}})
    await fleet.reconcile("fw-2")
    canary = [n for n, j in fleet.jobs().items() if j["version"] == "2.0.0"]
    fleet.answer_jobs({canary[0]: "failed"})
    await fleet.reconcile("fw-2")  # aborts; the two still working time out next
    fleet.add_release("fw-3", "3.0.0", **{**FAST, "canary": {"percent": 100}})
    await fleet.reconcile("fw-3")
    sent = len(fleet.messenger.published)

    await fleet.reconcile("fw-2")

    assert len(fleet.messenger.published) == sent
    assert {j["version"] for j in fleet.jobs().values()} == {"3.0.0"}


def test_may_send_respects_the_age_of_the_release_holding_the_device() -> None:
    spec = FirmwareReleaseSpec.model_validate(release_body("fw-2", "2.0.0")["spec"])
    mine = ReleaseView("fw-2", "2026-01-01T00:00:05Z", spec)
    ages = {"fw-1": ("2026-01-01T00:00:01Z", "fw-1"), "fw-3": ("2026-01-01T00:00:09Z", "fw-3")}

    def holding(name: str | None) -> DeviceView:
        return DeviceView("d", {}, None, {"release": name} if name else {})

    assert may_send(holding(None), mine, ages, ReleasePhase.SUCCEEDED)
    assert may_send(holding("fw-1"), mine, ages, ReleasePhase.SUCCEEDED)
    assert not may_send(holding("fw-3"), mine, ages, ReleasePhase.PROGRESSING)
    assert may_send(holding("deleted"), mine, ages, ReleasePhase.PROGRESSING)
    assert not may_send(holding("deleted"), mine, ages, ReleasePhase.SUCCEEDED)


async def test_concurrent_reconciles_announce_and_count_an_abort_once() -> None:
    fleet = Fleet()
    fleet.add_release("fw-2", "2.0.0", **FAST)
    first = await fleet.reconcile("fw-2")
    fleet.answer_jobs({name: "failed" for name in fleet.names})
    body = json.loads(json.dumps(fleet.release("fw-2")))

    outcomes = await asyncio.gather(reconcile_release(fleet.platform, body),
                                    reconcile_release(fleet.platform, body))

    assert events(first) == ["WaveStarted"]
    assert sorted(r for o in outcomes for r in events(o)) == ["RolloutAborted"]
    assert fleet.platform.metrics.rollouts_aborted.labels("acme", "fw-2")._value.get() == 1
    assert fleet.status("fw-2")["phase"] == "Aborted"


def test_an_ota_status_report_carries_its_job_version_and_reason_into_status() -> None:
    buffer = ReportBuffer()
    root = "acme/devices/dev-01"
    buffer.add(f"{root}/ota/status", b'{"state":"failed","version":"2.0.0","reason":"X"}',
               datetime(2026, 1, 1))
    [(_, failed)] = buffer.drain(1)
    assert failed.status_patch()["firmware"] == {"state": "failed", "stateVersion": "2.0.0",
                                                 "reason": "X"}
    buffer.add(f"{root}/ota/status", b'{"state":"succeeded","version":"2.0.0"}',
               datetime(2026, 1, 1))
    [(_, succeeded)] = buffer.drain(1)
    assert succeeded.status_patch()["firmware"] == {"state": "succeeded",
                                                    "stateVersion": "2.0.0", "reason": None}


GATED: dict[str, Any] = {"canary": {"count": 2}, "waves": [100], "pauseBetweenWavesSeconds": 0,
                         "progressDeadlineSeconds": 60,
                         "healthGate": {"soakSeconds": 30, "unhealthyBudget": {"count": 0}}}


def gated_fleet() -> Fleet:
    fleet = Fleet(devices=6)
    fleet.platform.health = HealthTracker(fleet.clock())
    for name in fleet.names:
        fleet.platform.health.presence("acme", name, True, fleet.clock())
    return fleet


def telemetry(fleet: Fleet, names: list[str], **fields: Any) -> None:
    """The ingest reports each device's telemetry as of now."""
    for name in names:
        fleet.platform.health.health("acme", name, HealthReport(
            time=fleet.clock(), received_at=fleet.clock(), **fields))


async def test_a_gated_release_soaks_each_wave_and_succeeds_when_healthy() -> None:
    fleet = gated_fleet()
    fleet.add_release("fw-1", "1.0.0", **GATED)
    await fleet.reconcile("fw-1")
    fleet.answer_jobs({})
    fleet.clock.advance(1)
    outcome = await fleet.reconcile("fw-1")

    status = fleet.status("fw-1")
    assert (status["phase"], status["healthGate"]["state"]) == ("Progressing", "Soaking")
    assert condition(status, "Progressing")["reason"] == "SoakingWave"
    assert outcome.retry_after == pytest.approx(2.0)
    fleet.clock.advance(10)
    telemetry(fleet, fleet.names)
    fleet.clock.advance(21)
    outcome = await fleet.reconcile("fw-1")
    assert events(outcome) == ["HealthGatePassed", "WaveStarted"]
    assert fleet.status("fw-1")["currentWave"] == 1

    status = await fleet.until_settled("fw-1")
    assert status["phase"] == "Progressing"  # the last wave soaks too
    fleet.clock.advance(5)
    telemetry(fleet, fleet.names)
    fleet.clock.advance(30)
    await fleet.reconcile("fw-1")
    status = fleet.status("fw-1")
    assert status["phase"] == "Succeeded"
    assert status["healthGate"]["state"] == "Passed"
    assert condition(status, "HealthGate")["status"] == "True"


async def test_a_gate_failure_aborts_names_the_gate_and_rolls_every_updated_device_back(
        ) -> None:
    fleet = gated_fleet()
    fleet.add_release("fw-1", "1.0.0", canary={"count": 1}, waves=[100],
                      pauseBetweenWavesSeconds=0)
    assert (await fleet.until_settled("fw-1"))["phase"] == "Succeeded"
    fleet.add_release("fw-2", "2.0.0", **GATED)
    await fleet.reconcile("fw-2")
    canary = [name for name, job in fleet.jobs().items() if job["version"] == "2.0.0"]
    fleet.answer_jobs({})
    fleet.clock.advance(1)
    await fleet.reconcile("fw-2")
    fleet.clock.advance(5)
    telemetry(fleet, canary[:1])
    telemetry(fleet, canary[1:], silent=True)

    outcome = await fleet.reconcile("fw-2")

    status = fleet.status("fw-2")
    assert status["phase"] == "Aborted"
    assert events(outcome) == ["RolloutAborted", "HealthGateFailed"]
    gate = status["healthGate"]
    assert (gate["state"], gate["failedGate"], gate["unhealthy"], gate["checked"]) == (
        "Failed", "Telemetry", 1, 2)
    assert [d["name"] for d in gate["devices"]] == canary[1:]
    ready = condition(status, "Ready")
    assert ready["reason"] == "HealthGateFailed" and canary[1] in ready["message"]
    assert condition(status, "HealthGate")["status"] == "False"
    for name in canary:  # the healthy one as well: it runs 2.0.0
        assert fleet.jobs()[name]["release"] == "fw-1"
    assert status["counts"]["rolledBack"] == 2
    metrics = fleet.platform.metrics
    assert metrics.rollout_gate_failures.labels("acme", "fw-2", "Telemetry")._value.get() == 1
    assert metrics.rollouts_aborted.labels("acme", "fw-2")._value.get() == 1

    # The rollback is answered and the devices look healthy on 1.0.0: the abort and its
    # verdict stand, and nothing is announced or counted again.
    fleet.answer_jobs({})
    telemetry(fleet, canary)
    again = await fleet.reconcile("fw-2")
    assert events(again) == []
    assert fleet.status("fw-2")["healthGate"]["failedGate"] == "Telemetry"
    assert condition(fleet.status("fw-2"), "Ready")["reason"] == "HealthGateFailed"
