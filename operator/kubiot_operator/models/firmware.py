"""FirmwareRelease: a signed firmware rolled out in waves, aborted when too many devices fail."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import ConfigDict, Field, StringConstraints

from kubiot_contract.telemetry import MetricName
from kubiot_operator.models.common import (
    Conditions,
    KubiotModel,
    LabelSelector,
    cel,
    validations,
)
from kubiot_operator.models.device import FirmwareVersion, Model

Sha256 = Annotated[str, StringConstraints(pattern=r"^[a-f0-9]{64}$")]


class Artifact(KubiotModel):
    """The firmware image devices download."""

    url: Annotated[str, StringConstraints(pattern=r"^https?://\S+$", max_length=2048)]
    sha256: Sha256 = Field(description="Lower-case hex SHA-256 of the image.")
    size: int = Field(ge=1, le=4 * 1024**3, description="Image size in bytes.")


class DeviceSelector(LabelSelector):
    """Labels, and optionally the hardware model, of the devices a release targets."""

    model: Model | None = None


class Amount(KubiotModel):
    """A number of devices, absolute or as a percentage of the targeted ones."""

    model_config = ConfigDict(json_schema_extra=validations(cel(
        "has(self.count) != has(self.percent)", "set exactly one of count and percent",
    )))

    count: int | None = Field(None, ge=0, le=1_000_000)
    percent: int | None = Field(None, ge=0, le=100)


class FailureAction(StrEnum):
    ROLLBACK = "Rollback"
    HALT = "Halt"


class MetricBound(KubiotModel):
    """A range the latest value of one metric must stay in on an updated device."""

    model_config = ConfigDict(json_schema_extra=validations(
        cel("has(self.min) || has(self.max)", "set min, max or both"),
        cel("!has(self.min) || !has(self.max) || self.min <= self.max",
            "min must not be above max"),
    ))

    metric: MetricName
    min: float | None = Field(None, allow_inf_nan=False)
    max: float | None = Field(None, allow_inf_nan=False)


class HealthGate(KubiotModel):
    """What an updated device must show, for `soakSeconds` after its wave completed, before
    the next wave starts (or the release succeeds). Judged from the tenant's ingest health
    reports and the devices' presence."""

    soak_seconds: int = Field(
        300, ge=0, le=7 * 86400, description="How long the devices updated so far must stay "
        "healthy after a wave completed; runs alongside pauseBetweenWavesSeconds.")
    require_online: bool = Field(True, description="An updated device that is offline at a "
                                 "check during the soak is unhealthy.")
    require_telemetry: bool = Field(
        True, description="An updated device must send telemetry: a health report of a "
        "message received after its wave completed, and not silent.")
    max_anomalies_per_device: int = Field(
        0, ge=0, le=1_000_000, description="Anomalies (bounds or zscore rules) a device may "
        "have during the soak; one more makes it unhealthy.")
    unhealthy_budget: Amount = Field(
        Amount(count=0), description="Unhealthy devices tolerated among those updated so far; "
        "one more aborts the release.")
    metrics: Annotated[list[MetricBound], Field(max_length=16)] = Field(
        default_factory=list, description="Ranges the latest reported value of a metric must "
        "stay in.")


class RolloutStrategy(KubiotModel):
    model_config = ConfigDict(json_schema_extra=validations(
        cel("self.waves.exists(w, w == 100)", "the last wave must reach 100 percent", ".waves"),
        cel("self.waves.all(w, self.waves.filter(x, x == w).size() == 1)",
            "waves must not repeat a percentage", ".waves"),
    ))

    canary: Amount = Field(Amount(count=1),
                           description="Devices updated first, alone.")
    waves: Annotated[list[Annotated[int, Field(ge=1, le=100)]], Field(
        min_length=1, max_length=20)] = Field(
        default=[25, 50, 100],
        description="Cumulative percentages of the targeted devices, applied in ascending order "
        "after the canary.")
    pause_between_waves_seconds: int = Field(300, ge=0, le=7 * 86400)
    failure_budget: Amount = Field(
        Amount(percent=10),
        description="Failed or timed-out devices tolerated before the rollout is aborted.")
    progress_deadline_seconds: int = Field(
        1800, ge=10, le=7 * 86400, description="A device that has not succeeded by then fails.")
    on_failure: FailureAction = Field(
        FailureAction.ROLLBACK, description="Rollback sends the failed devices (and, when the "
        "health gate fails, every updated device) the previous release; Halt only stops the "
        "rollout.")
    health_gate: HealthGate | None = Field(
        None, description="Advance a wave only after the devices updated so far stayed "
        "healthy; left out, waves advance on reported success alone.")


class FirmwareReleaseSpec(KubiotModel):
    version: FirmwareVersion
    artifact: Artifact
    selector: DeviceSelector
    strategy: RolloutStrategy = Field(RolloutStrategy())
    paused: bool = Field(False, description="Pause: no new wave starts while set.")


class ReleasePhase(StrEnum):
    PENDING = "Pending"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    SUCCEEDED = "Succeeded"
    ABORTED = "Aborted"
    SUPERSEDED = "Superseded"


class RolloutCounts(KubiotModel):
    pending: int = Field(0, ge=0)
    downloading: int = Field(0, ge=0)
    installing: int = Field(0, ge=0)
    succeeded: int = Field(0, ge=0)
    failed: int = Field(0, ge=0)
    timed_out: int = Field(0, ge=0)
    rolled_back: int = Field(0, ge=0)


class GateName(StrEnum):
    """The health gate an updated device failed."""

    ONLINE = "Online"
    TELEMETRY = "Telemetry"
    ANOMALIES = "Anomalies"
    METRICS = "Metrics"


class GateState(StrEnum):
    SOAKING = "Soaking"
    PASSED = "Passed"
    FAILED = "Failed"


#: Unhealthy devices a release's status names at most.
MAX_NAMED_DEVICES = 20


class UnhealthyDevice(KubiotModel):
    name: Annotated[str, StringConstraints(max_length=253)]
    gate: GateName
    message: Annotated[str, StringConstraints(max_length=256)] = ""


class HealthGateStatus(KubiotModel):
    """Where the health gate of the current wave stands."""

    state: GateState
    wave: int = Field(ge=0, description="The wave whose soak this is (0 is the canary).")
    soak_started_at: datetime | None = None
    soak_until: datetime | None = None
    checked: int = Field(0, ge=0, description="Updated devices judged.")
    unhealthy: int = Field(0, ge=0)
    budget: int = Field(0, ge=0, description="Unhealthy devices tolerated.")
    failed_gate: GateName | None = Field(
        None, description="The gate most unhealthy devices failed.")
    devices: Annotated[list[UnhealthyDevice], Field(max_length=MAX_NAMED_DEVICES)] = Field(
        default_factory=list, description=f"Unhealthy devices, at most {MAX_NAMED_DEVICES}.")


class FirmwareReleaseStatus(KubiotModel):
    observed_generation: int | None = None
    phase: ReleasePhase | None = None
    conditions: Conditions | None = None
    targeted: int | None = Field(None, ge=0)
    current_wave: int | None = Field(None, ge=0, description="0 is the canary.")
    waves_total: int | None = Field(None, ge=0)
    counts: RolloutCounts | None = None
    progress: Annotated[str, StringConstraints(max_length=32)] | None = Field(
        None, description="Succeeded out of targeted, for `kubectl get`.")
    manifest_sha256: str | None = Field(None, description="Digest of the signed manifest.")
    wave_start_times: list[datetime] | None = Field(
        None, max_length=22, description="When each wave so far started (the canary first).")
    wave_completed_at: datetime | None = Field(
        None, description="When every device of the current wave finished.")
    superseded_by: str | None = None
    health_gate: HealthGateStatus | None = None
