"""The Gateway controller: its own credential, plus access for exactly the devices it serves."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from kubiot_contract.topics import (
    IdentityKind,
    gateway_access,
)
from kubiot_operator.brokers import BrokerError, BrokerIdentity
from kubiot_operator.models.device import DeviceSpec
from kubiot_operator.models.gateway import GatewayPhase, GatewaySpec
from kubiot_operator.reconcile.conditions import ConditionUpdate, ready_update, set_conditions
from kubiot_operator.reconcile.selectors import selector_matches

from .access import ACCESS_READY, TENANT_RETRY_SECONDS, broker_failure
from .credentials import IDENTITY_READY, Subject, ensure_credential, retire_credential
from .objects import (
    conditions_wire,
    current_conditions,
    generation,
    owner_reference,
    parse_spec,
    tenant_of_namespace,
    validation_message,
)
from .platform import Outcome, Platform

log = logging.getLogger(__name__)
REQUIRED = (IDENTITY_READY, ACCESS_READY)
MAX_CHILDREN_IN_STATUS = 10_000


def children_of(spec: GatewaySpec, devices: list[dict[str, Any]]) -> list[str]:
    """The devices the gateway serves: selected, not suspended, not being deleted; sorted."""
    children = []
    for device in devices:
        meta = device["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        try:
            if parse_spec(DeviceSpec, device).suspended:
                continue
        except ValidationError:
            continue
        if selector_matches(spec.selector, meta.get("labels") or {}):
            children.append(str(meta["name"]))
    return sorted(children)


async def reconcile_gateway(platform: Platform, body: dict[str, Any]) -> Outcome:
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    conditions = current_conditions(body)
    now = platform.clock()
    outcome = Outcome(status={"observedGeneration": generation(body)})

    def finish(phase: GatewayPhase, updates: list[ConditionUpdate]) -> Outcome:
        merged = set_conditions(conditions, updates, now, generation(body))
        ready = (ready_update(merged, REQUIRED) if phase is not GatewayPhase.SUSPENDED
                 else ConditionUpdate("Ready", False, "Suspended", "spec.suspended is true"))
        merged = set_conditions(merged, [ready], now, generation(body))
        outcome.status.update(phase=phase.value, conditions=conditions_wire(merged))
        return outcome

    try:
        spec = parse_spec(GatewaySpec, body)
    except ValidationError as exc:
        message = validation_message(exc)
        outcome.warning("InvalidSpec", message)
        return finish(GatewayPhase.FAILED, [ConditionUpdate(IDENTITY_READY, False,
                                                            "InvalidSpec", message)])
    found = await tenant_of_namespace(platform.objects, namespace)
    if found is None:
        outcome.retry_after, outcome.retry_reason = TENANT_RETRY_SECONDS, "TenantNotFound"
        return finish(GatewayPhase.PENDING, [ConditionUpdate(
            IDENTITY_READY, False, "TenantNotFound",
            f"namespace {namespace} belongs to no Tenant (yet)")])
    tenant, tenant_spec = found
    subject = Subject.of(tenant, IdentityKind.GATEWAY, name, namespace)
    username, root = subject.username, subject.topic_root
    credential = await ensure_credential(platform, subject, tenant_spec, spec.identity,
                                         suspended=spec.suspended,
                                         owner=owner_reference(body), outcome=outcome)
    children = platform.fleet.children(namespace, spec.selector)
    served = children[:spec.max_children]
    outcome.status.update(username=username, topicRoot=root, childCount=len(served),
                          children=served[:MAX_CHILDREN_IN_STATUS])

    try:
        if spec.suspended:
            await platform.broker.set_enabled(username, False)
            access = ConditionUpdate(ACCESS_READY, False, "Suspended",
                                     "the broker refuses the gateway while it is suspended")
        elif credential.broker_credential is None:
            access = ConditionUpdate(ACCESS_READY, False, "NoCredential",
                                     "no broker access without a credential")
        else:
            await platform.broker.ensure_identity(BrokerIdentity(
                username=username, tenant=tenant, kind=IdentityKind.GATEWAY,
                rules=gateway_access(tenant, name, served),
                credential=credential.broker_credential))
            if len(children) > spec.max_children:
                access = ConditionUpdate(ACCESS_READY, False, "TooManyChildren",
                                         f"{len(children)} devices match; only the first "
                                         f"{spec.max_children} are served")
            else:
                access = ConditionUpdate(ACCESS_READY, True, "RulesApplied",
                                         f"serves {len(served)} devices")
    except BrokerError as exc:
        access = broker_failure(platform, exc, outcome)
    if spec.suspended:
        return finish(GatewayPhase.SUSPENDED, [credential.condition, access])
    ready = credential.condition.ok and access.ok
    phase = GatewayPhase.READY if ready else (
        GatewayPhase.PENDING if outcome.retry_after else GatewayPhase.FAILED)
    return finish(phase, [credential.condition, access])


async def delete_gateway(platform: Platform, body: dict[str, Any]) -> Outcome:
    """Revoke the certificate and remove broker access before the Gateway goes away."""
    outcome = Outcome(status={})
    await retire_credential(platform, body, IdentityKind.GATEWAY, outcome)
    return outcome


#: Writes a reconcile's outcome (status and events) the way the running operator does.
OutcomeWriter = Callable[[dict[str, Any], Outcome], Awaitable[None]]


class GatewayRefresher:
    """Re-reconciles the gateways of a namespace shortly after its devices change.

    Ten thousand devices created at once mean one gateway pass per `delay`, not ten thousand.
    """

    def __init__(self, platform: Platform, write_outcome: OutcomeWriter, delay: float = 1.0
                 ) -> None:
        self._platform = platform
        self._write_outcome = write_outcome
        self._delay = delay
        self._pending: set[str] = set()
        self._wakeup = asyncio.Event()

    def request(self, namespace: str) -> None:
        self._pending.add(namespace)
        self._wakeup.set()

    async def run(self) -> None:
        """Runs until cancelled."""
        while True:
            await self._wakeup.wait()
            await asyncio.sleep(self._delay)
            self._wakeup.clear()
            namespaces, self._pending = self._pending, set()
            for namespace in sorted(namespaces):
                try:
                    await self.refresh(namespace)
                except Exception:
                    log.exception("refreshing the gateways of %s failed; retrying", namespace)
                    self.request(namespace)

    async def refresh(self, namespace: str) -> None:
        for gateway in self._platform.fleet.gateways(namespace):
            outcome = await reconcile_gateway(self._platform, gateway.body)
            await self._write_outcome(gateway.body, outcome)
