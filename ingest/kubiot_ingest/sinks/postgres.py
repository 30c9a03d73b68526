"""The PostgreSQL sink: one connection, one transaction per batch, telemetry by COPY.

A batch is copied straight into the telemetry table. Only a redelivered message (a lost
PUBACK, a restart) can hold a sample that is already stored; then the copy fails on the
primary key, the transaction is rolled back, and that batch is written again through a
temporary staging table and `INSERT ... SELECT ... ON CONFLICT DO NOTHING`, so a redelivered
sample never becomes a second row. Conflict handling costs a batch something only when it
needs it. The staging path also says which samples were new, so that only those are judged
for anomalies.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import Enum
from typing import Any

import asyncpg

from kubiot_ingest.batcher import Batch, LastSeenMemo
from kubiot_ingest.migrations import Layout, migrate, quote_ident
from kubiot_ingest.partitions import PartitionKeeper
from kubiot_ingest.records import TELEMETRY_COLUMNS, DeviceUpdate, SampleKey

log = logging.getLogger(__name__)

STAGING_TABLE = "kubiot_telemetry_staging"
DEAD_LETTER_COLUMNS = ("received_at", "topic", "payload", "reason", "detail")
#: (device, metric, time, rule, value, low, high, detected_at): a row of the anomalies table.
AnomalyRow = tuple[str, str, datetime, str, float | None, float | None, float | None, datetime]

#: Errors after which a later attempt can succeed: the server or the network went away.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
)

#: Errors caused by the data of some message in the batch.
DATA_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
)


class WriteFailure(Enum):
    """What a failed write says, and so what the service does about it."""

    #: The database or the way to it failed; the same batch is retried with backoff.
    DATABASE = "database"
    #: Some message's data was refused; the batch is split to find it.
    DATA = "data"
    #: Nothing explains it (a bug): the batch is split, the message that fails is quarantined.
    UNEXPECTED = "unexpected"


def write_failure(exc: BaseException) -> WriteFailure:
    """Classify an exception raised by `PostgresSink.write`."""
    if isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError):
        # asyncpg's own "invalid input for query argument" (a value it cannot encode) is an
        # InterfaceError as well: a data error, not a lost connection.
        return WriteFailure.DATA
    if isinstance(exc, DATA_ERRORS):
        return WriteFailure.DATA
    if isinstance(exc, (*RETRYABLE_ERRORS, asyncpg.PostgresError)):
        # Any other error the server reports (read-only after a failover, a permission, a
        # dropped table) is about the database, not about one message: splitting the batch
        # would only dead-letter good messages.
        return WriteFailure.DATABASE
    return WriteFailure.UNEXPECTED


@dataclass(frozen=True)
class WriteResult:
    telemetry_rows: int
    dead_letters: int
    devices: int
    #: The telemetry rows this write inserted, when not all of the batch's were (a
    #: redelivery); None when every row of the batch is new.
    fresh: frozenset[SampleKey] | None = None


class PostgresSink:
    """Writes batches into the tenant's schema; `connect()` also migrates it."""

    name = "postgres"

    def __init__(self, dsn: str, schema: str, *, retention_days: int, compress_after_days: int,
                 ahead_days: int, connect_timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.schema = schema
        self.retention_days = retention_days
        self.compress_after_days = compress_after_days
        self.ahead_days = ahead_days
        self.connect_timeout = connect_timeout
        self.layout: Layout | None = None
        self._conn: Any = None
        self._partitions: PartitionKeeper | None = None
        self._ident = quote_ident(schema)
        self._last_seen = LastSeenMemo()
        #: Batches that held already stored samples and took the staging path.
        self.redelivered_batches = 0

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def connect(self, now: datetime) -> None:
        """Open the connection (if needed), migrate, and prepare the partitions."""
        if self.connected:
            return
        await self.close()
        conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout,
                                     server_settings={"application_name": "kubiot-ingest"})
        try:
            layout, applied = await migrate(conn, self.schema)
            if applied:
                log.info("applied migrations %s to schema %s (%s layout)",
                         applied, self.schema, layout.value)
            await conn.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {STAGING_TABLE} "
                f"(LIKE {self._ident}.telemetry INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
            keeper = PartitionKeeper(self.schema, layout, self.retention_days,
                                     self.compress_after_days, self.ahead_days)
            await keeper.maintain(conn, now)
        except BaseException:
            await conn.close(timeout=1)
            raise
        self._conn, self.layout, self._partitions = conn, layout, keeper

    async def maintain(self, now: datetime) -> list[date]:
        """Partitions ahead and retention behind; returns the days dropped."""
        if self._partitions is None or not self.connected:
            return []
        return await self._partitions.maintain(self._conn, now)

    async def write(self, batch: Batch, now: datetime) -> WriteResult:
        """Write a batch in one transaction; raises on any failure, having written nothing."""
        conn, keeper = self._conn, self._partitions
        if conn is None or keeper is None or conn.is_closed():
            raise asyncpg.InterfaceError("not connected to the database")
        updates = self._last_seen.due(batch.device_updates())
        fresh: set[SampleKey] | None = None
        try:
            if batch.telemetry:
                await keeper.ensure_for(conn, [row[0] for row in batch.telemetry], now)
            try:
                inserted = await self._transaction(conn, batch, updates, direct=True)
            except asyncpg.UniqueViolationError:
                # Some sample is stored already: a redelivery. Nothing of this attempt was
                # kept, so the batch is written again, skipping what is there.
                self.redelivered_batches += 1
                fresh = set()
                inserted = await self._transaction(conn, batch, updates, direct=False,
                                                   fresh=fresh)
        except Exception as exc:
            # After a data error the transaction is rolled back and the connection is fine;
            # after anything else its state is unknown, so the next write starts afresh.
            if write_failure(exc) is not WriteFailure.DATA:
                await self.close()
            raise
        self._last_seen.written(updates)
        return WriteResult(inserted, len(batch.dead_letters), len(updates),
                           None if fresh is None else frozenset(fresh))

    async def _transaction(self, conn: Any, batch: Batch, updates: list[DeviceUpdate], *,
                           direct: bool, fresh: set[SampleKey] | None = None) -> int:
        if direct and not updates and not batch.dead_letters:
            # Telemetry alone (the common batch): one COPY is one statement, committed whole
            # or not at all, without the round trips of BEGIN and COMMIT.
            return await self._write_telemetry(conn, batch, direct=True)
        async with conn.transaction():
            # Telemetry first: when the direct copy fails on the key, nothing else was sent.
            inserted = await self._write_telemetry(conn, batch, direct=direct, fresh=fresh)
            await self._write_devices(conn, updates)
            if batch.dead_letters:
                await conn.copy_records_to_table(
                    "dead_letter", schema_name=self.schema, columns=DEAD_LETTER_COLUMNS,
                    records=[(d.received_at, d.topic, d.payload, d.reason.value, d.detail)
                             for d in batch.dead_letters])
        return inserted

    async def _write_telemetry(self, conn: Any, batch: Batch, *, direct: bool,
                               fresh: set[SampleKey] | None = None) -> int:
        if not batch.telemetry:
            return 0
        if direct:
            await conn.copy_records_to_table("telemetry", schema_name=self.schema,
                                             records=batch.telemetry, columns=TELEMETRY_COLUMNS)
            return len(batch.telemetry)
        await conn.copy_records_to_table(STAGING_TABLE, records=batch.telemetry,
                                         columns=TELEMETRY_COLUMNS)
        inserted = await conn.fetch(
            f"INSERT INTO {self._ident}.telemetry SELECT * FROM {STAGING_TABLE} "
            "ON CONFLICT DO NOTHING RETURNING device, metric, stream, time, seq")
        if fresh is not None:
            fresh.update((r[0], r[1], r[2], r[3], r[4]) for r in inserted)
        return len(inserted)

    async def _write_devices(self, conn: Any, updates: list[DeviceUpdate]) -> None:
        if not updates:
            return
        await conn.executemany(
            f"INSERT INTO {self._ident}.devices AS d "
            "(device, kind, online, last_seen, reported, updated_at) "
            "VALUES ($1, $2, $3, $4, $5::jsonb, now()) "
            "ON CONFLICT (device, kind) DO UPDATE SET "
            " online = COALESCE(EXCLUDED.online, d.online),"
            " last_seen = GREATEST(EXCLUDED.last_seen, d.last_seen),"
            " reported = COALESCE(EXCLUDED.reported, d.reported),"
            # Telemetry only moves last_seen; updated_at follows presence and reported state.
            " updated_at = CASE WHEN EXCLUDED.online IS NULL AND EXCLUDED.reported IS NULL"
            "  THEN d.updated_at ELSE now() END",
            [(u.device, u.kind.value, u.online, u.seen_at, u.reported) for u in updates])

    async def write_anomalies(self, rows: Sequence[AnomalyRow]) -> int:
        """Record anomalies; one already recorded is skipped. Returns how many were new."""
        if not rows:
            return 0
        conn = self._conn
        if conn is None or conn.is_closed():
            raise asyncpg.InterfaceError("not connected to the database")
        columns = list(zip(*rows, strict=True))
        try:
            status = await conn.execute(
                f"INSERT INTO {self._ident}.anomalies "
                "(device, metric, time, rule, value, low, high, detected_at) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], "
                "$5::float8[], $6::float8[], $7::float8[], $8::timestamptz[]) "
                "ON CONFLICT DO NOTHING", *columns)
        except Exception as exc:
            if write_failure(exc) is not WriteFailure.DATA:
                await self.close()
            raise
        return int(status.rsplit(" ", 1)[-1])

    async def forget_anomalies(self, now: datetime) -> int:
        """Delete the anomalies older than the retention; returns how many."""
        if not self.connected:
            return 0
        status = await self._conn.execute(
            f"DELETE FROM {self._ident}.anomalies WHERE time < $1",
            now - timedelta(days=self.retention_days))
        return int(status.rsplit(" ", 1)[-1])

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        # Another writer may have moved rows meanwhile; what this one wrote is no guide now.
        self._last_seen.forget()
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=2)
            except Exception:
                conn.terminate()
