"""kubiot's PKI: tenant CAs, device and gateway identities, renewal, revocation (CRLs) and
firmware manifest signatures. Pure functions in the modules; `TenantAuthority` keeps state."""

from kubiot_operator.pki.authority import (
    TenantAuthority,
    ca_bundle_name,
    crl_bundle_name,
    signing_bundle_name,
)
from kubiot_operator.pki.ca import (
    CertificateAuthority,
    create_server_ca,
    create_tenant_ca,
    issue_server_certificate,
    load_ca,
)
from kubiot_operator.pki.crl import (
    Revocation,
    build_crl,
    crl_distribution_point,
    crl_number,
    revoked_serials,
)
from kubiot_operator.pki.csr import verify_csr
from kubiot_operator.pki.errors import CAInvalid, CSRRejected, PKIError
from kubiot_operator.pki.firmware import (
    canonical_manifest,
    generate_signing_key,
    load_signing_key,
    public_key_pem,
    sign_manifest,
    signing_key_pem,
    verify_manifest,
)
from kubiot_operator.pki.issue import (
    IssuedCertificate,
    certificate_summary,
    identity_common_name,
    issue_identity_certificate,
    needs_renewal,
    renewal_time,
)
from kubiot_operator.pki.keys import PrivateKey, generate_private_key, private_key_pem
from kubiot_operator.pki.store import FileMaterialStore, MaterialStore, MemoryMaterialStore

__all__ = [
    "CAInvalid",
    "CSRRejected",
    "CertificateAuthority",
    "FileMaterialStore",
    "IssuedCertificate",
    "MaterialStore",
    "MemoryMaterialStore",
    "PKIError",
    "PrivateKey",
    "Revocation",
    "TenantAuthority",
    "build_crl",
    "ca_bundle_name",
    "canonical_manifest",
    "certificate_summary",
    "create_server_ca",
    "create_tenant_ca",
    "crl_bundle_name",
    "crl_distribution_point",
    "crl_number",
    "generate_private_key",
    "generate_signing_key",
    "identity_common_name",
    "issue_identity_certificate",
    "issue_server_certificate",
    "load_ca",
    "load_signing_key",
    "needs_renewal",
    "private_key_pem",
    "public_key_pem",
    "renewal_time",
    "revoked_serials",
    "sign_manifest",
    "signing_bundle_name",
    "signing_key_pem",
    "verify_csr",
    "verify_manifest",
]
