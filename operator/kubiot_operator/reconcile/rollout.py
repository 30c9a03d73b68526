"""Firmware rollouts: who gets the job when, what counts as failed, when to abort and roll back.

Pure: the handler gathers the release, the devices it selects and what they report, and this
module answers. Waves are cumulative: wave 0 is the canary, wave k covers the first
`cumulative[k]` devices in rollout order, so a device never changes wave when the fleet does not.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from kubiot_contract.ota import OtaState
from kubiot_operator.models.firmware import (
    MAX_NAMED_DEVICES,
    Amount,
    FailureAction,
    FirmwareReleaseSpec,
    GateName,
    GateState,
    HealthGate,
    ReleasePhase,
    RolloutCounts,
)
from kubiot_operator.reconcile.health import TelemetryHealth, Unhealthy, judge_device

#: The reason (condition, status) of a release aborted by its health gate.
HEALTH_GATE_FAILED = "HealthGateFailed"


class DeviceOutcome(StrEnum):
    """Where one device stands in a release: what it reported (the contract's OtaState) or
    what the operator concluded without a report."""

    WAITING = "waiting"  # not in a started wave yet
    PENDING = "pending"  # job sent, nothing reported yet
    DOWNLOADING = OtaState.DOWNLOADING.value
    INSTALLING = OtaState.INSTALLING.value
    SUCCEEDED = OtaState.SUCCEEDED.value
    FAILED = OtaState.FAILED.value
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        return self in (DeviceOutcome.SUCCEEDED, DeviceOutcome.FAILED, DeviceOutcome.TIMED_OUT)

    @property
    def bad(self) -> bool:
        return self in (DeviceOutcome.FAILED, DeviceOutcome.TIMED_OUT)


@dataclass(frozen=True)
class DeviceFirmware:
    """What the operator knows about one targeted device's firmware."""

    name: str
    current: str | None = None
    ota_state: str | None = None  # last `ota/status` state for this release's version
    ota_version: str | None = None  # the version that `ota_state` is about
    health: TelemetryHealth | None = None  # what the health tracker knows (for the gate)


@dataclass(frozen=True, kw_only=True)
class GateVerdict:
    """The health gate of one wave: soaking, passed or failed, and on which devices."""

    state: GateState
    wave: int
    soak_started_at: datetime | None = None
    soak_until: datetime | None = None
    checked: int = 0
    budget: int = 0
    unhealthy: tuple[Unhealthy, ...] = ()
    unhealthy_count: int = 0  # may exceed the devices named

    @property
    def failed_gate(self) -> GateName | None:
        """The gate most unhealthy devices failed (the first in gate order on a tie)."""
        if not self.unhealthy:
            return None
        tally = Counter(u.gate for u in self.unhealthy)
        return max(GateName, key=lambda g: (tally[g], -list(GateName).index(g)))

    def summary(self) -> str:
        """`Telemetry gate failed on 2 of 5 updated devices (budget 0): pump-03 (silent: …)`."""
        named = ", ".join(f"{u.device} ({u.gate.value}: {u.message})"
                          for u in self.unhealthy[:5])
        more = self.unhealthy_count - min(5, len(self.unhealthy))
        return (f"{self.failed_gate.value if self.failed_gate else 'health'} gate failed on "
                f"{self.unhealthy_count} of {self.checked} updated devices (budget "
                f"{self.budget}): {named}" + (f" and {more} more" if more > 0 else ""))


@dataclass(frozen=True)
class RolloutState:
    """What the release's status remembers between reconciles."""

    phase: ReleasePhase = ReleasePhase.PENDING
    current_wave: int = 0
    wave_starts: tuple[datetime, ...] = ()  # when each wave up to the current one started
    wave_completed_at: datetime | None = None
    gate_failure: GateVerdict | None = None  # the gate verdict an abort was decided on


@dataclass(frozen=True, kw_only=True)
class RolloutPlan:
    phase: ReleasePhase
    current_wave: int
    waves_total: int
    wave_starts: tuple[datetime, ...]
    wave_completed_at: datetime | None
    send_job: tuple[str, ...]  # devices that must have this release's job now
    roll_back: tuple[str, ...] = ()  # devices to send their previous release
    counts: RolloutCounts = field(default_factory=RolloutCounts)
    outcomes: dict[str, DeviceOutcome] = field(default_factory=dict)
    reason: str = ""
    message: str = ""
    gate: GateVerdict | None = None

    @property
    def progress(self) -> str:
        total = len(self.outcomes)
        return f"{self.counts.succeeded}/{total}"


def rollout_order(release_uid: str, devices: list[str]) -> list[str]:
    """A stable shuffle: the same release always picks the same canary, releases differ."""
    return sorted(devices, key=lambda name: hashlib.sha256(
        f"{release_uid}/{name}".encode()).hexdigest())


def _amount(amount: Amount, total: int) -> int:
    if amount.count is not None:
        return min(amount.count, total)
    return math.ceil((amount.percent or 0) * total / 100)


def cumulative_waves(spec: FirmwareReleaseSpec, total: int) -> list[int]:
    """How many devices have the job once each wave (0 = canary) has started."""
    if total == 0:
        return []
    sizes = [max(1, _amount(spec.strategy.canary, total))]
    for percent in sorted(spec.strategy.waves):
        size = math.ceil(percent * total / 100)
        if size > sizes[-1]:
            sizes.append(size)
    if sizes[-1] < total:
        sizes.append(total)
    return sizes


def failure_budget(spec: FirmwareReleaseSpec, attempted: int) -> int:
    """How many failed or timed-out devices are tolerated among those attempted so far."""
    return _budget(spec.strategy.failure_budget, attempted)


def _budget(budget: Amount, among: int) -> int:
    if budget.count is not None:
        return budget.count
    return math.floor((budget.percent or 0) * among / 100)


def judge_wave(gate: HealthGate, wave: int, updated: list[DeviceFirmware],
               completed_at: datetime, observed_since: datetime, now: datetime) -> GateVerdict:
    """The health gate after a wave completed, over every device updated so far.

    The soak runs `soakSeconds` from the wave's completion, or from when the operator began
    watching health if that is later (after a restart it watches a full soak again)."""
    start = max(completed_at, observed_since)
    until = start + timedelta(seconds=gate.soak_seconds)
    over = now >= until
    unhealthy = [u for d in updated if (u := judge_device(
        gate, d.name, d.health, updated_by=completed_at, soak_start=start,
        soak_over=over)) is not None]
    budget = _budget(gate.unhealthy_budget, len(updated))
    state = GateState.FAILED if len(unhealthy) > budget else \
        GateState.PASSED if over else GateState.SOAKING
    return GateVerdict(state=state, wave=wave, soak_started_at=start, soak_until=until,
                       checked=len(updated), budget=budget,
                       unhealthy=tuple(unhealthy[:MAX_NAMED_DEVICES]),
                       unhealthy_count=len(unhealthy))


def outcome(device: DeviceFirmware, version: str, started: bool, deadline_passed: bool
            ) -> DeviceOutcome:
    """One device's state in this release."""
    if not started:
        return DeviceOutcome.WAITING
    reported = _reported_state(device) if device.ota_version == version else None
    if device.current == version or reported is OtaState.SUCCEEDED:
        return DeviceOutcome.SUCCEEDED
    if reported is OtaState.FAILED:
        return DeviceOutcome.FAILED
    if deadline_passed:
        return DeviceOutcome.TIMED_OUT
    if reported is not None and reported.working:
        return DeviceOutcome(reported.value)
    return DeviceOutcome.PENDING


def _reported_state(device: DeviceFirmware) -> OtaState | None:
    """The state a device last reported, if it is one the contract knows."""
    try:
        return OtaState(device.ota_state) if device.ota_state is not None else None
    except ValueError:
        return None


def plan_rollout(spec: FirmwareReleaseSpec, release_uid: str, devices: list[DeviceFirmware],
                 state: RolloutState, now: datetime, *,
                 health_observed_since: datetime | None = None) -> RolloutPlan:
    """Decide the rollout's next step from what the devices report.

    With a health gate, `health_observed_since` is when the health tracker the devices'
    `health` comes from began watching (None: as long as anyone can tell)."""
    ordered = rollout_order(release_uid, [d.name for d in devices])
    by_name = {d.name: d for d in devices}
    waves = cumulative_waves(spec, len(ordered))
    if not waves:
        return RolloutPlan(phase=ReleasePhase.PENDING, current_wave=0, waves_total=0,
                           wave_starts=(), wave_completed_at=None, send_job=(),
                           reason="NoDevices", message="the selector matches no device")
    wave = min(state.current_wave, len(waves) - 1)
    starts = state.wave_starts[:wave + 1] or (now,)
    wave = len(starts) - 1
    settled = state.phase in (ReleasePhase.ABORTED, ReleasePhase.SUCCEEDED,
                              ReleasePhase.SUPERSEDED)
    outcomes = _outcomes(spec, ordered, by_name, waves, starts, now, settled)
    counts = _counts(outcomes)
    attempted = waves[wave]
    bad = counts.failed + counts.timed_out
    roll_back = tuple(n for n in ordered if outcomes[n].bad) \
        if spec.strategy.on_failure is FailureAction.ROLLBACK else ()
    in_wave = tuple(ordered[:waves[wave]])

    def plan(phase: ReleasePhase, send: tuple[str, ...], reason: str, message: str,
             completed: datetime | None = state.wave_completed_at,
             back: tuple[str, ...] = (), gate: GateVerdict | None = None) -> RolloutPlan:
        return RolloutPlan(phase=phase, current_wave=wave, waves_total=len(waves),
                           wave_starts=starts, wave_completed_at=completed, send_job=send,
                           roll_back=back, counts=counts, outcomes=outcomes, reason=reason,
                           message=message, gate=gate)

    # Past the health gate, every device that got the job goes back, not only the failed ones:
    # they all run (or may run) the firmware the gate found unhealthy.
    updated_back = tuple(n for n in ordered if outcomes[n] is not DeviceOutcome.WAITING) \
        if spec.strategy.on_failure is FailureAction.ROLLBACK else ()
    if state.phase is ReleasePhase.SUPERSEDED:
        return plan(state.phase, (), "Superseded", "a newer release targets these devices")
    if state.phase is ReleasePhase.ABORTED and state.gate_failure is not None:
        return plan(ReleasePhase.ABORTED, (), HEALTH_GATE_FAILED, state.gate_failure.summary(),
                    state.wave_completed_at or now, updated_back, state.gate_failure)
    if state.phase is ReleasePhase.ABORTED or bad > failure_budget(spec, attempted):
        # Level-triggered: an aborted rollout keeps asking for the rollback until it is done.
        return plan(ReleasePhase.ABORTED, (), "FailureBudgetExceeded",
                    f"{bad} of {attempted} devices failed or timed out by wave {wave}; the "
                    f"budget allows {failure_budget(spec, attempted)}",
                    state.wave_completed_at or now, roll_back)
    wave_done = all(outcomes[n].terminal for n in in_wave)
    completed_at = state.wave_completed_at or (now if wave_done else None)
    if state.phase is ReleasePhase.SUCCEEDED:
        return plan(ReleasePhase.SUCCEEDED, in_wave, "RolloutComplete",
                    f"{counts.succeeded} of {len(ordered)} devices run {spec.version}",
                    completed_at)
    gate = spec.strategy.health_gate
    verdict = None
    if gate is not None and completed_at is not None:
        updated = [by_name[n] for n in in_wave if outcomes[n] is DeviceOutcome.SUCCEEDED]
        verdict = judge_wave(gate, wave, updated, completed_at,
                             health_observed_since or completed_at, now)
        if verdict.state is GateState.FAILED:
            return plan(ReleasePhase.ABORTED, (), HEALTH_GATE_FAILED, verdict.summary(),
                        completed_at, updated_back, verdict)
    soaking = verdict is not None and verdict.state is GateState.SOAKING
    if wave_done and wave == len(waves) - 1 and not soaking:
        return plan(ReleasePhase.SUCCEEDED, in_wave, "RolloutComplete",
                    f"{counts.succeeded} of {len(ordered)} devices run {spec.version}",
                    completed_at, gate=verdict)
    if spec.paused:
        return plan(ReleasePhase.PAUSED, in_wave, "Paused",
                    f"paused in wave {wave}; no new wave starts", completed_at, gate=verdict)
    if soaking:
        assert verdict is not None and verdict.soak_until is not None
        return plan(ReleasePhase.PROGRESSING, in_wave, "SoakingWave",
                    f"wave {wave} of {len(waves) - 1} complete; the {verdict.checked} devices "
                    f"updated so far must stay healthy until {_wire(verdict.soak_until)} "
                    f"({verdict.unhealthy_count} unhealthy, {verdict.budget} allowed)",
                    completed_at, gate=verdict)
    pause = timedelta(seconds=spec.strategy.pause_between_waves_seconds)
    if completed_at is not None and now >= completed_at + pause:
        wave += 1
        starts = (*starts, now)
        in_wave = tuple(ordered[:waves[wave]])
        outcomes.update({n: DeviceOutcome.PENDING for n in in_wave
                         if outcomes[n] is DeviceOutcome.WAITING})
        counts = _counts(outcomes)
        completed_at = None
    return plan(ReleasePhase.PROGRESSING, in_wave,
                "WaveInProgress" if completed_at is None else "PausingBetweenWaves",
                f"wave {wave} of {len(waves) - 1}: {waves[wave]} devices have the job",
                completed_at, gate=verdict)


def _wire(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _outcomes(spec: FirmwareReleaseSpec, ordered: list[str], by_name: dict[str, DeviceFirmware],
              waves: list[int], starts: tuple[datetime, ...], now: datetime,
              settled: bool) -> dict[str, DeviceOutcome]:
    """Each device's outcome; its deadline runs from the start of the wave it joined."""
    deadline = timedelta(seconds=spec.strategy.progress_deadline_seconds)
    outcomes = {}
    joined = 0
    for index, name in enumerate(ordered):
        while joined < len(starts) and index >= waves[joined]:
            joined += 1
        started = joined < len(starts)
        passed = settled or (started and now >= starts[joined] + deadline)
        outcomes[name] = outcome(by_name[name], spec.version, started, passed)
    return outcomes


def _counts(outcomes: dict[str, DeviceOutcome]) -> RolloutCounts:
    tally = Counter(outcomes.values())
    return RolloutCounts(
        pending=tally[DeviceOutcome.PENDING] + tally[DeviceOutcome.WAITING],
        downloading=tally[DeviceOutcome.DOWNLOADING],
        installing=tally[DeviceOutcome.INSTALLING],
        succeeded=tally[DeviceOutcome.SUCCEEDED],
        failed=tally[DeviceOutcome.FAILED],
        timed_out=tally[DeviceOutcome.TIMED_OUT],
    )
