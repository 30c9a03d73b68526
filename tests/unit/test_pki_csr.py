"""A device's own CSR is signed only when it is intact, strong and names that device."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from kubiot_contract.topics import IdentityKind
from kubiot_operator.pki import (
    CSRRejected,
    create_tenant_ca,
    issue_identity_certificate,
    verify_csr,
)
from tests.support.pki import make_csr, resign_csr, tamper_signature

USERNAME = "acme.sensor-1"


def _rejection(csr: str | bytes, expected: str = USERNAME) -> CSRRejected:
    with pytest.raises(CSRRejected) as caught:
        verify_csr(csr, expected)
    return caught.value


def test_good_csr_is_accepted_as_bytes_or_text() -> None:
    csr = make_csr(ec.generate_private_key(ec.SECP256R1()), USERNAME)
    assert verify_csr(csr, USERNAME).subject.rfc4514_string() == f"CN={USERNAME}"
    assert verify_csr(csr.decode(), USERNAME).is_signature_valid


def test_tampered_signature_is_refused() -> None:
    csr = tamper_signature(make_csr(ec.generate_private_key(ec.SECP256R1()), USERNAME))
    error = _rejection(csr)
    assert error.reason == "BadSignature"
    assert "signature does not verify" in str(error)


def test_weak_rsa_key_is_refused() -> None:
    error = _rejection(make_csr(rsa.generate_private_key(65537, 1024), USERNAME))
    assert error.reason == "WeakKey"
    assert "1024 bits" in error.message


def test_subject_of_another_device_is_refused() -> None:
    error = _rejection(make_csr(ec.generate_private_key(ec.SECP256R1()), "acme.sensor-2"))
    assert error.reason == "SubjectMismatch"
    assert "'acme.sensor-2'" in error.message and "'acme.sensor-1'" in error.message


@pytest.mark.parametrize("garbage", [
    "", "hello", "-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE "
    "REQUEST-----\n", b"\x00\xff" * 40, "A" * 20000,
])
def test_garbage_is_refused(garbage: str | bytes) -> None:
    assert _rejection(garbage).reason == "Unparseable"


def test_ed25519_key_is_not_a_tls_identity() -> None:
    error = _rejection(make_csr(ed25519.Ed25519PrivateKey.generate(), USERNAME))
    assert error.reason == "UnsupportedKeyType"


def test_dsa_key_is_not_a_tls_identity() -> None:
    error = _rejection(make_csr(dsa.generate_private_key(1024), USERNAME))
    assert error.reason == "UnsupportedKeyType"


def test_unusual_curve_is_refused() -> None:
    error = _rejection(make_csr(ec.generate_private_key(ec.SECP256K1()), USERNAME))
    assert error.reason == "UnsupportedKeyType"
    assert "secp256k1" in error.message


def test_issuing_for_a_bad_csr_raises_the_same_reason() -> None:
    ca = create_tenant_ca("acme")
    csr = make_csr(ec.generate_private_key(ec.SECP256R1()), "globex.sensor-1")
    with pytest.raises(CSRRejected) as caught:
        issue_identity_certificate(ca, tenant="acme", kind=IdentityKind.DEVICE,
                                   name="sensor-1", validity_days=30, csr_pem=csr)
    assert caught.value.reason == "SubjectMismatch"


def test_text_that_is_not_unicode_is_refused() -> None:
    # A lone surrogate raised UnicodeEncodeError from str.encode().
    error = _rejection("-----BEGIN CERTIFICATE REQUEST-----\ud800")
    assert error.reason == "Unparseable"


def test_a_subject_that_does_not_decode_is_refused() -> None:
    # Signed by the key it carries, but its common name is not UTF-8 (a UTF8String holding
    # 0xff): the subject decodes lazily and raised ValueError.
    key = ec.generate_private_key(ec.SECP256R1())
    placeholder = "x" * len(USERNAME)
    csr = resign_csr(make_csr(key, placeholder), key, lambda info: info.replace(
        placeholder.encode(), b"\xff" * len(USERNAME)))
    error = _rejection(csr)
    assert error.reason == "Unparseable"
    assert "subject" in str(error)


def test_a_csr_of_another_version_is_refused() -> None:
    # Found by the fuzz suite: cryptography raises InvalidVersion, not a ValueError.
    key = ec.generate_private_key(ec.SECP256R1())
    csr = resign_csr(make_csr(key, USERNAME), key,
                     lambda info: info.replace(b"\x02\x01\x00", b"\x02\x01\x01", 1))
    error = _rejection(csr)
    assert error.reason == "Unparseable"
    assert "version" in str(error)
