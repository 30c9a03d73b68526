"""The health gate of a rollout: soak after each wave, judge the devices updated so far, abort
and roll every updated device back past the unhealthy budget."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from kubiot_contract.health import Anomaly, AnomalyRule, HealthReport
from kubiot_operator.models.firmware import (
    FirmwareReleaseSpec,
    FirmwareReleaseStatus,
    GateName,
    GateState,
    ReleasePhase,
)
from kubiot_operator.reconcile.health import AnomalyEvent, HealthTracker, TelemetryHealth
from kubiot_operator.reconcile.release import (
    RECHECK_SECONDS,
    gate_wire,
    retry_after,
    rollout_state,
)
from kubiot_operator.reconcile.rollout import (
    HEALTH_GATE_FAILED,
    DeviceFirmware,
    RolloutPlan,
    RolloutState,
    plan_rollout,
)

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
SHA = "a" * 64
SOAK = 120
PAUSE = 60


def release(gate: dict[str, Any] | None = None, **strategy: Any) -> FirmwareReleaseSpec:
    return FirmwareReleaseSpec.model_validate({
        "version": "2.0.0",
        "artifact": {"url": "https://fw.example/2.0.0.bin", "sha256": SHA, "size": 10},
        "selector": {"model": "ps-10"},
        "strategy": {"canary": {"count": 2}, "waves": [50, 100],
                     "pauseBetweenWavesSeconds": PAUSE, "failureBudget": {"count": 0},
                     "progressDeadlineSeconds": 600,
                     "healthGate": {"soakSeconds": SOAK, **(gate or {})}, **strategy},
    })


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def healthy(**changes: Any) -> TelemetryHealth:
    """Online, and a health report of telemetry received well after any update in these tests."""
    return replace(TelemetryHealth(online=True, reported_at=at(200), received_at=at(200),
                                   metrics={"temperature": 21.5}), **changes)


class Rollout:
    """Ten devices at 1.0.0, a gated release over them, and its plans step by step."""

    def __init__(self, spec: FirmwareReleaseSpec, observed_since: datetime = T0) -> None:
        self.spec = spec
        self.devices = {f"d{i:02d}": DeviceFirmware(f"d{i:02d}", current="1.0.0")
                        for i in range(10)}
        self.observed_since = observed_since
        self.plan = self.step(0, RolloutState())

    def step(self, seconds: float, state: RolloutState | None = None) -> RolloutPlan:
        if state is None:
            state = RolloutState(self.plan.phase, self.plan.current_wave, self.plan.wave_starts,
                                 self.plan.wave_completed_at)
        self.plan = plan_rollout(self.spec, "uid", list(self.devices.values()), state, at(seconds),
                                 health_observed_since=self.observed_since)
        return self.plan

    def update(self, names: tuple[str, ...], health: TelemetryHealth | None = None) -> None:
        """The devices installed the release and report `health` (healthy by default)."""
        for name in names:
            self.devices[name] = replace(self.devices[name], current="2.0.0", ota_state="succeeded",
                                         ota_version="2.0.0", health=health or healthy())

    def sick(self, name: str, health: TelemetryHealth) -> None:
        self.devices[name] = replace(self.devices[name], health=health)


def test_a_healthy_wave_advances_only_after_the_soak_and_the_pause() -> None:
    rollout = Rollout(release())
    canary = rollout.plan.send_job
    rollout.update(canary)

    soaking = rollout.step(10)
    assert (soaking.phase, soaking.current_wave, soaking.reason) == (
        ReleasePhase.PROGRESSING, 0, "SoakingWave")
    assert soaking.gate is not None and soaking.gate.state is GateState.SOAKING
    assert soaking.gate.soak_until == at(10 + SOAK)
    assert retry_after(soaking, rollout.spec, at(10)) == RECHECK_SECONDS
    # The pause (60 s) is over, the soak (120 s) is not: the next wave waits.
    assert rollout.step(10 + PAUSE + 1).current_wave == 0

    advanced = rollout.step(10 + SOAK)
    assert (advanced.phase, advanced.current_wave) == (ReleasePhase.PROGRESSING, 1)
    assert len(advanced.send_job) == 5
    assert advanced.gate is not None and advanced.gate.state is GateState.PASSED
    assert retry_after(advanced, rollout.spec, at(10 + SOAK)) == RECHECK_SECONDS


def test_the_last_wave_soaks_before_the_release_succeeds() -> None:
    rollout = Rollout(release(waves=[100]))
    rollout.update(rollout.plan.send_job)
    rollout.step(10)
    rollout.step(10 + SOAK)
    rollout.update(rollout.plan.send_job)
    assert rollout.step(200).phase is ReleasePhase.PROGRESSING
    assert rollout.plan.reason == "SoakingWave"
    done = rollout.step(200 + SOAK)
    assert done.phase is ReleasePhase.SUCCEEDED
    assert done.gate is not None and done.gate.state is GateState.PASSED


def test_a_silent_canary_aborts_and_every_updated_device_is_rolled_back() -> None:
    rollout = Rollout(release())
    canary = rollout.plan.send_job
    rollout.update(canary)
    rollout.step(10)
    rollout.sick(canary[1], healthy(silent=True, received_at=at(30)))

    aborted = rollout.step(40)

    assert aborted.phase is ReleasePhase.ABORTED
    assert aborted.reason == HEALTH_GATE_FAILED
    assert set(aborted.roll_back) == set(canary)  # the healthy one too: it runs 2.0.0
    assert aborted.send_job == ()
    gate = aborted.gate
    assert gate is not None and gate.state is GateState.FAILED
    assert gate.failed_gate is GateName.TELEMETRY
    assert [u.device for u in gate.unhealthy] == [canary[1]]
    assert f"Telemetry gate failed on 1 of 2 updated devices (budget 0): {canary[1]} " \
           "(Telemetry: silent: no telemetry since 2026-11-30T12:00:30Z)" == aborted.message


def test_an_offline_device_fails_the_online_gate() -> None:
    rollout = Rollout(release())
    rollout.update(rollout.plan.send_job)
    rollout.sick(rollout.plan.send_job[0], healthy(online=False, presence_changed=at(8)))

    aborted = rollout.step(10)

    assert aborted.gate is not None and aborted.gate.failed_gate is GateName.ONLINE
    assert "(Online: offline since 2026-11-30T12:00:08Z)" in aborted.message


def test_offline_is_not_judged_when_the_gate_does_not_require_it() -> None:
    rollout = Rollout(release({"requireOnline": False}))
    rollout.update(rollout.plan.send_job)
    rollout.sick(rollout.plan.send_job[0], healthy(online=False))
    rollout.step(10)
    assert rollout.step(10 + SOAK).current_wave == 1


def test_anomalies_during_the_soak_beyond_the_allowance_fail_the_anomaly_gate() -> None:
    rollout = Rollout(release({"maxAnomaliesPerDevice": 2}))
    canary = rollout.plan.send_job
    rollout.update(canary)
    latest = Anomaly(rule=AnomalyRule.BOUNDS, metric="temperature", time=at(50), value=95.0,
                     low=0.0, high=60.0)
    # Three anomalies before the wave completed do not count; two during the soak are allowed.
    rollout.sick(canary[0], healthy(anomalies=(AnomalyEvent(at(5), 3), AnomalyEvent(at(50), 2)),
                                    latest=latest))
    assert rollout.step(10).phase is ReleasePhase.PROGRESSING
    rollout.sick(canary[0], healthy(anomalies=(AnomalyEvent(at(50), 2), AnomalyEvent(at(60), 1)),
                                    latest=latest))

    aborted = rollout.step(61)

    assert aborted.phase is ReleasePhase.ABORTED
    assert aborted.gate is not None and aborted.gate.failed_gate is GateName.ANOMALIES
    assert "3 anomalies during the soak, 2 allowed; latest bounds: temperature = 95 outside " \
           "[0, 60]" in aborted.message


def test_a_metric_out_of_its_bounds_fails_the_metric_gate() -> None:
    rollout = Rollout(release({"metrics": [{"metric": "temperature", "max": 60}]}))
    canary = rollout.plan.send_job
    rollout.update(canary)
    rollout.sick(canary[1], healthy(metrics={"temperature": 88.0}))

    aborted = rollout.step(10)

    assert aborted.gate is not None and aborted.gate.failed_gate is GateName.METRICS
    assert "temperature = 88 outside [-inf, 60]" in aborted.message


def test_metric_values_reported_before_the_update_are_not_judged() -> None:
    rollout = Rollout(release({"metrics": [{"metric": "temperature", "max": 60}],
                               "requireTelemetry": False}))
    canary = rollout.plan.send_job
    rollout.update(canary, healthy(reported_at=at(1), received_at=at(1),
                                   metrics={"temperature": 88.0}))
    rollout.step(10)
    assert rollout.step(10 + SOAK).current_wave == 1


def test_no_telemetry_since_the_update_fails_when_the_soak_ends() -> None:
    rollout = Rollout(release())
    canary = rollout.plan.send_job
    rollout.update(canary, healthy(received_at=at(2), reported_at=at(2)))
    assert rollout.step(10).phase is ReleasePhase.PROGRESSING
    assert rollout.step(10 + SOAK - 1).phase is ReleasePhase.PROGRESSING

    aborted = rollout.step(10 + SOAK)

    assert aborted.phase is ReleasePhase.ABORTED
    assert aborted.gate is not None and aborted.gate.failed_gate is GateName.TELEMETRY
    assert "no telemetry since the update" in aborted.message


def test_a_device_never_heard_of_fails_when_the_soak_ends() -> None:
    rollout = Rollout(release({"requireOnline": True}))
    canary = rollout.plan.send_job
    rollout.update(canary)
    rollout.sick(canary[0], TelemetryHealth())
    assert rollout.step(10).phase is ReleasePhase.PROGRESSING
    assert rollout.step(10 + SOAK).phase is ReleasePhase.ABORTED


def test_unhealthy_devices_within_the_budget_let_the_wave_advance() -> None:
    rollout = Rollout(release({"unhealthyBudget": {"count": 1}}))
    canary = rollout.plan.send_job
    rollout.update(canary)
    rollout.sick(canary[0], healthy(silent=True))
    assert rollout.step(10).phase is ReleasePhase.PROGRESSING

    advanced = rollout.step(10 + SOAK)

    assert advanced.current_wave == 1


def test_a_percentage_budget_counts_the_devices_updated_so_far() -> None:
    rollout = Rollout(release({"unhealthyBudget": {"percent": 50}}))
    canary = rollout.plan.send_job
    rollout.update(canary)
    rollout.sick(canary[0], healthy(silent=True))
    plan = rollout.step(10)
    assert plan.gate is not None and (plan.gate.budget, plan.gate.unhealthy_count) == (1, 1)
    rollout.sick(canary[1], healthy(silent=True))
    assert rollout.step(20).phase is ReleasePhase.ABORTED


def test_later_waves_judge_every_device_updated_so_far() -> None:
    rollout = Rollout(release())
    canary = rollout.plan.send_job
    rollout.update(canary)
    rollout.step(10)
    wave = rollout.step(10 + SOAK).send_job
    rollout.update(tuple(n for n in wave if n not in canary))
    soaking = rollout.step(200)
    assert soaking.gate is not None and soaking.gate.checked == 5
    rollout.sick(canary[0], healthy(online=False))  # a canary device fails in the second soak
    aborted = rollout.step(210)
    assert aborted.phase is ReleasePhase.ABORTED
    assert set(aborted.roll_back) == set(wave)


def test_failed_installs_keep_their_own_budget_and_reason() -> None:
    rollout = Rollout(release())
    canary = rollout.plan.send_job
    rollout.update(canary[:1])
    rollout.devices[canary[1]] = replace(rollout.devices[canary[1]], ota_state="failed",
                                         ota_version="2.0.0")
    aborted = rollout.step(10)
    assert (aborted.phase, aborted.reason) == (ReleasePhase.ABORTED, "FailureBudgetExceeded")
    assert aborted.roll_back == (canary[1],)


def test_a_restart_watches_a_whole_soak_again() -> None:
    # The wave completed at 10 s; the operator (its tracker) started watching at 100 s.
    rollout = Rollout(release(), observed_since=at(100))
    rollout.update(rollout.plan.send_job)
    plan = rollout.step(10)
    assert plan.gate is not None and plan.gate.soak_until == at(100 + SOAK)
    assert rollout.step(10 + SOAK).current_wave == 0
    assert rollout.step(100 + SOAK).current_wave == 1


def test_the_abort_and_its_verdict_survive_a_round_trip_through_the_status() -> None:
    rollout = Rollout(release())
    canary = rollout.plan.send_job
    rollout.update(canary)
    rollout.sick(canary[0], healthy(silent=True))
    aborted = rollout.step(10)
    assert aborted.gate is not None
    wire = {"phase": "Aborted", "currentWave": 0, "waveStartTimes": ["2026-11-30T12:00:00Z"],
            "waveCompletedAt": "2026-11-30T12:00:10Z", "healthGate": gate_wire(aborted.gate)}
    FirmwareReleaseStatus.model_validate(wire)
    state = rollout_state(wire, "digest")
    assert state.gate_failure is not None

    # Later the rolled-back devices run 1.0.0 again and look healthy: the abort stands.
    for name in canary:
        rollout.devices[name] = DeviceFirmware(name, current="1.0.0", health=healthy())
    again = rollout.step(3600, state)

    assert (again.phase, again.reason) == (ReleasePhase.ABORTED, HEALTH_GATE_FAILED)
    assert again.message == aborted.message
    assert set(again.roll_back) == set(canary)
    assert again.gate is not None and again.gate.failed_gate is GateName.TELEMETRY


def test_without_a_gate_waves_advance_on_success_alone() -> None:
    spec = release()
    spec = spec.model_copy(update={"strategy": spec.strategy.model_copy(
        update={"health_gate": None})})
    rollout = Rollout(spec)
    rollout.update(rollout.plan.send_job, TelemetryHealth(online=False, silent=True))
    rollout.step(10)
    assert rollout.step(10 + PAUSE).current_wave == 1


def test_the_tracker_folds_presence_and_reports_into_what_the_gate_reads() -> None:
    tracker = HealthTracker(T0)
    tracker.presence("acme", "d01", True, at(1))
    tracker.health("acme", "d01", HealthReport(
        time=at(10), received_at=at(9), anomalies={AnomalyRule.BOUNDS: 2, AnomalyRule.SILENT: 1},
        metrics={"temperature": 70.0}))
    # A replica's older report still adds its anomalies, but not its state.
    tracker.health("acme", "d01", HealthReport(time=at(8), received_at=at(7), silent=True,
                                               anomalies={AnomalyRule.ZSCORE: 1}))
    tracker.health("acme", "d01", HealthReport(time=at(5), received_at=at(4)))
    tracker.presence("acme", "d01", False, at(12))

    health = tracker.get("acme", "d01")

    assert health is not None
    assert (health.online, health.presence_changed) == (False, at(12))
    assert (health.reported_at, health.received_at, health.silent) == (at(10), at(9), False)
    assert health.anomalies_since(at(0)) == 3  # silences are the telemetry gate's
    assert health.anomalies_since(at(9)) == 2
    assert health.metrics == {"temperature": 70.0}
    assert tracker.get("acme", "d02") is None
    tracker.forget("acme", "d01")  # the Device was deleted
    assert tracker.get("acme", "d01") is None


def test_the_tracker_forgets_the_least_recently_heard_of_beyond_its_bound() -> None:
    tracker = HealthTracker(T0, max_devices=2)
    for name in ("a", "b", "c"):
        tracker.presence("acme", name, True, T0)
    assert len(tracker) == 2 and tracker.get("acme", "a") is None
