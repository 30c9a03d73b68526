"""Gateway: an edge box that speaks for the devices behind it (BLE, Modbus, LoRa children)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from kubiot_operator.models.common import (
    CertificateSummary,
    Conditions,
    DNSLabel,
    KubiotModel,
    LabelSelector,
)
from kubiot_operator.models.device import Model
from kubiot_operator.models.identity import IdentitySpec


class GatewaySpec(KubiotModel):
    selector: LabelSelector = Field(description="The devices in this namespace the gateway "
                                    "publishes and subscribes for.")
    model: Model | None = None
    suspended: bool = False
    identity: IdentitySpec = Field(IdentitySpec())
    max_children: int = Field(1000, ge=0, le=10_000, description="Refuse to serve more devices.")


class GatewayPhase(StrEnum):
    PENDING = "Pending"
    READY = "Ready"
    SUSPENDED = "Suspended"
    FAILED = "Failed"


class GatewayStatus(KubiotModel):
    observed_generation: int | None = None
    phase: GatewayPhase | None = None
    conditions: Conditions | None = None
    username: str | None = None
    topic_root: str | None = None
    online: bool | None = None
    last_seen: datetime | None = None
    children: list[DNSLabel] | None = Field(None, max_length=10_000)
    child_count: int | None = Field(None, ge=0)
    certificate: CertificateSummary | None = None
