"""Firmware rollouts end to end: kopf on the Kubernetes emulator, a real Mosquitto with mutual TLS
and dynamic security, and fifty simulated devices connecting with the certificates the operator
issued. The fleet is provisioned once for the module; the tests run in order on it."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import pytest
import pytest_asyncio

from kubiot_contract.topics import OPERATOR_USERNAME, device_root, ota_job_topic
from kubiot_operator.handlers import Operator
from kubiot_operator.reconcile.rollout import rollout_order
from kubiot_operator.simulator import Fleet, InstallResult, Scenario, synthetic_image
from tests.support.firmware_env import bounded_request_history
from tests.support.operator_env import API, OperatorEnv, operator_env
from tests.support.waiting import async_wait_until

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

TENANT = NAMESPACE = "acme"
FLEET_SIZE = 50
NAMES = [f"pump-{i:02d}" for i in range(FLEET_SIZE)]
STEP_SECONDS = 0.05


def ring(name: str) -> str:
    """Each device is in one of five rings of ten, so a test can target a slice of the fleet."""
    return f"r{int(name.split('-')[1]) % 5}"


def artifact(version: str, *, sha256: str | None = None) -> dict[str, Any]:
    url = f"http://firmware.acme.example/pump/{version}.bin"
    image = synthetic_image(url)
    return {"url": url, "sha256": sha256 or hashlib.sha256(image).hexdigest(),
            "size": len(image)}


def release(name: str, version: str, *, selector: dict[str, Any] | None = None,
            sha256: str | None = None, paused: bool = False, **strategy: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "FirmwareRelease",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"version": version, "artifact": artifact(version, sha256=sha256),
                     "selector": selector or {"matchLabels": {"fleet": "pumps"}},
                     "paused": paused,
                     "strategy": {"pauseBetweenWavesSeconds": 1, "progressDeadlineSeconds": 20,
                                  **strategy}}}


@dataclass
class Rollouts:
    env: OperatorEnv
    operator: Operator
    fleet: Fleet

    async def release(self, name: str) -> dict[str, Any]:
        body = await self.env.kube.get(API, "FirmwareRelease", name, NAMESPACE)
        assert body is not None
        return body

    async def wait_phase(self, name: str, phase: str, seconds: float = 30) -> dict[str, Any]:
        body = await self.env.wait("FirmwareRelease", name, lambda r: (
            (r or {}).get("status") or {}).get("phase") == phase, NAMESPACE, seconds)
        assert body is not None
        return dict(body["status"])

    async def device_firmware(self, name: str) -> dict[str, Any]:
        body = await self.env.kube.get(API, "Device", name, NAMESPACE)
        return dict(((body or {}).get("status") or {}).get("firmware") or {})

    def event_reasons(self, name: str) -> list[str]:
        return [e.get("reason", "") for e in self.env.kube.events(name)]

    async def wait_event(self, name: str, reason: str) -> None:
        """Events are posted after the status is written; wait for this one."""
        async def posted() -> bool:
            return reason in self.event_reasons(name)
        await async_wait_until(posted, message=f"event {reason} about {name}")

    async def restart_fleet(self) -> None:
        self.fleet.start()
        await self.fleet.wait_connected(30)


def device(name: str) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "Device",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": {"fleet": "pumps", "ring": ring(name)}},
            "spec": {"model": "pump-ctl"}}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rollouts(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rollouts]:
    """The operator running, a tenant with fifty devices, and the devices online at 1.0.0."""
    async with operator_env(tmp_path_factory.mktemp("firmware")) as env, \
            bounded_request_history(env.kube):
        operator = env.operator()
        async with env.running(operator):
            await env.apply({"apiVersion": API, "kind": "Tenant", "metadata": {"name": TENANT},
                             "spec": {"displayName": "ACME pumps", "namespace": NAMESPACE}})
            await env.wait("Namespace", NAMESPACE, lambda namespace: namespace is not None)
            await env.apply(*(device(n) for n in NAMES))
            bundles = {}
            for name in NAMES:
                await env.wait("Secret", f"{name}-device-credentials", lambda s: s is not None,
                               NAMESPACE, timeout=60)
                await env.wait("Device", name, lambda d: (d or {}).get("status", {}).get(
                    "phase") == "Ready", NAMESPACE, timeout=60)
                bundles[name] = await env.device_credentials(name, NAMESPACE)
            fleet = Fleet.from_bundles(bundles, firmware="1.0.0", telemetry_seconds=30,
                                       check_hostname=False)
            async with fleet:
                await fleet.wait_connected(30)
                yield Rollouts(env, operator, fleet)


async def test_a_release_reaches_all_fifty_devices_in_its_waves(rollouts: Rollouts) -> None:
    await rollouts.env.apply(release("pump-1.1.0", "1.1.0", canary={"count": 5},
                                     waves=[50, 100], failureBudget={"percent": 10}))

    status = await rollouts.wait_phase("pump-1.1.0", "Succeeded", seconds=45)

    assert status["progress"] == "50/50" and status["counts"]["succeeded"] == 50
    assert status["wavesTotal"] == 3 and len(status["waveStartTimes"]) == 3
    assert set(rollouts.fleet.firmware().values()) == {"1.1.0"}
    for name in NAMES:
        firmware = await rollouts.device_firmware(name)
        assert (firmware["current"], firmware["release"]) == ("1.1.0", "pump-1.1.0")
    await rollouts.wait_event("pump-1.1.0", "RolloutSucceeded")
    assert rollouts.event_reasons("pump-1.1.0").count("WaveStarted") == 3


async def test_too_many_failures_abort_after_the_canary_and_roll_back(
        rollouts: Rollouts) -> None:
    # Offline while the release is created, so the failing devices can be chosen with the
    # release's canary in view: three of its ten, fifteen of fifty overall.
    await rollouts.fleet.stop()
    await rollouts.env.apply(release("pump-2.0.0", "2.0.0", canary={"percent": 20},
                                     waves=[60, 100], failureBudget={"percent": 10}))
    body = await rollouts.release("pump-2.0.0")
    canary = rollout_order(body["metadata"]["uid"], NAMES)[:10]
    scenario = failing_scenario(canary, "2.0.0")
    failing = {n for n in NAMES if scenario.result_for(n, "2.0.0") is InstallResult.FAIL}
    assert len(failing) == 15 and len(failing & set(canary)) >= 2
    for simulated in rollouts.fleet.devices.values():
        simulated.scenario = scenario
    await rollouts.restart_fleet()

    status = await rollouts.wait_phase("pump-2.0.0", "Aborted")

    assert status["currentWave"] == 0 and len(status["waveStartTimes"]) == 1
    assert status["counts"]["failed"] >= 2
    await rollouts.wait_event("pump-2.0.0", "RolloutAborted")
    for name in failing & set(canary):
        await async_wait_until(_firmware_check(rollouts, name, "pump-1.1.0", "1.1.0"),
                               timeout=20)
        assert rollouts.fleet[name].firmware == "1.1.0"
    outside = set(NAMES) - set(canary)
    assert all(r.version != "2.0.0" for n in outside for r in rollouts.fleet[n].ota_reports)
    aborted = rollouts.operator.runtime
    assert aborted is not None
    assert aborted.metrics.rollouts_aborted.labels(TENANT, "pump-2.0.0")._value.get() == 1
    final = dict((await rollouts.release("pump-2.0.0"))["status"])
    assert final["counts"]["rolledBack"] >= len(failing & set(canary))
    for simulated in rollouts.fleet.devices.values():
        simulated.scenario = Scenario.succeed()


async def test_a_tampered_artifact_hash_is_refused_and_counted_failed(
        rollouts: Rollouts) -> None:
    await rollouts.env.apply(release("pump-3.0.0", "3.0.0", sha256="0" * 64,
                                     selector={"matchLabels": {"ring": "r1"}},
                                     canary={"count": 1}, waves=[100], onFailure="Halt",
                                     failureBudget={"count": 0}))

    status = await rollouts.wait_phase("pump-3.0.0", "Aborted")

    assert status["counts"]["failed"] == 1
    [canary] = [n for n in NAMES if ring(n) == "r1"
                and (await rollouts.device_firmware(n)).get("release") == "pump-3.0.0"]
    await async_wait_until(lambda: _reason_is(rollouts, canary, "ArtifactHashMismatch"))
    assert rollouts.fleet[canary].firmware != "3.0.0"


async def test_a_tampered_manifest_is_refused_and_counted_failed(rollouts: Rollouts) -> None:
    await rollouts.fleet.stop()
    await rollouts.env.apply(release("pump-3.1.0", "3.1.0",
                                     selector={"matchLabels": {"ring": "r2"}},
                                     canary={"count": 1}, waves=[100], onFailure="Halt",
                                     failureBudget={"count": 0}))
    canary = await async_wait_until(lambda: _job_sent(rollouts, "pump-3.1.0", "r2"))
    assert canary is not None
    # Someone with access to the broker points the signed job at another image.
    await rewrite_retained_job(rollouts.env, canary, url="http://evil.example/3.1.0.bin")
    await rollouts.restart_fleet()

    status = await rollouts.wait_phase("pump-3.1.0", "Aborted")

    assert status["counts"]["failed"] == 1
    await async_wait_until(lambda: _reason_is(rollouts, canary, "BadSignature"))
    assert rollouts.fleet[canary].firmware != "3.1.0"


async def test_pause_stops_new_waves_until_resumed(rollouts: Rollouts) -> None:
    await rollouts.env.apply(release("pump-4.0.0", "4.0.0", paused=True,
                                     selector={"matchLabels": {"ring": "r3"}},
                                     canary={"count": 1}, waves=[50, 100],
                                     pauseBetweenWavesSeconds=0))
    await rollouts.env.wait("FirmwareRelease", "pump-4.0.0", lambda r: (
        (r or {}).get("status") or {}).get("counts", {}).get("succeeded") == 1, NAMESPACE)
    # Several rechecks (the timer runs every few seconds) pass without a new wave.
    await asyncio.sleep(6)
    status = dict((await rollouts.release("pump-4.0.0"))["status"])
    assert (status["phase"], status["currentWave"]) == ("Paused", 0)
    ring_devices = [n for n in NAMES if ring(n) == "r3"]
    assert sum(rollouts.fleet[n].firmware == "4.0.0" for n in ring_devices) == 1

    await rollouts.env.kube.patch(API, "FirmwareRelease", "pump-4.0.0",
                                  {"spec": {"paused": False}}, namespace=NAMESPACE)

    status = await rollouts.wait_phase("pump-4.0.0", "Succeeded")
    assert len(status["waveStartTimes"]) == 3
    assert all(rollouts.fleet[n].firmware == "4.0.0" for n in ring_devices)


# --- helpers ---------------------------------------------------------------------------------


def failing_scenario(canary: list[str], version: str) -> Scenario:
    """A 30% failing scenario (by device name) that hits at least two of the canary."""
    for seed in range(100_000):
        scenario = Scenario.failing_fraction(0.3, seed=str(seed), step_seconds=STEP_SECONDS,
                                             versions=frozenset({version}))
        failing = {n for n in NAMES if scenario.result_for(n, version) is InstallResult.FAIL}
        if len(failing) == 15 and len(failing & set(canary)) == 3:
            return scenario
    raise AssertionError("no seed gives the wanted failures")


def _firmware_check(rollouts: Rollouts, name: str, release_name: str, version: str
                    ) -> Callable[[], Awaitable[bool]]:
    """Whether the device runs `version` from `release_name`, in its status and in fact."""
    async def check() -> bool:
        firmware = await rollouts.device_firmware(name)
        return firmware.get("release") == release_name and firmware.get("current") == version \
            and rollouts.fleet[name].firmware == version
    return check


async def _reason_is(rollouts: Rollouts, name: str, reason: str) -> bool:
    firmware = await rollouts.device_firmware(name)
    return firmware.get("state") == "failed" and firmware.get("reason") == reason


async def _job_sent(rollouts: Rollouts, release_name: str, ring_name: str) -> str | None:
    for name in NAMES:
        if ring(name) == ring_name and \
                (await rollouts.device_firmware(name)).get("release") == release_name:
            return name
    return None


async def rewrite_retained_job(env: OperatorEnv, device_name: str, **changes: Any) -> None:
    """Replace the retained job of a device with a changed copy, keeping its signature."""
    topic = ota_job_topic(device_root(TENANT, device_name))
    async with aiomqtt.Client("127.0.0.1", env.broker.ports.service, username=OPERATOR_USERNAME,
                              password=env.settings.broker_admin_password.get_secret_value(),
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                job = json.loads(message.payload)
                break
        await client.publish(topic, json.dumps({**job, **changes}).encode(), qos=1, retain=True)
