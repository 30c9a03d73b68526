"""Firmware manifest signatures (Ed25519): the operator signs, the device verifies."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kubiot_operator.pki.errors import PKIError

SIGNATURE_FIELD = "signature"


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signing_key_pem(key: Ed25519PrivateKey) -> bytes:
    """The signing key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The verifying key as SubjectPublicKeyInfo PEM, as devices are provisioned with it."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def load_signing_key(pem: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError("Unparseable", f"not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise PKIError("UnsupportedKeyType", "firmware signing keys are Ed25519 keys")
    return key


def canonical_manifest(manifest: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: JSON, keys sorted, no spaces, UTF-8, without `signature`."""
    body = {key: value for key, value in manifest.items() if key != SIGNATURE_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def sign_manifest(key: Ed25519PrivateKey, manifest: Mapping[str, Any]) -> str:
    """The base64 Ed25519 signature of the manifest's canonical form."""
    return base64.b64encode(key.sign(canonical_manifest(manifest))).decode()


def verify_manifest(public_key_pem: bytes, manifest: Mapping[str, Any], signature: str) -> None:
    """Return when `signature` signs the manifest; raise PKIError("BadSignature") otherwise."""
    try:
        public = serialization.load_pem_public_key(public_key_pem)
    except ValueError as exc:
        raise PKIError("Unparseable", f"not a PEM public key: {exc}") from exc
    if not isinstance(public, Ed25519PublicKey):
        raise PKIError("UnsupportedKeyType", "firmware is verified with an Ed25519 public key")
    try:
        raw = base64.b64decode(signature, validate=True)
        public.verify(raw, canonical_manifest(manifest))
    except (InvalidSignature, binascii.Error, ValueError) as exc:
        raise PKIError("BadSignature",
                       "the firmware manifest's signature does not verify") from exc
