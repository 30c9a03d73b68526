"""What the operator process holds while it runs: connections, the platform, background tasks."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, cast

import kopf
from aiohttp import web
from prometheus_client import CollectorRegistry

from kubiot_contract.topics import operator_client_id, report_filters
from kubiot_operator.brokers import BrokerBackend, backend_from_settings
from kubiot_operator.controllers.adapters import TrustPublisher
from kubiot_operator.controllers.commands import CommandResults
from kubiot_operator.controllers.fleet import FleetIndex
from kubiot_operator.controllers.gateway import GatewayRefresher
from kubiot_operator.controllers.kinds import apply_outcome
from kubiot_operator.controllers.platform import Event, Outcome, Platform, utc_now
from kubiot_operator.controllers.provisioning import ProvisioningDesk, route_messages
from kubiot_operator.controllers.reports import ReportPump
from kubiot_operator.controllers.resync import resync_forever
from kubiot_operator.handlers.http import http_app
from kubiot_operator.kube.client import Connection, KubeClient, Relogin, kind_of
from kubiot_operator.kube.secrets import SecretMaterialStore, SecretTrustPublisher
from kubiot_operator.metrics import OperatorMetrics
from kubiot_operator.mqtt import OperatorMqtt
from kubiot_operator.pki import TenantAuthority
from kubiot_operator.reconcile.health import HealthTracker
from kubiot_operator.reconcile.identity import BrokerEndpoint
from kubiot_operator.reconcile.tenant import IngestEnvironment
from kubiot_operator.settings import OperatorSettings

log = logging.getLogger(__name__)
#: How long stopping waits for the background tasks to end.
STOP_TIMEOUT_SECONDS = 10.0


class Runtime:
    """Started once by the startup handler, stopped by the cleanup handler."""

    def __init__(self, settings: OperatorSettings, connection: Connection,
                 registry: CollectorRegistry | None = None,
                 broker: BrokerBackend | None = None,
                 trust: TrustPublisher | None = None,
                 relogin: Relogin | None = None, fleet: FleetIndex | None = None) -> None:
        self.settings = settings
        self.fleet = fleet or FleetIndex()
        self.connection = connection
        self._relogin = relogin
        self.registry = registry or CollectorRegistry()
        self.metrics = OperatorMetrics(self.registry)
        self._broker = broker
        self._trust = trust
        self.kube: KubeClient | None = None
        self.platform: Platform | None = None
        self.mqtt: OperatorMqtt | None = None
        self.reports: ReportPump | None = None
        self.results = CommandResults()
        self.provisioning = ProvisioningDesk()
        self._tasks: list[asyncio.Task[None]] = []
        self._http: web.AppRunner | None = None

    async def start(self) -> Platform:
        settings = self.settings
        self.kube = await KubeClient(self.connection, relogin=self._relogin).__aenter__()
        broker = self._broker or backend_from_settings(settings)
        health = HealthTracker(utc_now())
        self.reports = ReportPump(self.kube, self.metrics,
                                  flush_seconds=settings.status_flush_seconds,
                                  patches_per_second=settings.status_patches_per_second,
                                  health=health, health_seconds=settings.status_health_seconds)
        self.mqtt = OperatorMqtt(
            settings.broker_admin_host, settings.broker_admin_port,
            settings.broker_admin_username, settings.broker_admin_password.get_secret_value(),
            client_id=operator_client_id(f"reports-{settings.namespace}"),
            tls=_admin_tls(settings), subscriptions=report_filters(),
            on_message=route_messages(self.reports.on_message, self.provisioning),
            on_command_result=self.results.on_result)
        ca_pem = _read(settings.broker_ca_file)
        self.platform = Platform(
            objects=self.kube,
            authority=TenantAuthority(SecretMaterialStore(self.kube, settings.namespace),
                                      crl_url_template=settings.crl_url_template),
            broker=broker, messenger=self.mqtt,
            trust=self._trust or SecretTrustPublisher(
                self.kube, settings.broker_trust_namespace or settings.namespace,
                include_crls=settings.crl_url_template is None),
            metrics=self.metrics,
            endpoint=BrokerEndpoint(settings.broker_public_host, settings.broker_public_port,
                                    ca_pem),
            ingest=IngestEnvironment(
                image=settings.ingest_image, broker_host=settings.broker_admin_host,
                broker_port=settings.broker_admin_port,
                platform_database_secret=settings.platform_database_secret,
                platform_database_key=settings.platform_database_key,
                monitoring_namespace=settings.monitoring_namespace,
                monitor_labels=settings.ingest_monitor_labels),
            ca_namespace=settings.namespace, broker_kind=settings.broker.value,
            fleet=self.fleet, health=health)
        self.results.attach(self.platform)
        refresher = GatewayRefresher(self.platform, self.apply)
        self.platform.gateway_refresh = refresher.request
        self._spawn(self.mqtt.run(), "mqtt")
        self._spawn(self.reports.run(), "reports")
        self._spawn(self.provisioning.run(self.platform), "provisioning")
        self._spawn(refresher.run(), "gateways")
        self._spawn(self.results.run(), "command-results")
        self._spawn(resync_forever(self.platform, settings.resync_period_seconds), "resync")
        if settings.metrics_port:
            await self._serve_http(settings.metrics_port)
        return self.platform

    async def stop(self) -> None:
        if self.platform is not None and self.results.queued:
            # Answers already received (and acknowledged to the devices) are recorded before
            # the session goes; bounded, so stopping cannot hang on an unreachable API server.
            try:
                await asyncio.wait_for(self.results.flush(), STOP_TIMEOUT_SECONDS)
            except Exception as exc:
                log.warning("%d command answers were not recorded before stopping; their "
                            "targets will time out: %r", self.results.queued, exc)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a task that ignores its cancellation must not keep the operator from
            # stopping (and its replacement from starting).
            _, stuck = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_SECONDS)
            for task in stuck:
                log.error("background task %s did not stop within %.0f s; leaving it",
                          task.get_name(), STOP_TIMEOUT_SECONDS)
        self._tasks.clear()
        if self._http is not None:
            await self._http.cleanup()
        if self.platform is not None:
            await self.platform.broker.aclose()
        if self.kube is not None:
            await self.kube.__aexit__(None, None, None)

    async def apply(self, body: dict[str, Any], outcome: Outcome) -> None:
        """Write an outcome reached outside a kopf handler (its retries are the timer's)."""
        await apply_outcome(body, outcome, write_status=self.write_status, post_event=post_event)

    async def write_status(self, body: dict[str, Any], status: dict[str, Any]) -> None:
        """Patch the status subresource with what a reconcile concluded."""
        assert self.kube is not None
        meta = body["metadata"]
        await self.kube.patch(kind_of(body), meta["name"], {"status": status},
                              meta.get("namespace"), subresource="status")

    def unhealthy(self) -> str | None:
        """Why the operator cannot work and a restart may help; None when it is healthy.

        An API server that has refused the operator's credentials for longer than
        `api_refusal_limit_seconds`, even after logging in again, leaves every reconcile
        failing: a restarted pod gets its service-account token mounted afresh."""
        refused = self.kube.refused_for() if self.kube is not None else 0.0
        if refused > self.settings.api_refusal_limit_seconds:
            return f"the Kubernetes API has refused the operator's credentials for {refused:.0f} s"
        return None

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coroutine, name=f"kubiot-{name}")
        task.add_done_callback(_log_crash)
        self._tasks.append(task)

    async def _serve_http(self, port: int) -> None:
        app = http_app(
            self.registry, ready=lambda: self.mqtt is not None and self.mqtt.connected,
            unhealthy=self.unhealthy,
            authority=lambda: self.platform.authority if self.platform is not None else None)
        self._http = web.AppRunner(app, access_log=None)
        await self._http.setup()
        await web.TCPSite(self._http, "0.0.0.0", port).start()


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path else None


def _admin_tls(settings: OperatorSettings) -> ssl.SSLContext | None:
    if not settings.broker_admin_tls:
        return None
    return ssl.create_default_context(
        cafile=str(settings.broker_ca_file) if settings.broker_ca_file else None)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s stopped: %r", task.get_name(), task.exception())


def post_event(body: dict[str, Any], event: Event) -> None:
    """A Kubernetes event about `body`, posted by kopf in the background."""
    raw: kopf.RawBody = cast(kopf.RawBody, body)  # RawBody is the typed view of an API object
    kopf.event(kopf.Body(raw), type=event.type.value, reason=event.reason, message=event.message)
