"""A redelivered batch against a real PostgreSQL: every sample stored exactly once."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import asyncpg
import pytest

from kubiot_contract.topics import device_root
from kubiot_ingest.batcher import Batch
from kubiot_ingest.config import IngestSettings
from kubiot_ingest.records import InboundMessage, StoredWindow, classify
from kubiot_ingest.service import postgres_sink
from kubiot_ingest.sinks.postgres import PostgresSink
from kubiot_operator.local.postgres import PostgresServer, postgres_server
from tests.support.ingest import sample, tally_telemetry

TENANT = "acme"
SCHEMA = "tenant_acme"
RECEIVED_AT = datetime(2026, 11, 24, 10, 0, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
async def sink(postgres: PostgresServer) -> AsyncIterator[PostgresSink]:
    settings = IngestSettings.model_validate(
        {"tenant": TENANT, "database_dsn": postgres.dsn, "retention_days": 3650})
    conn = await asyncpg.connect(postgres.dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    finally:
        await conn.close()
    writer = postgres_sink(settings)
    await writer.connect(RECEIVED_AT)
    try:
        yield writer
    finally:
        await writer.close()


def batch_of(samples: list[tuple[str, int]]) -> Batch:
    """The batch the service would build from these (device, seq) telemetry messages."""
    batch = Batch()
    for mid, (device, seq) in enumerate(samples, start=1):
        message = InboundMessage(mid, f"{device_root(TENANT, device)}/telemetry",
                                 json.dumps(sample(seq)).encode(), RECEIVED_AT)
        batch.add(message, classify(message, TENANT, 65536, StoredWindow()))
    return batch


async def test_the_same_batch_delivered_again_is_stored_once(
        postgres: PostgresServer, sink: PostgresSink) -> None:
    sent = [(f"pump-{d}", seq) for seq in range(50) for d in range(3)]
    first = await sink.write(batch_of(sent), RECEIVED_AT)
    again = await sink.write(batch_of(sent), RECEIVED_AT)
    assert (first.telemetry_rows, again.telemetry_rows) == (300, 0)
    assert sink.redelivered_batches == 1
    tally = await tally_telemetry(postgres.dsn, SCHEMA, sent)
    assert (tally.lost, tally.duplicated, tally.unexpected) == (set(), set(), set())


async def test_a_batch_mixing_new_and_stored_samples_adds_only_the_new(
        postgres: PostgresServer, sink: PostgresSink) -> None:
    stored = [("pump-1", seq) for seq in range(20)]
    await sink.write(batch_of(stored), RECEIVED_AT)
    fresh = [("pump-1", seq) for seq in range(20, 30)] + [("pump-2", seq) for seq in range(5)]
    mixed = stored[5:15] + fresh
    result = await sink.write(batch_of(mixed), RECEIVED_AT)
    assert result.telemetry_rows == 2 * len(fresh)
    assert sink.redelivered_batches == 1
    # A batch after it goes the direct way again.
    later = [("pump-3", seq) for seq in range(4)]
    assert (await sink.write(batch_of(later), RECEIVED_AT)).telemetry_rows == 8
    assert sink.redelivered_batches == 1
    tally = await tally_telemetry(postgres.dsn, SCHEMA, stored + fresh + later)
    assert (tally.lost, tally.duplicated, tally.unexpected) == (set(), set(), set())
