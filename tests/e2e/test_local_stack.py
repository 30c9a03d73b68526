"""`make dev` end to end: the stack as a subprocess, real telemetry, a manifest edit, Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import asyncpg
import pytest

from tests.support.local_stack import REPO, Stack, descendants, none_alive, running_stack
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
        # A valid sample, dated now so that the ingest stores it rather than dead-lettering it
        # as outside the stored window, and numbered like the device's first one, so that the
        # sequence check at the end still holds.
        probe = json.dumps({"ts": datetime.now(UTC).isoformat(), "seq": 0,
                            "values": {"probe": 1}}).encode()
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

    # Commands: the example's ping got its answer, and one from the command line prints its own.
    async def example_ping_answered() -> bool:
        from kubiot_operator.kube.client import DEVICECOMMANDS
        from kubiot_operator.local.objects import FileObjects

        command = await FileObjects(stack.root / "objects.json").get(
            DEVICECOMMANDS, "ping-pressure-01", "acme")
        return ((command or {}).get("status") or {}).get("phase") == "Succeeded"

    await async_wait_until(example_ping_answered, timeout=30, interval=0.5,
                           message="the example DeviceCommand answered")
    sent = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", "from kubiot_operator.cli import main; main()",
                         "command", "acme/pressure-01", "ping", "--wait", "--timeout", "20",
                         "--local", str(stack.root), "--manifests", str(stack.manifests)],
        cwd=REPO, capture_output=True, text=True, timeout=90, check=False)
    assert sent.returncode == 0, sent.stdout + sent.stderr + stack.output()
    assert "\npressure-01  Succeeded  pong  " in sent.stdout
    assert sent.stdout.endswith("1/1 succeeded, 0 failed, 0 timed out, 0 offline\n")

    # The example FirmwareRelease rolls out to the two pressure sensors it selects.
    async def rolled_out() -> bool:
        from kubiot_operator.kube.client import DEVICES, FIRMWARERELEASES
        from kubiot_operator.local.objects import FileObjects

        objects = FileObjects(stack.root / "objects.json")
        release = await objects.get(FIRMWARERELEASES, "ps-10-2.4.1", "acme")
        sensors = [await objects.get(DEVICES, name, "acme")
                   for name in ("pressure-01", "pressure-02")]
        return (((release or {}).get("status") or {}).get("phase") == "Succeeded"
                and all((((d or {}).get("status") or {}).get("firmware") or {}).get("current")
                        == "2.4.1" for d in sensors))

    try:
        await async_wait_until(rolled_out, timeout=90, interval=0.5,
                               message="the example FirmwareRelease rolled out")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.output()}") from None

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
