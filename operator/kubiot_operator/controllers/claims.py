"""A tenant's provisioning claims: a certificate each (in a Secret for manufacturing), broker
access to their own provisioning topics only, rotation and revocation.

Claims are part of the Tenant's spec, so the Tenant controller calls this; the credential
lifecycle is the one devices and gateways have (credentials.py).
"""

from __future__ import annotations

from typing import Any

from kubiot_contract.topics import IdentityKind, claim_access
from kubiot_operator.brokers import BrokerError, BrokerIdentity
from kubiot_operator.kube.client import SECRETS
from kubiot_operator.models.identity import IdentitySpec
from kubiot_operator.models.tenant import ClaimSpec, ClaimStatus, TenantSpec
from kubiot_operator.reconcile.conditions import ConditionUpdate
from kubiot_operator.reconcile.identity import credential_secret_name
from kubiot_operator.reconcile.provisioning import name_pattern_problem

from .access import broker_failure
from .credentials import Subject, ensure_credential, revoke_credential
from .platform import Outcome, Platform

PROVISIONING_READY = "ProvisioningReady"


async def ensure_claims(platform: Platform, tenant: str, namespace: str, spec: TenantSpec,
                        recorded: list[dict[str, Any]], owner: dict[str, Any] | None,
                        outcome: Outcome) -> ConditionUpdate:
    """Every claim of the spec issued (or revoked) with its broker access; claims no longer in
    the spec revoked and removed. Their state goes into `status.claims`; the condition also
    says when the provisioning settings cannot be used."""
    claims: list[ClaimStatus] = []
    problems: list[str] = []
    pattern_problem = name_pattern_problem(spec.provisioning)
    if pattern_problem is not None:
        outcome.warning("InvalidNamePattern", pattern_problem)
        problems.append(pattern_problem)
    for claim in spec.provisioning.claims:
        status, problem = await _ensure_claim(platform, tenant, namespace, spec, claim, owner,
                                              outcome)
        claims.append(status)
        if problem:
            problems.append(problem)
    wanted = {claim.name for claim in spec.provisioning.claims}
    for entry in recorded:
        name = entry.get("name")
        if isinstance(name, str) and name not in wanted:
            problem = await retire_claim(platform, tenant, namespace, name, outcome)
            if problem:
                problems.append(problem)
                claims.append(ClaimStatus.model_validate(entry))
    outcome.status["claims"] = [claim.to_wire() for claim in claims]
    if problems:
        reason = "InvalidNamePattern" if pattern_problem is not None else "ClaimFailed"
        return ConditionUpdate(PROVISIONING_READY, False, reason, "; ".join(problems))
    active = [claim.name for claim in claims if not claim.revoked]
    return ConditionUpdate(PROVISIONING_READY, True, "ClaimsIssued" if claims else "NoClaims",
                           f"{len(active)} active claims" + (
                               f": {', '.join(active)}" if active else ""))


async def _ensure_claim(platform: Platform, tenant: str, namespace: str, spec: TenantSpec,
                        claim: ClaimSpec, owner: dict[str, Any] | None, outcome: Outcome
                        ) -> tuple[ClaimStatus, str | None]:
    subject = Subject.of(tenant, IdentityKind.CLAIM, claim.name, namespace)
    state = await ensure_credential(
        platform, subject, spec, IdentitySpec(validity_days=claim.validity_days),
        suspended=claim.revoked, owner=owner, outcome=outcome, rotation=claim.rotation)
    # ensure_credential reports into the status of the object it serves; a claim's summary
    # belongs in its own entry.
    outcome.status.pop("certificate", None)
    status = ClaimStatus(name=claim.name, revoked=claim.revoked, certificate=state.summary)
    try:
        if claim.revoked or state.broker_credential is None:
            await platform.broker.remove_identity(subject.username)
        else:
            await platform.broker.ensure_identity(BrokerIdentity(
                username=subject.username, tenant=tenant, kind=IdentityKind.CLAIM,
                rules=claim_access(tenant, claim.name), credential=state.broker_credential))
    except BrokerError as exc:
        update = broker_failure(platform, exc, outcome)
        return status, f"claim {claim.name}: {update.message}"
    if not claim.revoked and not state.condition.ok:
        return status, f"claim {claim.name}: {state.condition.message}"
    return status, None


async def retire_claim(platform: Platform, tenant: str, namespace: str, name: str,
                       outcome: Outcome) -> str | None:
    """A claim taken out of the spec: revoke its certificate and remove its broker identity.
    Its Secret stays, marked revoked, so the record of what was issued is kept."""
    subject = Subject.of(tenant, IdentityKind.CLAIM, name, namespace)
    secret = await platform.objects.get(SECRETS, credential_secret_name(IdentityKind.CLAIM, name),
                                        namespace)
    if secret is not None:
        await revoke_credential(platform, subject, secret, outcome, reason="ClaimRemoved")
    try:
        await platform.broker.remove_identity(subject.username)
    except BrokerError as exc:
        return f"claim {name}: {broker_failure(platform, exc, outcome).message}"
    return None
