"""FirmwareRelease: a signed firmware rolled out in waves, aborted when too many devices fail."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import ConfigDict, Field, StringConstraints

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
        FailureAction.ROLLBACK, description="Rollback sends the failed devices the previous "
        "release; Halt only stops the rollout.")


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
