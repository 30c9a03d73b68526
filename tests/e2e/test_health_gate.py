"""Health-gated rollouts end to end on the operator's side: kopf on the Kubernetes emulator, a
real Mosquitto, simulated devices that acknowledge an update and then go silent, send
anomalous values or go offline, and health reports published as the tenant's ingest publishes
them (a stand-in, `tests/support/health_reporter.py`; the local-stack test runs the real
ingest).
The tests run in order on one fleet."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from kubiot_operator.handlers import Operator
from kubiot_operator.reconcile.rollout import rollout_order
from kubiot_operator.reconcile.tenant import ingest_broker_secret_name
from kubiot_operator.simulator import Fleet, parse_faults, synthetic_image
from tests.support.firmware_env import bounded_request_history
from tests.support.health_reporter import HealthReporter
from tests.support.operator_env import API, OperatorEnv, condition, operator_env
from tests.support.waiting import async_wait_until

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

TENANT = NAMESPACE = "acme"
NAMES = [f"pump-{i:02d}" for i in range(8)]
CANARY = 2


def release(name: str, version: str, **gate: Any) -> dict[str, Any]:
    url = f"http://firmware.acme.example/pump/{version}.bin"
    image = synthetic_image(url)
    return {"apiVersion": API, "kind": "FirmwareRelease",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"version": version,
                     "artifact": {"url": url, "sha256": hashlib.sha256(image).hexdigest(),
                                  "size": len(image)},
                     "selector": {"matchLabels": {"fleet": "pumps"}},
                     "strategy": {"canary": {"count": CANARY}, "waves": [100],
                                  "pauseBetweenWavesSeconds": 0, "progressDeadlineSeconds": 20,
                                  "failureBudget": {"count": 0},
                                  "healthGate": {"soakSeconds": 6, **gate}}}}


@dataclass
class Gated:
    env: OperatorEnv
    operator: Operator
    fleet: Fleet
    reporter: HealthReporter

    async def wait_phase(self, name: str, phase: str, seconds: float = 60) -> dict[str, Any]:
        body = await self.env.wait("FirmwareRelease", name, lambda r: (
            (r or {}).get("status") or {}).get("phase") == phase, NAMESPACE, seconds)
        assert body is not None, f"{name} never reached {phase}"
        return dict(body["status"])

    async def device(self, name: str) -> dict[str, Any]:
        body = await self.env.kube.get(API, "Device", name, NAMESPACE)
        assert body is not None
        return body

    async def holders(self, release_name: str) -> list[str]:
        """The devices that were sent `release_name`'s job."""
        return [n for n in NAMES if ((await self.device(n)).get("status") or {}).get(
            "firmware", {}).get("release") == release_name]

    def events(self, name: str) -> list[str]:
        return [e.get("reason", "") for e in self.env.kube.events(name)]

    def faults(self, text: str) -> None:
        for simulated in self.fleet.devices.values():
            simulated.faults = parse_faults(text)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gated(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gated]:
    """The operator, a tenant of eight devices online at 1.0.0 sending telemetry twice a second,
    and the tenant's health reports."""
    async with operator_env(tmp_path_factory.mktemp("gate"), status_health_seconds=1) as env, \
            bounded_request_history(env.kube):
        operator = env.operator()
        async with env.running(operator):
            await env.apply({"apiVersion": API, "kind": "Tenant", "metadata": {"name": TENANT},
                             "spec": {"displayName": "ACME pumps", "namespace": NAMESPACE}})
            await env.wait("Namespace", NAMESPACE, lambda namespace: namespace is not None)
            await env.apply(*({"apiVersion": API, "kind": "Device",
                               "metadata": {"name": n, "namespace": NAMESPACE,
                                            "labels": {"fleet": "pumps"}},
                               "spec": {"model": "pump-ctl"}} for n in NAMES))
            bundles = {}
            for name in NAMES:
                await env.wait("Device", name, lambda d: (d or {}).get("status", {}).get(
                    "phase") == "Ready", NAMESPACE, timeout=60)
                bundles[name] = await env.device_credentials(name, NAMESPACE)
            secret = await env.kube.get("v1", "Secret", ingest_broker_secret_name(TENANT),
                                        NAMESPACE)
            assert secret is not None
            reporter = HealthReporter(TENANT, "127.0.0.1", env.broker.ports.service,
                                      base64.b64decode(secret["data"]["password"]).decode())
            fleet = Fleet.from_bundles(bundles, firmware="1.0.0", telemetry_seconds=0.5,
                                       check_hostname=False)
            async with reporter.running(), fleet:
                await fleet.wait_connected(30)
                yield Gated(env, operator, fleet, reporter)


async def test_a_healthy_release_soaks_and_completes(gated: Gated) -> None:
    await gated.env.apply(release("pump-1.1.0", "1.1.0"))

    status = await gated.wait_phase("pump-1.1.0", "Succeeded")

    assert status["healthGate"]["state"] == "Passed"
    assert status["healthGate"]["checked"] == len(NAMES)
    assert condition({"status": status}, "HealthGate")["status"] == "True"
    # Events are posted after the status is written: the canary's soak, then the rest's.
    await async_wait_until(lambda: _async(gated.events("pump-1.1.0").count(
        "HealthGatePassed") == 2), message="two HealthGatePassed events")
    assert {gated.fleet[n].firmware for n in NAMES} == {"1.1.0"}
    device = await gated.device(NAMES[0])
    health = device["status"]["health"]
    assert health["silent"] is False and "lastTelemetry" in health
    assert condition(device, "TelemetryHealthy")["status"] == "True"


async def test_a_canary_that_goes_silent_after_the_update_aborts_and_rolls_back(
        gated: Gated) -> None:
    gated.faults("silent@2.0.0")
    await gated.env.apply(release("pump-2.0.0", "2.0.0"))
    body = await gated.env.kube.get(API, "FirmwareRelease", "pump-2.0.0", NAMESPACE)
    assert body is not None
    canary = rollout_order(body["metadata"]["uid"], NAMES)[:CANARY]
    # The ingest's verdict reaches the Device's status (before the rollback revives it).
    device = await gated.env.wait("Device", canary[0], lambda d: (condition(
        d, "TelemetryHealthy") or {}).get("reason") == "Silent", NAMESPACE, 30)
    assert device is not None and device["status"]["health"]["silent"] is True

    status = await gated.wait_phase("pump-2.0.0", "Aborted")

    gate = status["healthGate"]
    assert (gate["state"], gate["failedGate"], gate["checked"]) == ("Failed", "Telemetry", CANARY)
    # With a failure budget of 0 the first silent canary aborts the release: the other one may
    # not have fallen silent yet, so the gate names one or both.
    named = {d["name"] for d in gate["devices"]}
    assert named and named <= set(canary), named
    assert all(d["gate"] == "Telemetry" and "silent" in d["message"] for d in gate["devices"])
    ready = condition({"status": status}, "Ready")
    assert ready["reason"] == "HealthGateFailed"
    assert all(name in ready["message"] for name in named)
    await async_wait_until(lambda: _posted(gated, "pump-2.0.0", "HealthGateFailed"))
    # Every canary device acknowledged 2.0.0 and goes back to 1.1.0, then sends again.
    assert all(any(r.version == "2.0.0" and r.state.value == "succeeded"
                   for r in gated.fleet[n].ota_reports) for n in canary)
    for name in canary:
        await async_wait_until(lambda n=name: _runs(gated, n, "1.1.0", "pump-1.1.0"), timeout=30)
    assert await gated.holders("pump-2.0.0") == []
    assert status["counts"]["succeeded"] == CANARY
    runtime = gated.operator.runtime
    assert runtime is not None
    failures = runtime.metrics.rollout_gate_failures.labels(TENANT, "pump-2.0.0", "Telemetry")
    assert failures._value.get() == 1
    assert all(r.version != "2.0.0" for n in set(NAMES) - set(canary)
               for r in gated.fleet[n].ota_reports)


async def test_a_canary_that_sends_anomalous_values_aborts_at_the_anomaly_gate(
        gated: Gated) -> None:
    gated.faults("anomalous@3.0.0")
    await gated.env.apply(release("pump-3.0.0", "3.0.0", maxAnomaliesPerDevice=2,
                                  metrics=[{"metric": "temperature", "max": 60}]))

    status = await gated.wait_phase("pump-3.0.0", "Aborted")

    gate = status["healthGate"]
    assert gate["failedGate"] in ("Anomalies", "Metrics")
    assert {d["gate"] for d in gate["devices"]} <= {"Anomalies", "Metrics"}
    assert any("temperature" in d["message"] for d in gate["devices"])
    bad = [n for n in NAMES if gated.fleet[n].faults.active("3.0.0") and any(
        r.version == "3.0.0" and r.state.value == "succeeded" for r in gated.fleet[n].ota_reports)]
    assert len(bad) == CANARY
    device = await gated.device(bad[0])
    assert device["status"]["health"]["latestAnomaly"]["value"] == 95.0
    for name in bad:
        await async_wait_until(lambda n=name: _runs(gated, n, "1.1.0", "pump-1.1.0"), timeout=30)


async def _async(value: bool) -> bool:
    return value


async def _posted(gated: Gated, name: str, reason: str) -> bool:
    return reason in gated.events(name)


async def _runs(gated: Gated, name: str, version: str, release_name: str) -> bool:
    firmware = ((await gated.device(name)).get("status") or {}).get("firmware") or {}
    return gated.fleet[name].firmware == version and firmware.get("release") == release_name \
        and firmware.get("current") == version


async def test_a_canary_that_goes_offline_aborts_at_the_online_gate(gated: Gated) -> None:
    gated.faults("offline@4.0.0")
    await gated.env.apply(release("pump-4.0.0", "4.0.0"))

    status = await gated.wait_phase("pump-4.0.0", "Aborted")

    gate = status["healthGate"]
    assert gate["failedGate"] == "Online"
    offline = [d["name"] for d in gate["devices"]]
    assert offline and all("offline since" in d["message"] for d in gate["devices"])
    assert all(not gated.fleet[n].connected.is_set() for n in offline)
    # The previous release's job waits for them, retained: once the fault is gone they come
    # back, take it, and run 1.1.0 again.
    gated.faults("")
    for name in offline:
        await async_wait_until(lambda n=name: _runs(gated, n, "1.1.0", "pump-1.1.0"), timeout=30)
