"""Types shared by every kubiot resource: the model base, conditions, selectors, certificates."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from kubiot_contract.topics import NAME_MAX_LENGTH, NAME_PATTERN

DNSLabel = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=NAME_MAX_LENGTH)]
LabelValue = Annotated[str, StringConstraints(
    pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$", max_length=63)]
LabelKey = Annotated[str, StringConstraints(
    pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
            r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
    max_length=316)]
#: A device's or gateway's name: a topic level and part of a broker username (the contract).
IdentityName = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=NAME_MAX_LENGTH),
                         Field(description=(
                             "must be a DNS label (lower-case letters, digits and '-', starting "
                             "and ending with a letter or digit, at most 63 characters): it "
                             "becomes an MQTT topic level and part of a broker username"))]
#: The Kubernetes rule for most object names (RFC 1123 subdomain), for names nothing derives from.
SubdomainName = Annotated[str, StringConstraints(
    pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    max_length=253), Field(description=(
        "must be a DNS subdomain (lower-case letters, digits, '-' and '.', starting and ending "
        "with a letter or digit, at most 253 characters)"))]
ObjectName = Annotated[str, StringConstraints(
    pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$", max_length=253)]
QuantityText = Annotated[str, StringConstraints(
    pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$", max_length=32)]
#: A resource quantity as Kubernetes takes it: `cpu: 1` as well as `cpu: 500m` or `memory: 1Gi`.
Quantity = Annotated[int | QuantityText, Field(json_schema_extra={
    "x-kubernetes-int-or-string": True})]


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, Any]:
    """A CEL validation rule as the API server reads it (`x-kubernetes-validations`)."""
    validation = {"rule": rule, "message": message}
    if field_path:
        validation["fieldPath"] = field_path
    return validation


def validations(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


class KubiotModel(BaseModel):
    """Base of every spec and status model: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as it is written to Kubernetes (camelCase, no unset optional fields)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(KubiotModel):
    """The standard Kubernetes condition (as in metav1.Condition)."""

    type: Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Za-z0-9]*$", max_length=64)]
    status: ConditionStatus
    reason: Annotated[str, StringConstraints(
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)]
    message: Annotated[str, StringConstraints(max_length=32768)] = ""
    last_transition_time: datetime
    observed_generation: Annotated[int, Field(ge=0)] | None = None


Conditions = Annotated[
    list[Condition],
    Field(max_length=16, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"],
    }),
]


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(KubiotModel):
    model_config = ConfigDict(json_schema_extra=validations(cel(
        "self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0"
        " : !has(self.values) || size(self.values) == 0",
        "values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist",
    )))

    key: LabelKey
    operator: SelectorOperator
    values: Annotated[list[LabelValue], Field(max_length=64)] | None = None


class LabelSelector(KubiotModel):
    """Which devices a resource applies to, as in a Kubernetes label selector."""

    match_labels: Annotated[dict[LabelKey, LabelValue], Field(max_length=64)] | None = None
    match_expressions: Annotated[
        list[LabelSelectorRequirement], Field(max_length=32)] | None = None


class KeyAlgorithm(StrEnum):
    ECDSA_P256 = "ECDSA-P256"
    ECDSA_P384 = "ECDSA-P384"
    RSA_2048 = "RSA-2048"
    RSA_3072 = "RSA-3072"
    RSA_4096 = "RSA-4096"


class CertificateSummary(KubiotModel):
    """What status tells about an issued certificate."""

    serial: str | None = Field(None, description="Serial number, hexadecimal.")
    not_before: datetime | None = None
    not_after: datetime | None = None
    fingerprint_sha256: str | None = Field(None, description="SHA-256 of the DER certificate.")
    secret_name: str | None = Field(None, description="The Secret holding the credentials.")


class SecretKeyRef(KubiotModel):
    """One key of a Secret in the tenant's namespace."""

    name: ObjectName
    key: Annotated[str, StringConstraints(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)]
