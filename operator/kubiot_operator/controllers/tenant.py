"""The Tenant controller: namespace, CA, broker tenant, ingest pipeline, counts."""

from __future__ import annotations

import base64
import secrets
from typing import Any

from pydantic import ValidationError

from kubiot_contract.topics import IdentityKind, ingest_access, ingest_username, tenant_root
from kubiot_operator.brokers import BrokerError, BrokerIdentity, PasswordCredential
from kubiot_operator.kube.client import DEVICES, GATEWAYS, SECRETS
from kubiot_operator.models.tenant import TenantPhase, TenantSpec
from kubiot_operator.pki import PKIError, certificate_summary
from kubiot_operator.reconcile.conditions import ConditionUpdate, ready_update, set_conditions
from kubiot_operator.reconcile.tenant import (
    MANAGED_BY,
    TENANT_LABEL,
    ingest_broker_secret_name,
    ingest_objects,
    namespace_object,
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
REQUIRED = (IDENTITY_READY, ACCESS_READY, INGEST_READY, PROVISIONING_READY)


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
    recorded_claims = (body.get("status") or {}).get("claims") or []
    updates.append(await ensure_claims(platform, name, namespace, spec, recorded_claims, owner,
                                       outcome))
    updates.append(await _ensure_broker_tenant(platform, name, namespace, owner, outcome))
    updates.append(await _ensure_ingest(platform, name, spec, owner))

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
                         owner: dict[str, Any]) -> ConditionUpdate:
    objects = ingest_objects(name, spec, platform.ingest)
    if not objects:
        return ConditionUpdate(INGEST_READY, True, "Disabled", "spec.ingest.enabled is false")
    for obj in objects:
        await platform.objects.ensure(owned(obj, owner))
    deployment = objects[0]
    return ConditionUpdate(INGEST_READY, True, "Applied",
                           f"Deployment {deployment['metadata']['namespace']}/"
                           f"{deployment['metadata']['name']} with "
                           f"{spec.ingest.replicas} replicas")
