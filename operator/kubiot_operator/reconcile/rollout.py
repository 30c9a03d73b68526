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
    Amount,
    FailureAction,
    FirmwareReleaseSpec,
    ReleasePhase,
    RolloutCounts,
)


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


@dataclass(frozen=True)
class RolloutState:
    """What the release's status remembers between reconciles."""

    phase: ReleasePhase = ReleasePhase.PENDING
    current_wave: int = 0
    wave_starts: tuple[datetime, ...] = ()  # when each wave up to the current one started
    wave_completed_at: datetime | None = None


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
    budget = spec.strategy.failure_budget
    if budget.count is not None:
        return budget.count
    return math.floor((budget.percent or 0) * attempted / 100)


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
                 state: RolloutState, now: datetime) -> RolloutPlan:
    """Decide the rollout's next step from what the devices report."""
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
             back: tuple[str, ...] = ()) -> RolloutPlan:
        return RolloutPlan(phase=phase, current_wave=wave, waves_total=len(waves),
                           wave_starts=starts, wave_completed_at=completed, send_job=send,
                           roll_back=back, counts=counts, outcomes=outcomes, reason=reason,
                           message=message)

    if state.phase is ReleasePhase.SUPERSEDED:
        return plan(state.phase, (), "Superseded", "a newer release targets these devices")
    if state.phase is ReleasePhase.ABORTED or bad > failure_budget(spec, attempted):
        # Level-triggered: an aborted rollout keeps asking for the rollback until it is done.
        return plan(ReleasePhase.ABORTED, (), "FailureBudgetExceeded",
                    f"{bad} of {attempted} devices failed or timed out by wave {wave}; the "
                    f"budget allows {failure_budget(spec, attempted)}",
                    state.wave_completed_at or now, roll_back)
    wave_done = all(outcomes[n].terminal for n in in_wave)
    completed_at = state.wave_completed_at or (now if wave_done else None)
    if state.phase is ReleasePhase.SUCCEEDED or (wave_done and wave == len(waves) - 1):
        return plan(ReleasePhase.SUCCEEDED, in_wave, "RolloutComplete",
                    f"{counts.succeeded} of {len(ordered)} devices run {spec.version}",
                    completed_at)
    if spec.paused:
        return plan(ReleasePhase.PAUSED, in_wave, "Paused",
                    f"paused in wave {wave}; no new wave starts", completed_at)
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
                completed_at)


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
