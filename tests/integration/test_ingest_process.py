"""`kubiot-ingest` as a real process: killed, restarted, and stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from kubiot_contract.topics import device_root
from kubiot_operator.local.postgres import PostgresServer, postgres_server
from tests.support.ingest import (
    IngestProcess,
    Publisher,
    Stream,
    broker_for_tenant,
    ingest_environment,
    metrics_text,
    sample,
    tally_telemetry,
)
from tests.support.waiting import async_wait_until


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


async def rows(dsn: str, sql: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def http_status(process: IngestProcess, path: str) -> int:
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(f"{process.metrics_url}{path}") as response:
            return response.status
    except aiohttp.ClientError:
        return 0


async def wait_ready(process: IngestProcess) -> None:
    async def ready() -> bool:
        assert process.process is not None
        if process.process.poll() is not None:
            raise AssertionError(f"kubiot-ingest exited early:\n{process.log()}")
        return await http_status(process, "/readyz") == 200
    await async_wait_until(ready, timeout=20, message="kubiot-ingest ready")


async def test_sigkill_mid_stream_then_restart_loses_nothing(
        postgres: PostgresServer, tmp_path: Path) -> None:
    tenant = "killed"
    schema = "tenant_killed"
    with broker_for_tenant(tenant) as (_, access):
        env = ingest_environment(tenant, access, postgres.dsn)
        first = IngestProcess(env, tmp_path / "first.log").start()
        second = IngestProcess(env, tmp_path / "second.log")
        try:
            await wait_ready(first)
            with Stream(access, tenant) as stream:
                await async_wait_until(
                    lambda: _at_least(postgres.dsn, f"SELECT count(*) FROM {schema}.telemetry",
                                      300), timeout=20, message="stream under way")
                first.kill()
                # Messages keep coming while no ingest runs: the broker keeps them in the
                # persistent session, with those that were in flight and never acknowledged.
                sent_while_down = stream.sent
                await async_wait_until(lambda: _sent_more(stream, sent_while_down + 100),
                                       timeout=10, message="stream continues")
                second.start()
                await wait_ready(second)
                await asyncio.sleep(1)
            expected = stream.sent * 2
            await async_wait_until(
                lambda: _at_least(postgres.dsn, f"SELECT count(*) FROM {schema}.telemetry",
                                  expected), timeout=30, message=f"all {expected} rows")
            assert second.terminate() == 0
        finally:
            first.stop()
            second.stop()
    assert await rows(postgres.dsn, f"SELECT count(*) FROM {schema}.telemetry") == expected
    tally = await tally_telemetry(postgres.dsn, schema, stream.acknowledged)
    assert (tally.lost, tally.duplicated, tally.unexpected) == (set(), set(), set())
    # The restarted process resumed the killed one's session rather than starting afresh.
    assert "session present: True" in second.log()


async def test_the_ingest_is_back_within_a_second_of_the_broker_however_long_it_was_away(
        postgres: PostgresServer, tmp_path: Path) -> None:
    tenant = "reconnecting"
    with broker_for_tenant(tenant) as (broker, access):
        # RETRY_MAX_DELAY_S as deployed, not the tests' shortened one.
        env = ingest_environment(tenant, access, postgres.dsn, RETRY_MAX_DELAY_S=5)
        process = IngestProcess(env, tmp_path / "ingest.log").start()
        try:
            await wait_ready(process)
            await asyncio.to_thread(broker.stop)
            await async_wait_until(lambda: _status_is(process, "/readyz", 503), timeout=10,
                                   message="not ready while the broker is away")
            # Long enough for a doubling backoff to have grown to several seconds.
            await asyncio.sleep(8)
            back = time.monotonic()
            await asyncio.to_thread(broker.start)
            await async_wait_until(lambda: _status_is(process, "/readyz", 200), timeout=10,
                                   interval=0.02, message="ready again")
            reconnect_s = time.monotonic() - back
            # Ready means subscribed again: the restored session had lost its subscriptions.
            with Publisher(access) as publisher:
                await asyncio.to_thread(publisher.publish_all, [
                    (f"{device_root(tenant, 'pump-1')}/telemetry", sample(seq))
                    for seq in range(10)])
            await async_wait_until(lambda: _written(process, 20), timeout=10,
                                   message="rows written after the restart")
        finally:
            assert await asyncio.to_thread(process.terminate) == 0
    assert reconnect_s < 1.5, f"back {reconnect_s:.2f} s after the broker"


async def test_sigterm_flushes_acknowledges_and_exits_0(
        postgres: PostgresServer, tmp_path: Path) -> None:
    tenant = "graceful"
    schema = "tenant_graceful"
    with broker_for_tenant(tenant) as (_, access):
        # Batches that would only close after a minute: only the shutdown flush writes them.
        env = ingest_environment(tenant, access, postgres.dsn, BATCH_SIZE=50_000,
                                 BATCH_MAX_DELAY_MS=60_000)
        process = IngestProcess(env, tmp_path / "ingest.log").start()
        try:
            await wait_ready(process)
            assert await http_status(process, "/healthz") == 200
            with Publisher(access) as publisher:
                await asyncio.to_thread(publisher.publish_all, [
                    (f"{device_root(tenant, 'pump-1')}/telemetry", sample(seq))
                    for seq in range(500)] + [
                    (f"{device_root(tenant, 'pump-1')}/telemetry", b"not json")])
            await async_wait_until(lambda: _received(process, 501), timeout=15,
                                   message="all received")
            assert await rows(postgres.dsn, f"SELECT count(*) FROM {schema}.telemetry") == 0
            text = await metrics_text(process)
            assert f'kubiot_ingest_queue_depth{{tenant="{tenant}"}} 501.0' in text
            assert f'kubiot_ingest_broker_connected{{tenant="{tenant}"}} 1.0' in text
            assert f'kubiot_ingest_database_up{{tenant="{tenant}"}} 1.0' in text
            started = time.monotonic()
            assert await asyncio.to_thread(process.terminate) == 0
            assert time.monotonic() - started < 10
        finally:
            process.stop()
        assert await rows(postgres.dsn, f"SELECT count(*) FROM {schema}.telemetry") == 1000
        assert await rows(postgres.dsn, f"SELECT count(*) FROM {schema}.dead_letter") == 1
        # Everything was acknowledged: a new process finds nothing left to redeliver.
        again = IngestProcess(env, tmp_path / "again.log").start()
        try:
            await wait_ready(again)
            await asyncio.sleep(1)
            text = await metrics_text(again)
            assert f'kubiot_ingest_messages_received_total{{tenant="{tenant}"}} 0.0' in text
        finally:
            assert await asyncio.to_thread(again.terminate) == 0
    assert "stopped" in process.log()


async def test_metrics_endpoint_shows_the_counters(
        postgres: PostgresServer, tmp_path: Path) -> None:
    tenant = "metered"
    with broker_for_tenant(tenant) as (_, access):
        env = ingest_environment(tenant, access, postgres.dsn)
        process = IngestProcess(env, tmp_path / "ingest.log").start()
        try:
            await wait_ready(process)
            with Publisher(access) as publisher:
                await asyncio.to_thread(publisher.publish_all, [
                    (f"{device_root(tenant, 'pump-1')}/telemetry", sample(seq))
                    for seq in range(20)] + [
                    (f"{device_root(tenant, 'pump-1')}/telemetry", b"{")])
            await async_wait_until(lambda: _written(process, 40), timeout=15,
                                   message="rows written")
            text = await metrics_text(process)
        finally:
            assert await asyncio.to_thread(process.terminate) == 0
    label = f'tenant="{tenant}"'
    for line in (
        f"kubiot_ingest_messages_received_total{{{label}}} 21.0",
        f'kubiot_ingest_rows_written_total{{sink="postgres",{label}}} 40.0',
        f'kubiot_ingest_messages_rejected_total{{reason="bad_json",{label}}} 1.0',
        f"kubiot_ingest_database_errors_total{{{label}}} 0.0",
        f"kubiot_ingest_broker_connected{{{label}}} 1.0",
        f"kubiot_ingest_database_up{{{label}}} 1.0",
        f"kubiot_ingest_queue_depth{{{label}}} 0.0",
    ):
        assert line in text, line
    for histogram in ("kubiot_ingest_batch_size_count", "kubiot_ingest_lag_seconds_count",
                      "kubiot_ingest_commit_duration_seconds_count"):
        assert histogram in text


async def _at_least(dsn: str, sql: str, expected: int) -> bool:
    try:
        return await rows(dsn, sql) >= expected
    except asyncpg.UndefinedTableError:
        return False


async def _status_is(process: IngestProcess, path: str, status: int) -> bool:
    return await http_status(process, path) == status


async def _sent_more(stream: Stream, target: int) -> bool:
    return stream.sent >= target


def _sample_value(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _received(process: IngestProcess, expected: int) -> bool:
    text = await metrics_text(process)
    return _sample_value(text, "kubiot_ingest_messages_received_total{") >= expected


async def _written(process: IngestProcess, expected: int) -> bool:
    text = await metrics_text(process)
    return _sample_value(text, 'kubiot_ingest_rows_written_total{sink="postgres"') >= expected
