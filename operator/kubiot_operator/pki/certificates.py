"""Certificate value types and the building blocks shared by CAs and issuance (pure, no I/O)."""

from __future__ import annotations

import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache, cached_property
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, ObjectIdentifier

from kubiot_operator.models.common import CertificateSummary
from kubiot_operator.pki.keys import PrivateKey, PublicKey, private_key_pem, signature_hash

if TYPE_CHECKING:
    from kubiot_operator.pki.template import ClientCertificateTemplate

#: Certificates start a little in the past, so a device whose clock runs behind accepts them.
BACKDATE = timedelta(minutes=5)
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH


def as_utc(moment: datetime | None) -> datetime:
    """`moment` as an aware UTC datetime (naive values are taken as UTC); now when None."""
    if moment is None:
        return datetime.now(UTC)
    if moment.tzinfo is UTC:
        return moment
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def random_serial() -> int:
    """A random positive serial of at most 159 bits (RFC 5280 allows 20 octets, sign bit clear)."""
    serial = x509.random_serial_number()
    return serial or 1


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA certificate with its private key; `tenant` is None for the platform's server CA."""

    certificate: x509.Certificate
    private_key: PrivateKey
    tenant: str | None = None

    @cached_property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @cached_property
    def key_pem(self) -> bytes:
        return private_key_pem(self.private_key)

    @property
    def subject(self) -> x509.Name:
        return self.certificate.subject

    @cached_property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    @cached_property
    def signature_hash(self) -> hashes.SHA256 | hashes.SHA384:
        """The digest this CA signs with."""
        return signature_hash(self.private_key)

    @cached_property
    def authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        """The AKI of certificates this CA signs: its own SKI when it has one (RFC 5280)."""
        try:
            ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)

    @cached_property
    def client_template(self) -> ClientCertificateTemplate | None:
        """The encoded parts every client certificate of this CA shares (None: no template)."""
        from kubiot_operator.pki.template import ClientCertificateTemplate  # it imports this
        return ClientCertificateTemplate.for_ca(self)

    @cached_property
    def authority_key_extension(self) -> x509.Extension[x509.AuthorityKeyIdentifier]:
        """The AKI extension every certificate this CA signs carries (built once)."""
        return x509.Extension(ExtensionOID.AUTHORITY_KEY_IDENTIFIER, False,
                              self.authority_key_identifier)


@dataclass(frozen=True)
class IssuedCertificate:
    """A signed certificate; `key_pem` is None when it was issued for the holder's own CSR."""

    certificate: x509.Certificate
    cert_pem: bytes
    key_pem: bytes | None
    chain_pem: bytes
    summary: CertificateSummary

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    @property
    def fullchain_pem(self) -> bytes:
        """The certificate followed by its CA, as TLS servers like to present it."""
        return self.cert_pem + self.chain_pem


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lower-case hex without separators."""
    return cert.fingerprint(hashes.SHA256()).hex()


def certificate_summary(cert: x509.Certificate,
                        secret_name: str | None = None) -> CertificateSummary:
    """What a resource's status shows about a certificate."""
    return _summary(cert, fingerprint_sha256(cert), secret_name)


def _summary(cert: x509.Certificate, fingerprint: str,
             secret_name: str | None = None) -> CertificateSummary:
    # Validating five plain values is quicker than pydantic's unvalidated model_construct.
    return CertificateSummary(
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint_sha256=fingerprint,
        secret_name=secret_name,
    )


def certificate_pem(der: bytes) -> bytes:
    """A DER certificate in PEM (RFC 7468: base64 in lines of 64 characters).

    Encoding the DER once and wrapping it here is cheaper than asking the library for the DER
    (for the fingerprint) and the PEM separately: each of those serialises the certificate.
    """
    b2a = binascii.b2a_base64  # 48 bytes in, one 64-character line out
    return b"".join([b"-----BEGIN CERTIFICATE-----\n",
                     *[b2a(der[at:at + 48]) for at in range(0, len(der), 48)],
                     b"-----END CERTIFICATE-----\n"])


def issued_certificate(cert: x509.Certificate, ca: CertificateAuthority,
                       key_pem: bytes | None, der: bytes | None = None) -> IssuedCertificate:
    """Wrap a freshly signed certificate (and its DER, when known) with its PEM, chain and
    summary."""
    if der is None:
        der = cert.public_bytes(serialization.Encoding.DER)
    return IssuedCertificate(
        certificate=cert,
        cert_pem=certificate_pem(der),
        key_pem=key_pem,
        chain_pem=ca.cert_pem,
        summary=_summary(cert, hashlib.sha256(der).hexdigest()),
    )


def validity_window(ca: CertificateAuthority, validity_days: int,
                    now: datetime) -> tuple[datetime, datetime]:
    """not_before a little in the past; not_after no later than the CA's own expiry."""
    if validity_days < 1:
        raise ValueError(f"validity_days must be at least 1, not {validity_days}")
    not_before = now - BACKDATE
    not_after = min(now + timedelta(days=validity_days), ca.not_after)
    return not_before, not_after


_LEAF = x509.Extension(ExtensionOID.BASIC_CONSTRAINTS, True,
                       x509.BasicConstraints(ca=False, path_length=None))
_USAGE = {enciphers: x509.Extension(ExtensionOID.KEY_USAGE, True, x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=enciphers,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False)) for enciphers in (False, True)}


@cache
def _extended_key_usage(usages: tuple[ObjectIdentifier, ...]) -> x509.Extension[
        x509.ExtendedKeyUsage]:
    return x509.Extension(ExtensionOID.EXTENDED_KEY_USAGE, False, x509.ExtendedKeyUsage(usages))


def leading_leaf_extensions(usages: Sequence[ObjectIdentifier], *,
                            key_encipherment: bool = False) -> list[x509.Extension[Any]]:
    """An end-entity certificate's first extensions, the same for every certificate of a kind:
    basicConstraints (not a CA), keyUsage and extKeyUsage."""
    return [_LEAF, _USAGE[key_encipherment], _extended_key_usage(tuple(usages))]


def _naive_utc(moment: datetime) -> datetime:
    """What CertificateBuilder's setters store: naive UTC (certificates carry no zone)."""
    return as_utc(moment).replace(tzinfo=None)


def sign_leaf(ca: CertificateAuthority, *, subject: x509.Name, public_key: PublicKey,
              names: Sequence[x509.GeneralName], usages: Sequence[ObjectIdentifier],
              validity_days: int, now: datetime,
              key_encipherment: bool = False,
              crl_url: str | None = None) -> x509.Certificate:
    """An end-entity certificate signed by `ca`, with the extensions strict verifiers expect.

    `crl_url` is where verifiers that fetch CRLs (EMQX) find the CA's CRL; it becomes the
    certificate's CRL distribution point.
    """
    not_before, not_after = validity_window(ca, validity_days, now)
    extensions = [
        *leading_leaf_extensions(usages, key_encipherment=key_encipherment),
        x509.Extension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, False,
                       x509.SubjectAlternativeName(list(names))),
        x509.Extension(ExtensionOID.SUBJECT_KEY_IDENTIFIER, False,
                       x509.SubjectKeyIdentifier.from_public_key(public_key)),
        ca.authority_key_extension,
    ]
    if crl_url is not None:
        extensions.append(crl_distribution_points(crl_url))
    # All fields at once: the chained setters copy the builder and rescan its extensions at
    # every step, a sixth of the cost of issuing. The values are the setters' own forms.
    builder = x509.CertificateBuilder(
        issuer_name=ca.subject,
        subject_name=subject,
        public_key=public_key,
        serial_number=random_serial(),
        not_valid_before=_naive_utc(not_before),
        not_valid_after=_naive_utc(not_after),
        extensions=extensions,
    )
    return builder.sign(ca.private_key, ca.signature_hash)


def crl_distribution_points(url: str) -> x509.Extension[x509.CRLDistributionPoints]:
    """The CRL distribution point extension naming `url` (RFC 5280 4.2.1.13)."""
    point = x509.DistributionPoint(full_name=[x509.UniformResourceIdentifier(url)],
                                   relative_name=None, reasons=None, crl_issuer=None)
    return x509.Extension(ExtensionOID.CRL_DISTRIBUTION_POINTS, False,
                          x509.CRLDistributionPoints([point]))


def ca_key_usage() -> x509.KeyUsage:
    """A CA signs certificates and CRLs (cRLSign is needed for its CRLs to be accepted)."""
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )
