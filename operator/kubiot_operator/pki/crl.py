"""Certificate revocation lists: what a tenant CA no longer vouches for, as the broker reads it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kubiot_operator.pki.certificates import CertificateAuthority, as_utc
from kubiot_operator.pki.errors import PKIError

#: RFC 5280 reason codes by their ASN.1 names (removeFromCRL belongs to delta CRLs only).
REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    flag.value: flag for flag in x509.ReasonFlags if flag is not x509.ReasonFlags.remove_from_crl
}
UNSPECIFIED = x509.ReasonFlags.unspecified.value


@dataclass(frozen=True)
class Revocation:
    """One revoked certificate of a CA."""

    serial: int
    revoked_at: datetime
    reason: str = UNSPECIFIED
    #: When the revoked certificate expires; after that the CRL need not list it any more.
    expires_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.reason not in REVOCATION_REASONS:
            raise PKIError("UnknownRevocationReason",
                           f"{self.reason!r} is not a revocation reason; use one of "
                           f"{', '.join(sorted(REVOCATION_REASONS))}")
        if self.serial <= 0:
            raise PKIError("InvalidSerial", f"serial {self.serial} is not a certificate serial")

    def to_json(self) -> list[Any]:
        """`[serial hex, revoked at (epoch s), reason, expires at (epoch s) or null]`: a
        revocation record is kept beside its CRL in a Secret of 1 MiB at most."""
        return [format(self.serial, "x"), int(self.revoked_at.timestamp()), self.reason,
                int(self.expires_at.timestamp()) if self.expires_at is not None else None]

    @classmethod
    def from_json(cls, data: list[Any] | dict[str, Any]) -> Revocation:
        """From `to_json`'s form, or the object form earlier versions wrote."""
        if isinstance(data, dict):
            expires = data.get("expiresAt")
            return cls(int(data["serial"], 16),
                       as_utc(datetime.fromisoformat(data["revokedAt"])),
                       data.get("reason", UNSPECIFIED),
                       as_utc(datetime.fromisoformat(expires)) if expires else None)
        serial, revoked_at, reason, expires_at = data
        return cls(int(serial, 16), datetime.fromtimestamp(revoked_at, UTC), reason,
                   datetime.fromtimestamp(expires_at, UTC) if expires_at is not None else None)

    def listed_at(self, now: datetime, crl_validity: timedelta) -> bool:
        """Whether a CRL issued at `now` must still list this revocation.

        RFC 5280 3.3: an entry may go once it has appeared on one regularly scheduled CRL
        issued after the certificate expired; waiting one CRL lifetime past expiry ensures
        that. Without a known expiry it stays."""
        return self.expires_at is None or now < as_utc(self.expires_at) + crl_validity


def build_crl(ca: CertificateAuthority, revocations: Sequence[Revocation], *,
              now: datetime | None = None, next_update_days: int = 7,
              crl_number: int | None = None, distribution_point: str | None = None) -> bytes:
    """A PEM CRL signed by `ca` listing `revocations`.

    `crl_number` must grow with every CRL of a CA; left out, the issue time in seconds is used.
    `distribution_point` is the URL the CRL is published at, recorded in its issuing
    distribution point extension: EMQX enforces only CRLs that carry one, and OpenSSL then
    applies the CRL only to certificates naming the same URL as their distribution point.
    """
    moment = as_utc(now)
    number = crl_number if crl_number is not None else int(moment.timestamp())
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(moment)
        .next_update(moment + timedelta(days=next_update_days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(ca.authority_key_identifier, critical=False)
    )
    if distribution_point is not None:
        builder = builder.add_extension(x509.IssuingDistributionPoint(
            full_name=[x509.UniformResourceIdentifier(distribution_point)], relative_name=None,
            only_contains_user_certs=False, only_contains_ca_certs=False,
            only_some_reasons=None, indirect_crl=False, only_contains_attribute_certs=False,
        ), critical=True)  # RFC 5280 5.2.5: the extension is critical
    for revocation in sorted(revocations, key=lambda r: r.serial):
        builder = builder.add_revoked_certificate(_revoked_entry(revocation))
    crl = builder.sign(ca.private_key, ca.signature_hash)
    return crl.public_bytes(serialization.Encoding.PEM)


def _revoked_entry(revocation: Revocation) -> x509.RevokedCertificate:
    entry = (
        x509.RevokedCertificateBuilder()
        .serial_number(revocation.serial)
        .revocation_date(as_utc(revocation.revoked_at))
    )
    # RFC 5280 asks that "unspecified" be expressed by leaving the reason out.
    if revocation.reason != UNSPECIFIED:
        entry = entry.add_extension(x509.CRLReason(REVOCATION_REASONS[revocation.reason]),
                                    critical=False)
    return entry.build()


def load_crl(crl_pem: bytes) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(crl_pem)
    except ValueError as exc:
        raise PKIError("Unparseable", f"not a PEM CRL: {exc}") from exc


def crl_distribution_point(crl: x509.CertificateRevocationList) -> str | None:
    """The URL a CRL says it is published at (its issuing distribution point), if any."""
    try:
        point = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound:
        return None
    urls = [name.value for name in point.full_name or ()
            if isinstance(name, x509.UniformResourceIdentifier)]
    return urls[0] if urls else None


def revoked_serials(crl_pem: bytes) -> set[int]:
    """The serials a PEM CRL lists."""
    return {entry.serial_number for entry in load_crl(crl_pem)}


def crl_number(crl_pem: bytes) -> int | None:
    """The CRL number of a PEM CRL, if it carries one."""
    try:
        ext = load_crl(crl_pem).extensions.get_extension_for_class(x509.CRLNumber)
    except x509.ExtensionNotFound:
        return None
    return ext.value.crl_number
