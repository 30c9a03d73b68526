"""What the local stack prints: where to look, then one live line of how the fleet is doing."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import TYPE_CHECKING, Any

import asyncpg

from kubiot_operator.kube.client import DEVICES, TENANTS
from kubiot_operator.models.tenant import TenantSpec
from kubiot_operator.reconcile.tenant import database_schema

from .objects import FileObjects

if TYPE_CHECKING:
    from .ingest import IngestSupervisor
    from .stack import StackOptions


class Summary:
    def __init__(self, objects: FileObjects, dsn: str, options: StackOptions,
                 ingest: IngestSupervisor, prometheus_url: str | None = None) -> None:
        self.objects = objects
        self.prometheus_url = prometheus_url
        self.dsn = dsn
        self.options = options
        self.ingest = ingest

    async def schemas(self) -> list[str]:
        schemas = []
        for tenant in await self.objects.list(TENANTS):
            spec = TenantSpec.model_validate(tenant.get("spec") or {})
            if spec.ingest.enabled:
                schemas.append(database_schema(tenant["metadata"]["name"], spec))
        return schemas

    async def print_banner(self) -> None:
        ports = self.options.ports
        root = self.options.root
        schema = next(iter(await self.schemas()), "tenant_acme")
        lines = [
            "",
            "kubiot is running. Where to look:",
            f"  manifests (edit them; changes apply within a second): {self.options.manifests}",
            f"  device credentials:   {root / 'devices'}/<tenant>/<device>/",
            f"  provisioning claims:  {root / 'claims'}/<tenant>/<claim>/   "
            "(.venv/bin/kubiot local factory --count 20)",
            f"  MQTT for devices:     127.0.0.1:{ports.device} (mutual TLS)",
            f"  database:             psql '{self.dsn}'",
            f"  sample query:         SELECT device, metric, time, value FROM {schema}.telemetry "
            "ORDER BY time DESC LIMIT 10;",
            f"  logs:                 {root}/ingest/*.log, {root}/broker/mosquitto/mosquitto.log",
            "  status:               .venv/bin/kubiot local status   "
            "(devices, tail, issue, factory, approve)",
        ]
        lines.append(f"  operator metrics:     http://127.0.0.1:{ports.metrics}/metrics "
                     "(with the broker's statistics)")
        for tenant, process in sorted(self.ingest.processes.items()):
            lines.append(f"  ingest metrics ({tenant}): {process.metrics_url}")
        if self.prometheus_url is not None:
            lines.append(f"  Prometheus:           {self.prometheus_url} (alerts: "
                         f"{self.prometheus_url}/alerts)")
        lines.append("Press Ctrl-C to stop; run it again to resume with the same data.\n")
        print("\n".join(lines), flush=True)

    async def line(self, connection: Any, previous: tuple[float, int] | None
                   ) -> tuple[str, tuple[float, int]]:
        devices = await self.objects.list(DEVICES)
        online = sum(1 for d in devices if (d.get("status") or {}).get("online"))
        rows = dead = 0
        for schema in await self.schemas():
            with contextlib.suppress(asyncpg.PostgresError):
                rows += await connection.fetchval(f'SELECT count(*) FROM "{schema}".telemetry')
                dead += await connection.fetchval(
                    f'SELECT count(*) FROM "{schema}".dead_letter')
        now = time.monotonic()
        rate = 0.0
        if previous is not None and now > previous[0]:
            rate = (rows - previous[1]) / (now - previous[0])
        text = (f"devices online {online}/{len(devices)} · rows/s {rate:6.1f} · "
                f"rows written {rows} · dead letters {dead}")
        return text, (now, rows)

    async def run(self, interval: float = 2.0) -> None:
        previous = None
        connection = None
        try:
            while True:
                await asyncio.sleep(interval)
                try:
                    if connection is None:
                        connection = await asyncpg.connect(self.dsn)
                    text, previous = await self.line(connection, previous)
                except (OSError, asyncpg.PostgresError) as exc:
                    text, connection = f"database unavailable: {exc}", None
                sys.stdout.write("\r" + text.ljust(100) if sys.stdout.isatty()
                                 else text + "\n")
                sys.stdout.flush()
        finally:
            if connection is not None:
                await connection.close()
