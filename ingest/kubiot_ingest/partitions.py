"""Keeping the telemetry table's time layout: daily partitions ahead, retention behind.

The date arithmetic is pure; `PartitionKeeper` applies it to a connection.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from kubiot_ingest.migrations import Layout, quote_ident

PARTITION_PREFIX = "telemetry_p"
_PARTITION_RE = re.compile(r"^telemetry_p(\d{8})$")


def partition_name(day: date) -> str:
    return f"{PARTITION_PREFIX}{day:%Y%m%d}"


def partition_day(name: str) -> date | None:
    match = _PARTITION_RE.match(name)
    return datetime.strptime(match.group(1), "%Y%m%d").date() if match else None


def day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(), tzinfo=UTC)
    return start, start + timedelta(days=1)


def window(now: datetime, retention_days: int, ahead_days: int) -> tuple[date, date]:
    """First and last day that get their own partition; rows outside go to the default."""
    today = now.astimezone(UTC).date()
    return today - timedelta(days=retention_days), today + timedelta(days=ahead_days)


def days_to_create(times: Iterable[datetime], existing: set[date], first: date,
                   last: date) -> list[date]:
    """Days of `times` inside the window that have no partition yet."""
    wanted = {t.astimezone(UTC).date() for t in times}
    return sorted(d for d in wanted if first <= d <= last and d not in existing)


def expired(existing: Iterable[date], now: datetime, retention_days: int) -> list[date]:
    """Partitions whose every row is older than the retention period."""
    cutoff = now.astimezone(UTC) - timedelta(days=retention_days)
    return sorted(d for d in existing if day_bounds(d)[1] <= cutoff)


class PartitionKeeper:
    """Creates and drops daily partitions of `{schema}.telemetry` (native layout only)."""

    def __init__(self, schema: str, layout: Layout, retention_days: int,
                 compress_after_days: int, ahead_days: int) -> None:
        self.schema = schema
        self.layout = layout
        self.retention_days = retention_days
        self.compress_after_days = compress_after_days
        self.ahead_days = ahead_days
        self._known: set[date] = set()
        self._ident = quote_ident(schema)

    async def load(self, conn: Any) -> None:
        """Learn which partitions exist (another replica may have made some)."""
        if self.layout is not Layout.NATIVE:
            return
        rows = await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass($1)", f"{self._ident}.telemetry")
        self._known = {d for r in rows if (d := partition_day(r["relname"])) is not None}

    async def ensure_for(self, conn: Any, times: Sequence[datetime], now: datetime) -> None:
        """Create the partitions a batch needs, before it is written."""
        if self.layout is not Layout.NATIVE:
            return
        if self._known_span(times):
            return
        first, last = window(now, self.retention_days, self.ahead_days)
        for day in days_to_create(times, self._known, first, last):
            await self._create(conn, day)

    def _known_span(self, times: Sequence[datetime]) -> bool:
        """True when every day from the earliest to the latest of `times` has a partition:
        the common batch, answered with two comparisons per row instead of a date each."""
        if not times:
            return True
        earliest, latest = min(times).astimezone(UTC).date(), max(times).astimezone(UTC).date()
        day = earliest
        while day <= latest:
            if day not in self._known:
                return False
            day += timedelta(days=1)
        return True

    async def maintain(self, conn: Any, now: datetime) -> list[date]:
        """Create partitions ahead and drop expired ones; return the days dropped."""
        if self.layout is not Layout.NATIVE:
            await self._timescale_policies(conn)
            return []
        await self.load(conn)
        today = now.astimezone(UTC).date()
        for offset in range(self.ahead_days + 1):
            day = today + timedelta(days=offset)
            if day not in self._known:
                await self._create(conn, day)
        dropped = expired(self._known, now, self.retention_days)
        cutoff = now.astimezone(UTC) - timedelta(days=self.retention_days)
        async with conn.transaction():
            await self._lock(conn)
            for day in dropped:
                await conn.execute(
                    f"DROP TABLE IF EXISTS {self._ident}.{quote_ident(partition_name(day))}")
                self._known.discard(day)
            await conn.execute(
                f"DELETE FROM {self._ident}.telemetry_default WHERE time < $1", cutoff)
        return dropped

    async def _create(self, conn: Any, day: date) -> None:
        # Build the partition apart, move the default partition's rows for that day into it,
        # then attach: attaching straight away fails when the default already holds such rows.
        name = f"{self._ident}.{quote_ident(partition_name(day))}"
        start, end = day_bounds(day)
        async with conn.transaction():
            await self._lock(conn)
            exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name)
            if not exists:
                await conn.execute(
                    f"CREATE TABLE {name} (LIKE {self._ident}.telemetry "
                    "INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
                await conn.execute(
                    f"WITH moved AS (DELETE FROM {self._ident}.telemetry_default "
                    "WHERE time >= $1 AND time < $2 RETURNING *) "
                    f"INSERT INTO {name} SELECT * FROM moved", start, end)
                await conn.execute(
                    f"ALTER TABLE {self._ident}.telemetry ATTACH PARTITION {name} "
                    "FOR VALUES FROM ($1) TO ($2)".replace("$1", _literal(start))
                    .replace("$2", _literal(end)))
        self._known.add(day)

    async def _lock(self, conn: Any) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                           f"kubiot-ingest/partitions/{self.schema}")

    async def _timescale_policies(self, conn: Any) -> None:
        # Remove and add again so a changed retention or compression setting takes effect.
        table = f"{self._ident}.telemetry"
        async with conn.transaction():
            await conn.execute("SELECT remove_retention_policy($1::regclass, if_exists => true)",
                               table)
            await conn.execute(
                "SELECT add_retention_policy($1::regclass, make_interval(days => $2))",
                table, self.retention_days)
            await conn.execute(
                "SELECT remove_compression_policy($1::regclass, if_exists => true)", table)
            await conn.execute(
                "SELECT add_compression_policy($1::regclass, make_interval(days => $2))",
                table, self.compress_after_days)


def _literal(moment: datetime) -> str:
    # Partition bounds must be literals; an ISO timestamp from our own date math is safe.
    return f"'{moment.isoformat()}'"
