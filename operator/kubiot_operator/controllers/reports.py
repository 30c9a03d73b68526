"""Device reports (presence, reported state, firmware progress) and the ingest's health reports
into status, rate-limited; presence and health also into the platform's health tracker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime

from kubiot_contract.topics import IdentityKind
from kubiot_operator.kube.client import DEVICES, GATEWAYS, TENANTS, KubeError, NotFound
from kubiot_operator.metrics import OperatorMetrics
from kubiot_operator.models.device import DeviceStatus
from kubiot_operator.models.gateway import GatewayStatus
from kubiot_operator.models.tenant import TenantSpec
from kubiot_operator.reconcile.conditions import set_conditions
from kubiot_operator.reconcile.health import HealthTracker
from kubiot_operator.reconcile.reports import (
    PendingReport,
    ReportBuffer,
    ReportKey,
    TokenBucket,
    admissible_status,
)
from kubiot_operator.reconcile.tenant import tenant_namespace

from .adapters import Objects
from .objects import conditions_wire, current_conditions, generation, parse_spec
from .platform import utc_now

log = logging.getLogger(__name__)


class ReportPump:
    """Collects reports as they arrive and patches status in batches at a bounded rate."""

    def __init__(self, objects: Objects, metrics: OperatorMetrics, *, flush_seconds: float,
                 patches_per_second: float, clock: Callable[[], datetime] = utc_now,
                 health: HealthTracker | None = None, health_seconds: float = 30.0) -> None:
        self._objects = objects
        self._metrics = metrics
        self._flush_seconds = flush_seconds
        self._bucket = TokenBucket(patches_per_second, burst=patches_per_second * 2,
                                   now=time.monotonic())
        self._clock = clock
        self._buffer = ReportBuffer(health, health_seconds=health_seconds)
        self._namespaces: dict[str, str] = {}
        self._online: dict[str, set[str]] = {}
        self.ignored = 0

    def on_message(self, topic: str, payload: bytes) -> None:
        """Called by the MQTT connection for each report; never blocks."""
        try:
            if self._buffer.add(topic, payload, self._clock()) is not None:
                self.ignored += 1
        except Exception:
            # ReportBuffer.add refuses what a device sends with Ignored; an exception here is a
            # bug, and it must not end the MQTT session every other report arrives on.
            log.exception("could not read a report on %r (payload %r)", topic, payload[:200])
            self.ignored += 1

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_seconds)
            await self.flush()

    async def flush(self) -> int:
        """Patch as many pending reports as the rate allows; returns how many were written."""
        now = self._clock()
        self._buffer.promote(now)
        allowed = self._bucket.take(len(self._buffer), time.monotonic())
        written = 0
        for key, report in self._buffer.drain(allowed, now):
            if await self._patch(key, report):
                written += 1
        return written

    async def _patch(self, key: ReportKey, report: PendingReport) -> bool:
        namespace = await self._namespace_of(key.tenant)
        if namespace is None:
            return False
        kind, model = (DEVICES, DeviceStatus) if key.kind is IdentityKind.DEVICE else (
            GATEWAYS, GatewayStatus)
        admissible = admissible_status(report.status_patch(), model)
        for rejected in admissible.rejected:
            self._metrics.report_fields_rejected.labels(model.__name__.removesuffix("Status"),
                                                        rejected).inc()
            log.info("%s/%s reported an invalid %s; the rest of the report is kept",
                     namespace, key.name, rejected)
        patch = admissible.patch
        if not patch:
            return False
        try:
            if report.health_condition is not None:
                # A merge patch replaces the whole conditions list: start from the Device's.
                # (A Device reconcile writing its own conditions meanwhile may drop this one
                # until the next health change; it never loses its own.)
                body = await self._objects.get(DEVICES, key.name, namespace)
                if body is None:  # deleted meanwhile: nothing to record
                    self._buffer.forget(key)
                    return False
                patch["conditions"] = conditions_wire(set_conditions(
                    current_conditions(body), [report.health_condition], self._clock(),
                    generation(body)))
            await self._objects.patch(kind, key.name, {"status": patch}, namespace,
                                      subresource="status")
        except NotFound:  # deleted meanwhile: nothing to record
            self._buffer.forget(key)
            return False
        except KubeError as exc:
            log.warning("status patch for %s/%s failed: %s", namespace, key.name, exc)
            return False
        self._metrics.status_patches.inc()
        if report.online is not None and key.kind is IdentityKind.DEVICE:
            online = self._online.setdefault(key.tenant, set())
            (online.add if report.online else online.discard)(key.name)
            self._metrics.devices_online.labels(key.tenant).set(len(online))
        return True

    async def _namespace_of(self, tenant: str) -> str | None:
        if tenant not in self._namespaces:
            body = await self._objects.get(TENANTS, tenant)
            if body is None:
                return None
            self._namespaces[tenant] = tenant_namespace(tenant, parse_spec(TenantSpec, body))
        return self._namespaces[tenant]
