"""CRLs: what openssl reads in them, and that openssl refuses a revoked certificate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kubiot_contract.topics import IdentityKind
from kubiot_operator.pki import (
    CertificateAuthority,
    PKIError,
    Revocation,
    build_crl,
    create_tenant_ca,
    crl_number,
    issue_identity_certificate,
    revoked_serials,
)
from tests.support.pki import openssl_text, openssl_verify

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return create_tenant_ca("acme")


def _openssl_hex(serial: int) -> str:
    """openssl prints a serial byte by byte: upper-case hex of even length."""
    digits = format(serial, "X")
    return digits.zfill(len(digits) + len(digits) % 2)


def test_openssl_reads_the_crl_and_lists_the_revoked_serial(ca: CertificateAuthority) -> None:
    revoked = issue_identity_certificate(ca, tenant="acme", kind=IdentityKind.DEVICE,
                                         name="lost", validity_days=30)
    crl = build_crl(ca, [Revocation(revoked.serial, NOW, "keyCompromise"),
                         Revocation(0xABC, NOW)], now=NOW, crl_number=7)
    text = openssl_text("crl", crl)
    assert "Issuer: CN = kubiot tenant acme CA, O = kubiot" in text
    assert f"Serial Number: {_openssl_hex(revoked.serial)}" in text
    assert "Key Compromise" in text
    assert "X509v3 CRL Number" in text and "7" in text
    assert revoked_serials(crl) == {revoked.serial, 0xABC}
    assert crl_number(crl) == 7


def test_openssl_refuses_the_revoked_and_accepts_the_rest(ca: CertificateAuthority) -> None:
    revoked, kept = (issue_identity_certificate(ca, tenant="acme", kind=IdentityKind.DEVICE,
                                                name=name, validity_days=30)
                     for name in ("lost", "kept"))
    crl = build_crl(ca, [Revocation(revoked.serial, NOW)], now=NOW)
    refused = openssl_verify(ca.cert_pem, revoked.cert_pem, crl_pem=crl)
    assert refused.returncode != 0 and "certificate revoked" in refused.stderr
    accepted = openssl_verify(ca.cert_pem, kept.cert_pem, crl_pem=crl)
    assert accepted.returncode == 0, accepted.stderr


def test_an_empty_crl_is_valid_and_required_for_crl_checks(ca: CertificateAuthority) -> None:
    cert = issue_identity_certificate(ca, tenant="acme", kind=IdentityKind.DEVICE, name="d1",
                                      validity_days=30)
    crl = build_crl(ca, [], now=NOW, next_update_days=1)
    assert revoked_serials(crl) == set()
    assert openssl_verify(ca.cert_pem, cert.cert_pem, crl_pem=crl).returncode == 0
    # Without a CRL for its CA, a CRL-checking verifier refuses: the bundle needs one per CA.
    other = build_crl(create_tenant_ca("globex"), [], now=NOW)
    missing = openssl_verify(ca.cert_pem, cert.cert_pem, crl_pem=other)
    assert missing.returncode != 0 and "unable to get certificate CRL" in missing.stderr


def test_expired_crl_is_refused_by_openssl(ca: CertificateAuthority) -> None:
    cert = issue_identity_certificate(ca, tenant="acme", kind=IdentityKind.DEVICE, name="d1",
                                      validity_days=30)
    stale = build_crl(ca, [], now=NOW - timedelta(days=8), next_update_days=7)
    result = openssl_verify(ca.cert_pem, cert.cert_pem, crl_pem=stale)
    assert result.returncode != 0 and "CRL has expired" in result.stderr


def test_unspecified_reason_is_left_out_and_unknown_reasons_refused(
        ca: CertificateAuthority) -> None:
    crl = build_crl(ca, [Revocation(5, NOW)], now=NOW)
    assert "Reason Code" not in openssl_text("crl", crl)
    with pytest.raises(PKIError) as caught:
        Revocation(5, NOW, "lostInTheMail")
    assert caught.value.reason == "UnknownRevocationReason"
    with pytest.raises(PKIError):
        Revocation(0, NOW)


def test_revocation_round_trips_through_json() -> None:
    revocation = Revocation(0xDEADBEEF, NOW, "superseded")
    assert Revocation.from_json(revocation.to_json()) == revocation


def test_garbage_is_not_a_crl() -> None:
    with pytest.raises(PKIError):
        revoked_serials(b"nope")
