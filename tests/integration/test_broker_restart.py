"""A broker restart mid-stream: simulated devices and a gateway, a real Mosquitto, a real
`kubiot-ingest` process and a real PostgreSQL; nothing a device was told is delivered may be
missing or stored twice."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from kubiot_contract.topics import (
    IdentityKind,
    device_access,
    device_root,
    device_username,
    gateway_access,
    gateway_root,
    gateway_username,
    ingest_access,
    ingest_username,
)
from kubiot_operator.brokers import (
    BrokerIdentity,
    CertificateCredential,
    MosquittoDynsecBackend,
    PasswordCredential,
)
from kubiot_operator.local.postgres import PostgresServer, postgres_server
from kubiot_operator.simulator import DeviceCredentials, Fleet, SimulatedDevice
from kubiot_operator.simulator.gateway import SimulatedGateway, gateway_credentials
from kubiot_operator.simulator.outbox import NO_MATCHING_SUBSCRIBERS
from kubiot_operator.simulator.sender import stop_task
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
GATEWAY = "hub"
CHILDREN = ("sensor-a", "sensor-b")  # without an IP of their own: the gateway speaks for them


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


async def provision(broker: TlsMosquitto, backend: MosquittoDynsecBackend, names: list[str],
                    ingest_password: str) -> dict[str, dict[str, bytes]]:
    """The tenant's ingest identity, and a credential bundle per device and for the gateway."""
    await backend.ensure_tenant(TENANT)
    await backend.ensure_identity(BrokerIdentity(
        ingest_username(TENANT), TENANT, IdentityKind.INGEST, ingest_access(TENANT),
        PasswordCredential(ingest_password)))
    bundles = {}
    identities = [(IdentityKind.DEVICE, name, device_username(TENANT, name),
                   device_root(TENANT, name), device_access(TENANT, name)) for name in names]
    identities.append((IdentityKind.GATEWAY, GATEWAY, gateway_username(TENANT, GATEWAY),
                       gateway_root(TENANT, GATEWAY), gateway_access(TENANT, GATEWAY, CHILDREN)))
    for kind, name, username, root, rules in identities:
        await backend.ensure_identity(BrokerIdentity(
            username, TENANT, kind, rules, CertificateCredential()))
        cert = broker.pki.issue(TENANT, kind, name)
        assert cert.key_pem is not None
        bundles[name] = {
            "username": username.encode(), "topic-root": root.encode(),
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
    gateway = SimulatedGateway(gateway_credentials(bundles[GATEWAY]), CHILDREN,
                               telemetry_seconds=TELEMETRY_SECONDS)
    gateway_running = asyncio.create_task(gateway.run())
    try:
        await async_wait_until(lambda: _ready(ingest), timeout=20, message="ingest ready")
        async with fleet:
            await fleet.wait_connected(20)
            await asyncio.wait_for(gateway.connected.wait(), 20)
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
            gateway_after = gateway.telemetry_sent
            await async_wait_until(lambda: _caught_up(fleet, after, 20), timeout=30,
                                   message="every device caught up")
            await async_wait_until(lambda: _gateway_caught_up(gateway, gateway_after + 40),
                                   timeout=30, message="the gateway caught up")
            await stop_task(gateway_running)
        assert await asyncio.to_thread(ingest.terminate) == 0
    finally:
        await stop_task(gateway_running)
        ingest.stop()

    delivered = {(name, seq) for name in names for seq in range(fleet[name].telemetry_sent)}
    # The head of an outbox may have reached the ingest while the fleet stopped, unacknowledged.
    in_flight = {(name, fleet[name].telemetry_sent) for name in names}
    # The gateway's outbox goes in order too: round by round, child by child.
    gateway_messages = [(CHILDREN[i % len(CHILDREN)], i // len(CHILDREN))
                        for i in range(gateway.telemetry_sent + 1)]
    delivered |= set(gateway_messages[:-1])
    in_flight.add(gateway_messages[-1])
    tally = await tally_telemetry(postgres.dsn, SCHEMA, delivered)
    sampled = _sampled(fleet) + gateway.telemetry_sampled * len(CHILDREN)
    no_subscriber = sum(fleet[name].outbox.refusals[NO_MATCHING_SUBSCRIBERS] for name in names)
    no_subscriber += gateway.outbox.refusals[NO_MATCHING_SUBSCRIBERS]
    print(f"\nbroker restart: {sampled} sampled, {len(delivered)} delivered, "
          f"{len(tally.lost)} lost, {len(tally.duplicated)} duplicated; ingest back "
          f"{reconnect_s:.2f} s after the broker; {no_subscriber} PUBACKs with reason 16")
    assert not tally.lost, sorted(tally.lost)[:10]
    assert not tally.duplicated, sorted(tally.duplicated)[:10]
    assert tally.unexpected <= in_flight
    # Everything sampled before the broker came back (the outage included) was delivered.
    assert len(delivered) >= sampled_before_restart
    assert gateway.connects >= 2
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


async def _gateway_caught_up(gateway: SimulatedGateway, count: int) -> bool:
    return gateway.telemetry_sent >= count and len(gateway.outbox) <= 2 * len(CHILDREN)


async def _caught_up(fleet: Fleet, before: dict[str, int], more: int) -> bool:
    """Each device delivered `more` beyond `before` and holds no backlog."""
    return all(fleet[name].telemetry_sent >= sent + more and len(fleet[name].outbox) <= 2
               for name, sent in before.items())
