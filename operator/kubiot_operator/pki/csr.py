"""Checking a device's own certificate signing request before kubiot signs it."""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import NameOID

from kubiot_operator.pki.errors import CSRRejected
from kubiot_operator.pki.keys import unsupported_key_problem

#: Far above any real CSR (a 4096-bit RSA one is about 1.7 kB); refuses garbage early.
MAX_CSR_BYTES = 16384


def verify_csr(csr_pem: str | bytes, expected_common_name: str) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check it may become the identity `expected_common_name`.

    Refused with CSRRejected when it does not parse, its signature does not verify (it was
    altered or its maker does not hold the key), the key is weak or of a type TLS identities do
    not use, or its CN is not the expected broker username.
    """
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    if len(data) > MAX_CSR_BYTES:
        raise CSRRejected("Unparseable", f"the CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CSRRejected("Unparseable", f"the CSR is not a valid PEM certificate request: {exc}") \
            from exc
    try:
        public_key = csr.public_key()
        signature_ok = csr.is_signature_valid
    except UnsupportedAlgorithm as exc:
        raise CSRRejected("UnsupportedKeyType", f"the CSR's key or signature algorithm is not "
                          f"supported: {exc}") from exc
    except ValueError as exc:
        raise CSRRejected("Unparseable", f"the CSR's key cannot be read: {exc}") from exc
    problem = unsupported_key_problem(public_key)
    if problem is not None:
        raise CSRRejected(*problem)
    if not signature_ok:
        raise CSRRejected("BadSignature", "the CSR's signature does not verify: it was altered "
                          "or not signed with the key it carries")
    names = [attr.value for attr in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [expected_common_name]:
        found = ", ".join(repr(n) for n in names) or "no common name"
        raise CSRRejected("SubjectMismatch", f"the CSR's subject has {found}; it must have the "
                          f"single common name {expected_common_name!r}")
    return csr
