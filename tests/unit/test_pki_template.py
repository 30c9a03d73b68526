"""The template encoder writes, byte for byte, the certificate sign_leaf builds."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from kubiot_contract.topics import IdentityKind, certificate_names
from kubiot_operator.models.common import KeyAlgorithm
from kubiot_operator.pki import PKIError, create_tenant_ca, issue_identity_certificate
from kubiot_operator.pki.certificates import CLIENT_AUTH, CertificateAuthority, sign_leaf
from kubiot_operator.pki.keys import generate_private_key

NOW = datetime(2026, 11, 29, 12, 30, 45, 123456, tzinfo=UTC)
TENANT, DEVICE = "t" * 40, "d" * 23  # the longest CN a certificate may carry: 64 characters


def _ca(algorithm: KeyAlgorithm, now: datetime = NOW) -> CertificateAuthority:
    return create_tenant_ca(TENANT, key_algorithm=algorithm, validity_days=40 * 365, now=now)


@pytest.mark.parametrize("ca_algorithm", [KeyAlgorithm.ECDSA_P256, KeyAlgorithm.ECDSA_P384,
                                          KeyAlgorithm.RSA_2048])
@pytest.mark.parametrize("leaf_algorithm", [KeyAlgorithm.ECDSA_P256, KeyAlgorithm.ECDSA_P384,
                                            KeyAlgorithm.RSA_2048])
@pytest.mark.parametrize("crl_url", [None, "http://kubiot-metrics.kubiot-system.svc:8080/crl/"
                                           f"{TENANT}.crl"])
@pytest.mark.parametrize("now", [NOW, datetime(2049, 12, 31, 23, 0, tzinfo=UTC)],
                         ids=["utc-time", "generalized-time-after-2049"])
def test_the_template_encodes_what_the_builder_builds(
        ca_algorithm: KeyAlgorithm, leaf_algorithm: KeyAlgorithm, crl_url: str | None,
        now: datetime) -> None:
    ca = _ca(ca_algorithm, now)
    template = ca.client_template
    assert template is not None
    common_name, uri = certificate_names(TENANT, IdentityKind.DEVICE, DEVICE)
    public_key = generate_private_key(leaf_algorithm).public_key()
    built = sign_leaf(ca, subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                common_name)]),
                      public_key=public_key, names=[x509.UniformResourceIdentifier(uri)],
                      usages=[CLIENT_AUTH], validity_days=365, now=now, crl_url=crl_url)
    encoded = template.tbs_certificate(
        serial=built.serial_number, not_before=built.not_valid_before_utc,
        not_after=built.not_valid_after_utc, common_name=common_name, uri=uri,
        public_key=public_key, crl_url=crl_url)
    assert encoded == built.tbs_certificate_bytes


@pytest.mark.parametrize("ca_algorithm", [KeyAlgorithm.ECDSA_P256, KeyAlgorithm.ECDSA_P384,
                                          KeyAlgorithm.RSA_2048])
def test_a_template_signed_certificate_parses_and_verifies_against_its_ca(
        ca_algorithm: KeyAlgorithm) -> None:
    ca = _ca(ca_algorithm)
    issued = issue_identity_certificate(ca, tenant=TENANT, kind=IdentityKind.GATEWAY,
                                        name="gw-1", validity_days=30, now=NOW)
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == ca.signature_hash.name
    assert issued.summary.serial == format(cert.serial_number, "x")
    assert issued.summary.not_before == datetime(2026, 11, 29, 12, 25, 45, tzinfo=UTC)


@pytest.mark.parametrize("serial", [1, 127, 128, 255, 256, 2**159 - 1, 2**152])
def test_serials_are_minimal_positive_integers(serial: int) -> None:
    ca = _ca(KeyAlgorithm.ECDSA_P256)
    template = ca.client_template
    assert template is not None
    common_name, uri = certificate_names(TENANT, IdentityKind.DEVICE, "d1")
    tbs = template.tbs_certificate(serial=serial, not_before=NOW, not_after=NOW,
                                   common_name=common_name, uri=uri,
                                   public_key=generate_private_key().public_key())
    der = template.sign(tbs)
    assert x509.load_der_x509_certificate(der).serial_number == serial


def test_a_username_too_long_for_a_certificate_is_refused_with_a_reason() -> None:
    ca = _ca(KeyAlgorithm.ECDSA_P256)
    with pytest.raises(PKIError) as caught:
        issue_identity_certificate(ca, tenant=TENANT, kind=IdentityKind.DEVICE,
                                   name=DEVICE + "x", validity_days=30, now=NOW)
    assert caught.value.reason == "InvalidName"
    assert "64" in str(caught.value)
