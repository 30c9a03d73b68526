"""What a firmware rollout costs the operator, and how fast simulated devices take it.

Part 1, the controller (in-memory objects, a recording messenger, the real signing key): one
FirmwareRelease over N devices driven from the canary to Succeeded with every device
answering at once, reporting the time per reconcile and per job sent. Beside it, in the same
run: the pure planner (`plan_rollout`) over the same N devices, and N bare Ed25519 signatures
(the floor for signed per-device jobs).

Part 2, the simulator (`--devices D`, default 200): D simulated devices on a real Mosquitto with
mutual TLS, each sent a signed retained job; the time until all of them report `succeeded`.
Beside it: the time for the same D clients only to connect (TLS handshakes and subscriptions).

    .venv/bin/python bench/bench_rollout.py [--count 1000 5000] [--devices 200]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kubiot_contract.topics import (  # noqa: E402
    IdentityKind,
    device_access,
    device_root,
    device_username,
    ota_job_topic,
    ota_status_topic,
)
from kubiot_operator.brokers import (  # noqa: E402
    BrokerIdentity,
    CertificateCredential,
    MosquittoDynsecBackend,
)
from kubiot_operator.controllers.firmware import reconcile_release  # noqa: E402
from kubiot_operator.local.mosquitto import (  # noqa: E402
    MosquittoBroker,
    MosquittoConfig,
    TLSListener,
)
from kubiot_operator.local.ports import free_port  # noqa: E402
from kubiot_operator.models.firmware import FirmwareReleaseSpec  # noqa: E402
from kubiot_operator.pki import (  # noqa: E402
    create_server_ca,
    create_tenant_ca,
    generate_signing_key,
    issue_identity_certificate,
    issue_server_certificate,
    public_key_pem,
    sign_manifest,
)
from kubiot_operator.reconcile.release import signed_job  # noqa: E402
from kubiot_operator.reconcile.rollout import (  # noqa: E402
    DeviceFirmware,
    RolloutState,
    plan_rollout,
)
from kubiot_operator.simulator import Fleet, synthetic_image  # noqa: E402
from kubiot_operator.simulator.outbox import RetryPolicy  # noqa: E402
from tests.support.firmware_env import (  # noqa: E402
    Clock,
    MemoryObjects,
    RecordingMessenger,
    device_body,
    memory_platform,
    merge,
    release_body,
    tenant_objects,
)

TENANT = "acme"
# Nothing consumes telemetry here, so every device would keep resending its first sample
# during the rollout being timed; this bench measures firmware jobs, not that.
UNCONSUMED = RetryPolicy(first=600.0, ceiling=600.0)


async def controller_run(count: int) -> dict[str, float]:
    objects, messenger, clock = MemoryObjects(), RecordingMessenger(), Clock()
    platform = memory_platform(objects, messenger, clock)
    tenant_objects(objects)
    for i in range(count):
        objects.put(device_body(f"dev-{i:05d}"))
    objects.put(release_body("fw-2", "2.0.0", canary={"count": 1}, waves=[10, 50, 100],
                             pauseBetweenWavesSeconds=0, progressDeadlineSeconds=600))
    key = ("firmwarereleases", "acme", "fw-2")
    reconciles = 0
    started = time.perf_counter()
    while (objects.items[key].get("status") or {}).get("phase") != "Succeeded":
        outcome = await reconcile_release(platform, json.loads(json.dumps(objects.items[key])))
        merge(objects.items[key], {"status": outcome.status})
        reconciles += 1
        for topic, payload in messenger.retained.items():
            name = topic.split("/")[2]
            firmware = objects.items[("devices", "acme", name)]["status"]["firmware"]
            version = json.loads(payload)["version"]
            if firmware.get("stateVersion") != version:
                merge(firmware, {"current": version, "state": "succeeded",
                                 "stateVersion": version})
        clock.advance(1)
    total = time.perf_counter() - started
    steady = time.perf_counter()
    outcome = await reconcile_release(platform, json.loads(json.dumps(objects.items[key])))
    steady = time.perf_counter() - steady
    return {"total": total, "reconciles": reconciles, "jobs": len(messenger.published),
            "steady": steady}


def planner_run(count: int) -> float:
    spec = FirmwareReleaseSpec.model_validate(release_body("fw-2", "2.0.0")["spec"])
    devices = [DeviceFirmware(f"dev-{i:05d}", "1.0.0", "succeeded", "2.0.0")
               for i in range(count)]
    started = time.perf_counter()
    plan_rollout(spec, "uid", devices, RolloutState(), Clock()())
    return time.perf_counter() - started


def signing_run(count: int) -> float:
    key = generate_signing_key()
    manifest = {"version": "2.0.0", "url": "https://x/2.0.0.bin", "sha256": "a" * 64,
                "size": 1024, "release": "fw-2", "tenant": TENANT}
    started = time.perf_counter()
    for i in range(count):
        sign_manifest(key, {**manifest, "device": f"dev-{i:05d}"})
    return time.perf_counter() - started


async def simulator_run(devices: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="kubiot-bench-") as tmp:
        folder = Path(tmp)
        server_ca, tenant_ca = create_server_ca(), create_tenant_ca(TENANT)
        server = issue_server_certificate(server_ca, ["localhost"], ["127.0.0.1"])
        assert server.key_pem is not None
        (folder / "server.crt").write_bytes(server.fullchain_pem)
        (folder / "server.key").write_bytes(server.key_pem)
        (folder / "ca.crt").write_bytes(tenant_ca.cert_pem)
        config = MosquittoConfig(
            data_dir=folder / "broker", service_port=free_port(),
            admin_password=secrets.token_urlsafe(16),
            tls=TLSListener(port=free_port(), ca_file=folder / "ca.crt",
                            cert_file=folder / "server.crt", key_file=folder / "server.key"))
        with MosquittoBroker(config):
            signing = generate_signing_key()
            names = [f"sim-{i:04d}" for i in range(devices)]
            async with MosquittoDynsecBackend("127.0.0.1", config.service_port,
                                              config.admin_username, config.admin_password,
                                              timeout=60) as backend:
                await backend.resync(TENANT, [BrokerIdentity(
                    device_username(TENANT, n), TENANT, IdentityKind.DEVICE,
                    device_access(TENANT, n), CertificateCredential()) for n in names])
            bundles = {}
            assert config.tls is not None
            for name in names:
                cert = issue_identity_certificate(tenant_ca, tenant=TENANT,
                                                  kind=IdentityKind.DEVICE, name=name,
                                                  validity_days=1)
                assert cert.key_pem is not None
                bundles[name] = _bundle(name, cert.cert_pem, cert.key_pem, server_ca.cert_pem,
                                        config.tls.port, public_key_pem(signing))
            fleet = Fleet.from_bundles(bundles, telemetry_seconds=600,
                                       telemetry_retry=UNCONSUMED)
            connect = time.perf_counter()
            async with fleet:
                await fleet.wait_connected(120)
                connect = time.perf_counter() - connect
            url = "http://firmware.invalid/2.0.0.bin"
            image = synthetic_image(url)
            manifest: dict[str, Any] = {
                "version": "2.0.0", "url": url, "sha256": hashlib.sha256(image).hexdigest(),
                "size": len(image), "release": "fw-2", "tenant": TENANT}
            async with aiomqtt.Client("127.0.0.1", config.service_port,
                                      username=config.admin_username,
                                      password=config.admin_password,
                                      protocol=aiomqtt.ProtocolVersion.V5) as cloud:
                await cloud.subscribe(f"{TENANT}/devices/+/ota/status", qos=1)
                fleet = Fleet.from_bundles(bundles, telemetry_seconds=600,
                                       telemetry_retry=UNCONSUMED)
                rollout = time.perf_counter()
                async with fleet:
                    await fleet.wait_connected(120)
                    for name in names:
                        await cloud.publish(ota_job_topic(device_root(TENANT, name)),
                                            signed_job(signing, manifest, name), qos=1,
                                            retain=True)
                    done: set[str] = set()
                    statuses = {ota_status_topic(device_root(TENANT, n)): n for n in names}
                    async for message in cloud.messages:
                        payload = message.payload
                        if isinstance(payload, bytes) and \
                                json.loads(payload)["state"] == "succeeded":
                            done.add(statuses[str(message.topic)])
                            if len(done) == devices:
                                break
                    rollout = time.perf_counter() - rollout
            return connect, rollout


def _bundle(name: str, cert: bytes, key: bytes, broker_ca: bytes, port: int,
            signing_pub: bytes) -> dict[str, bytes]:
    return {"username": device_username(TENANT, name).encode(),
            "topic-root": device_root(TENANT, name).encode(), "broker-host": b"127.0.0.1",
            "broker-port": str(port).encode(), "tls.crt": cert, "tls.key": key,
            "broker-ca.crt": broker_ca, "firmware-signing.pub": signing_pub}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--devices", type=int, default=200)
    args = parser.parse_args()
    print("controller: one release from canary to Succeeded (waves 1, 10%, 50%, 100%)")
    print(f"{'devices':>8} {'reconciles':>10} {'total s':>8} {'per job ms':>10} "
          f"{'steady ms':>9} | {'planner ms':>10} {'sign ms/job':>11}")
    for count in args.count:
        run = await controller_run(count)
        planner, signing = planner_run(count), signing_run(count)
        print(f"{count:>8} {run['reconciles']:>10.0f} {run['total']:>8.2f} "
              f"{1000 * run['total'] / run['jobs']:>10.3f} {1000 * run['steady']:>9.1f} | "
              f"{1000 * planner:>10.1f} {1000 * signing / count:>11.3f}")
    if args.devices:
        connect, rollout = await simulator_run(args.devices)
        print(f"simulator: {args.devices} devices on Mosquitto (mutual TLS)")
        print(f"  connect only (baseline): {connect:.2f} s; connect + signed job installed "
              f"and reported by all: {rollout:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
