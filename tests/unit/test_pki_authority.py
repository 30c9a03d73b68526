"""TenantAuthority: CAs created once, revocations never lost, CRLs and keys kept in the store."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from kubiot_contract.topics import IdentityKind
from kubiot_operator.models.common import KeyAlgorithm
from kubiot_operator.models.tenant import CertificateAuthoritySpec
from kubiot_operator.pki import (
    CAInvalid,
    FileMaterialStore,
    MaterialStore,
    MemoryMaterialStore,
    TenantAuthority,
    create_tenant_ca,
    crl_number,
    public_key_pem,
    revoked_serials,
    sign_manifest,
    verify_manifest,
)
from tests.support.pki import make_csr, openssl_verify

DEVICE = IdentityKind.DEVICE


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.moment = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.moment

    def advance(self, delta: timedelta) -> None:
        self.moment += delta


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> MaterialStore:
    if request.param == "memory":
        return MemoryMaterialStore()
    return FileMaterialStore(tmp_path / "pki")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def authority(store: MaterialStore, clock: Clock) -> TenantAuthority:
    return TenantAuthority(store, now=clock)


async def test_ca_is_created_once_under_concurrency(authority: TenantAuthority,
                                                    store: MaterialStore) -> None:
    cas = await asyncio.gather(*(authority.ensure_ca("acme") for _ in range(10)))
    assert len({ca.certificate.serial_number for ca in cas}) == 1
    bundle = await store.get("tenant-acme-ca")
    assert bundle is not None and set(bundle) == {"tls.crt", "tls.key"}
    assert bundle["tls.crt"] == cas[0].cert_pem
    # Another process over the same store loads the same CA instead of making a new one.
    again = await TenantAuthority(store).ensure_ca("acme")
    assert again.certificate == cas[0].certificate


async def test_generated_ca_follows_the_spec(authority: TenantAuthority) -> None:
    spec = CertificateAuthoritySpec(key_algorithm=KeyAlgorithm.ECDSA_P384, validity_days=400,
                                    constrained=False)
    ca = await authority.ensure_ca("acme", spec)
    key = ca.private_key
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    lifetime = ca.certificate.not_valid_after_utc - ca.certificate.not_valid_before_utc
    assert timedelta(days=400) <= lifetime <= timedelta(days=400, minutes=10)


async def test_issue_with_generated_key_and_with_csr(authority: TenantAuthority) -> None:
    ca = await authority.ensure_ca("acme")
    generated = await authority.issue("acme", DEVICE, "d1", validity_days=30)
    rsa = await authority.issue("acme", IdentityKind.GATEWAY, "gw1", validity_days=30,
                                key_algorithm=KeyAlgorithm.RSA_2048)
    csr = make_csr(ec.generate_private_key(ec.SECP256R1()), "acme.d2")
    from_csr = await authority.issue("acme", DEVICE, "d2", validity_days=30, csr_pem=csr)
    assert from_csr.key_pem is None and generated.key_pem is not None
    for issued in (generated, rsa, from_csr):
        result = openssl_verify(ca.cert_pem, issued.cert_pem)
        assert result.returncode == 0, result.stderr


async def test_issue_without_ensure_creates_the_default_ca(authority: TenantAuthority,
                                                           store: MaterialStore) -> None:
    issued = await authority.issue("acme", DEVICE, "d1", validity_days=30)
    assert await store.get("tenant-acme-ca") is not None
    assert openssl_verify(await authority.ca_bundle(["acme"]), issued.cert_pem).returncode == 0


async def test_bring_your_own_ca(authority: TenantAuthority, store: MaterialStore) -> None:
    own = create_tenant_ca("acme", constrained=False)
    await store.put("acme-root", {"tls.crt": own.cert_pem, "tls.key": own.key_pem})
    spec = CertificateAuthoritySpec(secret_name="acme-root")
    ca = await authority.ensure_ca("acme", spec)
    assert ca.certificate == own.certificate
    issued = await authority.issue("acme", DEVICE, "d1", validity_days=30)
    assert openssl_verify(own.cert_pem, issued.cert_pem).returncode == 0
    assert await store.get("tenant-acme-ca") is None  # nothing generated beside it
    # The supplied CA outlives the tenant; everything kubiot made for it does not.
    await authority.signing_key("acme")
    await authority.crl("acme")
    await authority.forget_tenant("acme")
    assert await store.get("acme-root") is not None
    assert await store.get("tenant-acme-crl") is None
    assert await store.get("tenant-acme-firmware-signing") is None


async def test_issue_finds_a_supplied_ca_through_its_spec(store: MaterialStore) -> None:
    own = create_tenant_ca("acme", constrained=False)
    await store.put("acme-root", {"tls.crt": own.cert_pem, "tls.key": own.key_pem})
    fresh = TenantAuthority(store)  # a restarted process: nothing ensured yet
    issued = await fresh.issue("acme", DEVICE, "d1", validity_days=30,
                               ca_spec=CertificateAuthoritySpec(secret_name="acme-root"))
    assert openssl_verify(own.cert_pem, issued.cert_pem).returncode == 0
    assert await store.get("tenant-acme-ca") is None


async def test_a_restarted_process_finds_the_supplied_ca(store: MaterialStore) -> None:
    own = create_tenant_ca("acme", constrained=False)
    await store.put("acme-root", {"tls.crt": own.cert_pem, "tls.key": own.key_pem})
    spec = CertificateAuthoritySpec(secret_name="acme-root")
    await TenantAuthority(store).ensure_ca("acme", spec)

    restarted = TenantAuthority(store)  # the Tenant has not been reconciled again yet
    assert await restarted.ca_bundle(["acme"]) == own.cert_pem
    issued = await restarted.issue("acme", DEVICE, "d1", validity_days=30)
    crl = await restarted.revoke("acme", issued.serial)
    refused = openssl_verify(own.cert_pem, issued.cert_pem, crl_pem=crl)
    assert "certificate revoked" in refused.stderr
    assert await store.get("tenant-acme-ca") is None  # no stray CA was generated
    await TenantAuthority(store).forget_tenant("acme")
    assert await store.get("acme-root") is not None


async def _ensure_reason(authority: TenantAuthority, secret: str) -> str:
    with pytest.raises(CAInvalid) as caught:
        await authority.ensure_ca("acme", CertificateAuthoritySpec(secret_name=secret))
    return caught.value.reason


async def test_a_bad_supplied_ca_is_reported(authority: TenantAuthority,
                                             store: MaterialStore) -> None:
    acme, globex = create_tenant_ca("acme"), create_tenant_ca("globex")
    await store.put("mismatched", {"tls.crt": acme.cert_pem, "tls.key": globex.key_pem})
    await store.put("keyless", {"tls.crt": acme.cert_pem})
    assert await _ensure_reason(authority, "absent") == "NotFound"
    assert await _ensure_reason(authority, "mismatched") == "KeyMismatch"
    assert await _ensure_reason(authority, "keyless") == "MissingKey"


async def test_an_expired_ca_stops_issuing(authority: TenantAuthority, clock: Clock) -> None:
    await authority.ensure_ca("acme", CertificateAuthoritySpec(validity_days=30))
    clock.advance(timedelta(days=31))
    with pytest.raises(CAInvalid) as caught:
        await authority.issue("acme", DEVICE, "d1", validity_days=30)
    assert caught.value.reason == "Expired"


async def test_concurrent_revocations_all_reach_the_crl(authority: TenantAuthority,
                                                        store: MaterialStore) -> None:
    ca = await authority.ensure_ca("acme")
    issued = [await authority.issue("acme", DEVICE, f"d{i}", validity_days=30)
              for i in range(8)]
    crls = await asyncio.gather(*(authority.revoke("acme", c.serial, reason="keyCompromise")
                                  for c in issued))
    final = await authority.crl("acme")
    assert revoked_serials(final) == {c.serial for c in issued}
    # CRL 1 is the empty one published with the CA; each revocation signs the next.
    assert sorted(crl_number(pem) or 0 for pem in crls) == list(range(2, 10))
    assert crl_number(final) == 9
    bundle = await store.get("tenant-acme-crl")
    assert bundle is not None and bundle["crl.pem"] == final and b"keyCompromise" in bundle[
        "revoked.json"]
    result = openssl_verify(ca.cert_pem, issued[0].cert_pem, crl_pem=final)
    assert result.returncode != 0 and "certificate revoked" in result.stderr


async def test_revoking_twice_changes_nothing(authority: TenantAuthority) -> None:
    issued = await authority.issue("acme", DEVICE, "d1", validity_days=30)
    first = await authority.revoke("acme", issued.serial)
    assert await authority.revoke("acme", issued.serial) == first
    assert crl_number(await authority.crl("acme")) == 2


async def test_crl_exists_before_any_revocation_and_is_refreshed(
        authority: TenantAuthority, store: MaterialStore, clock: Clock) -> None:
    await authority.ensure_ca("acme")
    bundle = await store.get("tenant-acme-crl")
    assert bundle is not None and revoked_serials(bundle["crl.pem"]) == set()
    empty = await authority.crl("acme")
    assert empty == bundle["crl.pem"]
    assert revoked_serials(empty) == set() and crl_number(empty) == 1
    assert await authority.crl("acme") == empty
    clock.advance(timedelta(days=3))
    assert await authority.crl("acme") == empty
    clock.advance(timedelta(days=1))  # past half of the 7-day lifetime: re-signed
    refreshed = await authority.crl("acme")
    assert refreshed != empty and crl_number(refreshed) == 2


async def test_bundles_hold_one_ca_and_one_crl_per_tenant(authority: TenantAuthority) -> None:
    acme = await authority.issue("acme", DEVICE, "d1", validity_days=30)
    globex = await authority.issue("globex", DEVICE, "d1", validity_days=30)
    await authority.revoke("globex", globex.serial)
    cafile = await authority.ca_bundle(["globex", "acme", "acme"])
    crlfile = await authority.crl_bundle(["acme", "globex"])
    assert cafile.count(b"BEGIN CERTIFICATE") == 2
    assert crlfile.count(b"BEGIN X509 CRL") == 2
    assert openssl_verify(cafile, acme.cert_pem, crl_pem=crlfile).returncode == 0
    refused = openssl_verify(cafile, globex.cert_pem, crl_pem=crlfile)
    assert "certificate revoked" in refused.stderr


async def test_signing_key_is_created_once_and_kept(authority: TenantAuthority,
                                                    store: MaterialStore) -> None:
    keys = await asyncio.gather(*(authority.signing_key("acme") for _ in range(5)))
    assert len({public_key_pem(k) for k in keys}) == 1
    reloaded = await TenantAuthority(store).signing_key("acme")
    manifest = {"version": "2.0.0", "sha256": "ab" * 32}
    verify_manifest(public_key_pem(keys[0]), manifest, sign_manifest(reloaded, manifest))
    bundle = await store.get("tenant-acme-firmware-signing")
    assert bundle is not None and bundle["signing.pub"] == public_key_pem(keys[0])


async def test_forget_tenant_removes_generated_material(authority: TenantAuthority,
                                                        store: MaterialStore) -> None:
    await authority.issue("acme", DEVICE, "d1", validity_days=30)
    await authority.crl("acme")
    first_key = await authority.signing_key("acme")
    await authority.forget_tenant("acme")
    for name in ("tenant-acme-ca", "tenant-acme-crl", "tenant-acme-firmware-signing"):
        assert await store.get(name) is None
    assert public_key_pem(await authority.signing_key("acme")) != public_key_pem(first_key)


async def test_file_store_permissions_hold_for_real_material(tmp_path: Path) -> None:
    authority = TenantAuthority(FileMaterialStore(tmp_path / "pki"))
    await authority.ensure_ca("acme")
    await authority.crl("acme")
    for path in (tmp_path / "pki").rglob("*"):
        assert (path.stat().st_mode & 0o777) == (0o700 if path.is_dir() else 0o600), path


async def test_revoking_for_a_forgotten_tenant_brings_no_ca_back(authority: TenantAuthority,
                                                                 store: MaterialStore) -> None:
    issued = await authority.issue("acme", DEVICE, "d1", validity_days=30)
    await authority.forget_tenant("acme")

    assert await authority.revoke("acme", issued.serial) is None

    for bundle in ("tenant-acme-ca", "tenant-acme-crl", "tenant-acme-firmware-signing"):
        assert await store.get(bundle) is None, bundle


async def test_the_crl_drops_certificates_once_they_expired(authority: TenantAuthority,
                                                            clock: Clock) -> None:
    short = [await authority.issue("acme", DEVICE, f"s{i}", validity_days=1) for i in range(3)]
    long = await authority.issue("acme", DEVICE, "l1", validity_days=365)
    for issued in (*short, long):
        await authority.revoke("acme", issued.serial, expires_at=issued.summary.not_after)
    assert revoked_serials(await authority.crl("acme")) == {c.serial for c in (*short, long)}

    clock.advance(timedelta(days=1 + 7, minutes=1))  # expired, and listed one lifetime since

    assert revoked_serials(await authority.crl("acme")) == {long.serial}


async def test_years_of_revocations_keep_the_crl_secret_under_the_secret_limit(
        authority: TenantAuthority, store: MaterialStore, clock: Clock) -> None:
    await authority.ensure_ca("acme")
    bundle = await store.get("tenant-acme-crl")
    assert bundle is not None
    record = json.loads(bundle["revoked.json"])
    expired = clock() - timedelta(days=30)
    record["revoked"] = [{"serial": format(10**6 + i, "x"), "revokedAt": expired.isoformat(),
                          "reason": "superseded", "expiresAt": expired.isoformat()}
                         for i in range(6000)]
    await store.put("tenant-acme-crl", {**bundle, "revoked.json": json.dumps(record).encode()})
    current = await authority.issue("acme", DEVICE, "d1", validity_days=30)

    await authority.revoke("acme", current.serial, expires_at=current.summary.not_after)

    stored = await store.get("tenant-acme-crl")
    assert stored is not None
    assert sum(len(value) for value in stored.values()) < 1024 * 1024
    assert revoked_serials(stored["crl.pem"]) == {current.serial}


async def test_a_crl_secret_holds_six_thousand_live_revocations(
        authority: TenantAuthority, store: MaterialStore, clock: Clock) -> None:
    await authority.ensure_ca("acme")
    bundle = await store.get("tenant-acme-crl")
    assert bundle is not None
    record = json.loads(bundle["revoked.json"])
    now, later = int(clock().timestamp()), int((clock() + timedelta(days=365)).timestamp())
    record["revoked"] = [[format(2**150 + i, "x"), now, "keyCompromise", later]
                         for i in range(6000)]  # serials as long as real ones (20 bytes)
    await store.put("tenant-acme-crl", {**bundle, "revoked.json": json.dumps(record).encode()})
    current = await authority.issue("acme", DEVICE, "d1", validity_days=30)

    await authority.revoke("acme", current.serial, expires_at=current.summary.not_after)

    stored = await store.get("tenant-acme-crl")
    assert stored is not None
    assert len(revoked_serials(stored["crl.pem"])) == 6001
    assert sum(len(value) for value in stored.values()) < 1024 * 1024
