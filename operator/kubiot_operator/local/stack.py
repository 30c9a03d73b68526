"""`make dev`: the whole platform on one machine, from the same manifests a cluster would get.

Under `.kubiot/` it runs Mosquitto (mutual TLS, dynamic security), PostgreSQL, the reconcile
core over a file-backed object store, one ingest process per tenant, simulated devices and a
Prometheus evaluating the chart's alerts, and it picks up edits to the manifests within a
second, as the operator would in a cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from kubiot_contract.topics import OPERATOR_USERNAME, REPORTS_CLIENT_ID, report_filters
from kubiot_operator.brokers import BrokerIdentity, MosquittoDynsecBackend
from kubiot_operator.brokers.statistics import STATISTICS_FILTER, BrokerStatistics
from kubiot_operator.controllers.commands import CommandResults
from kubiot_operator.controllers.fleet import FleetIndex
from kubiot_operator.controllers.platform import Platform, utc_now
from kubiot_operator.controllers.provisioning import ProvisioningDesk, route_messages
from kubiot_operator.controllers.reports import ReportPump
from kubiot_operator.controllers.resync import identities_wanted, resync_all, resync_forever
from kubiot_operator.handlers.http import http_app
from kubiot_operator.kube.client import TENANTS
from kubiot_operator.logs import configure_logging
from kubiot_operator.metrics import OperatorMetrics
from kubiot_operator.models.tenant import TenantSpec
from kubiot_operator.mqtt import OperatorMqtt
from kubiot_operator.pki import FileMaterialStore, TenantAuthority
from kubiot_operator.reconcile.health import HealthTracker
from kubiot_operator.reconcile.identity import BrokerEndpoint
from kubiot_operator.reconcile.tenant import IngestEnvironment, ingest_name, tenant_namespace

from .broker import BrokerPorts, LocalBroker
from .ingest import IngestSupervisor
from .objects import FileObjects
from .ports import free_port, saved_ports
from .postgres import PostgresServer
from .prometheus import (
    CHART_RULES,
    PrometheusError,
    PrometheusServer,
    ScrapeTarget,
    load_rules,
    local_alert_rules,
)
from .reconciler import LocalReconciler
from .simulation import Simulation
from .summary import Summary

log = logging.getLogger("kubiot.local")
DATABASE_SECRET = "kubiot-database"
#: Where the operator would run in a cluster: the labels its metrics get, as in the chart.
OPERATOR_NAMESPACE = "local"
OPERATOR_JOB = "kubiot"
#: How often Mosquitto publishes its `$SYS` statistics here (its default is 10 s).
BROKER_STATISTICS_SECONDS = 2
#: A device's telemetry health is written to its status at most this often.
HEALTH_PATCH_SECONDS = 5.0


@dataclass(frozen=True)
class StackPorts:
    device: int
    service: int
    postgres: int
    metrics: int
    prometheus: int

    @classmethod
    def pick(cls, device: int | None = None, service: int | None = None,
             postgres: int | None = None, metrics: int | None = None,
             prometheus: int | None = None) -> StackPorts:
        return cls(device or free_port(), service or free_port(), postgres or free_port(),
                   metrics or free_port(), prometheus or free_port())


@dataclass(frozen=True)
class Monitoring:
    """The stack's Prometheus: how often it scrapes and evaluates, and the rules it loads."""

    enabled: bool = True
    interval: float = 2.0
    rules_file: Path = CHART_RULES
    #: Every alert's `for:` cut to at most this many seconds; None keeps the chart's.
    longest_for: float | None = None


def scrape_targets(metrics_port: int, ingest: dict[str, tuple[str, int]]) -> list[ScrapeTarget]:
    """The operator core and each tenant's ingest ({tenant: (namespace, metrics port)}), with
    the target labels the chart's and the operator's ServiceMonitors give them in a cluster."""
    targets = [ScrapeTarget(f"127.0.0.1:{metrics_port}", {
        "job": OPERATOR_JOB, "namespace": OPERATOR_NAMESPACE, "service": OPERATOR_JOB,
        "pod": "kubiot-operator-local"})]
    for tenant, (namespace, port) in sorted(ingest.items()):
        targets.append(ScrapeTarget(f"127.0.0.1:{port}", {
            "job": "kubiot-ingest", "namespace": namespace, "service": ingest_name(tenant),
            "pod": f"{tenant}-ingest-local"}))
    return targets


@dataclass(frozen=True)
class StackOptions:
    root: Path
    manifests: Path
    ports: StackPorts
    simulate: bool = True
    telemetry_interval: float = 2.0
    poll_interval: float = 1.0
    summary: bool = True
    monitoring: Monitoring = Monitoring()
    #: Seconds between drift repairs (broker rules deleted by hand come back), as the operator's
    #: resync period.
    resync_seconds: float = 30.0


class LocalStack:
    """Starts everything, runs until `stop` is set, then stops everything in reverse order."""

    def __init__(self, options: StackOptions) -> None:
        self.options = options
        root = options.root
        self.objects = FileObjects(root / "objects.json")
        self.authority = TenantAuthority(FileMaterialStore(root / "pki"))
        self.broker = LocalBroker(root / "broker", BrokerPorts(options.ports.device,
                                                               options.ports.service),
                                  statistics_interval=BROKER_STATISTICS_SECONDS)
        self.postgres = PostgresServer(postgres_home(root), port=options.ports.postgres,
                                       durable=True)
        self.metrics = OperatorMetrics(CollectorRegistry())
        self.broker_statistics = BrokerStatistics(self.metrics.registry)
        self.prometheus: PrometheusServer | None = None
        self._http: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self, stop: asyncio.Event) -> None:
        options = self.options
        # Searchable but not listable: PostgreSQL runs as an unprivileged user below it.
        options.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        options.root.chmod(0o711)
        self._write_ports()
        started = time.monotonic()
        log.info("starting PostgreSQL on port %d", options.ports.postgres)
        # Only the ingest needs the database: devices get their identities meanwhile (a first
        # start spends tens of seconds in initdb).
        database = asyncio.create_task(asyncio.to_thread(self.postgres.start))
        try:
            await self._run(stop, started, database)
        finally:
            with contextlib.suppress(Exception):
                await database
            await asyncio.to_thread(self.postgres.stop)
            log.info("stopped; the data stays in %s", options.root)

    async def _run(self, stop: asyncio.Event, started: float,
                   database: asyncio.Task[PostgresServer]) -> None:
        options = self.options
        reconciler = LocalReconciler(self.objects, options.manifests,
                                     approvals=options.root / "approvals")
        # Mosquitto needs every tenant's CA in its CA file before the listener starts.
        await reconciler.prepare_trust(self.authority, self.broker)
        seed = await self._cold_start_identities(reconciler)
        log.info("starting Mosquitto: devices on %d (mutual TLS), services on %d",
                 options.ports.device, options.ports.service)
        await self.broker.start(seed)
        if seed:
            log.info("Mosquitto started with %d identities in its dynamic-security state "
                     "(%.1f s)", len(seed), self.broker.cold_start_seeded or 0.0)
        password = await self.broker.admin_password()
        backend = MosquittoDynsecBackend("127.0.0.1", options.ports.service, OPERATOR_USERNAME,
                                         password)
        await backend.__aenter__()
        health = HealthTracker(utc_now())
        reports = ReportPump(self.objects, self.metrics, flush_seconds=1.0,
                             patches_per_second=200, health=health,
                             health_seconds=HEALTH_PATCH_SECONDS)
        results = CommandResults()
        desk = ProvisioningDesk()
        route = route_messages(reports.on_message, desk)

        def on_message(topic: str, payload: bytes) -> None:
            if topic.startswith("$SYS/"):
                self.broker_statistics.on_message(topic, payload)
            else:
                route(topic, payload)

        # The operator's session also reads the broker's statistics: Mosquitto has no metrics
        # endpoint, and the admin identity may read `$SYS`.
        mqtt = OperatorMqtt("127.0.0.1", options.ports.service, OPERATOR_USERNAME, password,
                            client_id=REPORTS_CLIENT_ID,
                            subscriptions=[*report_filters(), STATISTICS_FILTER],
                            on_message=on_message, on_command_result=results.on_result)
        platform = Platform(
            objects=self.objects, authority=self.authority, broker=backend, messenger=mqtt,
            trust=self.broker, metrics=self.metrics,
            endpoint=BrokerEndpoint("127.0.0.1", options.ports.device,
                                    self.broker.server_ca_file.read_bytes()),
            ingest=IngestEnvironment(image="local", broker_host="127.0.0.1",
                                     broker_port=options.ports.service,
                                     platform_database_secret=DATABASE_SECRET,
                                     platform_database_key="dsn"),
            ca_namespace="local", fleet=self.objects.fleet, health=health)
        reconciler.attach(platform, database_dsn=self.postgres.dsn)
        results.attach(platform)
        ingest = IngestSupervisor(self.objects, options.root / "ingest")
        simulation = Simulation(self.objects, options.root / "devices",
                                interval=options.telemetry_interval, enabled=options.simulate,
                                claim_dir=options.root / "claims")
        summary = Summary(self.objects, self.postgres.dsn, options, ingest)
        try:
            await self._serve_metrics(ready=lambda: mqtt.connected)
            await self._start_prometheus()
            if self.prometheus is not None:
                summary.prometheus_url = self.prometheus.url
            self._spawn(mqtt.run(), "mqtt")
            self._spawn(reports.run(), "reports")
            self._spawn(results.run(), "command-results")
            self._spawn(desk.run(platform), "provisioning")
            await mqtt.wait_connected(30)
            self._spawn(self.objects.flush_periodically(), "store")
            await reconciler.sync()
            log.info("every identity usable at the broker %.1f s after start (%s)",
                     time.monotonic() - started,
                     ready_summary(self.objects.fleet, await self.objects.list(TENANTS)))
            await resync_all(platform)
            self._spawn(resync_forever(platform, options.resync_seconds,
                                       first_delay=options.resync_seconds), "resync")
            self._spawn(reconciler.watch(options.poll_interval), "manifests")
            await database
            await ingest.reconcile()
            await ingest.wait_ready()
            self._spawn(ingest.supervise(), "ingest")
            if self.prometheus is not None:
                self._spawn(self._follow_targets(ingest), "scrape-targets")
            self._spawn(simulation.run(), "simulation")
            await summary.print_banner()
            if options.summary:
                self._spawn(summary.run(), "summary")
            await stop.wait()
        finally:
            log.info("stopping")
            for task in reversed(self._tasks):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.prometheus is not None:
                await asyncio.to_thread(self.prometheus.stop)
            if self._http is not None:
                await self._http.cleanup()
            await simulation.stop()
            await ingest.stop()
            with contextlib.suppress(Exception):
                await backend.aclose()
            await self.broker.stop()
            self.objects.flush()

    async def _cold_start_identities(self, reconciler: LocalReconciler) -> list[BrokerIdentity]:
        """On a broker's first start, every identity the manifests call for, so Mosquitto
        starts with them instead of taking one command each (each rewrites its whole state
        file). A broker with a state of its own keeps it: nothing to write after a restart."""
        if self.broker.has_state:
            return []
        await reconciler.apply_manifests()
        identities: list[BrokerIdentity] = []
        for tenant in await self.objects.list(TENANTS):
            try:
                spec = TenantSpec.model_validate(tenant.get("spec") or {})
            except ValidationError:
                continue  # the Tenant reconcile reports it
            identities += await identities_wanted(self.objects, tenant["metadata"]["name"], spec)
        return identities

    async def _serve_metrics(self, ready: Any) -> None:
        """/metrics, /healthz and /readyz of the operator core, as the operator serves them."""
        app = http_app(self.metrics.registry, ready=ready, authority=lambda: self.authority)
        self._http = web.AppRunner(app, access_log=None)
        await self._http.setup()
        await web.TCPSite(self._http, "127.0.0.1", self.options.ports.metrics).start()

    async def _start_prometheus(self) -> None:
        monitoring = self.options.monitoring
        if not monitoring.enabled:
            return
        rules = None
        if monitoring.rules_file.exists():
            rules = local_alert_rules(load_rules(monitoring.rules_file),
                                      longest_for=monitoring.longest_for)
        else:
            log.warning("no alert rules at %s; Prometheus runs without them",
                        monitoring.rules_file)
        try:
            server = PrometheusServer(self.options.root / "prometheus",
                                      self.options.ports.prometheus,
                                      interval=monitoring.interval, rules=rules)
            server.set_targets(scrape_targets(self.options.ports.metrics, {}))
            log.info("starting Prometheus on port %d", self.options.ports.prometheus)
            await asyncio.to_thread(server.start)
        except PrometheusError as exc:
            log.warning("%s; the stack runs without Prometheus", exc)
            return
        self.prometheus = server

    async def _follow_targets(self, ingest: IngestSupervisor, interval: float = 1.0) -> None:
        """Keep Prometheus's targets in step with the ingest processes the supervisor runs."""
        assert self.prometheus is not None
        while True:
            ports = {tenant: (process.namespace, process.metrics_port)
                     for tenant, process in ingest.processes.items()}
            self.prometheus.set_targets(scrape_targets(self.options.ports.metrics, ports))
            await asyncio.sleep(interval)

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=f"kubiot-local-{name}")
        task.add_done_callback(_report_crash)
        self._tasks.append(task)

    def _write_ports(self) -> None:
        ports = self.options.ports
        (self.options.root / "ports.env").write_text(
            f"KUBIOT_DEVICE_PORT={ports.device}\nKUBIOT_SERVICE_PORT={ports.service}\n"
            f"KUBIOT_POSTGRES_PORT={ports.postgres}\nKUBIOT_METRICS_PORT={ports.metrics}\n"
            f"KUBIOT_PROMETHEUS_PORT={ports.prometheus}\n")


def ready_summary(fleet: FleetIndex, tenants: list[dict[str, Any]]) -> str:
    """`acme: 9998/10000 devices Ready`, per tenant, from the objects' status."""
    parts = []
    for tenant in tenants:
        try:
            namespace = tenant_namespace(tenant["metadata"]["name"],
                                         TenantSpec.model_validate(tenant.get("spec") or {}))
        except ValidationError:
            continue
        devices = fleet.devices(namespace)
        ready = sum(1 for d in devices if d.ready)
        parts.append(f"{tenant['metadata']['name']}: {ready}/{len(devices)} devices Ready")
    return "; ".join(parts) or "no tenants"


def postgres_home(root: Path) -> Path:
    """Where the database lives: `.kubiot/postgres`, or, when the server's unprivileged user
    cannot reach the working tree (a checkout under /root), a folder outside it that
    `.kubiot/postgres` links to."""
    inside = root / "postgres"
    if os.geteuid() != 0 or all(p.stat().st_mode & 0o001 for p in root.parents if p.exists()):
        return inside
    if inside.is_symlink():
        return inside.resolve()
    outside = Path("/var/lib/kubiot") / hashlib.sha256(str(root).encode()).hexdigest()[:16]
    outside.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    root.mkdir(parents=True, exist_ok=True)
    inside.symlink_to(outside, target_is_directory=True)
    return outside


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: %r", task.get_name(), task.exception())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubiot-local", description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path(".kubiot"),
                   help="Where the stack keeps its data (default .kubiot).")
    p.add_argument("--manifests", type=Path, default=Path("manifests/examples"),
                   help="The folder of manifests to reconcile (watched for edits).")
    p.add_argument("--device-port", type=int, help="Mutual-TLS MQTT port for devices.")
    p.add_argument("--service-port", type=int, help="MQTT port for the operator and ingest.")
    p.add_argument("--postgres-port", type=int, help="PostgreSQL port.")
    p.add_argument("--metrics-port", type=int,
                   help="Port of the operator core's /metrics (with the broker's statistics).")
    p.add_argument("--prometheus-port", type=int, help="Prometheus's port.")
    p.add_argument("--no-prometheus", action="store_true", help="Do not run Prometheus.")
    p.add_argument("--scrape-interval", type=float, default=2.0,
                   help="Seconds between Prometheus scrapes and rule evaluations.")
    p.add_argument("--alert-rules", type=Path, default=CHART_RULES,
                   help="Alert rules Prometheus evaluates (default: the chart's).")
    p.add_argument("--alert-for", type=float, metavar="SECONDS",
                   help="Cut every alert's `for:` to at most this long, to see alerts fire "
                        "within seconds (default: the chart's durations).")
    p.add_argument("--resync-seconds", type=float, default=30.0,
                   help="Seconds between drift repairs of the broker's rules.")
    p.add_argument("--no-simulation", action="store_true", help="Do not simulate devices.")
    p.add_argument("--telemetry-interval", type=float, default=2.0,
                   help="Seconds between telemetry messages of a simulated device.")
    p.add_argument("--quiet", action="store_true", help="No live summary line.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging("text")
    root = args.dir.resolve()
    saved = saved_ports(root)
    ports = StackPorts.pick(args.device_port or saved.get("KUBIOT_DEVICE_PORT"),
                            args.service_port or saved.get("KUBIOT_SERVICE_PORT"),
                            args.postgres_port or saved.get("KUBIOT_POSTGRES_PORT"),
                            args.metrics_port or saved.get("KUBIOT_METRICS_PORT"),
                            args.prometheus_port or saved.get("KUBIOT_PROMETHEUS_PORT"))
    if not args.manifests.is_dir():
        print(f"kubiot-local: {args.manifests} is not a folder of manifests", file=sys.stderr)
        return 2
    options = StackOptions(root=root, manifests=args.manifests.resolve(), ports=ports,
                           simulate=not args.no_simulation,
                           telemetry_interval=args.telemetry_interval, summary=not args.quiet,
                           resync_seconds=args.resync_seconds,
                           monitoring=Monitoring(enabled=not args.no_prometheus,
                                                 interval=args.scrape_interval,
                                                 rules_file=args.alert_rules.resolve(),
                                                 longest_for=args.alert_for))
    return asyncio.run(_run(options))


async def _run(options: StackOptions) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, log_tasks)
    await LocalStack(options).run(stop)
    return 0


def log_tasks() -> None:
    """`kill -USR1 <pid>`: log what every task of the stack is waiting on (for a stack that
    seems stuck)."""
    for task in asyncio.all_tasks():
        frames = io.StringIO()
        task.print_stack(limit=12, file=frames)
        log.warning("task %s:\n%s", task.get_name(), frames.getvalue())


if __name__ == "__main__":
    sys.exit(main())

