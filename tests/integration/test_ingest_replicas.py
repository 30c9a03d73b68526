"""Two `kubiot-ingest` replicas on one tenant's shared subscription, through a real Mosquitto."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from kubiot_operator.local.postgres import PostgresServer, postgres_server
from tests.support.ingest import (
    IngestProcess,
    Stream,
    broker_for_tenant,
    ingest_environment,
    process_ready,
    tally_telemetry,
)
from tests.support.waiting import async_wait_until

TENANT = "shared"
SCHEMA = "tenant_shared"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


async def received(process: IngestProcess) -> float:
    """Messages the replica took from the broker (0 while it cannot answer)."""
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(f"{process.metrics_url}/metrics") as response:
            text = await response.text()
    except aiohttp.ClientError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kubiot_ingest_messages_received_total{"))


async def stored(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.telemetry"))
    finally:
        await conn.close()


async def test_replicas_split_the_stream_and_a_sigkill_of_one_loses_nothing(
        postgres: PostgresServer, tmp_path: Path) -> None:
    with broker_for_tenant(TENANT) as (_, access):
        # Each replica has its own client id (its pod name), so its own session.
        a_env = ingest_environment(TENANT, access, postgres.dsn, CLIENT_ID="ingest-shared-a")
        b_env = ingest_environment(TENANT, access, postgres.dsn, CLIENT_ID="ingest-shared-b")
        a = IngestProcess(a_env, tmp_path / "a.log").start()
        b = IngestProcess(b_env, tmp_path / "b.log").start()
        a_again = IngestProcess(a_env, tmp_path / "a-again.log")
        try:
            await async_wait_until(lambda: _both_ready(a, b), timeout=20,
                                   message="both replicas ready")
            with Stream(access, TENANT) as stream:
                # Both take a share of the same stream.
                await async_wait_until(lambda: _both_received(a, b, 100), timeout=20,
                                       message="both replicas receiving")
                a.kill()
                # B carries on with the new messages alone.
                taken_by_b = await received(b)
                await async_wait_until(lambda: _more(b, taken_by_b + 200), timeout=20,
                                       message="the other replica carries on")
                # A's pod comes back under its name and takes what its session kept.
                a_again.start()
                await async_wait_until(lambda: process_ready(a_again), timeout=20,
                                       message="killed replica back")
                await async_wait_until(lambda: _more(a_again, 1), timeout=20,
                                       message="the restarted replica receives again")
            expected = stream.sent * 2  # two metrics per sample
            await async_wait_until(lambda: _at_least(postgres.dsn, expected), timeout=30,
                                   message=f"all {expected} rows")
            assert a_again.terminate() == 0
            assert b.terminate() == 0
        finally:
            for replica in (a, b, a_again):
                replica.stop()
    assert await stored(postgres.dsn) == expected
    tally = await tally_telemetry(postgres.dsn, SCHEMA, stream.acknowledged)
    assert (tally.lost, tally.duplicated, tally.unexpected) == (set(), set(), set())
    assert "session present: True" in a_again.log()


async def _both_ready(a: IngestProcess, b: IngestProcess) -> bool:
    return await process_ready(a) and await process_ready(b)


async def _both_received(a: IngestProcess, b: IngestProcess, each: float) -> bool:
    return min(await received(a), await received(b)) >= each


async def _more(process: IngestProcess, target: float) -> bool:
    return await received(process) >= target


async def _at_least(dsn: str, expected: int) -> bool:
    return await stored(dsn) >= expected
