"""Provisioning by claim end to end on the local stack (`make dev`): the same controllers, a real
Mosquitto and PostgreSQL, factory-fresh simulated devices that hold only the example tenant's
claim, and Mosquitto's own MQTT v5 clients as the third party probing what a claim may do."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from kubiot_operator.local.credentials import read_bundle
from kubiot_operator.simulator.credentials import DeviceCredentials
from kubiot_operator.simulator.factory import (
    FactoryDevice,
    FactoryState,
    ProvisioningRefused,
    claim_credentials,
    ignore_lost_claim_sessions,
)
from tests.e2e.test_local_stack import REPO, Stack, telemetry_devices
from tests.support.waiting import async_wait_until, wait_until

pytestmark = pytest.mark.timeout(600)
CLAIM = "factory-line-1"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """One stack for the module: its tests run in order, the claim's revocation last."""
    tmp = Path(tempfile.mkdtemp(prefix="kubiot-provisioning-"))
    tmp.chmod(0o755)  # PostgreSQL runs as an unprivileged user and must reach its folder
    stack = Stack(tmp)
    stack.start()
    try:
        yield stack
    finally:
        process = stack.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)  # the stack stops its broker and database
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def objects(stack: Stack) -> dict[tuple[str, str], dict[str, Any]]:
    """The stack's Devices by (namespace, name), as its object store holds them now."""
    path = stack.root / "objects.json"
    if not path.exists():
        return {}
    return {(o["metadata"].get("namespace", ""), o["metadata"]["name"]): o
            for o in json.loads(path.read_text()) if o["kind"] == "Device"}


def secret(stack: Stack, name: str) -> dict[str, Any] | None:
    path = stack.root / "objects.json"
    return next((o for o in json.loads(path.read_text()) if o["kind"] == "Secret"
                 and o["metadata"]["name"] == name), None)


def claim_folder(stack: Stack) -> Path:
    return stack.root / "claims" / "acme" / CLAIM


async def the_claim(stack: Stack) -> DeviceCredentials:
    async def exported() -> bool:
        assert stack.process is not None and stack.process.poll() is None, stack.output()
        return (claim_folder(stack) / "tls.key").exists()

    await async_wait_until(exported, timeout=180, interval=0.5,
                           message="the claim bundle exported by the stack")
    return claim_credentials(read_bundle(claim_folder(stack)))


def edit_tenant(stack: Stack, **provisioning: Any) -> None:
    path = stack.manifests / "tenant.yaml"
    tenant = yaml.safe_load(path.read_text())
    tenant["spec"]["provisioning"].update(provisioning)
    path.write_text(yaml.safe_dump(tenant, sort_keys=False))


async def applied(stack: Stack, **provisioning: Any) -> bool:
    """True once the stack's Tenant has these provisioning settings (the manifest applied)."""
    tenant = next((o for o in json.loads((stack.root / "objects.json").read_text())
                   if o["kind"] == "Tenant"), None)
    spec = ((tenant or {}).get("spec") or {}).get("provisioning") or {}
    return all(spec.get(key) == value for key, value in provisioning.items())


def phase(stack: Stack, name: str) -> str | None:
    device = objects(stack).get(("acme", name))
    return ((device or {}).get("status") or {}).get("phase")


@contextlib.asynccontextmanager
async def running(devices: list[FactoryDevice]) -> AsyncIterator[list[FactoryDevice]]:
    ignore_lost_claim_sessions(asyncio.get_running_loop())
    tasks = [asyncio.create_task(device.run()) for device in devices]
    try:
        yield devices
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_twenty_factory_fresh_devices_become_ready_devices_that_send_telemetry(
        stack: Stack) -> None:
    claim = await the_claim(stack)
    serials = [f"sn-{i:04d}" for i in range(1, 21)]
    devices = [FactoryDevice(claim, serial, model="pressure-v3", check_hostname=False,
                             telemetry_seconds=0.5) for serial in serials]
    async with running(devices):
        async def all_provisioned() -> bool:
            return all(d.state is FactoryState.PROVISIONED for d in devices)

        try:
            await async_wait_until(all_provisioned, timeout=180, interval=0.5,
                                   message="every factory device provisioned")
        except AssertionError as exc:
            states = {d.serial: (d.state.value, d.last_answer) for d in devices}
            raise AssertionError(f"{exc}: {states}\n{stack.output()}") from None

        async def reporting() -> bool:
            return set(serials) <= await telemetry_devices(stack.dsn)

        await async_wait_until(reporting, timeout=120, interval=0.5,
                               message="telemetry from every provisioned device")

    found = objects(stack)
    for device in devices:
        body = found[("acme", device.serial)]
        assert body["status"]["phase"] == "Ready"
        labels = body["metadata"]["labels"]
        assert labels["kubiot.io/provisioned"] == "true"
        assert labels["kubiot.io/claim"] == CLAIM
        assert labels["site"] == "field"  # the tenant's deviceLabels
        assert body["spec"]["model"] == "pressure-v3"
        # Its own certificate, for the key it made and kept: the Secret holds no key.
        issued = secret(stack, f"{device.serial}-device-credentials")
        assert issued is not None and "tls.key" not in issued["data"]
        assert device.device is not None
        certificate = x509.load_pem_x509_certificate(device.device.credentials.certificate_pem)
        assert certificate.public_key() == device.key.public_key()
        assert body["status"]["certificate"]["serial"] == format(certificate.serial_number, "x")
    assert len({d.device.credentials.certificate_pem for d in devices if d.device}) == 20
    # The claim's session was shared: devices took it over from each other and asked again.
    print(f"requests {sum(d.requests for d in devices)}, "
          f"sessions lost {sum(d.lost_sessions for d in devices)}")


def mosquitto(tool: str, stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    folder = claim_folder(stack)
    env = dict(line.split("=", 1) for line in (folder / "connection.env").read_text().split())
    return subprocess.run(
        [tool, "-h", "127.0.0.1", "-p", env["KUBIOT_BROKER_PORT"], "-V", "mqttv5",
         "--cafile", str(folder / "broker-ca.crt"), "--cert", str(folder / "tls.crt"),
         "--key", str(folder / "tls.key"), "-q", "1", *args],
        capture_output=True, text=True, timeout=30, check=False)


OWN = f"acme/provisioning/{CLAIM}"


@pytest.mark.parametrize("topic_filter", [
    "#", "acme/#", "acme/devices/+/telemetry", "acme/devices/sn-0001/state/desired",
    "acme/provisioning/#", f"{OWN}/+/request", "acme/provisioning/other-line/+/response",
    "globex/provisioning/factory-line-1/+/response", "$SYS/#",
    "$share/g/acme/devices/+/telemetry",
])
def test_a_claim_may_subscribe_to_nothing_but_its_answers(stack: Stack, topic_filter: str
                                                          ) -> None:
    denied = mosquitto("mosquitto_sub", stack, "-t", topic_filter, "-W", "2")
    assert "All subscription requests were denied" in denied.stderr, denied


def test_a_claim_may_read_its_answers(stack: Stack) -> None:
    allowed = mosquitto("mosquitto_sub", stack, "-t", f"{OWN}/+/response", "-W", "2")
    assert allowed.returncode == 27 and "denied" not in allowed.stderr, allowed  # timed out


@pytest.mark.parametrize("topic", [
    "acme/devices/sn-0001/telemetry", "acme/devices/sn-0001/presence",
    "acme/gateways/pumphouse-1/telemetry", f"{OWN}/sn-0001/response",
    "acme/provisioning/other-line/sn-0001/request", "globex/provisioning/x/sn-0001/request",
    "acme/provisioning", "acme/sn-0001/request",
])
def test_a_claim_may_publish_nothing_but_its_requests(stack: Stack, topic: str) -> None:
    refused = mosquitto("mosquitto_pub", stack, "-t", topic, "-m", "{}")
    assert "Publish 1 failed: Not authorized" in refused.stderr, refused


def test_a_claim_may_send_a_request(stack: Stack) -> None:
    sent = mosquitto("mosquitto_pub", stack, "-t", f"{OWN}/sn-0999/request", "-m", "{}")
    assert sent.returncode == 0 and "failed" not in sent.stderr, sent


async def test_a_name_outside_the_pattern_and_a_reused_serial_are_refused(stack: Stack) -> None:
    claim = await the_claim(stack)
    outside = FactoryDevice(claim, "pump-7", check_hostname=False)
    with pytest.raises(ProvisioningRefused) as caught:
        await asyncio.wait_for(outside.provision(), 60)
    assert caught.value.reason == "NameNotAllowed"
    assert "pump-7" in str(caught.value) and ("acme", "pump-7") not in objects(stack)

    # A device provisions sn-0777; a clone of its serial, with another key, is refused.
    original = FactoryDevice(claim, "sn-0777", check_hostname=False)
    await asyncio.wait_for(original.provision(), 120)
    async def original_ready() -> bool:
        return phase(stack, "sn-0777") == "Ready"

    await async_wait_until(original_ready, timeout=60, interval=0.2, message="sn-0777 Ready")
    clone = FactoryDevice(claim, "sn-0777", check_hostname=False)
    with pytest.raises(ProvisioningRefused) as caught:
        await asyncio.wait_for(clone.provision(), 60)
    assert caught.value.reason == "SerialInUse"
    assert phase(stack, "sn-0777") == "Ready"


async def test_with_manual_approval_devices_wait_until_approved(stack: Stack) -> None:
    claim = await the_claim(stack)
    edit_tenant(stack, approval="Manual")
    await async_wait_until(lambda: applied(stack, approval="Manual"), timeout=30, interval=0.2,
                           message="the manifest edit applied")
    waiting = [FactoryDevice(claim, serial, check_hostname=False, telemetry_seconds=0.5)
               for serial in ("sn-1001", "sn-1002")]
    async with running(waiting):
        async def both_wait() -> bool:
            return all(d.last_answer is not None and d.last_answer.reason == "AwaitingApproval"
                       for d in waiting)

        await async_wait_until(both_wait, timeout=60, interval=0.2,
                               message="both devices told to wait for approval")

        async def both_pending() -> bool:
            return all(phase(stack, d.serial) == "Pending" for d in waiting)

        await async_wait_until(both_pending, timeout=30, interval=0.2,
                               message="both Devices Pending")
        for device in waiting:
            body = objects(stack)[("acme", device.serial)]
            assert body["status"]["phase"] == "Pending"
            identity = next(c for c in body["status"]["conditions"]
                            if c["type"] == "IdentityReady")
            assert identity["reason"] == "AwaitingApproval"
            assert secret(stack, f"{device.serial}-device-credentials") is None

        # The devices keep asking meanwhile: the command runs beside the event loop.
        approve = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", "from kubiot_operator.cli import main; main()",
                             "local", "--dir", str(stack.root), "approve", "acme/sn-1001"],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
        assert approve.returncode == 0, approve.stderr
        assert "approved" in approve.stdout

        async def first_provisioned() -> bool:
            return waiting[0].state is FactoryState.PROVISIONED

        await async_wait_until(first_provisioned, timeout=60, interval=0.2,
                               message="the approved device provisioned")
        # The stack saves its object store a moment after a change, not at once.
        wait_until(lambda: phase(stack, "sn-1001") == "Ready", timeout=10, interval=0.2,
                   message="the approved Device Ready in the stack's store")
        assert waiting[1].state is FactoryState.PENDING
        assert phase(stack, "sn-1002") == "Pending"
    edit_tenant(stack, approval="Automatic")


async def test_a_revoked_claim_is_refused(stack: Stack) -> None:
    claim = await the_claim(stack)
    assert mosquitto("mosquitto_pub", stack, "-t", f"{OWN}/sn-0998/request",
                     "-m", "{}").returncode == 0
    edit_tenant(stack, claims=[{"name": CLAIM, "validityDays": 730, "revoked": True}])

    async def refused() -> bool:
        attempt = mosquitto("mosquitto_pub", stack, "-t", f"{OWN}/sn-0998/request", "-m", "{}")
        return attempt.returncode != 0

    await async_wait_until(refused, timeout=60, interval=1,
                           message="the broker refusing the revoked claim")

    async def recorded_revoked() -> bool:
        tenant = next(o for o in json.loads((stack.root / "objects.json").read_text())
                      if o["kind"] == "Tenant")
        entry = next(c for c in tenant["status"]["claims"] if c["name"] == CLAIM)
        return entry["revoked"] is True

    # The status is written once the whole Tenant is reconciled, after the revocation.
    await async_wait_until(recorded_revoked, timeout=30, interval=0.5,
                           message="the Tenant's status recording the claim revoked")
    # A factory device holding it gets no session at all, so never an identity.
    late = FactoryDevice(claim, "sn-2001", check_hostname=False)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(late.provision(), 10)
    assert late.requests == 0 and ("acme", "sn-2001") not in objects(stack)
