"""The tenant authority: CAs, issuance, revocation and signing keys over a MaterialStore.

One instance per process. Every change to a tenant's material happens under that tenant's
lock, so concurrent reconciles neither create two CAs nor lose a revocation.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kubiot_contract.topics import IdentityKind
from kubiot_operator.models.common import KeyAlgorithm
from kubiot_operator.models.tenant import CertificateAuthoritySpec
from kubiot_operator.pki.ca import create_tenant_ca, load_ca
from kubiot_operator.pki.certificates import CertificateAuthority, IssuedCertificate, as_utc
from kubiot_operator.pki.crl import Revocation, build_crl, crl_distribution_point, load_crl
from kubiot_operator.pki.errors import CAInvalid
from kubiot_operator.pki.firmware import (
    generate_signing_key,
    load_signing_key,
    public_key_pem,
    signing_key_pem,
)
from kubiot_operator.pki.issue import issue_identity_certificate
from kubiot_operator.pki.keys import is_slow_to_generate
from kubiot_operator.pki.store import MaterialStore

CERT_KEY = "tls.crt"
PRIVATE_KEY = "tls.key"
CRL_KEY = "crl.pem"
REVOKED_KEY = "revoked.json"
SIGNING_KEY = "signing.key"
SIGNING_PUBLIC_KEY = "signing.pub"
CRL_VALIDITY_DAYS = 7


def ca_bundle_name(tenant: str, spec: CertificateAuthoritySpec | None = None) -> str:
    """The bundle of a tenant's CA: the admin's Secret, or `tenant-<tenant>-ca`."""
    if spec is not None and spec.secret_name:
        return spec.secret_name
    return f"tenant-{tenant}-ca"


def crl_bundle_name(tenant: str) -> str:
    return f"tenant-{tenant}-crl"


def signing_bundle_name(tenant: str) -> str:
    return f"tenant-{tenant}-firmware-signing"


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _LoadedCA:
    bundle: str
    cert_pem: bytes
    key_pem: bytes
    ca: CertificateAuthority


@dataclass(frozen=True)
class _CRLState:
    """The tenant's CRL bundle: the CRL, what it was built from, and which CA bundle signs it.

    Recording the CA bundle lets a restarted process find a supplied CA before the Tenant is
    reconciled again, instead of generating a stray one under the default name.
    """

    number: int
    revocations: tuple[Revocation, ...]
    pem: bytes | None
    ca_bundle: str | None = None
    ca_supplied: bool = False

    @classmethod
    def read(cls, bundle: dict[str, bytes] | None) -> _CRLState:
        if not bundle or REVOKED_KEY not in bundle:
            return cls(0, (), None)
        record = json.loads(bundle[REVOKED_KEY])
        revocations = tuple(Revocation.from_json(item) for item in record["revoked"])
        return cls(int(record["crlNumber"]), revocations, bundle.get(CRL_KEY),
                   record.get("caBundle"), bool(record.get("caSupplied", False)))

    def serials(self) -> set[int]:
        return {revocation.serial for revocation in self.revocations}

    def ca_spec(self) -> CertificateAuthoritySpec | None:
        """The spec that finds the recorded CA again (None: the default bundle)."""
        if self.ca_supplied and self.ca_bundle:
            return CertificateAuthoritySpec(secret_name=self.ca_bundle)
        return None

    def record(self) -> bytes:
        # Compact: this record and the CRL share one Secret, which holds 1 MiB at most.
        return json.dumps({"crlNumber": self.number, "caBundle": self.ca_bundle,
                           "caSupplied": self.ca_supplied,
                           "revoked": [r.to_json() for r in self.revocations]},
                          separators=(",", ":")).encode()


class TenantAuthority:
    """CAs, certificates, CRLs and firmware signing keys of every tenant, kept in `store`.

    `ensure_ca` records which bundle holds the tenant's CA (in the CRL bundle), so later calls,
    in this process or after a restart, use that CA. A tenant never ensured gets a CA generated
    into the default bundle on first use.

    `crl_url_template` (with `{tenant}`) is where brokers that fetch CRLs find each tenant's
    CRL: certificates name it as their CRL distribution point and CRLs as their issuing
    distribution point. Without it (Mosquitto, which reads a CRL file) neither carries one.
    """

    def __init__(self, store: MaterialStore, *, now: Callable[[], datetime] = _utc_now,
                 crl_validity_days: int = CRL_VALIDITY_DAYS,
                 crl_url_template: str | None = None) -> None:
        if crl_url_template is not None and "{tenant}" not in crl_url_template:
            raise ValueError(f"the CRL URL template {crl_url_template!r} lacks {{tenant}}")
        self.store = store
        self._now = now
        self._crl_validity = crl_validity_days
        self._crl_url_template = crl_url_template
        self._locks: dict[str, asyncio.Lock] = {}
        self._cas: dict[str, _LoadedCA] = {}
        self._signing: dict[str, Ed25519PrivateKey] = {}

    def now(self) -> datetime:
        return as_utc(self._now())

    def crl_url(self, tenant: str) -> str | None:
        """Where the tenant's CRL is published for brokers that fetch it (None: not published)."""
        if self._crl_url_template is None:
            return None
        return self._crl_url_template.format(tenant=tenant)

    def _lock(self, tenant: str) -> asyncio.Lock:
        return self._locks.setdefault(tenant, asyncio.Lock())

    # --- certificate authorities ------------------------------------------------------------

    async def ensure_ca(self, tenant: str,
                        spec: CertificateAuthoritySpec | None = None) -> CertificateAuthority:
        """The tenant's CA: loaded and checked when its bundle exists, generated once if not."""
        async with self._lock(tenant):
            return await self._ensure_ca_locked(tenant, spec)

    async def _ensure_ca_locked(self, tenant: str,
                                spec: CertificateAuthoritySpec | None) -> CertificateAuthority:
        spec = spec or CertificateAuthoritySpec()
        ca = await self._load_or_create_ca(tenant, spec)
        # Every ensured tenant has a CRL from the start (a verifier needs one per CA), and the
        # CRL bundle remembers where the CA lives.
        name, supplied = ca_bundle_name(tenant, spec), bool(spec.secret_name)
        state = _CRLState.read(await self.store.get(crl_bundle_name(tenant)))
        if (state.ca_bundle, state.ca_supplied) != (name, supplied) or state.pem is None \
                or not self._crl_is_fresh(tenant, state.pem, ca):
            await self._publish(tenant, ca, replace(state, ca_bundle=name, ca_supplied=supplied))
        return ca

    async def _load_or_create_ca(self, tenant: str,
                                 spec: CertificateAuthoritySpec) -> CertificateAuthority:
        name = ca_bundle_name(tenant, spec)
        bundle = await self.store.get(name)
        if bundle is None:
            if spec.secret_name:
                raise CAInvalid("NotFound", f"the CA Secret {name!r} does not exist")
            ca = create_tenant_ca(tenant, key_algorithm=spec.key_algorithm,
                                  validity_days=spec.validity_days,
                                  constrained=spec.constrained, now=self.now())
            await self.store.put(name, {CERT_KEY: ca.cert_pem, PRIVATE_KEY: ca.key_pem})
            self._cas[tenant] = _LoadedCA(name, ca.cert_pem, ca.key_pem, ca)
            return ca
        missing = [key for key in (CERT_KEY, PRIVATE_KEY) if key not in bundle]
        if missing:
            raise CAInvalid("MissingKey", f"the CA Secret {name!r} lacks {', '.join(missing)}")
        cached = self._cas.get(tenant)
        if cached and (cached.bundle, cached.cert_pem, cached.key_pem) == (
                name, bundle[CERT_KEY], bundle[PRIVATE_KEY]):
            self._check_current(cached.ca)
            return cached.ca
        ca = load_ca(bundle[CERT_KEY], bundle[PRIVATE_KEY], now=self.now(), tenant=tenant)
        self._cas[tenant] = _LoadedCA(name, bundle[CERT_KEY], bundle[PRIVATE_KEY], ca)
        return ca

    def _check_current(self, ca: CertificateAuthority, now: datetime | None = None) -> None:
        if (now or self.now()) >= ca.not_after:
            raise CAInvalid("Expired", f"the CA certificate expired at {ca.not_after}")

    async def _ca(self, tenant: str) -> CertificateAuthority:
        """The cached CA (the fast path of issuing), or the recorded one; takes the lock."""
        cached = self._cas.get(tenant)
        if cached is not None:
            self._check_current(cached.ca)
            return cached.ca
        async with self._lock(tenant):
            return await self._ca_locked(tenant)

    async def _ca_locked(self, tenant: str) -> CertificateAuthority:
        cached = self._cas.get(tenant)
        if cached is not None:
            self._check_current(cached.ca)
            return cached.ca
        state = _CRLState.read(await self.store.get(crl_bundle_name(tenant)))
        return await self._ensure_ca_locked(tenant, state.ca_spec())

    async def ca_bundle(self, tenants: Iterable[str]) -> bytes:
        """The tenants' CA certificates, concatenated: a broker `cafile`."""
        return b"".join([(await self._ca(t)).cert_pem for t in sorted(set(tenants))])

    # --- certificates -----------------------------------------------------------------------

    async def issue(self, tenant: str, kind: IdentityKind, name: str, *, validity_days: int,
                    key_algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256,
                    csr_pem: str | bytes | None = None,
                    ca_spec: CertificateAuthoritySpec | None = None) -> IssuedCertificate:
        """A device or gateway certificate from the tenant's CA (new key, or the holder's CSR).

        `ca_spec` is the tenant's CA spec, used when this process has not ensured the CA yet
        (so a supplied CA is found even if a Device is reconciled before its Tenant).
        """
        now = self.now()
        cached = self._cas.get(tenant)
        if cached is not None:
            ca = cached.ca
            self._check_current(ca, now)
        elif ca_spec is not None:
            ca = await self.ensure_ca(tenant, ca_spec)
        else:
            ca = await self._ca(tenant)

        crl_url = self.crl_url(tenant)

        def issue() -> IssuedCertificate:
            return issue_identity_certificate(
                ca, tenant=tenant, kind=kind, name=name, validity_days=validity_days,
                key_algorithm=key_algorithm, csr_pem=csr_pem, now=now, crl_url=crl_url)

        if csr_pem is None and is_slow_to_generate(key_algorithm):
            # RSA key generation can take seconds; keep the event loop responsive.
            return await asyncio.to_thread(issue)
        return issue()

    # --- revocation -------------------------------------------------------------------------

    async def revoke(self, tenant: str, serial: int, *, reason: str = "unspecified",
                     expires_at: datetime | None = None) -> bytes | None:
        """Add a serial to the tenant's CRL and return the new CRL; revoking twice is a no-op.

        `expires_at`, the certificate's notAfter, lets the CRL drop the entry once it expired,
        so a CRL lists only certificates that would otherwise still be valid.

        None when the tenant has no CA (any more): its certificates are trusted by nobody, and
        revoking must not bring a CA into being, as a tenant's teardown would otherwise do."""
        revocation = Revocation(serial, self.now(), reason, expires_at)
        async with self._lock(tenant):
            bundle = await self.store.get(crl_bundle_name(tenant))
            if bundle is None and tenant not in self._cas:
                return None
            ca = await self._ca_locked(tenant)  # may re-sign the CRL: read it again after
            state = _CRLState.read(await self.store.get(crl_bundle_name(tenant)))
            if serial in state.serials() and state.pem is not None:
                return state.pem
            return await self._publish(
                tenant, ca, replace(state, revocations=(*state.revocations, revocation)))

    async def crl(self, tenant: str) -> bytes:
        """The tenant's current CRL (PEM); re-signed once half its lifetime has passed."""
        async with self._lock(tenant):
            ca = await self._ca_locked(tenant)
            state = _CRLState.read(await self.store.get(crl_bundle_name(tenant)))
            if state.pem is not None and self._crl_is_fresh(tenant, state.pem, ca):
                return state.pem
            return await self._publish(tenant, ca, state)

    async def published_crl(self, tenant: str) -> bytes | None:
        """The tenant's current CRL if the tenant has one; never creates a CA or a CRL.

        What the operator serves at the CRL URL: a request for an unknown tenant must not
        bring one into being.
        """
        if await self.store.get(crl_bundle_name(tenant)) is None:
            return None
        return await self.crl(tenant)

    def _crl_is_fresh(self, tenant: str, pem: bytes, ca: CertificateAuthority) -> bool:
        crl = load_crl(pem)
        if not crl.is_signature_valid(ca.private_key.public_key()):
            return False  # the CA was replaced: re-sign with the current one
        if crl_distribution_point(crl) != self.crl_url(tenant):
            return False  # published elsewhere now
        next_update = crl.next_update_utc
        if next_update is None:
            return False
        return self.now() < next_update - timedelta(days=self._crl_validity) / 2

    async def _publish(self, tenant: str, ca: CertificateAuthority, state: _CRLState) -> bytes:
        """Sign `state`'s revocations as the next CRL and store it; return the PEM.

        Revocations of certificates long expired are dropped, so neither the CRL nor its
        Secret grows with every revocation a tenant ever had (a Secret holds 1 MiB at most)."""
        now = self.now()
        lifetime = timedelta(days=self._crl_validity)
        state = replace(state, revocations=tuple(
            r for r in state.revocations if r.listed_at(now, lifetime)))
        number = state.number + 1
        pem = build_crl(ca, state.revocations, now=now,
                        next_update_days=self._crl_validity, crl_number=number,
                        distribution_point=self.crl_url(tenant))
        stored = replace(state, number=number, pem=pem)
        await self.store.put(crl_bundle_name(tenant),
                             {CRL_KEY: pem, REVOKED_KEY: stored.record()})
        return pem

    async def crl_bundle(self, tenants: Iterable[str]) -> bytes:
        """One CRL per tenant CA, concatenated: a broker `crlfile` (OpenSSL wants one per CA)."""
        return b"".join([await self.crl(t) for t in sorted(set(tenants))])

    # --- firmware signing -------------------------------------------------------------------

    async def signing_key(self, tenant: str) -> Ed25519PrivateKey:
        """The tenant's Ed25519 firmware signing key, generated once."""
        cached = self._signing.get(tenant)
        if cached is not None:
            return cached
        async with self._lock(tenant):
            name = signing_bundle_name(tenant)
            bundle = await self.store.get(name)
            if bundle is not None and SIGNING_KEY in bundle:
                key = load_signing_key(bundle[SIGNING_KEY])
            else:
                key = generate_signing_key()
                await self.store.put(name, {SIGNING_KEY: signing_key_pem(key),
                                            SIGNING_PUBLIC_KEY: public_key_pem(key)})
            self._signing[tenant] = key
            return key

    # --- tenant removal ---------------------------------------------------------------------

    async def forget_tenant(self, tenant: str) -> None:
        """Delete the tenant's CRL, signing key and generated CA; a supplied CA is left alone."""
        async with self._lock(tenant):
            state = _CRLState.read(await self.store.get(crl_bundle_name(tenant)))
            if not state.ca_supplied:
                await self.store.delete(ca_bundle_name(tenant))
            await self.store.delete(crl_bundle_name(tenant))
            await self.store.delete(signing_bundle_name(tenant))
            self._cas.pop(tenant, None)
            self._signing.pop(tenant, None)
