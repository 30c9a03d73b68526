"""Certificate authorities: a CA per tenant (generated or brought by the admin) and the
platform's server CA that signs the broker's own TLS certificate."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from kubiot_contract.topics import ContractError, validate_name
from kubiot_operator.models.common import KeyAlgorithm
from kubiot_operator.pki.certificates import (
    BACKDATE,
    SERVER_AUTH,
    CertificateAuthority,
    IssuedCertificate,
    as_utc,
    ca_key_usage,
    issued_certificate,
    random_serial,
    sign_leaf,
)
from kubiot_operator.pki.errors import CAInvalid, PKIError
from kubiot_operator.pki.keys import (
    PrivateKey,
    generate_private_key,
    private_key_pem,
    signature_hash,
    unsupported_key_problem,
)

__all__ = [
    "CertificateAuthority",
    "create_server_ca",
    "create_tenant_ca",
    "issue_server_certificate",
    "load_ca",
    "tenant_ca_common_name",
]

ORGANIZATION = "kubiot"
URI_SCHEME = "kubiot"


def tenant_ca_common_name(tenant: str) -> str:
    return f"kubiot tenant {tenant} CA"


def create_tenant_ca(tenant: str, *, key_algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256,
                     validity_days: int = 3650, constrained: bool = True,
                     now: datetime | None = None) -> CertificateAuthority:
    """A new self-signed CA for one tenant.

    Constrained, it may only certify URIs of this tenant (`kubiot://<tenant>/...`) and no
    intermediate CA, so a leaked tenant CA cannot vouch for another tenant's devices.
    """
    try:
        validate_name(tenant, "tenant")
    except ContractError as exc:
        raise PKIError("InvalidName", str(exc)) from exc
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, tenant_ca_common_name(tenant)),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
    ])
    constraints = None
    if constrained:
        # For URI constraints RFC 5280 compares the host part: kubiot://<tenant>/...
        constraints = x509.NameConstraints(
            permitted_subtrees=[x509.UniformResourceIdentifier(tenant)], excluded_subtrees=None)
    key = generate_private_key(key_algorithm)
    cert = _self_signed_ca(subject, key, validity_days, as_utc(now), constraints)
    return CertificateAuthority(cert, key, tenant)


def create_server_ca(common_name: str = "kubiot platform CA", *,
                     key_algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256,
                     validity_days: int = 3650,
                     now: datetime | None = None) -> CertificateAuthority:
    """The platform CA devices trust for the broker's server certificate (not a tenant CA)."""
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
    ])
    key = generate_private_key(key_algorithm)
    return CertificateAuthority(_self_signed_ca(subject, key, validity_days, as_utc(now), None),
                                key, None)


def _self_signed_ca(subject: x509.Name, key: PrivateKey, validity_days: int, now: datetime,
                    constraints: x509.NameConstraints | None) -> x509.Certificate:
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=validity_days))
        # pathLen 0: a CA that may sign devices, gateways and servers, but no other CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key),
                       critical=False)
    )
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    return builder.sign(key, signature_hash(key))


def issue_server_certificate(ca: CertificateAuthority, hostnames: Sequence[str],
                             ips: Sequence[str], *, validity_days: int = 365,
                             key_algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256,
                             now: datetime | None = None) -> IssuedCertificate:
    """The broker's TLS server certificate for the given host names and IP addresses."""
    if not hostnames and not ips:
        raise PKIError("NoSubjectNames", "a server certificate needs a host name or an IP address")
    names: list[x509.GeneralName] = [x509.DNSName(host) for host in hostnames]
    try:
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    except ValueError as exc:
        raise PKIError("InvalidAddress", str(exc)) from exc
    key = generate_private_key(key_algorithm)
    common_name = hostnames[0] if hostnames else ips[0]
    cert = sign_leaf(
        ca,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                           x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]),
        public_key=key.public_key(), names=names, usages=[SERVER_AUTH],
        validity_days=validity_days, now=as_utc(now), key_encipherment=True,
    )
    return issued_certificate(cert, ca, private_key_pem(key))


def load_ca(cert_pem: bytes, key_pem: bytes, *, now: datetime | None = None,
            tenant: str | None = None) -> CertificateAuthority:
    """A CA from PEM (a generated one read back, or the admin's own); CAInvalid if unusable."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise CAInvalid("Unparseable", f"the CA certificate is not a PEM certificate: {exc}") \
            from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as exc:
        raise CAInvalid("EncryptedKey",
                        "the CA private key is encrypted; supply it unencrypted") from exc
    except ValueError as exc:
        raise CAInvalid("Unparseable", f"the CA private key is not a PEM private key: {exc}") \
            from exc
    problem = unsupported_key_problem(key)
    if problem is not None or not isinstance(key, ec.EllipticCurvePrivateKey
                                              | rsa.RSAPrivateKey):
        reason, message = problem or ("UnsupportedKeyType", "unsupported key type")
        raise CAInvalid(reason, f"the CA key cannot be used: {message}")
    _check_is_ca(cert)
    if cert.public_key() != key.public_key():
        raise CAInvalid("KeyMismatch", "the CA private key does not belong to the CA certificate")
    moment = as_utc(now)
    if moment < cert.not_valid_before_utc:
        raise CAInvalid("NotYetValid",
                        f"the CA certificate is valid only from {cert.not_valid_before_utc}")
    if moment >= cert.not_valid_after_utc:
        raise CAInvalid("Expired", f"the CA certificate expired at {cert.not_valid_after_utc}")
    return CertificateAuthority(cert, key, tenant)


def _check_is_ca(cert: x509.Certificate) -> None:
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca:
        raise CAInvalid("NotACA", "the certificate is not a CA certificate "
                        "(basicConstraints CA:TRUE is missing)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise CAInvalid("NotACA", "the CA certificate's key usage does not allow keyCertSign")
    if not usage.crl_sign:
        raise CAInvalid("CannotSignCRL", "the CA certificate's key usage does not allow cRLSign, "
                        "so revoked devices could not be published")
