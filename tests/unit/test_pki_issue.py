"""Issuing tenant CAs, device/gateway and server certificates, checked by the real openssl."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kubiot_contract.topics import IdentityKind, certificate_uri, device_username
from kubiot_operator.models.common import KeyAlgorithm
from kubiot_operator.pki import (
    CAInvalid,
    CertificateAuthority,
    PKIError,
    create_server_ca,
    create_tenant_ca,
    issue_identity_certificate,
    issue_server_certificate,
    load_ca,
    needs_renewal,
    renewal_time,
)
from kubiot_operator.pki.keys import generate_private_key
from tests.support.pki import make_csr, openssl_text, openssl_verify

E = TypeVar("E", bound=x509.ExtensionType)
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
USERNAMES = {IdentityKind.DEVICE: "acme.sensor-1", IdentityKind.GATEWAY: "acme.gw.sensor-1"}


@pytest.fixture(scope="module")
def acme_ca() -> CertificateAuthority:
    return create_tenant_ca("acme")


def _ext(cert: x509.Certificate, kind: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(kind)


def test_tenant_ca_is_a_name_constrained_ca(acme_ca: CertificateAuthority) -> None:
    cert = acme_ca.certificate
    assert cert.subject.rfc4514_string() == "O=kubiot,CN=kubiot tenant acme CA"
    basic = _ext(cert, x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    constraints = _ext(cert, x509.NameConstraints)
    assert constraints.critical
    assert constraints.value.permitted_subtrees == [x509.UniformResourceIdentifier("acme")]
    text = openssl_text("x509", acme_ca.cert_pem)
    assert "Permitted:" in text and "URI:acme" in text
    assert acme_ca.tenant == "acme"
    assert acme_ca.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")


@pytest.mark.parametrize("kind", [IdentityKind.DEVICE, IdentityKind.GATEWAY])
@pytest.mark.parametrize("algorithm", [KeyAlgorithm.ECDSA_P256, KeyAlgorithm.ECDSA_P384,
                                       KeyAlgorithm.RSA_2048])
@pytest.mark.parametrize("with_csr", [False, True], ids=["generated-key", "csr"])
def test_identity_certificate_verifies_with_openssl(
        acme_ca: CertificateAuthority, kind: IdentityKind, algorithm: KeyAlgorithm,
        with_csr: bool) -> None:
    username = USERNAMES[kind]
    device_key = generate_private_key(algorithm)
    csr = make_csr(device_key, username) if with_csr else None
    issued = issue_identity_certificate(acme_ca, tenant="acme", kind=kind, name="sensor-1",
                                        validity_days=90, key_algorithm=algorithm, csr_pem=csr)

    result = openssl_verify(acme_ca.cert_pem, issued.cert_pem)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": OK")

    cert = issued.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == username
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        certificate_uri("acme", kind, "sensor-1")]
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = _ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert not _ext(cert, x509.BasicConstraints).value.ca
    assert 0 < cert.serial_number < 2**159
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=90) < lifetime <= timedelta(days=90, minutes=10)
    assert cert.not_valid_before_utc < datetime.now(UTC)
    assert _ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == _ext(
        acme_ca.certificate, x509.SubjectKeyIdentifier).value.digest

    if with_csr:
        assert issued.key_pem is None
        assert cert.public_key() == device_key.public_key()
    else:
        assert issued.key_pem is not None and b"PRIVATE KEY" in issued.key_pem
        expected = ec.EllipticCurvePublicKey if algorithm.startswith("ECDSA") \
            else rsa.RSAPublicKey
        assert isinstance(cert.public_key(), expected)
    assert issued.chain_pem == acme_ca.cert_pem
    assert issued.summary.serial == format(cert.serial_number, "x")
    assert issued.summary.not_after == cert.not_valid_after_utc


def test_openssl_text_shows_identity_fields(acme_ca: CertificateAuthority) -> None:
    issued = issue_identity_certificate(acme_ca, tenant="acme", kind=IdentityKind.DEVICE,
                                        name="meter-7", validity_days=10)
    text = openssl_text("x509", issued.cert_pem)
    assert "Subject: CN = acme.meter-7" in text
    assert "URI:kubiot://acme/devices/meter-7" in text
    assert "TLS Web Client Authentication" in text


def test_constrained_ca_cannot_vouch_for_another_tenant(acme_ca: CertificateAuthority) -> None:
    # Issue through acme's CA as if it were globex's: only the name constraint stands in the way.
    rogue = dataclasses.replace(acme_ca, tenant="globex")
    issued = issue_identity_certificate(rogue, tenant="globex", kind=IdentityKind.DEVICE,
                                        name="sensor-1", validity_days=30)
    result = openssl_verify(acme_ca.cert_pem, issued.cert_pem)
    assert result.returncode != 0
    assert "permitted subtree violation" in result.stderr


def test_unconstrained_ca_has_no_name_constraints() -> None:
    ca = create_tenant_ca("acme", constrained=False, key_algorithm=KeyAlgorithm.ECDSA_P384)
    with pytest.raises(x509.ExtensionNotFound):
        ca.certificate.extensions.get_extension_for_class(x509.NameConstraints)
    issued = issue_identity_certificate(ca, tenant="acme", kind=IdentityKind.DEVICE,
                                        name="d1", validity_days=5)
    assert openssl_verify(ca.cert_pem, issued.cert_pem).returncode == 0


def test_a_tenant_ca_refuses_to_issue_for_another_tenant(acme_ca: CertificateAuthority) -> None:
    with pytest.raises(PKIError) as caught:
        issue_identity_certificate(acme_ca, tenant="globex", kind=IdentityKind.DEVICE,
                                   name="d1", validity_days=5)
    assert caught.value.reason == "TenantMismatch"


def test_invalid_names_and_kinds_are_refused(acme_ca: CertificateAuthority) -> None:
    with pytest.raises(PKIError) as caught:
        issue_identity_certificate(acme_ca, tenant="acme", kind=IdentityKind.DEVICE,
                                   name="Not_A_Label", validity_days=5)
    assert caught.value.reason == "InvalidName"
    with pytest.raises(PKIError) as caught:
        issue_identity_certificate(acme_ca, tenant="acme", kind=IdentityKind.INGEST,
                                   name="ingest", validity_days=5)
    assert caught.value.reason == "UnsupportedIdentityKind"


def test_certificate_never_outlives_its_ca() -> None:
    ca = create_tenant_ca("acme", validity_days=30, now=NOW)
    issued = issue_identity_certificate(ca, tenant="acme", kind=IdentityKind.DEVICE, name="d1",
                                        validity_days=365, now=NOW)
    assert issued.certificate.not_valid_after_utc == ca.certificate.not_valid_after_utc


def test_expired_certificate_fails_openssl(acme_ca: CertificateAuthority) -> None:
    issued = issue_identity_certificate(acme_ca, tenant="acme", kind=IdentityKind.DEVICE,
                                        name="d1", validity_days=1,
                                        now=datetime.now(UTC) - timedelta(days=3))
    result = openssl_verify(acme_ca.cert_pem, issued.cert_pem)
    assert result.returncode != 0 and "certificate has expired" in result.stderr


def test_server_certificate_for_the_broker() -> None:
    server_ca = create_server_ca()
    issued = issue_server_certificate(server_ca, ["broker.kubiot.svc", "localhost"],
                                      ["127.0.0.1", "::1"])
    result = openssl_verify(server_ca.cert_pem, issued.cert_pem, purpose="sslserver",
                            extra=["-verify_ip", "127.0.0.1"])
    assert result.returncode == 0, result.stderr
    text = openssl_text("x509", issued.cert_pem)
    assert "DNS:broker.kubiot.svc" in text and "IP Address:127.0.0.1" in text
    assert "TLS Web Server Authentication" in text
    assert server_ca.tenant is None
    with pytest.raises(PKIError):
        issue_server_certificate(server_ca, [], [])
    with pytest.raises(PKIError):
        issue_server_certificate(server_ca, [], ["not-an-ip"])


# --- bring your own CA ----------------------------------------------------------------------

def test_load_ca_round_trips_a_generated_ca(acme_ca: CertificateAuthority) -> None:
    loaded = load_ca(acme_ca.cert_pem, acme_ca.key_pem, tenant="acme")
    assert loaded.certificate == acme_ca.certificate
    issued = issue_identity_certificate(loaded, tenant="acme", kind=IdentityKind.DEVICE,
                                        name="d1", validity_days=5)
    assert openssl_verify(acme_ca.cert_pem, issued.cert_pem).returncode == 0


def _reason(cert_pem: bytes, key_pem: bytes, now: datetime | None = None) -> str:
    with pytest.raises(CAInvalid) as caught:
        load_ca(cert_pem, key_pem, now=now)
    return caught.value.reason


def test_load_ca_refuses_what_cannot_be_a_ca(acme_ca: CertificateAuthority) -> None:
    other = create_tenant_ca("globex")
    leaf = issue_identity_certificate(acme_ca, tenant="acme", kind=IdentityKind.DEVICE,
                                      name="d1", validity_days=5)
    assert leaf.key_pem is not None
    assert _reason(b"garbage", acme_ca.key_pem) == "Unparseable"
    assert _reason(acme_ca.cert_pem, b"garbage") == "Unparseable"
    assert _reason(acme_ca.cert_pem, other.key_pem) == "KeyMismatch"
    assert _reason(leaf.cert_pem, leaf.key_pem) == "NotACA"
    assert _reason(acme_ca.cert_pem, acme_ca.key_pem,
                   now=datetime.now(UTC) + timedelta(days=4000)) == "Expired"
    assert _reason(acme_ca.cert_pem, acme_ca.key_pem,
                   now=datetime.now(UTC) - timedelta(days=1)) == "NotYetValid"


# --- renewal --------------------------------------------------------------------------------

def test_renewal_is_due_renew_before_days_ahead_of_expiry() -> None:
    ca = create_tenant_ca("acme", now=NOW)
    issued = issue_identity_certificate(ca, tenant="acme", kind=IdentityKind.DEVICE,
                                        name="d1", validity_days=90, now=NOW)
    not_after = issued.certificate.not_valid_after_utc
    assert not_after == NOW + timedelta(days=90)
    due = renewal_time(not_after, 30)
    assert due == NOW + timedelta(days=60)
    for subject in (issued.certificate, issued.summary):
        assert not needs_renewal(subject, renew_before_days=30, now=NOW)
        assert not needs_renewal(subject, renew_before_days=30, now=due - timedelta(seconds=1))
        assert needs_renewal(subject, renew_before_days=30, now=due)
        assert needs_renewal(subject, renew_before_days=30, now=not_after + timedelta(days=1))
    naive = (due + timedelta(minutes=1)).replace(tzinfo=None)
    assert needs_renewal(issued.summary, renew_before_days=30, now=naive)


def test_unknown_expiry_needs_renewal() -> None:
    from kubiot_operator.models.common import CertificateSummary
    assert needs_renewal(CertificateSummary(), renew_before_days=30, now=NOW)


def test_username_matches_the_contract(acme_ca: CertificateAuthority) -> None:
    issued = issue_identity_certificate(acme_ca, tenant="acme", kind=IdentityKind.DEVICE,
                                        name="x", validity_days=1)
    cn = issued.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == device_username("acme", "x")
