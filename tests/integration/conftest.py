"""Shared servers for integration tests: a Mosquitto with mutual TLS and dynamic security.

`mosquitto_tls` (one per test module) trusts the CAs of the tenants in `TENANTS`, enforces
their CRLs, and logs the operator in on a plain loopback service listener.
`make_mosquitto_tls` builds a private one for tests that restart or reload the broker.
`emqx_fake` serves an HTTP fake of EMQX's REST API.
"""

from __future__ import annotations

import secrets
import ssl
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kubiot_contract.topics import IdentityKind
from kubiot_operator.brokers import BrokerIdentity, MosquittoDynsecBackend
from kubiot_operator.brokers.emqx import SESSION_BINDING
from kubiot_operator.local.mosquitto import MosquittoBroker, MosquittoConfig, TLSListener
from kubiot_operator.local.ports import free_port
from kubiot_operator.pki import (
    CertificateAuthority,
    IssuedCertificate,
    Revocation,
    build_crl,
    create_server_ca,
    create_tenant_ca,
    issue_identity_certificate,
    issue_server_certificate,
)
from tests.support.emqx_fake import DEFAULT_ZONE_MQTT, EmqxFake
from tests.support.mqtt_client import MqttTestClient

TENANTS = ("acme", "globex")
HOST = "127.0.0.1"


@dataclass
class BrokerPki:
    """The server CA and certificate, one CA and CRL per tenant, all as files."""

    directory: Path
    server_ca: CertificateAuthority
    tenant_cas: dict[str, CertificateAuthority]
    revoked: dict[str, list[Revocation]] = field(default_factory=dict)
    _issued: int = 0

    @classmethod
    def create(cls, directory: Path, tenants: tuple[str, ...] = TENANTS) -> BrokerPki:
        directory.mkdir(parents=True, exist_ok=True)
        server_ca = create_server_ca()
        server = issue_server_certificate(server_ca, ["localhost"], [HOST])
        assert server.key_pem is not None
        (directory / "server.crt").write_bytes(server.fullchain_pem)
        (directory / "server.key").write_bytes(server.key_pem)
        (directory / "server-ca.crt").write_bytes(server_ca.cert_pem)
        pki = cls(directory, server_ca, {t: create_tenant_ca(t) for t in tenants})
        (directory / "tenant-cas.crt").write_bytes(
            b"".join(ca.cert_pem for ca in pki.tenant_cas.values()))
        pki.write_crls()
        return pki

    def listener(self, port: int) -> TLSListener:
        """The device listener for these files."""
        d = self.directory
        return TLSListener(port=port, ca_file=d / "tenant-cas.crt", cert_file=d / "server.crt",
                           key_file=d / "server.key", crl_file=self.crl_file)

    @property
    def crl_file(self) -> Path:
        return self.directory / "crls.pem"

    def write_crls(self) -> None:
        """One CRL per tenant CA in one file: with CRL checking on, every CA needs one."""
        crls = [build_crl(ca, self.revoked.get(t, [])) for t, ca in self.tenant_cas.items()]
        self.crl_file.write_bytes(b"".join(crls))

    def issue(self, tenant: str, kind: IdentityKind, name: str) -> IssuedCertificate:
        return issue_identity_certificate(self.tenant_cas[tenant], tenant=tenant, kind=kind,
                                          name=name, validity_days=2)

    def revoke(self, tenant: str, cert: IssuedCertificate) -> None:
        self.revoked.setdefault(tenant, []).append(Revocation(cert.serial, datetime.now(UTC)))
        self.write_crls()

    def client_context(self, cert: IssuedCertificate) -> ssl.SSLContext:
        """A device's TLS context: trusts the server CA, presents `cert`."""
        self._issued += 1
        stem = self.directory / f"client-{self._issued}"
        assert cert.key_pem is not None
        stem.with_suffix(".crt").write_bytes(cert.cert_pem)
        stem.with_suffix(".key").write_bytes(cert.key_pem)
        context = ssl.create_default_context(cafile=str(self.directory / "server-ca.crt"))
        context.load_cert_chain(str(stem.with_suffix(".crt")), str(stem.with_suffix(".key")))
        return context


@dataclass
class TlsMosquitto:
    """A running Mosquitto: the device listener (mutual TLS) and the service listener."""

    broker: MosquittoBroker
    pki: BrokerPki

    @property
    def config(self) -> MosquittoConfig:
        return self.broker.config

    @property
    def tls_port(self) -> int:
        assert self.config.tls is not None
        return self.config.tls.port

    def backend(self, **options: object) -> MosquittoDynsecBackend:
        cfg = self.config
        return MosquittoDynsecBackend(HOST, cfg.service_port, cfg.admin_username,
                                      cfg.admin_password, timeout=10.0, **options)  # type: ignore[arg-type]

    def device_client(self, cert: IssuedCertificate, client_id: str | None = None
                      ) -> MqttTestClient:
        """A not yet connected MQTT v5 client that logs in with `cert`."""
        return MqttTestClient(HOST, self.tls_port, tls_context=self.pki.client_context(cert),
                              client_id=client_id or f"c-{secrets.token_hex(4)}")

    def admin_client(self) -> MqttTestClient:
        cfg = self.config
        return MqttTestClient(HOST, cfg.service_port, client_id=f"a-{secrets.token_hex(4)}",
                              username=cfg.admin_username, password=cfg.admin_password)

    def dynsec_logged_commands(self) -> list[str]:
        """Names of the dynamic-security commands the broker has executed, from its log."""
        return [line.split(" | ")[1] for line in self.config.log_file.read_text().splitlines()
                if " dynsec: " in line and " | " in line]

    def dynsec_logged_writes(self) -> int:
        """How many executed commands changed something (everything but list*/get*)."""
        return sum(1 for name in self.dynsec_logged_commands()
                   if not name.startswith(("list", "get")))


def start_tls_mosquitto(directory: Path, identities: Sequence[BrokerIdentity] = ()
                        ) -> TlsMosquitto:
    pki = BrokerPki.create(directory / "pki")
    config = MosquittoConfig(
        data_dir=directory / "broker", service_port=free_port(),
        admin_password=secrets.token_urlsafe(16),
        tls=pki.listener(free_port()),
    )
    broker = MosquittoBroker(config)
    broker.start(identities=identities)
    return TlsMosquitto(broker, pki)


@pytest.fixture(scope="module")
def mosquitto_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMosquitto]:
    """One broker per test module; tests keep apart by using their own device names."""
    running = start_tls_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    try:
        yield running
    finally:
        running.broker.stop()


@pytest.fixture
def make_mosquitto_tls(tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[Callable[[], TlsMosquitto]]:
    """Private brokers for tests that restart or reload one; all stopped afterwards."""
    started: list[TlsMosquitto] = []

    def make() -> TlsMosquitto:
        started.append(start_tls_mosquitto(tmp_path_factory.mktemp("mosquitto")))
        return started[-1]

    yield make
    for running in started:
        running.broker.stop()


@pytest.fixture
async def dynsec(mosquitto_tls: TlsMosquitto) -> AsyncIterator[MosquittoDynsecBackend]:
    """The backend, logged in as the operator on the module's broker."""
    async with mosquitto_tls.backend() as backend:
        yield backend


@pytest.fixture
async def emqx_fake() -> AsyncIterator[EmqxFake]:
    """An HTTP fake of EMQX's REST API on a free loopback port, configured as docs/brokers.md
    says (certificates bind usernames and client ids)."""
    fake = EmqxFake(zone_mqtt={**DEFAULT_ZONE_MQTT, **SESSION_BINDING})
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
