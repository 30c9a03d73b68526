"""A broker restart mid-stream: simulated devices, a real Mosquitto, a real `kubiot-ingest`
process and a real PostgreSQL; nothing a device was told is delivered may be missing or twice."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from kubiot_operator.brokers import (
    BrokerIdentity,
    CertificateCredential,
    MosquittoDynsecBackend,
    PasswordCredential,
)
from kubiot_operator.contract import (
    IdentityKind,
    device_access,
    device_root,
    device_username,
    ingest_access,
    ingest_username,
)
from kubiot_operator.local.postgres import PostgresServer, postgres_server
from kubiot_operator.simulator import DeviceCredentials, Fleet, SimulatedDevice
from kubiot_operator.simulator.outbox import NO_MATCHING_SUBSCRIBERS
from tests.integration.conftest import HOST, TlsMosquitto
from tests.support.ingest import (
    BrokerAccess,
    IngestProcess,
    ingest_environment,
    tally_telemetry,
)
from tests.support.waiting import async_wait_until

pytestmark = pytest.mark.timeout(120)
TENANT = "acme"
SCHEMA = "tenant_acme"
DEVICES = 20
TELEMETRY_SECONDS = 0.05  # 20 devices at 20 messages a second: 400 messages a second
OUTAGE_S = 3.0


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


async def provision(broker: TlsMosquitto, backend: MosquittoDynsecBackend, names: list[str],
                    ingest_password: str) -> dict[str, dict[str, bytes]]:
    """The tenant's ingest identity, and one credential bundle per device."""
    await backend.ensure_tenant(TENANT)
    await backend.ensure_identity(BrokerIdentity(
        ingest_username(TENANT), TENANT, IdentityKind.INGEST, ingest_access(TENANT),
        PasswordCredential(ingest_password)))
    bundles = {}
    for name in names:
        username = device_username(TENANT, name)
        await backend.ensure_identity(BrokerIdentity(
            username, TENANT, IdentityKind.DEVICE, device_access(TENANT, name),
            CertificateCredential()))
        cert = broker.pki.issue(TENANT, IdentityKind.DEVICE, name)
        assert cert.key_pem is not None
        bundles[name] = {
            "username": username.encode(), "topic-root": device_root(TENANT, name).encode(),
            "broker-host": HOST.encode(), "broker-port": str(broker.tls_port).encode(),
            "tls.crt": cert.cert_pem, "tls.key": cert.key_pem,
            "ca.crt": broker.pki.tenant_cas[TENANT].cert_pem,
            "broker-ca.crt": broker.pki.server_ca.cert_pem,
            "firmware-signing.pub": b"unused",
        }
    return bundles


async def readyz(process: IngestProcess) -> int:
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(f"{process.metrics_url}/readyz") as response:
            return response.status
    except aiohttp.ClientError:
        return 0


async def test_a_broker_restart_mid_stream_loses_and_duplicates_nothing(
        postgres: PostgresServer, make_mosquitto_tls: Callable[[], TlsMosquitto],
        tmp_path: Path) -> None:
    broker = make_mosquitto_tls()
    ingest_password = secrets.token_urlsafe(12)
    names = [f"meter-{i:02d}" for i in range(DEVICES)]
    async with broker.backend() as backend:
        bundles = await provision(broker, backend, names, ingest_password)
    access = BrokerAccess(HOST, broker.config.service_port, ingest_username(TENANT),
                          ingest_password, publisher_username="", publisher_password="")
    ingest = IngestProcess(ingest_environment(TENANT, access, postgres.dsn),
                           tmp_path / "ingest.log").start()
    fleet = Fleet(SimulatedDevice(DeviceCredentials.from_secret_data(bundles[name]),
                                  telemetry_seconds=TELEMETRY_SECONDS)
                  for name in names)
    try:
        await async_wait_until(lambda: _ready(ingest), timeout=20, message="ingest ready")
        async with fleet:
            await fleet.wait_connected(20)
            await async_wait_until(lambda: _all_delivered_at_least(fleet, 40), timeout=20,
                                   message="the stream under way")

            await asyncio.to_thread(broker.broker.stop)
            await async_wait_until(lambda: _not_ready(ingest), timeout=10,
                                   message="the ingest notices the broker is gone")
            # The outage, measured in samples: every device goes on sampling meanwhile.
            sampled = _sampled(fleet)
            await async_wait_until(
                lambda: _sampled_at_least(fleet, sampled + DEVICES * OUTAGE_S / TELEMETRY_SECONDS),
                timeout=OUTAGE_S * 3, message="the outage")
            sampled_before_restart = _sampled(fleet)
            back = time.monotonic()
            await asyncio.to_thread(broker.broker.start)
            await async_wait_until(lambda: _ready(ingest), timeout=10, interval=0.02,
                                   message="the ingest back")
            reconnect_s = time.monotonic() - back

            # The stream goes on until every device has sent what it kept, and then some.
            after = {name: fleet[name].telemetry_sent for name in names}
            await async_wait_until(lambda: _caught_up(fleet, after, 20), timeout=30,
                                   message="every device caught up")
        assert await asyncio.to_thread(ingest.terminate) == 0
    finally:
        ingest.stop()

    delivered = {(name, seq) for name in names for seq in range(fleet[name].telemetry_sent)}
    # The head of an outbox may have reached the ingest while the fleet stopped, unacknowledged.
    in_flight = {(name, fleet[name].telemetry_sent) for name in names}
    tally = await tally_telemetry(postgres.dsn, SCHEMA, delivered)
    sampled = _sampled(fleet)
    no_subscriber = sum(fleet[name].outbox.refusals[NO_MATCHING_SUBSCRIBERS] for name in names)
    print(f"\nbroker restart: {sampled} sampled, {len(delivered)} delivered, "
          f"{len(tally.lost)} lost, {len(tally.duplicated)} duplicated; ingest back "
          f"{reconnect_s:.2f} s after the broker; {no_subscriber} PUBACKs with reason 16")
    assert not tally.lost, sorted(tally.lost)[:10]
    assert not tally.duplicated, sorted(tally.duplicated)[:10]
    assert tally.unexpected <= in_flight
    # Everything sampled before the broker came back (the outage included) was delivered.
    assert len(delivered) >= sampled_before_restart
    assert reconnect_s < 2.0
    # The broker restored the ingest's session without its shared subscription; the ingest
    # subscribed again anyway.
    assert "session present: True" in ingest.log()


async def _ready(process: IngestProcess) -> bool:
    assert process.process is not None
    if process.process.poll() is not None:
        raise AssertionError(f"kubiot-ingest exited:\n{process.log()}")
    return await readyz(process) == 200


async def _not_ready(process: IngestProcess) -> bool:
    return await readyz(process) != 200


def _sampled(fleet: Fleet) -> int:
    return sum(device.telemetry_sampled for device in fleet.devices.values())


async def _sampled_at_least(fleet: Fleet, count: float) -> bool:
    return _sampled(fleet) >= count


async def _all_delivered_at_least(fleet: Fleet, count: int) -> bool:
    return all(device.telemetry_sent >= count for device in fleet.devices.values())


async def _caught_up(fleet: Fleet, before: dict[str, int], more: int) -> bool:
    """Each device delivered `more` beyond `before` and holds no backlog."""
    return all(fleet[name].telemetry_sent >= sent + more and len(fleet[name].outbox) <= 2
               for name, sent in before.items())
