"""Versioned schema migrations, applied by the service at start under an advisory lock.

Files are named `NNNN_name.sql`, or `NNNN_name.{native,timescale}.sql` where the two storage
layouts differ. `{{schema}}` stands for the tenant's quoted schema name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import Any

_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)(?:\.(native|timescale))?\.sql$")
SCHEMA_PLACEHOLDER = "{{schema}}"


class Layout(StrEnum):
    """How telemetry is stored: a TimescaleDB hypertable, or native range partitions."""

    TIMESCALE = "timescale"
    NATIVE = "native"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def load_migrations(layout: Layout) -> list[Migration]:
    """The migrations for a layout, in version order, with no schema substituted yet."""
    found: dict[int, Migration] = {}
    for entry in resources.files(__package__).iterdir():
        match = _FILE_RE.match(entry.name)
        if not match or match.group(3) not in (None, layout.value):
            continue
        version = int(match.group(1))
        if version in found:
            raise ValueError(f"two migrations have version {version}")
        found[version] = Migration(version, match.group(2), entry.read_text())
    return [found[v] for v in sorted(found)]


def render(migration: Migration, schema: str) -> str:
    return migration.sql.replace(SCHEMA_PLACEHOLDER, quote_ident(schema))


def lock_key(schema: str) -> str:
    """Text hashed into the advisory lock that serialises migrations of one schema."""
    return f"kubiot-ingest/migrate/{schema}"


async def detect_layout(conn: Any) -> Layout:
    """TimescaleDB when the extension is installed or can be, else native partitioning."""
    installed = await conn.fetchval(
        "SELECT true FROM pg_extension WHERE extname = 'timescaledb'")
    if installed:
        return Layout.TIMESCALE
    available = await conn.fetchval(
        "SELECT true FROM pg_available_extensions WHERE name = 'timescaledb'")
    if not available:
        return Layout.NATIVE
    try:
        async with conn.transaction():
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except Exception:
        # Available but not loadable (not in shared_preload_libraries, or no privilege).
        return Layout.NATIVE
    return Layout.TIMESCALE


async def migrate(conn: Any, schema: str) -> tuple[Layout, list[int]]:
    """Bring the schema up to date; return its layout and the versions applied now."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", lock_key(schema))
        ident = quote_ident(schema)
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {ident}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {ident}.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, layout text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())")
        rows = await conn.fetch(f"SELECT version, layout FROM {ident}.schema_migrations")
        applied = {r["version"]: r["layout"] for r in rows}
        # Once telemetry exists its layout is fixed, whatever extensions appear later.
        layout = Layout(applied[2]) if 2 in applied else await detect_layout(conn)
        done: list[int] = []
        for migration in load_migrations(layout):
            if migration.version in applied:
                continue
            await conn.execute(render(migration, schema))
            await conn.execute(
                f"INSERT INTO {ident}.schema_migrations (version, name, layout) "
                "VALUES ($1, $2, $3)", migration.version, migration.name, layout.value)
            done.append(migration.version)
    return layout, done
