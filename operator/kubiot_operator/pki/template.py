"""Client certificates encoded from a per-CA template: the fast path of issuing.

Every device and gateway certificate of a CA has the same shape (sign_leaf's, for one CN, one
URI SAN and the clientAuth usage), so most of its DER is the same from one certificate to the
next: the issuer, the signature algorithm, four of the extensions. `ClientCertificateTemplate`
encodes those once per CA and, per certificate, only the serial, the validity, the subject,
the key, the SAN, the SKI and the CRL distribution point, then signs the result with the CA's
key. The bytes are exactly those `sign_leaf` produces for the same values: the tests compare
the two byte for byte, for every CA key type.

DER (X.690) as RFC 5280 uses it: definite lengths, minimal integers, UTCTime before 2050 and
GeneralizedTime from then on, both in whole seconds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtensionOID

from kubiot_operator.pki.certificates import (
    CLIENT_AUTH,
    CertificateAuthority,
    crl_distribution_points,
    leading_leaf_extensions,
)
from kubiot_operator.pki.keys import PublicKey

# Tags
_INTEGER, _BIT_STRING, _OCTET_STRING, _OID, _UTF8 = 0x02, 0x03, 0x04, 0x06, 0x0C
_UTC_TIME, _GENERALIZED_TIME, _SEQUENCE, _SET = 0x17, 0x18, 0x30, 0x31
_URI_NAME = 0x86  # GeneralName uniformResourceIdentifier: [6] IMPLICIT IA5String
_VERSION_3 = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2
_BOOLEAN_TRUE = bytes.fromhex("0101ff")
_COMMON_NAME_OID = bytes.fromhex("0603550403")  # 2.5.4.3

#: AlgorithmIdentifier of the CA's signature, by key type and digest (RFC 5758, RFC 4055).
_SIGNATURE_ALGORITHMS = {
    ("ec", "sha256"): bytes.fromhex("300a06082a8648ce3d040302"),
    ("ec", "sha384"): bytes.fromhex("300a06082a8648ce3d040303"),
    ("rsa", "sha256"): bytes.fromhex("300d06092a864886f70d01010b0500"),
    ("rsa", "sha384"): bytes.fromhex("300d06092a864886f70d01010c0500"),
}


def _length(size: int) -> bytes:
    if size < 0x80:
        return bytes((size,))
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes((tag,)) + _length(len(value)) + value


def _integer(value: int) -> bytes:
    """A non-negative INTEGER in its minimal two's-complement form."""
    return _tlv(_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _time(moment: datetime) -> bytes:
    """RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime after; seconds, `Z`."""
    if moment.year < 2050:
        return _tlv(_UTC_TIME, moment.strftime("%y%m%d%H%M%SZ").encode())
    return _tlv(_GENERALIZED_TIME, moment.strftime("%Y%m%d%H%M%SZ").encode())


def _extension(oid: bytes, value: bytes, critical: bool = False) -> bytes:
    return _tlv(_SEQUENCE, oid + (_BOOLEAN_TRUE if critical else b"")
                + _tlv(_OCTET_STRING, value))


def _encoded(extension: x509.Extension[Any]) -> bytes:
    """An extension the library describes, in DER (its value encoded by the library)."""
    return _extension(_oid(extension.oid), extension.value.public_bytes(), extension.critical)


def _oid(extension: x509.ObjectIdentifier) -> bytes:
    return _tlv(_OID, _encode_oid(extension.dotted_string))


def _encode_oid(dotted: str) -> bytes:
    first, second, *rest = (int(arc) for arc in dotted.split("."))
    encoded = bytearray()
    for arc in (40 * first + second, *rest):
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        encoded += bytes(reversed(chunk))
    return bytes(encoded)


_SAN_OID = _oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
_SKI_OID = _oid(ExtensionOID.SUBJECT_KEY_IDENTIFIER)


@dataclass(frozen=True)
class ClientCertificateTemplate:
    """What every client certificate of one CA has in common, already encoded."""

    ca: CertificateAuthority
    signature_algorithm: bytes
    issuer: bytes
    leading_extensions: bytes   # basicConstraints, keyUsage, extKeyUsage (before the SAN)
    authority_key_id: bytes     # the AKI extension (after the SKI)

    @classmethod
    def for_ca(cls, ca: CertificateAuthority) -> ClientCertificateTemplate | None:
        """The template of `ca`; None for a key type it does not cover (sign_leaf then)."""
        key = ca.private_key
        family = "ec" if isinstance(key, ec.EllipticCurvePrivateKey) else (
            "rsa" if isinstance(key, rsa.RSAPrivateKey) else None)
        algorithm = _SIGNATURE_ALGORITHMS.get((family or "", ca.signature_hash.name))
        if algorithm is None:
            return None
        return cls(
            ca=ca,
            signature_algorithm=algorithm,
            issuer=ca.subject.public_bytes(),
            leading_extensions=b"".join(
                _encoded(extension) for extension in leading_leaf_extensions([CLIENT_AUTH])),
            authority_key_id=_encoded(ca.authority_key_extension),
        )

    def tbs_certificate(self, *, serial: int, not_before: datetime, not_after: datetime,
                        common_name: str, uri: str, public_key: PublicKey,
                        crl_url: str | None = None) -> bytes:
        """The TBSCertificate sign_leaf would build for these values (times in UTC)."""
        spki = public_key.public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
        subject = _tlv(_SEQUENCE, _tlv(_SET, _tlv(_SEQUENCE, _COMMON_NAME_OID
                                                  + _tlv(_UTF8, common_name.encode()))))
        extensions = (
            self.leading_extensions
            + _extension(_SAN_OID, _tlv(_SEQUENCE, _tlv(_URI_NAME, uri.encode("ascii"))))
            + _extension(_SKI_OID, _tlv(_OCTET_STRING, _subject_key_id(spki)))
            + self.authority_key_id
        )
        if crl_url is not None:
            extensions += _encoded(crl_distribution_points(crl_url))
        return _tlv(_SEQUENCE, b"".join((
            _VERSION_3,
            _integer(serial),
            self.signature_algorithm,
            self.issuer,
            _tlv(_SEQUENCE, _time(not_before) + _time(not_after)),
            subject,
            spki,
            _tlv(0xA3, _tlv(_SEQUENCE, extensions)),  # [3] EXPLICIT Extensions
        )))

    def sign(self, tbs: bytes) -> bytes:
        """The DER certificate: `tbs`, the algorithm and the CA's signature over `tbs`."""
        key, digest = self.ca.private_key, self.ca.signature_hash
        if isinstance(key, ec.EllipticCurvePrivateKey):
            signature = key.sign(tbs, ec.ECDSA(digest))
        else:
            signature = key.sign(tbs, padding.PKCS1v15(), digest)
        return _tlv(_SEQUENCE, tbs + self.signature_algorithm
                    + _tlv(_BIT_STRING, b"\0" + signature))


def _subject_key_id(spki: bytes) -> bytes:
    """RFC 5280 4.2.1.2 method (1): SHA-1 of the subjectPublicKey BIT STRING's contents."""
    # The SPKI is SEQUENCE { AlgorithmIdentifier, BIT STRING }: skip the outer header and the
    # algorithm, then the BIT STRING's header and its unused-bits octet.
    cursor = _header_end(spki, 0)
    cursor = _header_end(spki, cursor) + _content_length(spki, cursor)
    return hashlib.sha1(spki[_header_end(spki, cursor) + 1:], usedforsecurity=False).digest()


def _content_length(data: bytes, at: int) -> int:
    first = data[at + 1]
    if first < 0x80:
        return first
    return int.from_bytes(data[at + 2:at + 2 + (first & 0x7F)], "big")


def _header_end(data: bytes, at: int) -> int:
    first = data[at + 1]
    return at + 2 + (first & 0x7F if first >= 0x80 else 0)
