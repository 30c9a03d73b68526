"""Device: one connected thing with its identity, desired state and what it reports."""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, StringConstraints, field_validator

from kubiot_contract.health import AnomalyRule
from kubiot_operator.models.common import CertificateSummary, Conditions, KubiotModel
from kubiot_operator.models.identity import IdentitySpec

Model = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
FirmwareVersion = Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")]


MAX_DESIRED_FIELDS = 64
MAX_DESIRED_BYTES = 16 * 1024


class DeviceSpec(KubiotModel):
    model: Model | None = Field(None, description="Hardware model; firmware releases can "
                                "select devices by it.")
    suspended: bool = Field(False, description="Suspend the device: the broker refuses it and "
                            "its certificate is revoked until it is resumed.")
    identity: IdentitySpec = Field(IdentitySpec())
    desired: Annotated[dict[str, Any], Field(max_length=MAX_DESIRED_FIELDS)] | None = Field(
        None, description="Desired state, published retained to the device's `state/desired`: "
        f"at most {MAX_DESIRED_FIELDS} top-level fields and {MAX_DESIRED_BYTES // 1024} KiB as "
        "JSON.")

    @field_validator("desired")
    @classmethod
    def _desired_fits(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # Published retained on every reconcile, and part of an object etcd caps at 1.5 MiB.
        if value is not None and len(json.dumps(value, separators=(",", ":"))) > \
                MAX_DESIRED_BYTES:
            raise ValueError(f"is larger than {MAX_DESIRED_BYTES // 1024} KiB as JSON")
        return value


class DevicePhase(StrEnum):
    PENDING = "Pending"
    READY = "Ready"
    SUSPENDED = "Suspended"
    FAILED = "Failed"


class FirmwareStatus(KubiotModel):
    current: FirmwareVersion | None = Field(None, description="Version the device reports.")
    target: FirmwareVersion | None = Field(None, description="Version a release sends it.")
    release: str | None = Field(None, description="The FirmwareRelease driving the target.")
    state: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        None, description="Last `ota/status` the device reported.")
    state_version: FirmwareVersion | None = Field(
        None, description="The job version the last `ota/status` was about.")
    reason: Annotated[str, StringConstraints(max_length=256)] | None = Field(
        None, description="Why the last firmware job failed, as the device reported it.")


class LatestAnomaly(KubiotModel):
    """The newest anomaly the tenant's ingest found in the device's telemetry."""

    rule: AnomalyRule
    metric: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        None, description="The metric; none for a silent device.")
    value: float | None = Field(None, allow_inf_nan=False)
    low: float | None = Field(None, allow_inf_nan=False, description="Expected range, low end.")
    high: float | None = Field(None, allow_inf_nan=False,
                               description="Expected range, high end.")
    time: datetime


class DeviceHealth(KubiotModel):
    """The device's telemetry health, from the health reports of its tenant's ingest."""

    silent: bool | None = Field(None, description="No telemetry for longer than the tenant's "
                                "silence rule allows.")
    last_telemetry: datetime | None = Field(
        None, description="When the newest telemetry message arrived (updated with the other "
        "fields, not on every message).")
    latest_anomaly: LatestAnomaly | None = None
    anomaly_count: int | None = Field(
        None, ge=0, description="Anomalies reported since `countedSince`.")
    counted_since: datetime | None = Field(
        None, description="Since when the operator counts (its start, or the device's first "
        "report).")
    reported_at: datetime | None = Field(None, description="Time of the health report shown.")


class DeviceStatus(KubiotModel):
    observed_generation: int | None = None
    phase: DevicePhase | None = None
    conditions: Conditions | None = None
    username: str | None = Field(None, description="Broker username, also the certificate CN.")
    topic_root: str | None = None
    online: bool | None = None
    last_seen: datetime | None = None
    gateway: str | None = Field(None, description="The gateway serving this device, if any.")
    certificate: CertificateSummary | None = None
    firmware: FirmwareStatus | None = None
    reported: dict[str, Any] | None = Field(
        None, description="Last state the device reported on `state/reported`.")
    health: DeviceHealth | None = Field(
        None, description="Telemetry health as the tenant's ingest reports it (silence, "
        "anomalies); the TelemetryHealthy condition summarises it.")
