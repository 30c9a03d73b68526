"""The Tenant controller: namespace, CA, broker tenant, ingest pipeline, counts."""

from __future__ import annotations

import base64
import secrets
from typing import Any

from pydantic import ValidationError

from kubiot_operator.brokers import BrokerError, BrokerIdentity, PasswordCredential
from kubiot_operator.contract import IdentityKind, ingest_access, ingest_username, tenant_root
from kubiot_operator.kube.client import (
    DEPLOYMENTS,
    DEVICES,
    GATEWAYS,
    KINDS_BY_API,
    NETWORKPOLICIES,
    PODDISRUPTIONBUDGETS,
    PODMONITORS,
    SECRETS,
    SERVICEMONITORS,
    SERVICES,
    NotFound,
)
from kubiot_operator.models.tenant import TenantPhase, TenantSpec
from kubiot_operator.pki import PKIError, certificate_summary
from kubiot_operator.reconcile.conditions import ConditionUpdate, ready_update, set_conditions
from kubiot_operator.reconcile.tenant import (
    INGEST_METRICS_PORT,
    MANAGED_BY,
    MONITORING_API,
    POD_MONITOR,
    SERVICE_MONITOR,
    TENANT_LABEL,
    ingest_broker_secret_name,
    ingest_name,
    ingest_objects,
    monitor_kind,
    namespace_object,
    tenant_namespace,
)

from .credentials import IDENTITY_READY, publish_trust
from .device import ACCESS_READY, broker_failure
from .objects import (
    conditions_wire,
    current_conditions,
    generation,
    owned,
    owner_reference,
    parse_spec,
    validation_message,
)
from .platform import Outcome, Platform

INGEST_READY = "IngestReady"
#: Whether Prometheus scrapes the ingest; informational, not part of Ready.
MONITORING = "Monitoring"
INGEST_KINDS = (DEPLOYMENTS, SERVICES, PODDISRUPTIONBUDGETS, NETWORKPOLICIES, SERVICEMONITORS,
                PODMONITORS)
REQUIRED = (IDENTITY_READY, ACCESS_READY, INGEST_READY)


async def reconcile_tenant(platform: Platform, body: dict[str, Any]) -> Outcome:
    name = body["metadata"]["name"]
    conditions = current_conditions(body)
    now = platform.clock()
    outcome = Outcome(status={"observedGeneration": generation(body)})

    def finish(updates: list[ConditionUpdate], phase: TenantPhase | None = None) -> Outcome:
        merged = set_conditions(conditions, updates, now, generation(body))
        ready = ready_update(merged, REQUIRED)
        merged = set_conditions(merged, [ready], now, generation(body))
        if phase is None:
            phase = TenantPhase.READY if ready.ok else (
                TenantPhase.PENDING if outcome.retry_after else TenantPhase.DEGRADED)
        outcome.status.update(phase=phase.value, conditions=conditions_wire(merged))
        return outcome

    try:
        spec = parse_spec(TenantSpec, body)
    except ValidationError as exc:
        message = validation_message(exc)
        outcome.warning("InvalidSpec", message)
        return finish([ConditionUpdate(IDENTITY_READY, False, "InvalidSpec", message)],
                      TenantPhase.FAILED)
    owner = owner_reference(body)
    namespace = tenant_namespace(name, spec)
    await platform.objects.ensure(owned(namespace_object(name, namespace), owner))
    outcome.status.update(namespace=namespace, topicRoot=f"{tenant_root(name)}/")

    updates = [await _ensure_ca(platform, name, spec, outcome)]
    updates.append(await _ensure_broker_tenant(platform, name, namespace, owner, outcome))
    updates += await _ensure_ingest(platform, name, spec, owner)

    devices = await platform.objects.list(DEVICES, namespace)
    gateways = await platform.objects.list(GATEWAYS, namespace)
    outcome.status.update(deviceCount=len(devices), gatewayCount=len(gateways))
    return finish(updates)


async def delete_tenant(platform: Platform, body: dict[str, Any]) -> Outcome:
    """Remove everything the broker knows of the tenant; the namespace goes by ownership."""
    name = body["metadata"]["name"]
    await platform.broker.remove_tenant(name)
    await platform.authority.forget_tenant(name)
    await publish_trust(platform)
    return Outcome(status={})


async def _ensure_ca(platform: Platform, name: str, spec: TenantSpec, outcome: Outcome
                     ) -> ConditionUpdate:
    try:
        ca = await platform.authority.ensure_ca(name, spec.ca)
    except PKIError as exc:
        outcome.warning(exc.reason, str(exc))
        return ConditionUpdate(IDENTITY_READY, False, exc.reason, str(exc))
    summary = certificate_summary(ca.certificate,
                                  secret_name=spec.ca.secret_name or f"tenant-{name}-ca")
    outcome.status["ca"] = summary.to_wire()
    if summary.not_after is not None:
        platform.metrics.certificate_expiry.labels(name, "ca", name).set(
            summary.not_after.timestamp())
    await publish_trust(platform)
    return ConditionUpdate(IDENTITY_READY, True, "CAReady",
                           f"tenant CA {summary.serial} in Secret {summary.secret_name}")


async def _ensure_broker_tenant(platform: Platform, name: str, namespace: str,
                                owner: dict[str, Any], outcome: Outcome) -> ConditionUpdate:
    try:
        await platform.broker.ensure_tenant(name)
        password = await _ingest_password(platform, name, namespace, owner)
        await platform.broker.ensure_identity(BrokerIdentity(
            username=ingest_username(name), tenant=name, kind=IdentityKind.INGEST,
            rules=ingest_access(name), credential=PasswordCredential(password)))
    except BrokerError as exc:
        return broker_failure(platform, exc, outcome)
    return ConditionUpdate(ACCESS_READY, True, "RulesApplied",
                           f"default deny under {tenant_root(name)}/; ingest may read telemetry")


async def _ingest_password(platform: Platform, name: str, namespace: str,
                           owner: dict[str, Any]) -> str:
    """The ingest service's broker password, created once and kept in its Secret."""
    secret_name = ingest_broker_secret_name(name)
    secret = await platform.objects.get(SECRETS, secret_name, namespace)
    if secret is not None and "password" in (secret.get("data") or {}):
        return base64.b64decode(secret["data"]["password"]).decode()
    password = secrets.token_urlsafe(24)
    await platform.objects.ensure(owned({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": secret_name, "namespace": namespace,
                     "labels": {TENANT_LABEL: name, **MANAGED_BY}},
        "data": {"username": base64.b64encode(ingest_username(name).encode()).decode(),
                 "password": base64.b64encode(password.encode()).decode()},
    }, owner))
    return password


async def _ensure_ingest(platform: Platform, name: str, spec: TenantSpec,
                         owner: dict[str, Any]) -> list[ConditionUpdate]:
    """The ingest objects, and whether Prometheus scrapes them (a condition, never a failure:
    a cluster without the Prometheus Operator, such as minikube, is a fine place to run)."""
    namespace = tenant_namespace(name, spec)
    if not spec.ingest.enabled:
        await _remove_ingest(platform, name, namespace)
        return [ConditionUpdate(INGEST_READY, True, "Disabled", "spec.ingest.enabled is false"),
                ConditionUpdate(MONITORING, False, "IngestDisabled",
                                "there is no ingest to scrape")]
    served = await platform.objects.served_kinds(MONITORING_API)
    monitor = monitor_kind(served)
    objects = ingest_objects(name, spec, platform.ingest, monitor=monitor)
    for obj in objects:
        try:
            await platform.objects.ensure(owned(obj, owner))
        except NotFound:
            if obj["kind"] != monitor:
                raise
            monitor = None  # its CRD went away since discovery
    for stale in sorted(({SERVICE_MONITOR, POD_MONITOR} & served) - {monitor}):
        await platform.objects.delete(KINDS_BY_API[(MONITORING_API, stale)],
                                      ingest_name(name), namespace)
    deployment = objects[0]
    ingest = ConditionUpdate(INGEST_READY, True, "Applied",
                             f"Deployment {deployment['metadata']['namespace']}/"
                             f"{deployment['metadata']['name']} with "
                             f"{spec.ingest.replicas} replicas")
    if monitor is None:
        return [ingest, ConditionUpdate(
            MONITORING, False, "PrometheusOperatorAbsent",
            f"the cluster serves neither {SERVICE_MONITOR} nor {POD_MONITOR} "
            f"({MONITORING_API}), so nothing scrapes the ingest metrics on port "
            f"{INGEST_METRICS_PORT}; once the Prometheus Operator's CRDs are installed the "
            "next reconcile adds one")]
    return [ingest, ConditionUpdate(MONITORING, True, f"{monitor}Applied",
                                    f"{monitor} {namespace}/{ingest_name(name)}")]


async def _remove_ingest(platform: Platform, name: str, namespace: str) -> None:
    """Delete the ingest objects of a tenant whose ingest was turned off (absent ones are fine)."""
    for kind in INGEST_KINDS:
        try:
            await platform.objects.delete(kind, ingest_name(name), namespace)
        except NotFound:  # an optional API the cluster does not serve
            continue
