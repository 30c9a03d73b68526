"""The ingest service against a real Mosquitto and a real PostgreSQL, in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from kubiot_contract.topics import device_root, gateway_root
from kubiot_ingest.config import load_settings
from kubiot_ingest.service import IngestService
from kubiot_operator.local.postgres import PostgresServer, postgres_server
from tests.support.ingest import (
    Publisher,
    broker_for_tenant,
    ingest_environment,
    sample,
    tally_telemetry,
)
from tests.support.waiting import async_wait_until


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@contextlib.asynccontextmanager
async def running(env: dict[str, str]) -> AsyncIterator[IngestService]:
    service = IngestService(load_settings(env))
    task = asyncio.create_task(service.run())
    try:
        await async_wait_until(lambda: _ready(service, task), timeout=20, message="ingest ready")
        yield service
    finally:
        service.request_stop()
        assert await asyncio.wait_for(task, 30) == 0


async def _ready(service: IngestService, task: asyncio.Task[int]) -> bool:
    if task.done():
        task.result()  # surfaces the error
    return service.ready()[0]


async def count(dsn: str, sql: str, *args: Any) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()


def telemetry_messages(tenant: str, devices: int, per_device: int,
                       stream: str | None = None) -> list[tuple[str, Any]]:
    suffix = f"/{stream}" if stream else ""
    return [(f"{device_root(tenant, f'dev-{d}')}/telemetry{suffix}", sample(seq))
            for seq in range(per_device) for d in range(devices)]


async def test_messages_land_exactly_once(postgres: PostgresServer) -> None:
    tenant = "acme"
    with broker_for_tenant(tenant) as (_, access):
        env = ingest_environment(tenant, access, postgres.dsn)
        async with running(env) as service:
            messages = telemetry_messages(tenant, devices=4, per_device=300)
            messages += telemetry_messages(tenant, devices=2, per_device=50, stream="vibration")
            # The same samples again: a device resending after a lost PUBACK.
            messages += messages[:200]
            with Publisher(access) as publisher:
                await asyncio.to_thread(publisher.publish_all, messages)
            expected = (4 * 300 + 2 * 50) * 2  # two metrics per sample
            schema = service.settings.schema_name
            await async_wait_until(
                lambda: _has(postgres.dsn, f"SELECT count(*) FROM {schema}.telemetry", expected),
                timeout=30, message=f"{expected} telemetry rows")
            await async_wait_until(
                lambda: _settled(service, len(messages)), timeout=10, message="all acked")
        assert await count(postgres.dsn, f"SELECT count(*) FROM {schema}.telemetry") == expected
        assert await count(postgres.dsn, "SELECT count(DISTINCT (device, stream, time, seq, "
                           f"metric)) FROM {schema}.telemetry") == expected
        assert await count(postgres.dsn, f"SELECT count(*) FROM {schema}.dead_letter") == 0
        assert await count(postgres.dsn, f"SELECT count(*) FROM {schema}.telemetry "
                           "WHERE stream = 'vibration'") == 2 * 50 * 2
        # Stored in a daily partition made for them, not in the catch-all default partition.
        assert await count(postgres.dsn,
                           f"SELECT count(*) FROM {schema}.telemetry_p20261124") == expected
        assert await count(postgres.dsn, f"SELECT count(*) FROM {schema}.telemetry_default") == 0


async def _has(dsn: str, sql: str, expected: int) -> bool:
    return await count(dsn, sql) >= expected


def _metric(service: IngestService, name: str) -> float:
    return service.registry.get_sample_value(name, {"tenant": service.settings.tenant}) or 0.0


async def _settled(service: IngestService, received: int) -> bool:
    return (_metric(service, "kubiot_ingest_messages_received_total") >= received
            and _metric(service, "kubiot_ingest_queue_depth") == 0)


async def test_malformed_messages_go_to_the_dead_letter_table(postgres: PostgresServer) -> None:
    tenant = "dead-ends"
    root = device_root(tenant, "pump-1")
    bad: dict[str, tuple[str, bytes | str]] = {
        "bad_json": (f"{root}/telemetry", b"{not json"),
        "bad_schema": (f"{root}/telemetry", json.dumps({"ts": 1, "values": {"flow": [1]}})),
        "unsupported_version": (f"{root}/telemetry",
                                json.dumps({"v": 9, "ts": 1, "values": {"flow": 1}})),
        "too_large": (f"{root}/telemetry", json.dumps(sample(1, blob="x" * 3000))),
        "bad_topic": (f"{root}/telemetry/Not_A_Stream", json.dumps(sample(1))),
    }
    with broker_for_tenant(tenant) as (_, access):
        env = ingest_environment(tenant, access, postgres.dsn, MAX_PAYLOAD_BYTES=2048)
        async with running(env) as service:
            schema = service.settings.schema_name
            with Publisher(access) as publisher:
                await asyncio.to_thread(publisher.publish_all, list(bad.values()))
                # A NUL in a text value is valid JSON but not storable text: refused, not stuck.
                await asyncio.to_thread(publisher.publish_all, [
                    (f"{root}/telemetry", json.dumps(sample(2, mode="eco\u0000"))),
                    (f"{root}/telemetry", json.dumps(sample(3))),
                ])
            await async_wait_until(
                lambda: _has(postgres.dsn, f"SELECT count(*) FROM {schema}.dead_letter", 6),
                timeout=15, message="dead letters stored")
            await async_wait_until(
                lambda: _has(postgres.dsn, f"SELECT count(*) FROM {schema}.telemetry", 2),
                timeout=15, message="the good sample stored")
            assert service.ready()[0], "a malformed message must not take the service down"
            rejected = service.registry.get_sample_value(
                "kubiot_ingest_messages_rejected_total", {"tenant": tenant, "reason": "bad_json"})
            assert rejected == 1
        conn = await asyncpg.connect(postgres.dsn)
        try:
            rows = await conn.fetch(
                f"SELECT topic, payload, reason, detail FROM {schema}.dead_letter")
        finally:
            await conn.close()
    by_reason: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        by_reason.setdefault(row["reason"], []).append(row)
    assert sorted(by_reason) == sorted(bad)
    assert len(by_reason["bad_schema"]) == 2
    for reason, (topic, payload) in bad.items():
        stored = by_reason[reason][0]
        assert stored["topic"] == topic
        assert bytes(stored["payload"]) == (payload if isinstance(payload, bytes)
                                            else payload.encode())
        assert stored["detail"]
    details = " ".join(row["detail"] for row in by_reason["bad_schema"])
    assert "values.flow" in details
    assert "NUL" in details


async def test_presence_and_reported_state_update_the_devices_table(
        postgres: PostgresServer) -> None:
    tenant = "twins"
    pump, hub = device_root(tenant, "pump-1"), gateway_root(tenant, "hub-1")
    with broker_for_tenant(tenant) as (_, access):
        env = ingest_environment(tenant, access, postgres.dsn)
        async with running(env) as service:
            schema = service.settings.schema_name
            with Publisher(access) as publisher:
                await asyncio.to_thread(publisher.publish_all, [
                    (f"{pump}/presence", "online"),
                    (f"{pump}/state/reported", {"firmware": "1.2.0", "valve": "open"}),
                    (f"{hub}/presence", "online"),
                ])
                await async_wait_until(
                    lambda: _has(postgres.dsn, f"SELECT count(*) FROM {schema}.devices "
                                 "WHERE online", 2), timeout=15, message="both online")
                await asyncio.to_thread(publisher.publish_all, [
                    (f"{pump}/presence", "offline"),
                    (f"{hub}/presence", "sleeping"),
                ])
                await async_wait_until(
                    lambda: _has(postgres.dsn, f"SELECT count(*) FROM {schema}.devices "
                                 "WHERE NOT online", 1), timeout=15, message="pump offline")
                await async_wait_until(
                    lambda: _has(postgres.dsn, f"SELECT count(*) FROM {schema}.dead_letter", 1),
                    timeout=15, message="bad presence dead-lettered")
        conn = await asyncpg.connect(postgres.dsn)
        try:
            rows = {(r["device"], r["kind"]): r for r in await conn.fetch(
                f"SELECT device, kind, online, last_seen, reported::text AS reported "
                f"FROM {schema}.devices")}
        finally:
            await conn.close()
    assert rows[("pump-1", "device")]["online"] is False
    assert json.loads(rows[("pump-1", "device")]["reported"]) == {
        "firmware": "1.2.0", "valve": "open"}
    assert rows[("pump-1", "device")]["last_seen"] is not None
    assert rows[("hub-1", "gateway")]["online"] is True  # "sleeping" was refused, not applied


async def test_a_database_outage_loses_and_duplicates_nothing() -> None:
    tenant = "outage"
    outage_s = 20.0
    with postgres_server() as postgres, broker_for_tenant(tenant) as (_, access):
        env = ingest_environment(tenant, access, postgres.dsn, QUEUE_MAX=300)
        async with running(env) as service:
            schema = service.settings.schema_name
            enough = threading.Event()
            acknowledged: list[tuple[str, int]] = []  # (device, seq) the broker took

            def stream() -> int:
                """Three devices, 10 messages every 50 ms, until told to stop; returns the count."""
                with Publisher(access) as publisher:
                    while not enough.is_set():
                        device, first = f"dev-{len(acknowledged) % 3}", len(acknowledged)
                        publisher.publish_all(
                            (f"{device_root(tenant, device)}/telemetry", sample(first + i))
                            for i in range(10))
                        acknowledged.extend((device, first + i) for i in range(10))
                        enough.wait(0.05)
                return len(acknowledged)

            producer = asyncio.create_task(asyncio.to_thread(stream))
            try:
                await async_wait_until(
                    lambda: _has(postgres.dsn, f"SELECT count(*) FROM {schema}.telemetry", 200),
                    timeout=15, message="stream under way")
                await asyncio.to_thread(postgres.stop, "immediate")
                await async_wait_until(lambda: _not_ready(service), timeout=10,
                                       message="readiness false during the outage")
                assert await _readyz(service) == 503
                # The outage itself: the stream goes on while the database is down.
                await asyncio.sleep(outage_s)
                # Backpressure: the service holds at most QUEUE_MAX unacknowledged messages.
                assert _metric(service, "kubiot_ingest_queue_depth") <= 300
                assert service.registry.get_sample_value(
                    "kubiot_ingest_database_up", {"tenant": tenant}) == 0
                await asyncio.to_thread(postgres.start)
                await asyncio.sleep(1)  # and a little more stream after the recovery
            finally:
                enough.set()
                sent = await producer
            expected = sent * 2  # two metrics per sample
            await async_wait_until(
                lambda: _has(postgres.dsn, f"SELECT count(*) FROM {schema}.telemetry", expected),
                timeout=40, message=f"all {expected} rows after the outage")
            await async_wait_until(lambda: _is_ready(service), timeout=10, message="ready again")
            assert await _readyz(service) == 200
            errors = service.registry.get_sample_value(
                "kubiot_ingest_database_errors_total", {"tenant": tenant})
            assert errors is not None and errors > 0
        assert sent > 2000, "the stream must span the outage"
        assert await count(postgres.dsn, f"SELECT count(*) FROM {schema}.telemetry") == expected
        tally = await tally_telemetry(postgres.dsn, schema, acknowledged)
        assert (tally.lost, tally.duplicated, tally.unexpected) == (set(), set(), set())


async def _is_ready(service: IngestService) -> bool:
    return service.ready()[0]


async def _not_ready(service: IngestService) -> bool:
    return not service.ready()[0]


async def _readyz(service: IngestService) -> int:
    url = f"http://127.0.0.1:{service.settings.metrics_port}/readyz"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status
