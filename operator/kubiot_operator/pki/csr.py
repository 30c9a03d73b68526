"""Checking a device's own certificate signing request before kubiot signs it."""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from kubiot_operator.pki.errors import CSRRejected
from kubiot_operator.pki.keys import unsupported_key_problem

#: Far above any real CSR (a 4096-bit RSA one is about 1.7 kB); refuses garbage early.
MAX_CSR_BYTES = 16384
#: Devices use 2048 to 4096 bits. A certificate with a larger key slows every TLS handshake
#: the broker makes with it, and some TLS stacks refuse it; refused before anything else.
MAX_CSR_RSA_BITS = 8192


def verify_csr(csr_pem: str | bytes, expected_common_name: str) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check it may become the identity `expected_common_name`.

    Refused with CSRRejected when it does not parse, its signature does not verify (it was
    altered or its maker does not hold the key), the key is weak or of a type TLS identities do
    not use, or its CN is not the expected broker username.
    """
    try:
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    except UnicodeEncodeError as exc:
        raise CSRRejected("Unparseable", "the CSR is not text a PEM file can hold") from exc
    if len(data) > MAX_CSR_BYTES:
        raise CSRRejected("Unparseable", f"the CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(data)
    except (ValueError, x509.InvalidVersion) as exc:
        # InvalidVersion (a version other than 1, encoded 0) is not a ValueError.
        raise CSRRejected("Unparseable", f"the CSR is not a valid PEM certificate request: {exc}") \
            from exc
    try:
        public_key = csr.public_key()
    except UnsupportedAlgorithm as exc:
        raise CSRRejected("UnsupportedKeyType", f"the CSR's key algorithm is not supported: "
                          f"{exc}") from exc
    except ValueError as exc:
        raise CSRRejected("Unparseable", f"the CSR's key cannot be read: {exc}") from exc
    problem = unsupported_key_problem(public_key)
    if problem is not None:
        raise CSRRejected(*problem)
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size > MAX_CSR_RSA_BITS:
        raise CSRRejected("UnsupportedKeyType", f"an RSA key of {public_key.key_size} bits is "
                          f"larger than kubiot signs (at most {MAX_CSR_RSA_BITS} bits)")
    try:
        signature_ok = csr.is_signature_valid
    except UnsupportedAlgorithm as exc:
        raise CSRRejected("UnsupportedKeyType", f"the CSR's signature algorithm is not "
                          f"supported: {exc}") from exc
    except ValueError as exc:
        raise CSRRejected("Unparseable", f"the CSR's signature cannot be read: {exc}") from exc
    if not signature_ok:
        raise CSRRejected("BadSignature", "the CSR's signature does not verify: it was altered "
                          "or not signed with the key it carries")
    try:
        # The subject is decoded lazily: a name that is not valid in its string type only
        # fails here.
        names = [attr.value for attr in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    except ValueError as exc:
        raise CSRRejected("Unparseable", f"the CSR's subject cannot be read: {exc}") from exc
    if names != [expected_common_name]:
        found = ", ".join(repr(n)[:80] for n in names[:4]) or "no common name"
        raise CSRRejected("SubjectMismatch", f"the CSR's subject has {found}; it must have the "
                          f"single common name {expected_common_name!r}")
    return csr
