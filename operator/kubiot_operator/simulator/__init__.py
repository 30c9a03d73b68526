"""Simulated devices: real MQTT v5 clients with the credentials the operator issues."""

from kubiot_operator.simulator.artifacts import (
    ArtifactSource,
    ArtifactUnavailable,
    SyntheticArtifacts,
    UrlArtifacts,
    synthetic_image,
)
from kubiot_operator.simulator.credentials import BundleIncomplete, DeviceCredentials
from kubiot_operator.simulator.device import OtaReport, SimulatedDevice
from kubiot_operator.simulator.faults import (
    SIMULATE_ANNOTATION,
    Faults,
    HealthFault,
    parse_faults,
)
from kubiot_operator.simulator.fleet import Fleet
from kubiot_operator.simulator.ota import (
    FirmwareJob,
    JobRefused,
    Refusal,
    check_image,
    parse_job,
)
from kubiot_operator.simulator.scenario import InstallResult, Scenario

__all__ = [
    "SIMULATE_ANNOTATION",
    "ArtifactSource",
    "ArtifactUnavailable",
    "BundleIncomplete",
    "DeviceCredentials",
    "Faults",
    "FirmwareJob",
    "Fleet",
    "HealthFault",
    "InstallResult",
    "JobRefused",
    "OtaReport",
    "Refusal",
    "Scenario",
    "SimulatedDevice",
    "SyntheticArtifacts",
    "UrlArtifacts",
    "check_image",
    "parse_faults",
    "parse_job",
    "synthetic_image",
]
