"""Drift repair: make the broker hold exactly what the resources want, tenant by tenant."""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

from pydantic import ValidationError

from kubiot_contract.topics import (
    IdentityKind,
    claim_access,
    claim_username,
    device_access,
    device_username,
    gateway_access,
    gateway_username,
    ingest_access,
    ingest_username,
)
from kubiot_operator.brokers import (
    BrokerError,
    BrokerIdentity,
    CertificateCredential,
    Credential,
    PasswordCredential,
)
from kubiot_operator.kube.client import DEVICES, GATEWAYS, SECRETS, TENANTS
from kubiot_operator.models.device import DeviceSpec
from kubiot_operator.models.gateway import GatewaySpec
from kubiot_operator.models.identity import IdentityType
from kubiot_operator.models.tenant import TenantSpec
from kubiot_operator.reconcile.identity import credential_secret_name, issued_record
from kubiot_operator.reconcile.provisioning import awaiting_approval
from kubiot_operator.reconcile.tenant import (
    ingest_broker_secret_name,
    tenant_namespace,
)

from .adapters import Objects
from .gateway import children_of
from .objects import parse_spec
from .platform import Platform

log = logging.getLogger(__name__)


async def wanted_identities(platform: Platform, tenant: str, spec: TenantSpec
                            ) -> list[BrokerIdentity]:
    """Every broker identity the tenant's resources call for, with the credential each has."""
    return await identities_wanted(platform.objects, tenant, spec)


async def identities_wanted(objects: Objects, tenant: str, spec: TenantSpec
                            ) -> list[BrokerIdentity]:
    """The same from the objects alone, for a broker about to start (a cold start writes them
    into its state at once). A certificate identity needs no Secret: its broker entry is the
    same before and after the certificate is issued.

    Secrets are read one by one and only where a password lives: the operator is not
    granted to list Secrets, which would let it read every credential in a namespace at once.
    """
    namespace = tenant_namespace(tenant, spec)
    wanted: list[BrokerIdentity] = []
    ingest_password = _password(await objects.get(
        SECRETS, ingest_broker_secret_name(tenant), namespace))
    if ingest_password is not None:
        wanted.append(BrokerIdentity(ingest_username(tenant), tenant, IdentityKind.INGEST,
                                     ingest_access(tenant), PasswordCredential(ingest_password)))
    for claim in spec.provisioning.claims:
        if not claim.revoked:
            wanted.append(BrokerIdentity(claim_username(tenant, claim.name), tenant,
                                         IdentityKind.CLAIM, claim_access(tenant, claim.name),
                                         CertificateCredential()))
    devices = await objects.list(DEVICES, namespace)
    quota = spec.quotas.max_devices
    admitted = sorted((d for d in devices if not d["metadata"].get("deletionTimestamp")),
                      key=lambda d: (d["metadata"].get("creationTimestamp") or "",
                                     d["metadata"]["name"]))
    admitted = admitted if quota is None else admitted[:quota]
    for device in admitted:
        name = device["metadata"]["name"]
        try:
            device_spec = parse_spec(DeviceSpec, device)
        except ValidationError:
            continue
        credential = await _credential(objects, device_spec.identity.type, IdentityKind.DEVICE,
                                       name, namespace)
        if awaiting_approval(device["metadata"].get("labels") or {}):
            continue  # no broker access until approved
        if credential is not None:
            wanted.append(BrokerIdentity(device_username(tenant, name), tenant,
                                         IdentityKind.DEVICE, device_access(tenant, name),
                                         credential, enabled=not device_spec.suspended))
    for gateway in await objects.list(GATEWAYS, namespace):
        name = gateway["metadata"]["name"]
        if gateway["metadata"].get("deletionTimestamp"):
            continue
        try:
            gateway_spec = parse_spec(GatewaySpec, gateway)
        except ValidationError:
            continue
        credential = await _credential(objects, gateway_spec.identity.type,
                                       IdentityKind.GATEWAY, name, namespace)
        if credential is not None:
            children = children_of(gateway_spec, devices)[:gateway_spec.max_children]
            wanted.append(BrokerIdentity(gateway_username(tenant, name), tenant,
                                         IdentityKind.GATEWAY,
                                         gateway_access(tenant, name, children), credential,
                                         enabled=not gateway_spec.suspended))
    return wanted


async def resync_tenant(platform: Platform, tenant: str, spec: TenantSpec) -> int:
    """One drift repair for a tenant; returns the number of broker writes it took."""
    await platform.broker.ensure_tenant(tenant)
    result = await platform.broker.resync(tenant, await wanted_identities(platform, tenant, spec))
    # The tenant's series from 0, so that increase() sees its first repair too.
    repairs = platform.metrics.drift_repairs.labels(tenant, "resync")
    if result.writes:
        repairs.inc(result.writes)
        log.info("drift repaired for tenant %s: %d broker writes", tenant, result.writes)
    return int(result.writes)


async def resync_all(platform: Platform) -> int:
    writes = 0
    for body in await platform.objects.list(TENANTS):
        if body["metadata"].get("deletionTimestamp"):
            continue
        tenant = body["metadata"]["name"]
        try:
            writes += await resync_tenant(platform, tenant, parse_spec(TenantSpec, body))
        except ValidationError:
            continue
        except BrokerError as exc:
            platform.metrics.broker_errors.labels(platform.broker_kind, type(exc).__name__).inc()
            log.warning("drift repair for tenant %s failed: %s", tenant, exc)
    return writes


async def resync_forever(platform: Platform, period: float, first_delay: float = 2.0) -> None:
    """The startup resync, then one every `period` seconds, until cancelled."""
    await asyncio.sleep(first_delay)
    while True:
        try:
            await resync_all(platform)
            platform.metrics.resync_passes.inc()
        except Exception:
            log.exception("drift repair pass failed")
        await asyncio.sleep(period)


def _password(secret: dict[str, Any] | None) -> str | None:
    data = (secret or {}).get("data") or {}
    return base64.b64decode(data["password"]).decode() if "password" in data else None


async def _credential(objects: Objects, kind: IdentityType, identity: IdentityKind,
                      name: str, namespace: str) -> Credential | None:
    if kind is not IdentityType.PASSWORD:
        return CertificateCredential()
    secret = await objects.get(SECRETS, credential_secret_name(identity, name),
                                        namespace)
    record = issued_record(secret)
    password = _password(secret)
    if record is None or record.revoked or password is None:
        return None
    return PasswordCredential(password)
