"""Private keys for CAs, devices and gateways, in the algorithms a tenant may choose."""

from __future__ import annotations

from typing import TypeAlias

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kubiot_operator.models.common import KeyAlgorithm

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

#: Curves a TLS identity may use; both are in every TLS stack a device is likely to run.
SUPPORTED_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "secp256r1": ec.SECP256R1,
    "secp384r1": ec.SECP384R1,
}
MIN_RSA_BITS = 2048
RSA_PUBLIC_EXPONENT = 65537

_NO_ENCRYPTION = serialization.NoEncryption()
_EC_CURVES: dict[KeyAlgorithm, type[ec.EllipticCurve]] = {
    KeyAlgorithm.ECDSA_P256: ec.SECP256R1,
    KeyAlgorithm.ECDSA_P384: ec.SECP384R1,
}
_RSA_BITS = {
    KeyAlgorithm.RSA_2048: 2048,
    KeyAlgorithm.RSA_3072: 3072,
    KeyAlgorithm.RSA_4096: 4096,
}


def generate_private_key(algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256) -> PrivateKey:
    """A fresh private key of the given algorithm."""
    curve = _EC_CURVES.get(algorithm)
    if curve is not None:
        return ec.generate_private_key(curve())
    return rsa.generate_private_key(RSA_PUBLIC_EXPONENT, _RSA_BITS[algorithm])


def is_slow_to_generate(algorithm: KeyAlgorithm) -> bool:
    """RSA key generation takes long enough (up to seconds) to block an event loop."""
    return algorithm in _RSA_BITS


def private_key_pem(key: PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (what a Secret's `tls.key` holds)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             _NO_ENCRYPTION)


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    """The digest that matches the key's strength (SHA-384 for P-384, SHA-256 otherwise)."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def unsupported_key_problem(key: object) -> tuple[str, str] | None:
    """Why a public or private key may not be a TLS identity or CA key: (reason, message)."""
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if key.curve.name not in SUPPORTED_CURVES:
            return ("UnsupportedKeyType",
                    f"elliptic curve {key.curve.name} is not supported; use P-256 or P-384")
        return None
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            return ("WeakKey",
                    f"an RSA key of {key.key_size} bits is too weak; at least {MIN_RSA_BITS} "
                    "bits are required")
        return None
    return ("UnsupportedKeyType",
            f"{type(key).__name__.lstrip('_')} keys are not supported for TLS identities; "
            "use ECDSA P-256/P-384 or RSA of at least 2048 bits")
