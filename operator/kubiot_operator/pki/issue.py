"""Issuing device and gateway certificates, and deciding when they are due for renewal."""

from __future__ import annotations

from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from kubiot_contract.topics import ContractError, IdentityKind, certificate_names
from kubiot_operator.models.common import CertificateSummary, KeyAlgorithm
from kubiot_operator.pki.certificates import (
    CLIENT_AUTH,
    CertificateAuthority,
    IssuedCertificate,
    as_utc,
    certificate_summary,
    issued_certificate,
    random_serial,
    sign_leaf,
    validity_window,
)
from kubiot_operator.pki.csr import verify_csr
from kubiot_operator.pki.errors import CSRRejected, PKIError
from kubiot_operator.pki.keys import PublicKey, generate_private_key, private_key_pem

__all__ = [
    "IssuedCertificate",
    "certificate_summary",
    "identity_common_name",
    "issue_identity_certificate",
    "needs_renewal",
    "renewal_time",
]


#: RFC 5280's upper bound of a common name; the CN is the broker username.
COMMON_NAME_MAX_LENGTH = 64


def identity_common_name(tenant: str, kind: IdentityKind, name: str) -> str:
    """The broker username an identity's certificate carries as its CN."""
    return _certificate_names(tenant, kind, name)[0]


def _certificate_names(tenant: str, kind: IdentityKind, name: str) -> tuple[str, str]:
    if kind not in (IdentityKind.DEVICE, IdentityKind.GATEWAY, IdentityKind.CLAIM):
        raise PKIError("UnsupportedIdentityKind", "certificates are issued for devices, "
                       f"gateways and provisioning claims, not {kind.value}")
    try:
        common_name, uri = certificate_names(tenant, kind, name)
    except ContractError as exc:
        raise PKIError("InvalidName", str(exc)) from exc
    if len(common_name) > COMMON_NAME_MAX_LENGTH:
        raise PKIError("InvalidName", f"the username {common_name!r} is longer than the "
                       f"{COMMON_NAME_MAX_LENGTH} characters a certificate's CN may hold "
                       "(RFC 5280 ub-common-name); shorten the tenant or the name")
    return common_name, uri


def issue_identity_certificate(ca: CertificateAuthority, *, tenant: str, kind: IdentityKind,
                               name: str, validity_days: int,
                               key_algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256,
                               csr_pem: str | bytes | None = None,
                               now: datetime | None = None,
                               crl_url: str | None = None) -> IssuedCertificate:
    """A client certificate for a device, gateway or claim: for a new key, or the holder's CSR.

    CN is the broker username, the URI SAN `kubiot://<tenant>/<kind>s/<name>`. With a CSR the
    key stays with the device: `key_pem` is None and `key_algorithm` is not used. `crl_url`,
    when given, is the certificate's CRL distribution point.
    """
    if ca.tenant is not None and ca.tenant != tenant:
        raise PKIError("TenantMismatch",
                       f"the CA of tenant {ca.tenant!r} cannot issue for tenant {tenant!r}")
    common_name, uri = _certificate_names(tenant, kind, name)
    public_key: PublicKey
    key_pem: bytes | None = None
    if csr_pem is not None:
        requested = verify_csr(csr_pem, common_name).public_key()
        if not isinstance(requested, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise CSRRejected("UnsupportedKeyType", "the CSR's key type is not supported")
        public_key = requested
    else:
        key = generate_private_key(key_algorithm)
        public_key = key.public_key()
        key_pem = private_key_pem(key)
    template = ca.client_template
    if template is None:
        cert = sign_leaf(
            ca,
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
            public_key=public_key, names=[x509.UniformResourceIdentifier(uri)],
            usages=[CLIENT_AUTH], validity_days=validity_days, now=as_utc(now), crl_url=crl_url,
        )
        return issued_certificate(cert, ca, key_pem)
    # The same certificate sign_leaf makes, encoded from the CA's template.
    not_before, not_after = validity_window(ca, validity_days, as_utc(now))
    der = template.sign(template.tbs_certificate(
        serial=random_serial(), not_before=not_before, not_after=not_after,
        common_name=common_name, uri=uri, public_key=public_key, crl_url=crl_url))
    return issued_certificate(x509.load_der_x509_certificate(der), ca, key_pem, der)


def renewal_time(not_after: datetime, renew_before_days: int) -> datetime:
    """When a certificate expiring at `not_after` is due for renewal."""
    return as_utc(not_after) - timedelta(days=renew_before_days)


def needs_renewal(cert_or_summary: x509.Certificate | CertificateSummary, *,
                  renew_before_days: int, now: datetime) -> bool:
    """True once `now` has reached the renewal time (or when the expiry is unknown)."""
    if isinstance(cert_or_summary, x509.Certificate):
        not_after: datetime | None = cert_or_summary.not_valid_after_utc
    else:
        not_after = cert_or_summary.not_after
    if not_after is None:
        return True
    return as_utc(now) >= renewal_time(not_after, renew_before_days)
