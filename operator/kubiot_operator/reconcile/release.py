"""What a FirmwareRelease decides about itself and its devices, beside the wave plan.

Pure: which release may place a device's job, which newer release supersedes this one, what a
failed device goes back to, the signed job each device gets, and what the status remembers.
`rollout.plan_rollout` decides the waves; the FirmwareRelease controller does the I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from kubiot_operator.models.firmware import (
    DeviceSelector,
    FirmwareReleaseSpec,
    GateState,
    HealthGateStatus,
    ReleasePhase,
    RolloutCounts,
    UnhealthyDevice,
)
from kubiot_operator.pki import canonical_manifest, sign_manifest
from kubiot_operator.pki.firmware import SIGNATURE_FIELD
from kubiot_operator.reconcile.health import TelemetryHealth, Unhealthy
from kubiot_operator.reconcile.rollout import (
    DeviceFirmware,
    GateVerdict,
    RolloutPlan,
    RolloutState,
)
from kubiot_operator.reconcile.selectors import device_selected

RECHECK_SECONDS = 2.0  # while devices of a wave are still working

@dataclass(frozen=True)
class ReleaseView:
    """A FirmwareRelease as the decisions need it."""

    name: str
    created: str  # creationTimestamp; RFC 3339 strings sort in time order
    spec: FirmwareReleaseSpec
    phase: str | None = None

    @property
    def age_key(self) -> tuple[str, str]:
        """Creation order; the name breaks ties between releases created in the same second."""
        return self.created, self.name


@dataclass(frozen=True)
class DeviceView:
    """A Device as the rollout needs it."""

    name: str
    labels: Mapping[str, str]
    model: str | None
    firmware: Mapping[str, Any]

    @property
    def current(self) -> str | None:
        value = self.firmware.get("current")
        return str(value) if value is not None else None

    def sent(self, release: str, version: str) -> bool:
        """Whether this device already has `release`'s job."""
        return self.firmware.get("release") == release and self.firmware.get("target") == version

    def as_rollout_input(self, health: TelemetryHealth | None = None) -> DeviceFirmware:
        state, version = self.firmware.get("state"), self.firmware.get("stateVersion")
        return DeviceFirmware(self.name, self.current, str(state) if state else None,
                              str(version) if version else None, health)

    def selected_by(self, selector: DeviceSelector) -> bool:
        return device_selected(selector, self.labels, self.model)


def may_send(device: DeviceView, release: ReleaseView, ages: Mapping[str, tuple[str, str]],
             phase: ReleasePhase) -> bool:
    """Whether this release may (re)place the device's job: never over a newer release's.

    A device whose job came from a release that no longer exists is left alone by a finished
    release (it would be a silent downgrade) but taken by one still rolling out.
    """
    holder = device.firmware.get("release")
    if not holder or holder == release.name:
        return True
    age = ages.get(str(holder))
    if age is None:
        return phase in (ReleasePhase.PROGRESSING, ReleasePhase.PAUSED)
    return age < release.age_key


def release_manifest(spec: FirmwareReleaseSpec, tenant: str, release: str) -> dict[str, Any]:
    """The manifest every device of a release gets, before it is bound to one device."""
    return {"version": spec.version, "url": spec.artifact.url, "sha256": spec.artifact.sha256,
            "size": spec.artifact.size, "release": release, "tenant": tenant}


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_manifest(manifest)).hexdigest()


def signed_job(key: Ed25519PrivateKey, manifest: Mapping[str, Any], device: str) -> bytes:
    """The `ota/job` payload for one device: its manifest plus the signature over it."""
    bound = {**manifest, "device": device}
    bound[SIGNATURE_FIELD] = sign_manifest(key, bound)
    return json.dumps(bound, sort_keys=True, separators=(",", ":")).encode()


def superseding_release(release: ReleaseView, others: Sequence[ReleaseView],
                        devices: Sequence[DeviceView]) -> str | None:
    """The newest release created after this one that targets any of the same devices."""
    mine = {d.name for d in devices if d.selected_by(release.spec.selector)}
    newer = sorted((o for o in others if o.age_key > release.age_key), key=lambda o: o.age_key,
                   reverse=True)
    for other in newer:
        if any(d.name in mine and d.selected_by(other.spec.selector) for d in devices):
            return other.name
    return None


def previous_release(release: ReleaseView, others: Sequence[ReleaseView], device: DeviceView
                     ) -> ReleaseView | None:
    """What a failed device goes back to.

    The newest release created before this one that targets the device, with another version,
    and that either Succeeded or carries the version the device still reports running.
    """
    older = sorted((o for o in others if o.age_key < release.age_key
                    and o.spec.version != release.spec.version
                    and device.selected_by(o.spec.selector)),
                   key=lambda o: o.age_key, reverse=True)
    for other in older:
        if other.phase == ReleasePhase.SUCCEEDED or other.spec.version == device.current:
            return other
    return None


def rollout_state(status: Mapping[str, Any], digest: str) -> RolloutState:
    """What the status remembers; a changed manifest (new version or artifact) starts over."""
    if not status.get("phase") or (status.get("manifestSha256") not in (None, digest)):
        return RolloutState()
    try:
        phase = ReleasePhase(status["phase"])
    except ValueError:
        return RolloutState()
    starts = tuple(_parse_time(t) for t in status.get("waveStartTimes") or [])
    completed = status.get("waveCompletedAt")
    gate = gate_verdict(status.get("healthGate"))
    return RolloutState(phase=phase, current_wave=int(status.get("currentWave") or 0),
                        wave_starts=starts,
                        wave_completed_at=_parse_time(completed) if completed else None,
                        gate_failure=gate if phase is ReleasePhase.ABORTED and gate is not None
                        and gate.state is GateState.FAILED else None)


def gate_wire(verdict: GateVerdict) -> dict[str, Any]:
    """The gate verdict as the release's `status.healthGate`."""
    return HealthGateStatus(
        state=verdict.state, wave=verdict.wave, soak_started_at=verdict.soak_started_at,
        soak_until=verdict.soak_until, checked=verdict.checked,
        unhealthy=verdict.unhealthy_count, budget=verdict.budget,
        failed_gate=verdict.failed_gate,
        devices=[UnhealthyDevice(name=u.device, gate=u.gate, message=u.message[:256])
                 for u in verdict.unhealthy]).to_wire()


def gate_verdict(wire: Any) -> GateVerdict | None:
    """`status.healthGate` read back; None when absent or unreadable."""
    if not isinstance(wire, Mapping):
        return None
    try:
        gate = HealthGateStatus.model_validate(wire)
    except ValidationError:
        return None
    return GateVerdict(state=gate.state, wave=gate.wave, soak_started_at=gate.soak_started_at,
                       soak_until=gate.soak_until, checked=gate.checked, budget=gate.budget,
                       unhealthy=tuple(Unhealthy(d.name, d.gate, d.message)
                                       for d in gate.devices),
                       unhealthy_count=gate.unhealthy)


def retry_after(plan: RolloutPlan, spec: FirmwareReleaseSpec, now: datetime) -> float | None:
    """Seconds until something can change that no watch event announces."""
    if plan.phase is not ReleasePhase.PROGRESSING:
        return None
    if plan.wave_completed_at is None:
        return RECHECK_SECONDS
    if plan.gate is not None and plan.gate.state is GateState.SOAKING:
        return RECHECK_SECONDS  # the devices updated so far are watched through the soak
    next_wave = plan.wave_completed_at.timestamp() + spec.strategy.pause_between_waves_seconds
    return max(0.1, next_wave - now.timestamp())


def wire_time(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def counts_wire(counts: RolloutCounts) -> dict[str, int]:
    return {k: int(v) for k, v in counts.model_dump(by_alias=True).items()}
