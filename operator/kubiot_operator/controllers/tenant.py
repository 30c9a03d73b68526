"""The Tenant controller: namespace, CA, broker tenant, ingest pipeline, counts."""

from __future__ import annotations

import base64
import secrets
from typing import Any

from pydantic import TypeAdapter, ValidationError

from kubiot_contract.topics import IdentityKind, ingest_access, ingest_username, tenant_root
from kubiot_operator.brokers import BrokerError, BrokerIdentity, PasswordCredential
from kubiot_operator.kube.client import (
    DEPLOYMENTS,
    DEVICES,
    FIRMWARERELEASES,
    GATEWAYS,
    KINDS_BY_API,
    NAMESPACES,
    NETWORKPOLICIES,
    PODDISRUPTIONBUDGETS,
    PODMONITORS,
    SECRETS,
    SERVICEMONITORS,
    SERVICES,
    Conflict,
    NotFound,
)
from kubiot_operator.models.tenant import TenantName, TenantPhase, TenantSpec
from kubiot_operator.pki import PKIError, certificate_summary
from kubiot_operator.reconcile.conditions import ConditionUpdate, ready_update, set_conditions
from kubiot_operator.reconcile.tenant import (
    INGEST_METRICS_PORT,
    MANAGED_BY,
    MONITORING_API,
    POD_MONITOR,
    SERVICE_MONITOR,
    TENANT_LABEL,
    ingest_availability,
    ingest_broker_secret_name,
    ingest_name,
    ingest_objects,
    monitor_kind,
    namespace_object,
    namespace_refusal,
    tenant_namespace,
)

from .access import ACCESS_READY, broker_failure
from .claims import PROVISIONING_READY, ensure_claims
from .credentials import IDENTITY_READY, publish_trust
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
NAMESPACE_READY = "NamespaceReady"
TENANT_NAME: TypeAdapter[str] = TypeAdapter(TenantName)
NAMESPACE_RETRY_SECONDS = 5.0
TEARDOWN_RECHECK_SECONDS = 1.0
INGEST_RECHECK_SECONDS = 10.0
#: Whether Prometheus scrapes the ingest; informational, not part of Ready.
MONITORING = "Monitoring"
INGEST_KINDS = (DEPLOYMENTS, SERVICES, PODDISRUPTIONBUDGETS, NETWORKPOLICIES, SERVICEMONITORS,
                PODMONITORS)
REQUIRED = (NAMESPACE_READY, IDENTITY_READY, ACCESS_READY, INGEST_READY, PROVISIONING_READY)


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
        # The CRD refuses such names; a cluster too old for its CEL rules does not.
        TENANT_NAME.validate_python(name)
    except ValidationError:
        message = f"metadata.name {TENANT_NAME.json_schema()['description']}"
        outcome.warning("InvalidName", message)
        return finish([ConditionUpdate(NAMESPACE_READY, False, "InvalidName", message)],
                      TenantPhase.FAILED)
    try:
        spec = parse_spec(TenantSpec, body)
    except ValidationError as exc:
        message = validation_message(exc)
        outcome.warning("InvalidSpec", message)
        return finish([ConditionUpdate(IDENTITY_READY, False, "InvalidSpec", message)],
                      TenantPhase.FAILED)
    owner = owner_reference(body)
    namespace = tenant_namespace(name, spec)
    claim = await _claim_namespace(platform, name, namespace, owner)
    if not claim.ok:
        outcome.warning(claim.reason, claim.message)
        if claim.reason == "NamespaceTerminating":
            outcome.retry_after, outcome.retry_reason = NAMESPACE_RETRY_SECONDS, claim.reason
        return finish([claim], TenantPhase.PENDING if outcome.retry_after else TenantPhase.FAILED)
    outcome.status.update(namespace=namespace, topicRoot=f"{tenant_root(name)}/")

    updates = [claim, await _ensure_ca(platform, name, spec, outcome)]
    recorded_claims = (body.get("status") or {}).get("claims") or []
    updates.append(await ensure_claims(platform, name, namespace, spec, recorded_claims, owner,
                                       outcome))
    updates.append(await _ensure_broker_tenant(platform, name, namespace, owner, outcome))
    updates += await _ensure_ingest(platform, name, spec, owner, outcome)

    outcome.status.update(deviceCount=platform.fleet.device_count(namespace),
                          gatewayCount=platform.fleet.gateway_count(namespace))
    return finish(updates)


async def delete_tenant(platform: Platform, body: dict[str, Any]) -> Outcome:
    """Retire the tenant's devices, gateways and releases first, then remove what the broker
    and the PKI keep of it; the namespace goes by ownership.

    The order matters: each Device's finalizer revokes its certificate with the tenant's CA,
    so the CA may only go once no Device is left. Deleting the namespace first would run those
    finalizers after the CA is gone."""
    name = body["metadata"]["name"]
    outcome = Outcome(status={})
    namespace = (body.get("status") or {}).get("namespace") or _spec_namespace(name, body)
    existing = await platform.objects.get(NAMESPACES, namespace)
    if namespace_refusal(name, body["metadata"]["uid"], namespace, existing) is None \
            and existing is not None:
        remaining = await _retire_children(platform, namespace)
        if remaining:
            outcome.retry_after, outcome.retry_reason = TEARDOWN_RECHECK_SECONDS, "Retiring"
            outcome.planned = True
            outcome.normal("Retiring", f"waiting for {remaining} devices, gateways and "
                           f"firmware releases in {namespace} to be retired")
            return outcome
    await platform.broker.remove_tenant(name)
    await platform.authority.forget_tenant(name)
    await publish_trust(platform)
    return outcome


def _spec_namespace(name: str, body: dict[str, Any]) -> str:
    try:
        return tenant_namespace(name, parse_spec(TenantSpec, body))
    except ValidationError:
        return name


async def _retire_children(platform: Platform, namespace: str) -> int:
    """Ask for the deletion of every kubiot resource in the namespace; how many are left."""
    remaining = 0
    for kind in (FIRMWARERELEASES, GATEWAYS, DEVICES):
        for obj in await platform.objects.list(kind, namespace):
            remaining += 1
            if not obj["metadata"].get("deletionTimestamp"):
                await platform.objects.delete(kind, obj["metadata"]["name"], namespace)
    return remaining


async def _claim_namespace(platform: Platform, name: str, namespace: str,
                           owner: dict[str, Any]) -> ConditionUpdate:
    """Create the tenant's namespace, or confirm it is the one this Tenant created before."""
    wanted = owned(namespace_object(name, namespace), owner)
    existing = await platform.objects.get(NAMESPACES, namespace)
    if existing is None:
        try:
            existing = await platform.objects.create(wanted)
        except Conflict:  # created by someone else since we looked
            existing = await platform.objects.get(NAMESPACES, namespace)
    refusal = namespace_refusal(name, owner["uid"], namespace, existing)
    if refusal is not None:
        terminating = bool((existing or {}).get("metadata", {}).get("deletionTimestamp"))
        return ConditionUpdate(NAMESPACE_READY, False,
                               "NamespaceTerminating" if terminating else "NamespaceTaken",
                               refusal)
    await platform.objects.ensure(wanted)  # labels put back if someone removed them
    return ConditionUpdate(NAMESPACE_READY, True, "Created",
                           f"namespace {namespace} belongs to this Tenant")


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
                         owner: dict[str, Any], outcome: Outcome) -> list[ConditionUpdate]:
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
    availability = ingest_availability(
        await platform.objects.get(DEPLOYMENTS, ingest_name(name), namespace))
    if not availability.available and outcome.retry_after is None:
        # Deployments are not watched: look again soon, as a planned recheck.
        outcome.retry_after, outcome.retry_reason = INGEST_RECHECK_SECONDS, availability.reason
        outcome.planned = True
    ingest = ConditionUpdate(INGEST_READY, availability.available, availability.reason,
                             availability.message)
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
