"""Rollout decisions: waves, pauses, deadlines, the failure budget, abort and rollback."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from kubiot_operator.models.firmware import FirmwareReleaseSpec, ReleasePhase
from kubiot_operator.reconcile.rollout import (
    DeviceFirmware,
    DeviceOutcome,
    RolloutPlan,
    RolloutState,
    cumulative_waves,
    plan_rollout,
    rollout_order,
)

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
SHA = "a" * 64


def release(**strategy: Any) -> FirmwareReleaseSpec:
    return FirmwareReleaseSpec.model_validate({
        "version": "2.0.0",
        "artifact": {"url": "https://fw.example/2.0.0.bin", "sha256": SHA, "size": 10},
        "selector": {"model": "ps-10"},
        "strategy": {"canary": {"count": 2}, "waves": [25, 50, 100],
                     "pauseBetweenWavesSeconds": 60, "failureBudget": {"percent": 10},
                     "progressDeadlineSeconds": 600, **strategy},
    })


def fleet(n: int) -> list[DeviceFirmware]:
    return [DeviceFirmware(f"d{i:02d}", current="1.0.0") for i in range(n)]


def state_of(plan: RolloutPlan) -> RolloutState:
    return RolloutState(plan.phase, plan.current_wave, plan.wave_starts, plan.wave_completed_at)


def report(devices: list[DeviceFirmware], names: tuple[str, ...], state: str
           ) -> list[DeviceFirmware]:
    chosen = set(names)
    return [replace(d, ota_state=state, ota_version="2.0.0",
                    current="2.0.0" if state == "succeeded" else d.current)
            if d.name in chosen else d for d in devices]


def test_waves_are_cumulative_and_grow() -> None:
    assert cumulative_waves(release(), 40) == [2, 10, 20, 40]
    assert cumulative_waves(release(canary={"percent": 50}), 4) == [2, 4]
    assert cumulative_waves(release(), 1) == [1]
    assert cumulative_waves(release(), 0) == []


def test_rollout_order_is_stable_per_release_and_differs_between_releases() -> None:
    names = [f"d{i}" for i in range(20)]
    assert rollout_order("uid-1", names) == rollout_order("uid-1", list(reversed(names)))
    assert rollout_order("uid-1", names) != rollout_order("uid-2", names)


def test_a_healthy_rollout_walks_every_wave_with_pauses() -> None:
    spec, devices, now = release(), fleet(40), T0
    plan = plan_rollout(spec, "uid", devices, RolloutState(), now)
    assert (plan.phase, plan.current_wave, len(plan.send_job)) == (ReleasePhase.PROGRESSING, 0, 2)
    sizes = []
    for _ in range(20):
        devices = report(devices, plan.send_job, "succeeded")
        now += timedelta(seconds=30)
        plan = plan_rollout(spec, "uid", devices, state_of(plan), now)
        sizes.append(len(plan.send_job))
        if plan.phase is ReleasePhase.SUCCEEDED:
            break
    assert plan.phase is ReleasePhase.SUCCEEDED
    assert plan.counts.succeeded == 40
    assert plan.progress == "40/40"
    # Each wave waited out the 60 s pause (two 30 s steps) before the next began.
    assert sizes == [2, 2, 10, 10, 10, 20, 20, 20, 40, 40]


def test_failures_beyond_the_budget_abort_after_the_canary_and_roll_back() -> None:
    spec = release(canary={"count": 10})
    devices = fleet(50)
    plan = plan_rollout(spec, "uid", devices, RolloutState(), T0)
    canary = plan.send_job
    devices = report(devices, canary[:7], "succeeded")
    devices = report(devices, canary[7:], "failed")  # 30% of the canary fails
    plan = plan_rollout(spec, "uid", devices, state_of(plan), T0 + timedelta(seconds=5))
    assert plan.phase is ReleasePhase.ABORTED
    assert plan.reason == "FailureBudgetExceeded"
    assert set(plan.roll_back) == set(canary[7:])
    assert plan.send_job == ()
    # Nothing more is sent in later reconciles, and the rollback is still asked for.
    again = plan_rollout(spec, "uid", devices, state_of(plan), T0 + timedelta(hours=1))
    assert again.phase is ReleasePhase.ABORTED
    assert again.current_wave == 0
    assert set(again.roll_back) == set(canary[7:])


def test_failures_within_budget_continue() -> None:
    spec = release(canary={"count": 10}, failureBudget={"count": 1})
    devices = fleet(20)
    plan = plan_rollout(spec, "uid", devices, RolloutState(), T0)
    devices = report(devices, plan.send_job[:9], "succeeded")
    devices = report(devices, plan.send_job[9:], "failed")
    plan = plan_rollout(spec, "uid", devices, state_of(plan), T0 + timedelta(seconds=61))
    assert plan.phase is ReleasePhase.PROGRESSING
    assert plan.counts.failed == 1


def test_silent_devices_time_out_at_their_deadline() -> None:
    spec = release(canary={"count": 2}, failureBudget={"count": 5})
    devices = fleet(10)
    plan = plan_rollout(spec, "uid", devices, RolloutState(), T0)
    devices = report(devices, plan.send_job[:1], "downloading")
    before = plan_rollout(spec, "uid", devices, state_of(plan), T0 + timedelta(seconds=599))
    assert before.outcomes[plan.send_job[0]] is DeviceOutcome.DOWNLOADING
    assert before.counts.timed_out == 0
    after = plan_rollout(spec, "uid", devices, state_of(plan), T0 + timedelta(seconds=600))
    assert after.counts.timed_out == 2
    assert after.wave_completed_at is not None


def test_pause_holds_the_next_wave_and_resume_continues() -> None:
    spec = release()
    devices = fleet(40)
    plan = plan_rollout(spec, "uid", devices, RolloutState(), T0)
    devices = report(devices, plan.send_job, "succeeded")
    paused = plan_rollout(spec.model_copy(update={"paused": True}), "uid", devices,
                          state_of(plan), T0 + timedelta(hours=1))
    assert paused.phase is ReleasePhase.PAUSED
    assert len(paused.send_job) == 2
    resumed = plan_rollout(spec, "uid", devices, state_of(paused), T0 + timedelta(hours=2))
    assert resumed.phase is ReleasePhase.PROGRESSING
    assert resumed.current_wave == 1
    assert len(resumed.send_job) == 10


def test_no_device_selected_is_pending_with_a_reason() -> None:
    plan = plan_rollout(release(), "uid", [], RolloutState(), T0)
    assert plan.phase is ReleasePhase.PENDING
    assert plan.reason == "NoDevices"
