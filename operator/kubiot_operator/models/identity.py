"""How a device or gateway proves who it is to the broker."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import ConfigDict, Field, StringConstraints

from kubiot_operator.models.common import KeyAlgorithm, KubiotModel, cel, validations


class IdentityType(StrEnum):
    GENERATED_KEY = "GeneratedKey"
    CSR = "CSR"
    PASSWORD = "Password"


class IdentitySpec(KubiotModel):
    """The credential kubiot issues: a certificate for a generated key or for the device's own
    CSR (so the private key never leaves the device), or a broker password."""

    model_config = ConfigDict(json_schema_extra=validations(
        cel("self.type == 'CSR' ? has(self.csr) : !has(self.csr)",
            "csr is required when type is CSR, and only then", ".csr"),
        cel("self.type == 'GeneratedKey' || !has(self.keyAlgorithm)",
            "keyAlgorithm applies only to type GeneratedKey", ".keyAlgorithm"),
        cel("!has(self.validityDays) || !has(self.renewBeforeDays)"
            " || self.renewBeforeDays < self.validityDays",
            "renewBeforeDays must be shorter than validityDays", ".renewBeforeDays"),
    ))

    type: IdentityType = Field(IdentityType.GENERATED_KEY, description="How the credential "
                               "is made: GeneratedKey, CSR or Password.")
    csr: Annotated[str, StringConstraints(
        pattern=r"^-----BEGIN CERTIFICATE REQUEST-----", max_length=16384)] | None = Field(
        None, description="PEM certificate signing request made on the device (type CSR).")
    key_algorithm: KeyAlgorithm | None = Field(
        None, description="Overrides the tenant's default key algorithm (type GeneratedKey).")
    validity_days: int | None = Field(None, ge=1, le=3650,
                                      description="Overrides the tenant's certificate lifetime.")
    renew_before_days: int | None = Field(None, ge=1, le=3649,
                                          description="Overrides the tenant's renewal margin.")
