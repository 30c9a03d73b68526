"""A device's or gateway's credential: issue, renew, revoke, and keep its Secret current."""

from __future__ import annotations

import base64
import contextlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509

from kubiot_contract.topics import (
    ContractError,
    IdentityKind,
    claim_root,
    claim_username,
    device_root,
    device_username,
    gateway_root,
    gateway_username,
    parse_username,
)
from kubiot_operator.brokers import CertificateCredential, Credential, PasswordCredential
from kubiot_operator.kube.client import SECRETS, TENANTS, NotFound
from kubiot_operator.models.common import CertificateSummary
from kubiot_operator.models.identity import IdentitySpec, IdentityType
from kubiot_operator.models.tenant import TenantSpec
from kubiot_operator.pki import PKIError, certificate_summary, public_key_pem
from kubiot_operator.reconcile.conditions import ConditionUpdate
from kubiot_operator.reconcile.identity import (
    REVOKED_ANNOTATION,
    IssueReason,
    credential_policy,
    credential_secret,
    credential_secret_name,
    decide_identity,
    issued_record,
)

from .objects import owned, tenant_of_namespace
from .platform import Outcome, Platform

IDENTITY_READY = "IdentityReady"
FIRMWARE_KEY_FILE = "firmware-signing.pub"  # devices verify firmware manifests with it


@dataclass(frozen=True)
class CredentialState:
    """Where the credential stands after a reconcile."""

    condition: ConditionUpdate
    broker_credential: Credential | None
    summary: CertificateSummary | None = None
    renew_at: datetime | None = None


@dataclass(frozen=True)
class Subject:
    """Whose credential: the identity in the product's words."""

    tenant: str
    kind: IdentityKind
    name: str
    namespace: str
    username: str
    topic_root: str

    @classmethod
    def of(cls, tenant: str, kind: IdentityKind, name: str, namespace: str) -> Subject:
        """A device, gateway or claim, with its username and topic root from the contract."""
        username, root = _NAMING[kind]
        return cls(tenant, kind, name, namespace, username(tenant, name), root(tenant, name))


_NAMING = {
    IdentityKind.DEVICE: (device_username, device_root),
    IdentityKind.GATEWAY: (gateway_username, gateway_root),
    IdentityKind.CLAIM: (claim_username, claim_root),
}


async def ensure_credential(platform: Platform, subject: Subject, tenant_spec: TenantSpec,
                            identity: IdentitySpec, *, suspended: bool,
                            owner: dict[str, Any] | None, outcome: Outcome,
                            rotation: int = 0) -> CredentialState:
    """Issue or renew as the spec asks; revoke while suspended. The certificate goes into the
    status and its expiry into the metrics."""
    async with platform.lock(subject.username):
        state = await _ensure_credential(platform, subject, tenant_spec, identity,
                                         suspended=suspended, owner=owner, outcome=outcome,
                                         rotation=rotation)
    if state.summary is not None:
        outcome.status["certificate"] = state.summary.to_wire()
        if state.summary.not_after is not None:
            platform.metrics.certificate_expiry.labels(
                subject.tenant, subject.kind.value, subject.name).set(
                state.summary.not_after.timestamp())
    return state


async def _ensure_credential(platform: Platform, subject: Subject, tenant_spec: TenantSpec,
                             identity: IdentitySpec, *, suspended: bool,
                             owner: dict[str, Any] | None, outcome: Outcome,
                             rotation: int) -> CredentialState:
    policy = credential_policy(tenant_spec, identity, rotation)
    secret_name = credential_secret_name(subject.kind, subject.name)
    secret = await platform.objects.get(SECRETS, secret_name, subject.namespace)
    record = issued_record(secret)

    if suspended:
        if secret is not None and record is not None and not record.revoked:
            await revoke_credential(platform, subject, secret, outcome, reason="Suspended")
        return CredentialState(ConditionUpdate(IDENTITY_READY, False, "Suspended",
                                               "the credential is revoked while suspended"),
                               broker_credential=None)

    decision = decide_identity(policy, record, platform.clock())
    if decision.issue is None and secret is not None:
        return _state_of(secret, policy.type, decision.renew_at)

    if decision.revoke_serial and secret is not None:
        await revoke_credential(platform, subject, secret, outcome, reason=decision.issue or "")
    try:
        files, summary = await _issue(platform, subject, policy.type, policy.validity_days,
                                      policy.key_algorithm, policy.csr)
    except PKIError as exc:
        outcome.warning(exc.reason, f"no credential issued: {exc}")
        return CredentialState(ConditionUpdate(IDENTITY_READY, False, exc.reason, str(exc)),
                               broker_credential=None)
    new_secret = owned(credential_secret(
        tenant=subject.tenant, kind=subject.kind, name=subject.name,
        namespace=subject.namespace, username=subject.username, topic_root=subject.topic_root,
        policy=policy, endpoint=platform.endpoint, files=files,
        serial=summary.serial if summary else None,
        not_after=summary.not_after if summary else None), owner)
    if secret is not None:
        # Replace, not merge: a key from the previous credential must not linger.
        await platform.objects.delete(SECRETS, secret_name, subject.namespace)
    await platform.objects.ensure(new_secret)
    reason = decision.issue or IssueReason.NEW
    platform.metrics.certificates_issued.labels(subject.tenant, reason.value).inc()
    outcome.normal("CredentialIssued", f"{policy.type.value} credential issued ({reason.value})"
                   + (f", serial {summary.serial}" if summary else ""))
    return _state_of(new_secret, policy.type, None)


async def revoke_credential(platform: Platform, subject: Subject, secret: dict[str, Any],
                            outcome: Outcome, *, reason: str) -> None:
    """Revoke the Secret's certificate, republish the CRL and mark the Secret revoked."""
    record = issued_record(secret)
    if record is None or record.revoked:
        return
    if record.serial:
        await platform.authority.revoke(subject.tenant, int(record.serial, 16),
                                        expires_at=record.not_after)
        await publish_trust(platform)
        platform.metrics.certificates_revoked.labels(subject.tenant).inc()
        outcome.normal("CertificateRevoked", f"serial {record.serial} revoked ({reason})")
    with contextlib.suppress(NotFound):  # deleted meanwhile (its namespace is going away)
        await platform.objects.patch(SECRETS, secret["metadata"]["name"], {
            "metadata": {"annotations": {REVOKED_ANNOTATION: "true"}}}, subject.namespace)


async def retire_credential(platform: Platform, body: dict[str, Any], kind: IdentityKind,
                            outcome: Outcome) -> Subject | None:
    """Before a device or gateway goes: revoke its certificate and remove its broker identity.

    None when the resource never belonged to a tenant, so nothing was made for it.
    """
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    found = await tenant_of_namespace(platform.objects, namespace)
    if found:
        tenant = found[0]
    else:  # the namespace's Tenant is gone: the username the status recorded still names it
        try:
            tenant = parse_username((body.get("status") or {}).get("username") or "").tenant
        except ContractError:
            return None
    subject = Subject.of(tenant, kind, name, namespace)
    secret = await platform.objects.get(SECRETS, credential_secret_name(kind, name), namespace)
    if secret is not None:
        await revoke_credential(platform, subject, secret, outcome, reason="Deleted")
    await platform.broker.remove_identity(subject.username)
    with contextlib.suppress(KeyError):  # never issued
        platform.metrics.certificate_expiry.remove(tenant, kind.value, name)
    return subject


async def publish_trust(platform: Platform) -> None:
    """Every tenant's CA and CRL, bundled where the broker reads them."""
    tenants = sorted(t["metadata"]["name"] for t in await platform.objects.list(TENANTS)
                     if not t["metadata"].get("deletionTimestamp"))
    await platform.trust.publish(await platform.authority.ca_bundle(tenants),
                                 await platform.authority.crl_bundle(tenants))


async def _issue(platform: Platform, subject: Subject, kind: IdentityType, validity_days: int,
                 key_algorithm: Any, csr: str | None
                 ) -> tuple[dict[str, bytes], CertificateSummary | None]:
    if kind is IdentityType.PASSWORD:
        return {"password": secrets.token_urlsafe(24).encode()}, None
    issued = await platform.authority.issue(
        subject.tenant, subject.kind, subject.name, validity_days=validity_days,
        key_algorithm=key_algorithm, csr_pem=csr)
    signing_key = await platform.authority.signing_key(subject.tenant)
    files = {"tls.crt": issued.cert_pem, "ca.crt": issued.chain_pem,
             FIRMWARE_KEY_FILE: public_key_pem(signing_key)}
    if issued.key_pem is not None:
        files["tls.key"] = issued.key_pem
    return files, issued.summary


def _state_of(secret: dict[str, Any], kind: IdentityType, renew_at: datetime | None
              ) -> CredentialState:
    data = secret.get("data") or {}
    name = secret["metadata"]["name"]
    if kind is IdentityType.PASSWORD:
        password = base64.b64decode(data.get("password", "")).decode()
        return CredentialState(ConditionUpdate(IDENTITY_READY, True, "PasswordIssued",
                                               f"credentials in Secret {name}"),
                               PasswordCredential(password))
    certificate = x509.load_pem_x509_certificate(base64.b64decode(data["tls.crt"]))
    summary = certificate_summary(certificate, secret_name=name)
    return CredentialState(
        ConditionUpdate(IDENTITY_READY, True, "CertificateIssued",
                        f"certificate {summary.serial} valid until "
                        f"{summary.not_after.isoformat() if summary.not_after else '?'}"),
        CertificateCredential(), summary, renew_at)
