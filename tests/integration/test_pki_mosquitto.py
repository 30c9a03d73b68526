"""A real Mosquitto enforces the tenant PKI: mutual TLS against the tenant CA bundle and CRLs."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kubiot_contract.topics import IdentityKind
from kubiot_operator.local.mosquitto import MosquittoBroker, MosquittoConfig, TLSListener
from kubiot_operator.local.ports import free_port
from kubiot_operator.models.common import KeyAlgorithm
from kubiot_operator.pki import (
    FileMaterialStore,
    IssuedCertificate,
    TenantAuthority,
    create_server_ca,
    create_tenant_ca,
    issue_identity_certificate,
    issue_server_certificate,
    private_key_pem,
)
from kubiot_operator.pki.keys import generate_private_key
from tests.support.pki import ConnectOutcome, make_csr, mqtt_tls_connect

TENANTS = ("acme", "globex")


@dataclass
class PKIBroker:
    """A broker whose device listener trusts the tenant CAs kept by `authority`."""

    authority: TenantAuthority
    broker: MosquittoBroker
    listener: TLSListener
    server_ca_file: Path
    work: Path

    async def publish_trust(self) -> None:
        """Rewrite the broker's cafile and crlfile from the authority (read at listener start)."""
        self.listener.ca_file.write_bytes(await self.authority.ca_bundle(TENANTS))
        assert self.listener.crl_file is not None
        self.listener.crl_file.write_bytes(await self.authority.crl_bundle(TENANTS))

    def connect(self, issued: IssuedCertificate, client_id: str,
                key_pem: bytes | None = None) -> ConnectOutcome:
        """Connect with the issued certificate and its key (`key_pem` when the device kept it)."""
        key = key_pem or issued.key_pem
        assert key is not None
        cert_file, key_file = self.work / f"{client_id}.crt", self.work / f"{client_id}.key"
        cert_file.write_bytes(issued.cert_pem)
        key_file.write_bytes(key)
        key_file.chmod(0o600)
        return mqtt_tls_connect(self.listener.port, server_ca=self.server_ca_file,
                                cert_file=cert_file, key_file=key_file, client_id=client_id)


@pytest.fixture
async def pki_broker(tmp_path: Path) -> AsyncIterator[PKIBroker]:
    authority = TenantAuthority(FileMaterialStore(tmp_path / "pki"))
    for tenant in TENANTS:
        await authority.ensure_ca(tenant)
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    server_ca = create_server_ca()
    server = issue_server_certificate(server_ca, ["localhost"], ["127.0.0.1"])
    assert server.key_pem is not None
    (tls_dir / "server-ca.pem").write_bytes(server_ca.cert_pem)
    (tls_dir / "server.crt").write_bytes(server.cert_pem)
    (tls_dir / "server.key").write_bytes(server.key_pem)
    listener = TLSListener(
        port=free_port(), ca_file=tls_dir / "tenant-cas.pem", cert_file=tls_dir / "server.crt",
        key_file=tls_dir / "server.key", crl_file=tls_dir / "tenant-crls.pem",
    )
    broker = MosquittoBroker(MosquittoConfig(
        data_dir=tmp_path / "mosquitto", service_port=free_port(),
        admin_password=secrets.token_urlsafe(16), tls=listener))
    env = PKIBroker(authority, broker, listener, tls_dir / "server-ca.pem", tls_dir)
    await env.publish_trust()
    broker.start()
    try:
        yield env
    finally:
        broker.stop()


async def test_freshly_issued_device_and_gateway_certificates_connect(
        pki_broker: PKIBroker) -> None:
    device = await pki_broker.authority.issue("acme", IdentityKind.DEVICE, "sensor-1",
                                              validity_days=30)
    gateway = await pki_broker.authority.issue("globex", IdentityKind.GATEWAY, "edge-1",
                                               validity_days=30)
    outcome = pki_broker.connect(device, "acme.sensor-1")
    assert outcome.accepted, (outcome, pki_broker.broker.log_tail())
    assert pki_broker.connect(gateway, "globex.gw.edge-1").accepted


async def test_certificate_for_a_device_csr_connects_with_the_device_key(
        pki_broker: PKIBroker) -> None:
    device_key = generate_private_key(KeyAlgorithm.ECDSA_P384)
    csr = make_csr(device_key, "acme.own-key")
    issued = await pki_broker.authority.issue("acme", IdentityKind.DEVICE, "own-key",
                                              validity_days=30, csr_pem=csr)
    assert issued.key_pem is None
    outcome = pki_broker.connect(issued, "acme.own-key", key_pem=private_key_pem(device_key))
    assert outcome.accepted, outcome


async def test_every_tenant_ca_needs_its_crl_in_the_bundle(pki_broker: PKIBroker) -> None:
    globex = await pki_broker.authority.issue("globex", IdentityKind.DEVICE, "d1",
                                              validity_days=30)
    assert pki_broker.connect(globex, "globex.d1").accepted
    crl_file = pki_broker.listener.crl_file
    assert crl_file is not None
    crl_file.write_bytes(await pki_broker.authority.crl("acme"))  # globex's CRL left out
    pki_broker.broker.restart()
    outcome = pki_broker.connect(globex, "globex.d1")
    assert not outcome.accepted, outcome


async def test_revoked_certificate_is_refused_after_the_crl_is_reloaded(
        pki_broker: PKIBroker) -> None:
    authority = pki_broker.authority
    lost = await authority.issue("acme", IdentityKind.DEVICE, "lost", validity_days=30)
    kept = await authority.issue("acme", IdentityKind.DEVICE, "kept", validity_days=30)
    assert pki_broker.connect(lost, "acme.lost").accepted

    await authority.revoke("acme", lost.serial, reason="keyCompromise")
    await pki_broker.publish_trust()
    pki_broker.broker.restart()  # Mosquitto reads the CRL when the listener starts

    refused = pki_broker.connect(lost, "acme.lost")
    assert not refused.accepted
    assert "CERTIFICATE_REVOKED" in (refused.error or ""), refused
    assert pki_broker.connect(kept, "acme.kept").accepted


async def test_certificate_from_a_ca_outside_the_bundle_is_refused(
        pki_broker: PKIBroker) -> None:
    rogue_ca = create_tenant_ca("rogue")
    rogue = issue_identity_certificate(rogue_ca, tenant="rogue", kind=IdentityKind.DEVICE,
                                       name="sensor-1", validity_days=30)
    outcome = pki_broker.connect(rogue, "rogue.sensor-1")
    assert not outcome.accepted
    assert "UNKNOWN_CA" in (outcome.error or ""), outcome


async def test_expired_certificate_is_refused(pki_broker: PKIBroker) -> None:
    ca = await pki_broker.authority.ensure_ca("acme")
    expired = issue_identity_certificate(ca, tenant="acme", kind=IdentityKind.DEVICE,
                                         name="old", validity_days=1,
                                         now=datetime.now(UTC) - timedelta(days=3))
    outcome = pki_broker.connect(expired, "acme.old")
    assert not outcome.accepted
    assert "CERTIFICATE_EXPIRED" in (outcome.error or ""), outcome
