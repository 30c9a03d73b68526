"""Health-gated rollouts on `make dev`: the tenant's real ingest evaluates its anomaly rules and
reports each device's health, the simulated pressure sensors acknowledge an update and then
go silent or send anomalous values (Device annotation `kubiot.io/simulate`), and the
operator's health gate aborts those releases and rolls the sensors back; a healthy release
soaks and completes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from kubiot_operator.kube.client import DEVICES, FIRMWARERELEASES, KubeKind
from kubiot_operator.local.objects import FileObjects
from tests.support.local_stack import Stack, pressure_sensor_release, running_stack
from tests.support.waiting import async_wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
NAMESPACE = "acme"
SENSORS = ("pressure-01", "pressure-02")  # the example release's devices, simulated directly
#: What the sensors do once they run these versions (see simulator/faults.py).
FAULTS = "silent@2.6.0,anomalous@2.7.0"


def prepare(stack: Stack) -> None:
    """Anomaly rules for the tenant, faults for the sensors, a health gate for the example."""
    tenant_file = stack.manifests / "tenant.yaml"
    tenant = yaml.safe_load(tenant_file.read_text())
    tenant["spec"]["anomalies"] = {
        "bounds": [{"metric": "temperature", "min": -20, "max": 60}],
        # The stack's devices send every 0.5 s (tests/support/local_stack.py).
        "silence": {"intervalSeconds": 0.5, "intervals": 4, "minSilenceSeconds": 2},
        "reportSeconds": 1}
    tenant_file.write_text(yaml.safe_dump(tenant, sort_keys=False))

    stack.simulate_faults(SENSORS, FAULTS)

    release_file = stack.manifests / "firmware-release.yaml"
    release = yaml.safe_load(release_file.read_text())
    release["spec"]["strategy"]["healthGate"] = {"soakSeconds": 5}
    release_file.write_text(yaml.safe_dump(release, sort_keys=False))


def release(version: str, **gate: Any) -> dict[str, Any]:
    """A release of `version` for both sensors: the canary alone, then the other."""
    return pressure_sensor_release(version, NAMESPACE, {
        "canary": {"count": 1}, "waves": [100], "pauseBetweenWavesSeconds": 1,
        "failureBudget": {"count": 0}, "progressDeadlineSeconds": 60,
        "healthGate": {"soakSeconds": 10, **gate}})


@pytest.fixture
def stack() -> Iterator[Stack]:
    with running_stack(prepare=prepare) as started:
        yield started


async def status(stack: Stack, kind: KubeKind, name: str) -> dict[str, Any]:
    body = await FileObjects(stack.root / "objects.json").get(kind, name, NAMESPACE)
    return dict((body or {}).get("status") or {})


async def settled(stack: Stack, name: str, phase: str, seconds: float) -> dict[str, Any]:
    """The release's status once it reached `phase`; fails early if it settled otherwise."""
    async def reached() -> dict[str, Any] | None:
        assert stack.process is not None and stack.process.poll() is None, stack.output()
        found = await status(stack, FIRMWARERELEASES, name)
        if found.get("phase") in ("Succeeded", "Aborted") and found["phase"] != phase:
            raise AssertionError(f"{name} is {found['phase']}, not {phase}: {found}")
        return found if found.get("phase") == phase else None

    result = await async_wait_until(reached, timeout=seconds, interval=0.5,
                                    message=f"{name} {phase}")
    assert result is not None
    return result


async def runs(stack: Stack, device: str, version: str, release_name: str) -> bool:
    firmware = (await status(stack, DEVICES, device)).get("firmware") or {}
    return (firmware.get("current"), firmware.get("release")) == (version, release_name)


async def latest_anomaly_value(stack: Stack, device: str, metric: str) -> bool:
    latest = ((await status(stack, DEVICES, device)).get("health") or {}).get("latestAnomaly")
    return bool(latest) and latest.get("metric") == metric and latest.get("value") == 95.0


def condition(found: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in found.get("conditions") or [] if c["type"] == kind), {})


async def test_bad_releases_abort_at_the_health_gate_and_a_healthy_one_completes(
        stack: Stack) -> None:
    # The example release, gated: both sensors stay healthy through both soaks.
    example = await settled(stack, "ps-10-2.4.1", "Succeeded", seconds=300)
    assert example["healthGate"]["state"] == "Passed", example
    assert example["healthGate"]["checked"] == len(SENSORS)
    for sensor in SENSORS:
        device = await status(stack, DEVICES, sensor)
        assert device["health"]["silent"] is False and "lastTelemetry" in device["health"]
        assert condition(device, "TelemetryHealthy")["status"] == "True"

    # 2.6.0 makes a sensor silent once it is installed.
    (stack.manifests / "ps-10-2.6.0.yaml").write_text(yaml.safe_dump(release("2.6.0")))
    silent = await settled(stack, "ps-10-2.6.0", "Aborted", seconds=120)
    gate = silent["healthGate"]
    assert (gate["failedGate"], gate["checked"], gate["unhealthy"]) == ("Telemetry", 1, 1)
    [canary] = [d["name"] for d in gate["devices"]]
    assert condition(silent, "Ready")["reason"] == "HealthGateFailed"
    assert canary in condition(silent, "Ready")["message"]
    await async_wait_until(lambda: runs(stack, canary, "2.4.1", "ps-10-2.4.1"), timeout=60,
                           interval=0.5, message=f"{canary} back on 2.4.1")
    [other] = set(SENSORS) - {canary}
    assert (await status(stack, DEVICES, other))["firmware"]["current"] == "2.4.1"

    # 2.7.0 makes a sensor report 95 degrees: the anomaly gate (and the metric bound) trip.
    (stack.manifests / "ps-10-2.7.0.yaml").write_text(yaml.safe_dump(release(
        "2.7.0", metrics=[{"metric": "temperature", "max": 60}])))
    anomalous = await settled(stack, "ps-10-2.7.0", "Aborted", seconds=120)
    assert anomalous["healthGate"]["failedGate"] in ("Anomalies", "Metrics")
    [canary] = [d["name"] for d in anomalous["healthGate"]["devices"]]
    # The Device's status shows it too, within its health interval (5 s in the local stack).
    await async_wait_until(lambda: latest_anomaly_value(stack, canary, "temperature"),
                           timeout=30, interval=0.5, message=f"{canary}'s anomaly in status")
    assert condition(await status(stack, DEVICES, canary), "TelemetryHealthy")["reason"] in (
        "AnomalyDetected", "Healthy")  # Healthy again once the rollback has it send 21 degrees
    await async_wait_until(lambda: runs(stack, canary, "2.4.1", "ps-10-2.4.1"), timeout=60,
                           interval=0.5, message=f"{canary} back on 2.4.1")
