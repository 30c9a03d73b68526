"""Every example manifest is admitted; broken copies are refused with the field named."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubiot_contract.health import AnomalyRule
from kubiot_contract.topics import IdentityKind
from kubiot_ingest.anomaly import AnomalyDetector
from kubiot_ingest.records import telemetry_rows
from kubiot_operator.crd.validate import ResourceInvalid, validate_resource
from kubiot_operator.models import kind_named
from kubiot_operator.models.tenant import TenantSpec
from kubiot_operator.pki.ca import create_tenant_ca
from kubiot_operator.simulator.credentials import DeviceCredentials
from kubiot_operator.simulator.device import SimulatedDevice

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests" / "examples"


def _resources() -> list[dict[str, Any]]:
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and str(document.get("apiVersion", "")).startswith("kubiot.io/"):
                found.append(document)
    return found


RESOURCES = _resources()


def _id(resource: dict[str, Any]) -> str:
    return f"{resource['kind']}/{resource['metadata']['name']}"


def _example(kind: str, name: str | None = None) -> dict[str, Any]:
    for resource in RESOURCES:
        if resource["kind"] == kind and name in (None, resource["metadata"]["name"]):
            return copy.deepcopy(resource)
    raise LookupError(kind)


def test_examples_cover_every_kind_and_a_realistic_fleet() -> None:
    kinds = [r["kind"] for r in RESOURCES]
    assert {"Tenant", "Gateway", "Device", "FirmwareRelease", "DeviceCommand"} <= set(kinds)
    assert kinds.count("Device") >= 4
    gateway = _example("Gateway")
    selected = gateway["spec"]["selector"]["matchLabels"]
    children = [r for r in RESOURCES if r["kind"] == "Device"
                and selected.items() <= r["metadata"].get("labels", {}).items()]
    assert 0 < len(children) < kinds.count("Device"), "some devices sit behind the gateway"


@pytest.mark.parametrize("resource", RESOURCES, ids=_id)
def test_example_is_admitted_by_its_crd_and_parsed_by_its_model(resource: dict[str, Any]) -> None:
    defaulted = validate_resource(resource)
    kind_named(resource["kind"]).spec.model_validate(defaulted["spec"])


def _rejection(resource: dict[str, Any]) -> str:
    with pytest.raises(ResourceInvalid) as caught:
        validate_resource(resource)
    return str(caught.value)


Mutation = Callable[[dict[str, Any]], None]

BROKEN: list[tuple[str, str, Mutation, str]] = [
    # (kind, what is broken, mutation, the field the message must name)
    ("Tenant", "wrong type", lambda r: r["spec"]["quotas"].update(maxDevices="many"),
     "spec.quotas.maxDevices"),
    ("Tenant", "unknown enum value", lambda r: r["spec"]["ca"].update(keyAlgorithm="DSA-1024"),
     "spec.ca.keyAlgorithm"),
    ("Tenant", "out of range", lambda r: r["spec"]["ingest"].update(replicas=-1),
     "spec.ingest.replicas"),
    ("Tenant", "conflicting fields (CEL)",
     lambda r: r["spec"]["certificates"].update(renewBeforeDays=400),
     "spec.certificates.renewBeforeDays"),
    ("Device", "wrong type", lambda r: r["spec"].update(suspended="yes"), "spec.suspended"),
    ("Device", "unknown enum value", lambda r: r["spec"].update(identity={"type": "Magic"}),
     "spec.identity.type"),
    ("Device", "CSR type without a CSR (CEL)", lambda r: r["spec"].update(identity={"type": "CSR"}),
     "spec.identity.csr"),
    ("Device", "unknown field", lambda r: r["spec"].update(colour="red"), "spec.colour"),
    ("Device", "name that cannot be a topic level",
     lambda r: r["metadata"].update(name="Flow.Meter"), "metadata.name"),
    ("Gateway", "missing required field", lambda r: r["spec"].pop("selector"), "spec.selector"),
    ("Gateway", "selector operator without values (CEL)",
     lambda r: r["spec"]["selector"].update(matchExpressions=[{"key": "a", "operator": "In"}]),
     "spec.selector.matchExpressions[0]"),
    ("FirmwareRelease", "missing required field", lambda r: r["spec"]["artifact"].pop("sha256"),
     "spec.artifact.sha256"),
    ("FirmwareRelease", "wrong type", lambda r: r["spec"]["artifact"].update(size="1MB"),
     "spec.artifact.size"),
    ("FirmwareRelease", "unknown enum value",
     lambda r: r["spec"]["strategy"].update(onFailure="Ignore"), "spec.strategy.onFailure"),
    ("FirmwareRelease", "bad digest", lambda r: r["spec"]["artifact"].update(sha256="abc"),
     "spec.artifact.sha256"),
    ("FirmwareRelease", "count and percent together (CEL)",
     lambda r: r["spec"]["strategy"].update(failureBudget={"count": 1, "percent": 5}),
     "spec.strategy.failureBudget"),
    ("FirmwareRelease", "waves that never reach everyone (CEL)",
     lambda r: r["spec"]["strategy"].update(waves=[10, 50]), "spec.strategy.waves"),
    ("DeviceCommand", "command name that cannot be a topic level",
     lambda r: r["spec"].update(command="Re/boot"), "spec.command"),
    ("DeviceCommand", "at and schedule together (CEL)",
     lambda r: r["spec"].update(at="2026-12-01T06:00:00Z", schedule="0 6 * * *"), "spec"),
    ("DeviceCommand", "no targets (CEL)", lambda r: r["spec"].update(targets={}),
     "spec.targets"),
    ("DeviceCommand", "unknown offline policy",
     lambda r: r["spec"].update(offlinePolicy="Retry"), "spec.offlinePolicy"),
    ("DeviceCommand", "schedule with four fields",
     lambda r: r["spec"].update(schedule="0 6 * *"), "spec.schedule"),
]


@pytest.mark.parametrize(("kind", "what", "mutate", "field"), BROKEN,
                         ids=[f"{k}-{w}" for k, w, _, _ in BROKEN])
def test_broken_copy_is_rejected_naming_the_field(
    kind: str, what: str, mutate: Mutation, field: str
) -> None:
    resource = _example(kind)
    mutate(resource)
    assert field in _rejection(resource)


def test_every_error_is_reported_at_once() -> None:
    device = _example("Device")
    device["spec"].update(suspended="no", model="bad model name!")
    message = _rejection(device)
    assert "spec.suspended" in message and "spec.model" in message


def test_wrong_api_version_or_kind_is_refused() -> None:
    device = _example("Device")
    device["apiVersion"] = "kubiot.io/v1"
    assert "apiVersion" in _rejection(device)
    device["apiVersion"], device["kind"] = "kubiot.io/v1alpha1", "Thing"
    assert "kind" in _rejection(device)


def test_the_example_tenants_anomaly_rules_stay_quiet_on_the_simulators_telemetry() -> None:
    """`make dev` runs the example Tenant with simulated devices: their normal telemetry (a
    sample every 5 s, a temperature swinging by 3 degC) must raise no anomaly in 2 hours."""
    spec = TenantSpec.model_validate(_example("Tenant")["spec"])
    assert spec.anomalies is not None and spec.anomalies.active
    detector = AnomalyDetector(spec.anomalies)
    ca = create_tenant_ca("acme")
    start = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
    now = [start]
    devices = [SimulatedDevice(DeviceCredentials(
        tenant="acme", name=f"pump-{i}", username=f"acme.pump-{i}",
        topic_root=f"acme/devices/pump-{i}", broker_host="localhost", broker_port=8883,
        certificate_pem=ca.cert_pem, key_pem=ca.key_pem, broker_ca_pem=ca.cert_pem,
        firmware_key_pem=b""), clock=lambda: now[0]) for i in range(3)]
    found = []
    for seq in range(2 * 3600 // 5):
        for index, device in enumerate(devices):
            now[0] = start + timedelta(seconds=5 * seq + index * 0.3)
            payload = json.dumps(device.telemetry_sample(seq)).encode()
            booleans: set[str] = set()
            rows = telemetry_rows(device.credentials.name, None, payload, 65536, booleans)
            found += detector.observe(IdentityKind.DEVICE, device.credentials.name, rows,
                                      now[0], frozenset(booleans))
        found += detector.silences(now[0] + timedelta(seconds=1))
    assert found == []
    # While a real fault, 40 degC (within the bounds), is flagged.
    later = now[0] + timedelta(seconds=5)
    spike = [(later, "pump-0", "", 10**6, "temperature", 40.0, None)]
    assert [f.anomaly.rule for f in detector.observe(IdentityKind.DEVICE, "pump-0", spike,
                                                     later)] == [AnomalyRule.ZSCORE]
