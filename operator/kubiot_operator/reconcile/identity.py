"""When a device or gateway needs a new credential, and what its Secret holds.

The Secret is the record of what was issued: its annotations carry the serial, the expiry and a
hash of the identity spec it was issued for, so a restarted operator decides from the Secret
alone and never issues twice for the same spec.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from kubiot_contract.topics import IdentityKind
from kubiot_operator import API_GROUP
from kubiot_operator.models.common import KeyAlgorithm
from kubiot_operator.models.identity import IdentitySpec, IdentityType
from kubiot_operator.models.tenant import TenantSpec
from kubiot_operator.reconcile.tenant import MANAGED_BY, TENANT_LABEL

SERIAL_ANNOTATION = f"{API_GROUP}/serial"
NOT_AFTER_ANNOTATION = f"{API_GROUP}/not-after"
SPEC_HASH_ANNOTATION = f"{API_GROUP}/identity-spec"
KIND_LABEL = f"{API_GROUP}/identity-kind"
REVOKED_ANNOTATION = f"{API_GROUP}/revoked"


class IssueReason(StrEnum):
    NEW = "New"
    RENEWAL = "Renewal"
    SPEC_CHANGED = "SpecChanged"
    RESUMED = "Resumed"


@dataclass(frozen=True)
class CredentialPolicy:
    """The identity spec with the tenant's defaults filled in."""

    type: IdentityType
    key_algorithm: KeyAlgorithm
    validity_days: int
    renew_before_days: int
    csr: str | None
    rotation: int = 0  # raised to re-issue for the same spec (a claim's rotation)

    @property
    def spec_hash(self) -> str:
        """Changes exactly when a new credential must be issued for a different spec."""
        material: dict[str, object] = {"type": self.type.value,
                                       "keyAlgorithm": self.key_algorithm.value,
                                       "csr": self.csr or ""}
        if self.rotation:  # absent when zero, so credentials issued before keep their hash
            material["rotation"] = self.rotation
        digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
        return digest[:32]


def credential_policy(tenant: TenantSpec, identity: IdentitySpec,
                      rotation: int = 0) -> CredentialPolicy:
    defaults = tenant.certificates
    return CredentialPolicy(
        type=identity.type,
        key_algorithm=identity.key_algorithm or defaults.key_algorithm,
        validity_days=identity.validity_days or defaults.validity_days,
        renew_before_days=identity.renew_before_days or defaults.renew_before_days,
        csr=identity.csr,
        rotation=rotation,
    )


@dataclass(frozen=True)
class IssuedRecord:
    """What the existing Secret says was issued."""

    serial: str | None
    not_after: datetime | None
    spec_hash: str | None
    revoked: bool = False


def issued_record(secret: dict[str, Any] | None) -> IssuedRecord | None:
    """Read the record from a Secret's annotations; None when there is no usable Secret."""
    if secret is None:
        return None
    annotations = (secret.get("metadata") or {}).get("annotations") or {}
    if SPEC_HASH_ANNOTATION not in annotations:
        return None
    not_after = annotations.get(NOT_AFTER_ANNOTATION)
    return IssuedRecord(
        serial=annotations.get(SERIAL_ANNOTATION),
        not_after=datetime.fromisoformat(not_after) if not_after else None,
        spec_hash=annotations[SPEC_HASH_ANNOTATION],
        revoked=annotations.get(REVOKED_ANNOTATION) == "true",
    )


@dataclass(frozen=True)
class IdentityDecision:
    """Issue a credential (and why), or keep the current one until `renew_at`."""

    issue: IssueReason | None
    renew_at: datetime | None = None
    revoke_serial: str | None = None


def decide_identity(policy: CredentialPolicy, record: IssuedRecord | None,
                    now: datetime) -> IdentityDecision:
    """Pure: compare what was issued with what the spec wants, at `now`."""
    if record is None:
        return IdentityDecision(IssueReason.NEW)
    if record.revoked:
        return IdentityDecision(IssueReason.RESUMED)
    if record.spec_hash != policy.spec_hash:
        # A different key type or CSR means the old key is no longer the device's: revoke it.
        return IdentityDecision(IssueReason.SPEC_CHANGED, revoke_serial=record.serial)
    if policy.type is IdentityType.PASSWORD or record.not_after is None:
        return IdentityDecision(None)
    renew_at = record.not_after - timedelta(days=policy.renew_before_days)
    if now >= renew_at:
        return IdentityDecision(IssueReason.RENEWAL)
    return IdentityDecision(None, renew_at=renew_at)


@dataclass(frozen=True)
class BrokerEndpoint:
    """What a device is told about where to connect."""

    host: str
    port: int
    ca_pem: bytes | None = None


def credential_secret_name(kind: IdentityKind, name: str) -> str:
    return f"{name}-{kind.value}-credentials"


def credential_secret(*, tenant: str, kind: IdentityKind, name: str, namespace: str,
                      username: str, topic_root: str, policy: CredentialPolicy,
                      endpoint: BrokerEndpoint, files: dict[str, bytes],
                      serial: str | None, not_after: datetime | None) -> dict[str, Any]:
    """The Secret a firmware engineer flashes onto the device: credentials plus where to go."""
    data = {
        "username": username.encode(),
        "topic-root": topic_root.encode(),
        "broker-host": endpoint.host.encode(),
        "broker-port": str(endpoint.port).encode(),
        **files,
    }
    if endpoint.ca_pem:
        data["broker-ca.crt"] = endpoint.ca_pem
    annotations = {SPEC_HASH_ANNOTATION: policy.spec_hash}
    if serial is not None:
        annotations[SERIAL_ANNOTATION] = serial
    if not_after is not None:
        annotations[NOT_AFTER_ANNOTATION] = not_after.isoformat()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": credential_secret_name(kind, name),
            "namespace": namespace,
            "labels": {TENANT_LABEL: tenant, KIND_LABEL: kind.value, **MANAGED_BY},
            "annotations": annotations,
        },
        "data": {key: _b64(value) for key, value in sorted(data.items())},
    }


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()
