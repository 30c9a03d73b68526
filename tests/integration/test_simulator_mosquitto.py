"""Simulated devices against a real Mosquitto: mutual TLS with their own certificates, presence,
telemetry, twin, and signed firmware jobs installed, refused, failed or left hanging."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import pytest
from aiohttp import web

from kubiot_contract.telemetry import parse_payload
from kubiot_contract.topics import (
    IdentityKind,
    device_access,
    device_root,
    device_username,
    ota_job_topic,
    state_desired_topic,
)
from kubiot_operator.brokers import BrokerIdentity, CertificateCredential, MosquittoDynsecBackend
from kubiot_operator.local.ports import free_port
from kubiot_operator.pki import generate_signing_key, public_key_pem
from kubiot_operator.reconcile.release import signed_job
from kubiot_operator.simulator import (
    DeviceCredentials,
    Fleet,
    Scenario,
    SimulatedDevice,
    UrlArtifacts,
    parse_faults,
)
from kubiot_operator.simulator.artifacts import synthetic_image
from kubiot_operator.simulator.outbox import NO_MATCHING_SUBSCRIBERS, RetryPolicy
from tests.integration.conftest import HOST, TlsMosquitto
from tests.support.waiting import async_wait_until

TENANT = "acme"
KEY = generate_signing_key()


@dataclass
class Cloud:
    """The operator's side of the broker: sees every report, publishes jobs."""

    client: aiomqtt.Client
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    retained: dict[str, bytes] = field(default_factory=dict)

    async def job(self, device: str, manifest: dict[str, Any], *, payload: bytes | None = None
                  ) -> None:
        body = payload if payload is not None else signed_job(KEY, manifest, device)
        await self.client.publish(ota_job_topic(device_root(TENANT, device)), body, qos=1,
                                  retain=True)

    def ota(self, device: str) -> list[dict[str, Any]]:
        topic = f"{device_root(TENANT, device)}/ota/status"
        return [json.loads(p) for t, p in self.messages if t == topic]

    def states(self, device: str) -> list[str]:
        return [m["state"] for m in self.ota(device)]

    def last(self, device: str, channel: str) -> bytes | None:
        return self.retained.get(f"{device_root(TENANT, device)}/{channel}")


def manifest(version: str, url: str, image: bytes) -> dict[str, Any]:
    return {"version": version, "url": url, "sha256": hashlib.sha256(image).hexdigest(),
            "size": len(image), "release": f"fw-{version}", "tenant": TENANT}


def synthetic(version: str) -> dict[str, Any]:
    url = f"http://firmware.invalid/{version}.bin"
    return manifest(version, url, synthetic_image(url))


async def provision(mosquitto_tls: TlsMosquitto, backend: MosquittoDynsecBackend,
                    names: list[str]) -> dict[str, dict[str, bytes]]:
    """Broker identities and credential bundles, as the operator would make them."""
    await backend.ensure_tenant(TENANT)
    bundles = {}
    for name in names:
        username = device_username(TENANT, name)
        await backend.ensure_identity(BrokerIdentity(
            username, TENANT, IdentityKind.DEVICE, device_access(TENANT, name),
            CertificateCredential()))
        cert = mosquitto_tls.pki.issue(TENANT, IdentityKind.DEVICE, name)
        assert cert.key_pem is not None
        bundles[name] = {
            "username": username.encode(), "topic-root": device_root(TENANT, name).encode(),
            "broker-host": HOST.encode(), "broker-port": str(mosquitto_tls.tls_port).encode(),
            "tls.crt": cert.cert_pem, "tls.key": cert.key_pem,
            "ca.crt": mosquitto_tls.pki.tenant_cas[TENANT].cert_pem,
            "broker-ca.crt": mosquitto_tls.pki.server_ca.cert_pem,
            "firmware-signing.pub": public_key_pem(KEY),
        }
    return bundles


@pytest.fixture
async def cloud(mosquitto_tls: TlsMosquitto) -> AsyncIterator[Cloud]:
    cfg = mosquitto_tls.config
    async with aiomqtt.Client(HOST, cfg.service_port, username=cfg.admin_username,
                              password=cfg.admin_password,
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        seen = Cloud(client)
        await client.subscribe(f"{TENANT}/devices/#", qos=1)

        async def collect() -> None:
            async for message in client.messages:
                payload = message.payload if isinstance(message.payload, bytes) else b""
                seen.messages.append((str(message.topic), payload))
                if message.retain or str(message.topic).endswith(("/presence", "/reported")):
                    seen.retained[str(message.topic)] = payload

        task = asyncio.create_task(collect())
        try:
            yield seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
async def image_server() -> AsyncIterator[tuple[str, dict[str, bytes]]]:
    """An HTTP server for firmware images: (base URL, path -> bytes)."""
    images: dict[str, bytes] = {}

    async def serve(request: web.Request) -> web.Response:
        image = images.get(request.path)
        return web.Response(body=image) if image is not None else web.Response(status=404)

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port).start()
    try:
        yield f"http://{HOST}:{port}", images
    finally:
        await runner.cleanup()


async def test_a_device_comes_online_sends_telemetry_and_applies_its_twin(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend, cloud: Cloud) -> None:
    bundles = await provision(mosquitto_tls, dynsec, ["sim-twin"])
    async with Fleet.from_bundles(bundles, telemetry_seconds=0.1) as fleet:
        await fleet.wait_connected(10)
        await async_wait_until(lambda: _async(cloud.last("sim-twin", "presence") == b"online"))
        await async_wait_until(lambda: _async(len(
            [t for t, _ in cloud.messages if t.endswith("sim-twin/telemetry")]) >= 2))
        telemetry = [p for t, p in cloud.messages if t.endswith("sim-twin/telemetry")]
        [sample] = parse_payload(telemetry[0])
        assert sample.values["firmware"] == "1.0.0"

        await cloud.client.publish(state_desired_topic(device_root(TENANT, "sim-twin")),
                                   b'{"led": "blue"}', qos=1, retain=True)
        await async_wait_until(lambda: _async(json.loads(
            cloud.last("sim-twin", "state/reported") or b"{}").get("led") == "blue"))
        assert json.loads(cloud.last("sim-twin", "state/reported") or b"{}")["firmware"] == "1.0.0"


async def test_a_signed_job_is_downloaded_checked_and_installed(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend, cloud: Cloud,
        image_server: tuple[str, dict[str, bytes]]) -> None:
    base, images = image_server
    images["/2.0.0.bin"] = b"\x7fELF firmware 2.0.0" * 100
    bundles = await provision(mosquitto_tls, dynsec, ["sim-http"])
    async with Fleet.from_bundles(bundles, artifacts=UrlArtifacts()) as fleet:
        await fleet.wait_connected(10)
        await cloud.job("sim-http", manifest("2.0.0", f"{base}/2.0.0.bin", images["/2.0.0.bin"]))

        await async_wait_until(lambda: _async(cloud.states("sim-http")[-1:] == ["succeeded"]))

        assert cloud.states("sim-http") == ["downloading", "installing", "succeeded"]
        assert {m["version"] for m in cloud.ota("sim-http")} == {"2.0.0"}
        assert fleet["sim-http"].firmware == "2.0.0"
        reported = json.loads(cloud.last("sim-http", "state/reported") or b"{}")
        assert reported["firmware"] == "2.0.0"


async def test_faults_show_only_after_the_faulty_version_is_installed_and_acknowledged(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend, cloud: Cloud) -> None:
    names = ["sim-silent", "sim-anomalous", "sim-offline", "sim-fine"]
    bundles = await provision(mosquitto_tls, dynsec, names)
    async with Fleet.from_bundles(bundles, telemetry_seconds=0.1) as fleet:
        for name in names[:3]:
            fleet[name].faults = parse_faults(f"{name.removeprefix('sim-')}@2.0.0")
        await fleet.wait_connected(10)
        await async_wait_until(lambda: _async(all(len(telemetry(cloud, n)) >= 3 for n in names)))
        assert all(t["values"]["temperature"] < 30 for n in names for t in telemetry(cloud, n))

        for name in names:
            await cloud.job(name, synthetic("2.0.0"))
        await async_wait_until(lambda: _async(all(
            cloud.states(n)[-1:] == ["succeeded"] for n in names)))
        sent = {n: len(telemetry(cloud, n)) for n in names}
        await async_wait_until(lambda: _async(len(telemetry(cloud, "sim-fine")) >=
                                              sent["sim-fine"] + 10))

        assert len(telemetry(cloud, "sim-silent")) <= sent["sim-silent"] + 1  # one in flight
        assert cloud.last("sim-silent", "presence") == b"online"
        after = telemetry(cloud, "sim-anomalous")[sent["sim-anomalous"] + 1:]
        assert after and all(t["values"]["temperature"] == 95.0 for t in after)
        assert cloud.last("sim-offline", "presence") == b"offline"
        assert not fleet["sim-offline"].connected.is_set()
        assert all(t["values"]["temperature"] < 30 for t in telemetry(cloud, "sim-fine"))
        assert {fleet[n].firmware for n in names} == {"2.0.0"}

        # Faults follow the version: another version, or none asked for, and it behaves again.
        fleet["sim-silent"].faults = parse_faults("")
        before = len(telemetry(cloud, "sim-silent"))
        await async_wait_until(lambda: _async(len(telemetry(cloud, "sim-silent")) > before + 2))


def telemetry(cloud: Cloud, device: str) -> list[dict[str, Any]]:
    topic = f"{device_root(TENANT, device)}/telemetry"
    return [json.loads(p) for t, p in cloud.messages if t == topic]


async def test_tampered_jobs_and_images_are_refused_and_reported_failed(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend, cloud: Cloud) -> None:
    names = ["sim-forged", "sim-badhash", "sim-other"]
    bundles = await provision(mosquitto_tls, dynsec, names)
    async with Fleet.from_bundles(bundles) as fleet:
        await fleet.wait_connected(10)
        forged = json.loads(signed_job(KEY, synthetic("2.0.0"), "sim-forged"))
        forged["url"] = "http://evil.invalid/2.0.0.bin"
        await cloud.job("sim-forged", {}, payload=json.dumps(forged).encode())
        await cloud.job("sim-badhash", {**synthetic("2.0.0"), "sha256": "0" * 64})
        await cloud.job("sim-other", {}, payload=signed_job(KEY, synthetic("2.0.0"), "sim-forged"))

        await async_wait_until(lambda: _async(all(cloud.states(n)[-1:] == ["failed"]
                                                  for n in names)))

        reasons = {n: cloud.ota(n)[-1]["reason"] for n in names}
        assert reasons == {"sim-forged": "BadSignature", "sim-badhash": "ArtifactHashMismatch",
                           "sim-other": "NotForThisDevice"}
        assert all(cloud.ota(n)[-1]["version"] == "2.0.0" for n in names)
        assert set(fleet.firmware().values()) == {"1.0.0"}


async def test_scenarios_fail_hang_and_a_newer_job_replaces_a_hanging_one(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend, cloud: Cloud) -> None:
    bundles = await provision(mosquitto_tls, dynsec, ["sim-fail", "sim-hang"])
    limit = asyncio.Semaphore(4)
    devices = [
        SimulatedDevice(DeviceCredentials.from_secret_data(bundles["sim-fail"]),
                        scenario=Scenario.fail(), connect_limit=limit),
        SimulatedDevice(DeviceCredentials.from_secret_data(bundles["sim-hang"]),
                        scenario=Scenario.hang(), connect_limit=limit),
    ]
    async with Fleet(devices) as fleet:
        await fleet.wait_connected(10)
        for name in ("sim-fail", "sim-hang"):
            await cloud.job(name, synthetic("2.0.0"))

        await async_wait_until(lambda: _async(
            cloud.states("sim-fail")[-1:] == ["failed"]
            and cloud.states("sim-hang")[-1:] == ["installing"]))
        assert cloud.ota("sim-fail")[-1]["reason"] == "InstallFailed"

        # Rolling the hanging device back to what it runs ends the stuck install at once.
        await cloud.job("sim-hang", synthetic("1.0.0"))
        await async_wait_until(lambda: _async(cloud.ota("sim-hang")[-1] == {
            "state": "succeeded", "version": "1.0.0"}))
        assert fleet.firmware() == {"sim-fail": "1.0.0", "sim-hang": "1.0.0"}


async def test_a_fleet_installs_a_retained_job_and_survives_a_reconnect(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend, cloud: Cloud) -> None:
    names = [f"sim-fleet-{i:02d}" for i in range(20)]
    bundles = await provision(mosquitto_tls, dynsec, names)
    for name in names:  # retained before the devices connect: they get it on subscribe
        await cloud.job(name, synthetic("2.0.0"))
    async with Fleet.from_bundles(bundles, telemetry_seconds=60) as fleet:
        await fleet.wait_connected(20)
        await async_wait_until(lambda: _async(set(fleet.firmware().values()) == {"2.0.0"}),
                               timeout=20)
    async with Fleet.from_bundles(bundles, firmware="2.0.0", telemetry_seconds=60) as again:
        await again.wait_connected(20)
        await async_wait_until(lambda: _async(all(
            cloud.states(n).count("succeeded") == 2 for n in names)), timeout=20)
    assert all(cloud.states(n) == ["downloading", "installing", "succeeded", "succeeded"]
               for n in names)


async def test_telemetry_nobody_consumes_is_kept_and_sent_again_until_someone_does(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend) -> None:
    bundles = await provision(mosquitto_tls, dynsec, ["sim-unheard"])
    device = SimulatedDevice(DeviceCredentials.from_secret_data(bundles["sim-unheard"]),
                             telemetry_seconds=0.05, telemetry_retry=RetryPolicy(0.05, 0.2))
    topic = f"{device_root(TENANT, 'sim-unheard')}/telemetry"
    cfg = mosquitto_tls.config
    received: list[int] = []
    async with Fleet([device]) as fleet:
        await fleet.wait_connected(10)
        # No subscriber: the broker answers every attempt with reason 16, and the device keeps
        # everything it sampled.
        await async_wait_until(lambda: _async(
            device.outbox.refusals[NO_MATCHING_SUBSCRIBERS] >= 3), timeout=10)
        assert device.telemetry_sent == 0
        assert device.telemetry_sampled >= 3

        async with aiomqtt.Client(HOST, cfg.service_port, username=cfg.admin_username,
                                  password=cfg.admin_password,
                                  protocol=aiomqtt.ProtocolVersion.V5) as consumer:
            await consumer.subscribe(topic, qos=1)

            async def collect() -> None:
                async for message in consumer.messages:
                    assert isinstance(message.payload, bytes)
                    received.append(json.loads(message.payload)["seq"])

            collecting = asyncio.create_task(collect())
            backlog = device.telemetry_sampled
            try:
                await async_wait_until(lambda: _async(device.telemetry_sent >= backlog + 5),
                                       timeout=10, message="the backlog delivered")
                await fleet.stop()
                await async_wait_until(lambda: _async(len(received) >= device.telemetry_sent))
            finally:
                collecting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await collecting
    # What was kept arrived, in order, once each.
    assert received == list(range(len(received)))
    assert len(device.outbox) == device.telemetry_sampled - device.telemetry_sent


async def _async(value: bool) -> bool:
    return value
