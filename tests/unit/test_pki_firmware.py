"""Firmware manifests: signed by the tenant's key, and any change is detected."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from kubiot_operator.pki import (
    PKIError,
    canonical_manifest,
    generate_signing_key,
    load_signing_key,
    public_key_pem,
    sign_manifest,
    signing_key_pem,
    verify_manifest,
)
from tests.support.pki import openssl

MANIFEST: dict[str, Any] = {
    "version": "1.4.2",
    "url": "https://firmware.example.com/acme/1.4.2.bin",
    "sha256": "9f" * 32,
    "size": 524288,
    "notes": "überarbeitet",
}


def test_canonical_form_is_sorted_compact_utf8_without_signature() -> None:
    body = canonical_manifest({"b": 1, "a": [1, 2], "signature": "x", "c": "é"})
    assert body == '{"a":[1,2],"b":1,"c":"é"}'.encode()
    assert canonical_manifest(dict(reversed(list(MANIFEST.items())))) == \
        canonical_manifest(MANIFEST)


def test_signed_manifest_verifies_and_carries_its_signature() -> None:
    key = generate_signing_key()
    signature = sign_manifest(key, MANIFEST)
    assert len(base64.b64decode(signature)) == 64
    verify_manifest(public_key_pem(key), MANIFEST, signature)
    # The signature travels inside the job; it is not part of what is signed.
    job = {**MANIFEST, "signature": signature}
    verify_manifest(public_key_pem(key), job, job["signature"])


@pytest.mark.parametrize("change", [
    {"version": "1.4.3"}, {"sha256": "00" * 32}, {"size": 524289}, {"extra": True},
])
def test_any_change_to_the_manifest_is_detected(change: dict[str, Any]) -> None:
    key = generate_signing_key()
    signature = sign_manifest(key, MANIFEST)
    with pytest.raises(PKIError) as caught:
        verify_manifest(public_key_pem(key), {**MANIFEST, **change}, signature)
    assert caught.value.reason == "BadSignature"


def test_wrong_key_and_mangled_signatures_are_refused() -> None:
    key, other = generate_signing_key(), generate_signing_key()
    signature = sign_manifest(key, MANIFEST)
    raw = bytearray(base64.b64decode(signature))
    raw[0] ^= 1
    for bad_key, bad_signature in [
        (public_key_pem(other), signature),
        (public_key_pem(key), base64.b64encode(bytes(raw)).decode()),
        (public_key_pem(key), "not base64!"),
        (public_key_pem(key), ""),
    ]:
        with pytest.raises(PKIError) as caught:
            verify_manifest(bad_key, MANIFEST, bad_signature)
        assert caught.value.reason == "BadSignature"


def test_signing_key_round_trips_and_openssl_verifies(tmp_path: Any) -> None:
    key = load_signing_key(signing_key_pem(generate_signing_key()))
    signature = sign_manifest(key, MANIFEST)
    (tmp_path / "pub.pem").write_bytes(public_key_pem(key))
    (tmp_path / "body").write_bytes(canonical_manifest(MANIFEST))
    (tmp_path / "sig").write_bytes(base64.b64decode(signature))
    result = openssl("pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "pub.pem"),
                     "-rawin", "-in", str(tmp_path / "body"), "-sigfile", str(tmp_path / "sig"))
    assert result.returncode == 0, result.stderr
    assert "Signature Verified Successfully" in result.stdout
    assert json.loads(canonical_manifest(MANIFEST)) == MANIFEST


def test_non_ed25519_keys_are_refused() -> None:
    from kubiot_operator.models.common import KeyAlgorithm
    from kubiot_operator.pki import generate_private_key, private_key_pem

    ec_key = generate_private_key(KeyAlgorithm.ECDSA_P256)
    with pytest.raises(PKIError) as caught:
        load_signing_key(private_key_pem(ec_key))
    assert caught.value.reason == "UnsupportedKeyType"
    with pytest.raises(PKIError) as caught:
        verify_manifest(b"garbage", MANIFEST, "AAAA")
    assert caught.value.reason == "Unparseable"
