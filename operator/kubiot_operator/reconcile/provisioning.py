"""Provisioning by claim, the decisions: is a request admitted, which Device it makes, what the
device is answered.

A request arrives on `{tenant}/provisioning/{claim}/{serial}/request` from whoever holds the
claim's certificate; the broker lets nobody else publish there, so the topic says which claim
asked. Its payload is untrusted bytes: every way it can be wrong becomes a `Refusal` with a
reason the device is told, never an exception.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kubiot_contract.topics import (
    ContractError,
    ProvisioningMessage,
    claim_root,
    device_root,
    device_username,
    parse_provisioning_topic,
    provisioning_topic,
)
from kubiot_operator import API_GROUP, API_VERSION
from kubiot_operator.models.tenant import ApprovalMode, ProvisioningSpec
from kubiot_operator.pki.csr import MAX_CSR_BYTES, verify_csr
from kubiot_operator.pki.errors import CSRRejected
from kubiot_operator.reconcile.tenant import MANAGED_BY, TENANT_LABEL

PROVISIONED_LABEL = f"{API_GROUP}/provisioned"
CLAIM_LABEL = f"{API_GROUP}/claim"
SERIAL_LABEL = f"{API_GROUP}/serial"
APPROVED_LABEL = f"{API_GROUP}/approved"

#: A request is a CSR and a few short fields; anything much larger is refused unread.
MAX_REQUEST_BYTES = MAX_CSR_BYTES + 1024
#: The pattern of a Device's `spec.model`, checked here so a bad one is refused, not created.
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")


#: How soon a device refused for a reason someone may fix (a quota, a failed Device, the tenant's
#: settings) asks again.
RECHECK_SECONDS = 60.0


class RefusalReason(StrEnum):
    MALFORMED = "Malformed"
    PROVISIONING_DISABLED = "ProvisioningDisabled"
    PROVISIONING_MISCONFIGURED = "ProvisioningMisconfigured"
    UNKNOWN_CLAIM = "UnknownClaim"
    CLAIM_REVOKED = "ClaimRevoked"
    NAME_NOT_ALLOWED = "NameNotAllowed"
    SERIAL_NOT_ALLOWED = "SerialNotAllowed"
    SERIAL_IN_USE = "SerialInUse"
    NAME_TAKEN = "NameTaken"
    BAD_CSR = "BadCSR"
    RATE_LIMITED = "RateLimited"
    QUOTA_EXCEEDED = "QuotaExceeded"
    DEVICE_SUSPENDED = "DeviceSuspended"
    DEVICE_FAILED = "DeviceFailed"


class PendingReason(StrEnum):
    ISSUING = "Issuing"
    AWAITING_APPROVAL = "AwaitingApproval"


@dataclass(frozen=True)
class Refusal:
    """Why a request is not answered with a certificate; `retry_after` when asking again later
    may succeed (a rate limit)."""

    reason: RefusalReason
    message: str
    retry_after: float | None = None


@dataclass(frozen=True)
class ProvisioningRequest:
    """A request that parsed: who asked (from the topic) and what for (from the payload)."""

    tenant: str
    claim: str
    serial: str
    csr_pem: str
    public_key: bytes  # SubjectPublicKeyInfo DER of the CSR's key: what makes a request "the same"
    model: str | None = None

    @property
    def device(self) -> str:
        """The serial is the Device's name: the device knows it, so it can put its own CN
        (`{tenant}.{serial}`) into its CSR before it is told anything."""
        return self.serial

    @property
    def response_topic(self) -> str:
        return response_topic(self.tenant, self.claim, self.serial)


def response_topic(tenant: str, claim: str, serial: str) -> str:
    return provisioning_topic(claim_root(tenant, claim), serial, ProvisioningMessage.RESPONSE)


@dataclass(frozen=True)
class Unanswerable:
    """A message that is not a provisioning request at all: there is nowhere to answer."""

    topic: str
    reason: str


def parse_request(topic: str, payload: bytes
                  ) -> ProvisioningRequest | tuple[str, Refusal] | Unanswerable:
    """Parse a request; a refusal comes with the topic to answer it on."""
    try:
        parsed = parse_provisioning_topic(topic)
    except ContractError as exc:
        return Unanswerable(topic, str(exc))
    if parsed.message is not ProvisioningMessage.REQUEST:
        return Unanswerable(topic, "only requests are answered")
    answer_on = response_topic(parsed.tenant, parsed.claim, parsed.serial)

    def refuse(reason: RefusalReason, message: str) -> tuple[str, Refusal]:
        return answer_on, Refusal(reason, message)

    if len(payload) > MAX_REQUEST_BYTES:
        return refuse(RefusalReason.MALFORMED, f"the request is larger than "
                      f"{MAX_REQUEST_BYTES} bytes")
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return refuse(RefusalReason.MALFORMED, "the request is not UTF-8 JSON")
    if not isinstance(body, dict):
        return refuse(RefusalReason.MALFORMED, "the request must be a JSON object")
    csr, model = body.get("csr"), body.get("model")
    if not isinstance(csr, str) or not csr:
        return refuse(RefusalReason.MALFORMED, "the request has no `csr` string")
    if model is not None and not (isinstance(model, str) and _MODEL_RE.match(model)):
        return refuse(RefusalReason.MALFORMED, "`model` must be 1 to 63 letters, digits, "
                      "'.', '_' or '-'")
    username = device_username(parsed.tenant, parsed.serial)
    try:
        request = verify_csr(csr, username)
    except CSRRejected as exc:
        return refuse(RefusalReason.BAD_CSR, f"{exc.reason}: {exc}")
    except (ValueError, TypeError) as exc:  # the library's own refusal of odd encodings
        return refuse(RefusalReason.BAD_CSR, f"the CSR cannot be read: {exc}")
    key = request.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return ProvisioningRequest(parsed.tenant, parsed.claim, parsed.serial, csr, key, model)


def name_pattern_problem(spec: ProvisioningSpec) -> str | None:
    """Why the tenant's name pattern cannot be used, if it cannot.

    Checked here rather than in the model: a typo in the pattern must stop provisioning only,
    not fail the whole Tenant (its CA, its ingest) as an invalid spec would.
    """
    if spec.name_pattern is None:
        return None
    try:
        re.compile(spec.name_pattern)
    except re.error as exc:
        return f"spec.provisioning.namePattern is not a regular expression: {exc}"
    return None


def admit(request: ProvisioningRequest, spec: ProvisioningSpec | None) -> Refusal | None:
    """Whether the tenant's provisioning settings let this request through at all."""
    if spec is None or not spec.enabled:
        return Refusal(RefusalReason.PROVISIONING_DISABLED,
                       f"provisioning is not enabled for tenant {request.tenant}")
    problem = name_pattern_problem(spec)
    if problem is not None:
        return Refusal(RefusalReason.PROVISIONING_MISCONFIGURED, problem,
                       retry_after=RECHECK_SECONDS)
    claim = next((c for c in spec.claims if c.name == request.claim), None)
    if claim is None:
        return Refusal(RefusalReason.UNKNOWN_CLAIM, f"tenant {request.tenant} has no claim "
                       f"{request.claim}")
    if claim.revoked:
        return Refusal(RefusalReason.CLAIM_REVOKED, f"claim {request.claim} is revoked")
    if spec.name_pattern is not None and not re.fullmatch(spec.name_pattern, request.device):
        return Refusal(RefusalReason.NAME_NOT_ALLOWED, f"device name {request.device!r} does "
                       f"not match the tenant's pattern {spec.name_pattern!r}")
    if spec.serials is not None and request.serial not in spec.serials:
        return Refusal(RefusalReason.SERIAL_NOT_ALLOWED, f"serial {request.serial!r} is not "
                       "on the tenant's list of serials")
    return None


def public_key_of_csr(csr_pem: str) -> bytes | None:
    """The SubjectPublicKeyInfo of a CSR already on record (None when it cannot be read)."""
    try:
        key = x509.load_pem_x509_csr(csr_pem.encode()).public_key()
        return key.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError):
        return None


def public_key_of_certificate(cert_pem: bytes) -> bytes | None:
    """The SubjectPublicKeyInfo of an issued certificate (None when it cannot be read)."""
    try:
        key = x509.load_pem_x509_certificate(cert_pem).public_key()
        return key.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError):
        return None


def match_existing(request: ProvisioningRequest, device: Mapping[str, Any]) -> Refusal | None:
    """A Device of that name exists: None when it is this device's (the request is a replay),
    else why the request is refused."""
    labels = (device.get("metadata") or {}).get("labels") or {}
    identity = (device.get("spec") or {}).get("identity") or {}
    if labels.get(PROVISIONED_LABEL) != "true":
        return Refusal(RefusalReason.NAME_TAKEN, f"a Device {request.device} exists that was "
                       "not provisioned by claim")
    csr = identity.get("csr")
    if not isinstance(csr, str) or public_key_of_csr(csr) != request.public_key:
        return Refusal(RefusalReason.SERIAL_IN_USE, f"serial {request.serial} was provisioned "
                       "with a different key")
    if (device.get("spec") or {}).get("suspended"):
        return Refusal(RefusalReason.DEVICE_SUSPENDED, f"Device {request.device} is suspended")
    return None


def quota_refusal(tenant: str, max_devices: int | None, existing: int) -> Refusal | None:
    """A new Device beyond the tenant's quota would only be created to fail: refuse first."""
    if max_devices is None or existing < max_devices:
        return None
    return Refusal(RefusalReason.QUOTA_EXCEEDED, f"tenant {tenant} allows {max_devices} "
                   f"devices and has {existing}", retry_after=RECHECK_SECONDS)


def failed_device_refusal(device: Mapping[str, Any]) -> Refusal | None:
    """A Device whose reconcile failed (a quota, a CSR the PKI refused): say why."""
    status = device.get("status") or {}
    if status.get("phase") != "Failed":
        return None
    failing = [c for c in status.get("conditions") or []
               if isinstance(c, dict) and c.get("status") == "False" and c.get("type") != "Ready"]
    why = "; ".join(f"{c.get('reason')}: {c.get('message')}" for c in failing) or "failed"
    return Refusal(RefusalReason.DEVICE_FAILED, f"Device {device['metadata']['name']}: {why}",
                   retry_after=RECHECK_SECONDS)


def awaiting_approval(labels: Mapping[str, str]) -> bool:
    """A provisioned Device that nobody has approved yet gets no certificate."""
    return labels.get(PROVISIONED_LABEL) == "true" and labels.get(APPROVED_LABEL) != "true"


def provisioned_device(request: ProvisioningRequest, spec: ProvisioningSpec,
                       namespace: str) -> dict[str, Any]:
    """The Device a request becomes: its identity is the device's own CSR."""
    labels = {**(spec.device_labels or {}), TENANT_LABEL: request.tenant,
              PROVISIONED_LABEL: "true", CLAIM_LABEL: request.claim,
              SERIAL_LABEL: request.serial, **MANAGED_BY}
    if spec.approval is ApprovalMode.AUTOMATIC:
        labels[APPROVED_LABEL] = "true"
    device_spec: dict[str, Any] = {"identity": {"type": "CSR", "csr": request.csr_pem}}
    if request.model is not None:
        device_spec["model"] = request.model
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "Device",
            "metadata": {"name": request.device, "namespace": namespace, "labels": labels},
            "spec": device_spec}


# --- answers -----------------------------------------------------------------------------------

def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def refused_answer(refusal: Refusal) -> bytes:
    answer: dict[str, Any] = {"status": "refused", "reason": refusal.reason.value,
                              "message": refusal.message}
    if refusal.retry_after is not None:
        answer["retryAfterSeconds"] = refusal.retry_after
    return _json(answer)


def pending_answer(reason: PendingReason, message: str, retry_after: float) -> bytes:
    return _json({"status": "pending", "reason": reason.value, "message": message,
                  "retryAfterSeconds": retry_after})


#: Secret keys the device is told, and what it is told them as. Never `tls.key`: there is none
#: (the key is the device's), and an answer is readable by every holder of the claim.
ANSWERED_FILES = {
    "tls.crt": "certificate",
    "ca.crt": "ca",
    "broker-ca.crt": "brokerCa",
    "firmware-signing.pub": "firmwareSigningKey",
    "broker-host": "brokerHost",
    "broker-port": "brokerPort",
    "username": "username",
    "topic-root": "topicRoot",
}


def accepted_answer(request: ProvisioningRequest, files: Mapping[str, bytes]) -> bytes:
    """The device's certificate and where to take it, from its credential Secret."""
    answer: dict[str, Any] = {"status": "accepted", "device": request.device}
    for key, field in ANSWERED_FILES.items():
        if key in files:
            answer[field] = files[key].decode()
    answer.setdefault("username", device_username(request.tenant, request.device))
    answer.setdefault("topicRoot", device_root(request.tenant, request.device))
    return _json(answer)
