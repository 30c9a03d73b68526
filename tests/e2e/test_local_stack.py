"""`make dev` end to end: the stack as a subprocess, real telemetry, a manifest edit, Ctrl-C."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import asyncpg
import pytest

from tests.support.local_stack import Stack, descendants, none_alive, running_stack
from tests.support.mqtt_client import ConnectRefused, MqttTestClient
from tests.support.waiting import async_wait_until, wait_until

pytestmark = pytest.mark.timeout(300)
SIMULATED = {"pressure-01", "pressure-02", "flow-meter-01", "flow-meter-02"}


@pytest.fixture
def stack() -> Iterator[Stack]:
    with running_stack() as started:
        yield started


async def telemetry_devices(dsn: str) -> set[str]:
    try:
        connection = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError):
        return set()
    try:
        rows = await connection.fetch("SELECT DISTINCT device FROM tenant_acme.telemetry")
    except asyncpg.PostgresError:
        return set()
    finally:
        await connection.close()
    return {row["device"] for row in rows}


def refused(stack: Stack, device: str, port: int) -> bool:
    import ssl

    files = stack.device_files(device)
    context = ssl.create_default_context(cafile=str(files / "broker-ca.crt"))
    context.check_hostname = False
    context.load_cert_chain(files / "tls.crt", files / "tls.key")
    client = MqttTestClient("127.0.0.1", port, client_id=f"{device}-probe", tls_context=context)
    try:
        client.connect()
    except ConnectRefused:
        return True
    try:
        # A valid sample that duplicates the device's first one, so it adds no row.
        probe = b'{"ts": "2020-01-01T00:00:00Z", "seq": 0, "values": {"probe": 1}}'
        return not client.publish(f"acme/devices/{device}/telemetry", probe).accepted
    finally:
        client.close()


async def test_make_dev_runs_the_platform_and_stops_cleanly(stack: Stack) -> None:
    # Telemetry from every simulated device (two direct, two through the gateway) in PostgreSQL.
    seen: set[str] = set()

    async def all_devices_reporting() -> bool:
        nonlocal seen
        assert stack.process is not None and stack.process.poll() is None, stack.output()
        seen = await telemetry_devices(stack.dsn)
        return seen >= SIMULATED

    try:
        await async_wait_until(all_devices_reporting, timeout=120, interval=0.5,
                               message="telemetry from every simulated device")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; rows only from {seen}\n{stack.output()}") from None

    # Suspending a device in its manifest: the broker refuses it within seconds.
    ports = dict(line.split("=") for line in (stack.root / "ports.env").read_text().split())
    device_port = int(ports["KUBIOT_DEVICE_PORT"])
    assert not refused(stack, "pressure-02", device_port)
    stack.set_suspended("pressure-02", True)
    try:
        wait_until(lambda: refused(stack, "pressure-02", device_port), timeout=30,
                   interval=0.5, message="the suspended device refused")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.output()}") from None

    # Ctrl-C: every process of the stack exits, and what was received was stored.
    assert stack.process is not None
    children = descendants(stack.process.pid)
    assert len(children) >= 2  # at least Mosquitto and an ingest process
    # pg_ctl detaches PostgreSQL; its postmaster is named in the pid file.
    postmaster = stack.root / "postgres" / "pgdata" / "postmaster.pid"
    children.add(int(postmaster.read_text().split()[0]))
    stack.process.send_signal(signal.SIGINT)
    assert stack.process.wait(timeout=90) == 0, stack.output()
    await async_wait_until(lambda: none_alive(children), timeout=10, interval=0.2,
                           message="every process of the stack exited")

    # Nothing lost: each device's sequence numbers are contiguous, and nothing was refused.
    from kubiot_operator.local.postgres import PostgresServer

    server = PostgresServer(stack.root / "postgres", port=stack.postgres_port, durable=True)
    server.start()
    try:
        connection = await asyncpg.connect(stack.dsn)
        try:
            gaps = await connection.fetch("""
                SELECT device, min(seq) AS first, max(seq) AS last, count(DISTINCT seq) AS n
                FROM tenant_acme.telemetry GROUP BY device""")
            dead = await connection.fetchval("SELECT count(*) FROM tenant_acme.dead_letter")
        finally:
            await connection.close()
    finally:
        server.stop()
    assert dead == 0
    for row in gaps:
        assert row["n"] == row["last"] - row["first"] + 1, dict(row)
