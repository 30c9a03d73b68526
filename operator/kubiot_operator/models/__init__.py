"""The kubiot custom resources: pydantic models of spec and status, the CRDs' source of truth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, TypeAdapter

from kubiot_operator import API_GROUP, API_VERSION
from kubiot_operator.models.api import KubeKind
from kubiot_operator.models.command import DeviceCommandSpec, DeviceCommandStatus
from kubiot_operator.models.common import IdentityName, SubdomainName
from kubiot_operator.models.device import DeviceSpec, DeviceStatus
from kubiot_operator.models.firmware import FirmwareReleaseSpec, FirmwareReleaseStatus
from kubiot_operator.models.gateway import GatewaySpec, GatewayStatus
from kubiot_operator.models.tenant import TenantName, TenantSpec, TenantStatus


def name_rule(name_type: Any) -> dict[str, str]:
    """The CEL rule on `metadata.name` a CRD carries for a name type of the models.

    A CRD can constrain `metadata.name` only in CEL; the pattern, the length and the message
    come from the annotated type, so the CRD, `kubiot validate` and the operator agree."""
    schema = TypeAdapter(name_type).json_schema()
    pattern = schema["pattern"].replace("\\", "\\\\")  # a CEL string literal escapes `\`
    return {
        "rule": f"self.metadata.name.matches('{pattern}')"
                f" && size(self.metadata.name) <= {schema['maxLength']}",
        "message": f"metadata.name {schema['description']}",
    }


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: Literal["string", "integer", "number", "boolean", "date"] = "string"
    description: str = ""
    priority: int = 0

    def to_crd(self) -> dict[str, Any]:
        column: dict[str, Any] = {"name": self.name, "type": self.type, "jsonPath": self.json_path}
        if self.description:
            column["description"] = self.description
        if self.priority:
            column["priority"] = self.priority
        return column


def _condition(condition_type: str) -> str:
    return f'.status.conditions[?(@.type=="{condition_type}")].status'


PHASE = PrinterColumn("Phase", ".status.phase", description="Where the resource stands.")
AGE = PrinterColumn("Age", ".metadata.creationTimestamp", "date")


@dataclass(frozen=True)
class ResourceKind:
    """Everything the API server needs to serve one kind, besides its schema."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    namespaced: bool
    spec: type[BaseModel]
    status: type[BaseModel]
    description: str
    printer_columns: tuple[PrinterColumn, ...]
    #: What names the kind accepts (an annotated `str` with pattern, max_length, description).
    name_type: Any = IdentityName
    categories: tuple[str, ...] = ("kubiot", "iot")

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{API_GROUP}"

    @property
    def api_version(self) -> str:
        return f"{API_GROUP}/{API_VERSION}"

    @property
    def api(self) -> KubeKind:
        """Where the API server serves this kind."""
        return KubeKind(API_GROUP, API_VERSION, self.plural, self.namespaced)


TENANT = ResourceKind(
    kind="Tenant", plural="tenants", short_names=("tn",), namespaced=False,
    spec=TenantSpec, status=TenantStatus, name_type=TenantName,
    description="A customer or site: its namespace, certificate authority, broker topic root, "
                "quotas and telemetry ingest pipeline.",
    printer_columns=(
        PrinterColumn("Namespace", ".status.namespace"),
        PHASE,
        PrinterColumn("Devices", ".status.deviceCount", "integer"),
        PrinterColumn("Ready", _condition("Ready")),
        PrinterColumn("Ingest", _condition("IngestReady"), priority=1),
        PrinterColumn("CA-Expiry", ".status.ca.notAfter", "date", priority=1),
        AGE,
    ),
)

DEVICE = ResourceKind(
    kind="Device", plural="devices", short_names=("dev",), namespaced=True,
    spec=DeviceSpec, status=DeviceStatus,
    description="A connected device: its X.509 identity, broker access to its own topics, "
                "desired state, and what it reports.",
    printer_columns=(
        PHASE,
        PrinterColumn("Online", ".status.online", "boolean"),
        PrinterColumn("Firmware", ".status.firmware.current"),
        PrinterColumn("Cert-Expiry", ".status.certificate.notAfter", "date"),
        PrinterColumn("Model", ".spec.model", priority=1),
        PrinterColumn("Gateway", ".status.gateway", priority=1),
        PrinterColumn("Last-Seen", ".status.lastSeen", "date", priority=1),
        PrinterColumn("Telemetry", _condition("TelemetryHealthy"), priority=1,
                      description="TelemetryHealthy: the ingest's verdict on its telemetry."),
        AGE,
    ),
)

GATEWAY = ResourceKind(
    kind="Gateway", plural="gateways", short_names=("gw",), namespaced=True,
    spec=GatewaySpec, status=GatewayStatus,
    description="An edge gateway that publishes and subscribes on behalf of the devices its "
                "selector picks.",
    printer_columns=(
        PHASE,
        PrinterColumn("Online", ".status.online", "boolean"),
        PrinterColumn("Children", ".status.childCount", "integer"),
        PrinterColumn("Cert-Expiry", ".status.certificate.notAfter", "date"),
        AGE,
    ),
)

FIRMWARE_RELEASE = ResourceKind(
    kind="FirmwareRelease", plural="firmwarereleases", short_names=("fw", "fwr"),
    namespaced=True, spec=FirmwareReleaseSpec, status=FirmwareReleaseStatus,
    name_type=SubdomainName,
    description="A signed firmware image rolled out to selected devices in waves, with a "
                "failure budget that aborts and rolls back.",
    printer_columns=(
        PrinterColumn("Version", ".spec.version"),
        PHASE,
        PrinterColumn("Wave", ".status.currentWave", "integer"),
        PrinterColumn("Progress", ".status.progress"),
        PrinterColumn("Failed", ".status.counts.failed", "integer"),
        PrinterColumn("Paused", ".spec.paused", "boolean", priority=1),
        PrinterColumn("Gate", ".status.healthGate.state", priority=1,
                      description="The health gate: Soaking, Passed or Failed."),
        AGE,
    ),
)

DEVICE_COMMAND = ResourceKind(
    kind="DeviceCommand", plural="devicecommands", short_names=("dcmd",), namespaced=True,
    spec=DeviceCommandSpec, status=DeviceCommandStatus, name_type=SubdomainName,
    description="A command (ping, set, reboot, ...) sent to the devices it targets, once, at a "
                "time, or on a cron schedule, with each device's result in status.",
    printer_columns=(
        PrinterColumn("Command", ".spec.command"),
        PHASE,
        PrinterColumn("Targets", ".status.counts.targeted", "integer"),
        PrinterColumn("Succeeded", ".status.counts.succeeded", "integer"),
        PrinterColumn("Failed", ".status.counts.failed", "integer"),
        PrinterColumn("Timed-Out", ".status.counts.timedOut", "integer", priority=1),
        PrinterColumn("Offline", ".status.counts.offline", "integer"),
        PrinterColumn("Schedule", ".spec.schedule", priority=1),
        PrinterColumn("Last-Run", ".status.lastRun", "date"),
        PrinterColumn("Next-Run", ".status.nextRun", "date", priority=1),
        AGE,
    ),
)

KINDS: tuple[ResourceKind, ...] = (TENANT, DEVICE, GATEWAY, FIRMWARE_RELEASE, DEVICE_COMMAND)


def kind_named(kind: str) -> ResourceKind:
    """The ResourceKind for a `kind:` value, or KeyError."""
    for resource_kind in KINDS:
        if resource_kind.kind == kind:
            return resource_kind
    raise KeyError(f"kubiot has no kind {kind!r}; it has {', '.join(k.kind for k in KINDS)}")
