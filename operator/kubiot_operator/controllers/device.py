"""The Device controller: credential, broker access, desired state, status."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from kubiot_contract.topics import (
    PRESENCE_OFFLINE,
    IdentityKind,
    device_access,
    parse_username,
    presence_topic,
    state_desired_topic,
)
from kubiot_operator.brokers import BrokerError, BrokerIdentity
from kubiot_operator.models.device import DevicePhase, DeviceSpec
from kubiot_operator.models.tenant import TenantSpec
from kubiot_operator.reconcile.conditions import ConditionUpdate, ready_update, set_conditions
from kubiot_operator.reconcile.provisioning import APPROVED_LABEL, awaiting_approval

from .access import ACCESS_READY, TENANT_RETRY_SECONDS, broker_failure, count_drift
from .credentials import IDENTITY_READY, Subject, ensure_credential, retire_credential
from .objects import (
    condition_held,
    conditions_wire,
    current_conditions,
    generation,
    owner_reference,
    parse_spec,
    tenant_of_namespace,
    validation_message,
)
from .platform import Outcome, Platform

REQUIRED = (IDENTITY_READY, ACCESS_READY)
QUOTA_RECHECK_SECONDS = 60.0


async def reconcile_device(platform: Platform, body: dict[str, Any]) -> Outcome:
    """Bring everything a Device implies in line with its spec; return its status."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    labels = meta.get("labels") or {}
    conditions = current_conditions(body)
    now = platform.clock()
    outcome = Outcome(status={"observedGeneration": generation(body)})
    tenant: str | None = None

    def finish(phase: DevicePhase, updates: list[ConditionUpdate]) -> Outcome:
        if tenant is not None:
            platform.metrics.device_phase(namespace, name, tenant, phase.value)
        merged = set_conditions(conditions, updates, now, generation(body))
        merged = set_conditions(merged, [ready_update(merged, REQUIRED) if phase not in (
            DevicePhase.SUSPENDED,) else ConditionUpdate("Ready", False, "Suspended",
                                                        "spec.suspended is true")],
                                now, generation(body))
        outcome.status.update(phase=phase.value, conditions=conditions_wire(merged))
        return outcome

    try:
        spec = parse_spec(DeviceSpec, body)
    except ValidationError as exc:
        message = validation_message(exc)
        outcome.warning("InvalidSpec", message)
        return finish(DevicePhase.FAILED, [ConditionUpdate(IDENTITY_READY, False, "InvalidSpec",
                                                           message)])
    found = await tenant_of_namespace(platform.objects, namespace)
    if found is None:
        outcome.retry_after, outcome.retry_reason = TENANT_RETRY_SECONDS, "TenantNotFound"
        return finish(DevicePhase.PENDING, [ConditionUpdate(
            IDENTITY_READY, False, "TenantNotFound",
            f"namespace {namespace} belongs to no Tenant (yet)")])
    tenant, tenant_spec = found
    subject = Subject.of(tenant, IdentityKind.DEVICE, name, namespace)
    username, root = subject.username, subject.topic_root
    outcome.status.update(username=username, topicRoot=root)

    quota = _quota_refusal(platform, tenant_spec, namespace, name,
                           meta.get("creationTimestamp") or "")
    if quota:
        outcome.warning("QuotaExceeded", quota)
        outcome.retry_after, outcome.retry_reason = QUOTA_RECHECK_SECONDS, "QuotaExceeded"
        await _forget_broker_identity(platform, username, outcome)
        return finish(DevicePhase.FAILED, [ConditionUpdate(ACCESS_READY, False, "QuotaExceeded",
                                                           quota)])

    if awaiting_approval(labels):
        # No certificate and no broker access until a person approves; the label change
        # brings the Device back here.
        outcome.status["gateway"] = None
        return finish(DevicePhase.PENDING, [ConditionUpdate(
            IDENTITY_READY, False, "AwaitingApproval",
            f"provisioned by claim; approve with `kubiot approve {namespace}/{name}` or the "
            f"label {APPROVED_LABEL}=true")])

    credential = await ensure_credential(platform, subject, tenant_spec, spec.identity,
                                         suspended=spec.suspended,
                                         owner=owner_reference(body), outcome=outcome)
    outcome.status["gateway"] = platform.fleet.serving_gateway(namespace, labels)

    access = await _ensure_access(platform, tenant, username, credential.broker_credential,
                                  spec.suspended, outcome,
                                  applied=condition_held(conditions, ACCESS_READY,
                                                         generation(body)))
    if not spec.suspended and access.ok and spec.desired is not None:
        await _publish_desired(platform, root, spec.desired, outcome)
    if spec.suspended and access.reason == "Suspended":  # disabled at the broker
        # Brokers end a disabled identity's session without its last will (Mosquitto's
        # dynamic security kicks "without will"), so its retained presence would say online
        # for ever: say offline on its behalf.
        await platform.messenger.publish(presence_topic(root), PRESENCE_OFFLINE.encode(),
                                         retain=True)
    platform.gateway_refresh(namespace)
    if spec.suspended:
        return finish(DevicePhase.SUSPENDED, [credential.condition, access])
    ready = credential.condition.ok and access.ok
    phase = DevicePhase.READY if ready else (
        DevicePhase.PENDING if outcome.retry_after else DevicePhase.FAILED)
    return finish(phase, [credential.condition, access])


async def delete_device(platform: Platform, body: dict[str, Any]) -> Outcome:
    """Revoke the certificate and remove broker access before the Device goes away."""
    outcome = Outcome(status={})
    platform.metrics.device_gone(body["metadata"]["namespace"], body["metadata"]["name"])
    subject = await retire_credential(platform, body, IdentityKind.DEVICE, outcome)
    if subject is not None:
        await platform.messenger.publish(state_desired_topic(subject.topic_root), b"",
                                         retain=True)
        platform.health.forget(subject.tenant, subject.name)
        platform.gateway_refresh(subject.namespace)
    return outcome


def _quota_refusal(platform: Platform, tenant_spec: TenantSpec, namespace: str, name: str,
                   created: str) -> str | None:
    """A message when this device is beyond the tenant's device quota (oldest first are in)."""
    limit = tenant_spec.quotas.max_devices
    if limit is None:
        return None
    fleet = platform.fleet
    if fleet.device(namespace, name) is not None and fleet.devices_before(
            namespace, created, name) < limit:
        return None
    return (f"the tenant allows {limit} devices and {fleet.device_count(namespace)} exist; "
            "this one is not admitted until others are deleted or the quota is raised")


async def _ensure_access(platform: Platform, tenant: str, username: str, credential: Any,
                         suspended: bool, outcome: Outcome, *, applied: bool
                         ) -> ConditionUpdate:
    """Enable or disable the device at the broker. `applied`: this generation's access was
    already in place, so whatever this has to write back had drifted (it is counted)."""
    try:
        if suspended:
            await platform.broker.set_enabled(username, False)
            return ConditionUpdate(ACCESS_READY, False, "Suspended",
                                   "the broker refuses the device while it is suspended")
        if credential is None:
            return ConditionUpdate(ACCESS_READY, False, "NoCredential",
                                   "no broker access without a credential")
        name = parse_username(username).name
        result = await platform.broker.ensure_identity(BrokerIdentity(
            username=username, tenant=tenant, kind=IdentityKind.DEVICE,
            rules=device_access(tenant, name), credential=credential, enabled=True))
        if applied:
            count_drift(platform, tenant, username, result)
    except BrokerError as exc:
        return broker_failure(platform, exc, outcome)
    return ConditionUpdate(ACCESS_READY, True, "RulesApplied",
                           "the broker allows exactly the device's own topics")


async def _forget_broker_identity(platform: Platform, username: str, outcome: Outcome) -> None:
    try:
        await platform.broker.remove_identity(username)
    except BrokerError as exc:
        broker_failure(platform, exc, outcome)


async def _publish_desired(platform: Platform, root: str, desired: dict[str, Any],
                           outcome: Outcome) -> None:
    payload = json.dumps(desired, sort_keys=True, separators=(",", ":")).encode()
    await platform.messenger.publish(state_desired_topic(root), payload, retain=True)
