"""The broker of a machine without Kubernetes: Mosquitto with mutual TLS for devices, a server
certificate from a platform CA kept on disk, and the tenants' CA and CRL bundles as its
trust files. Also the operator end-to-end tests' broker."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kubiot_operator.brokers import BrokerIdentity
from kubiot_operator.pki import (
    CertificateAuthority,
    FileMaterialStore,
    build_crl,
    create_server_ca,
    issue_server_certificate,
    load_ca,
)

from .mosquitto import MosquittoBroker, MosquittoConfig, TLSListener

log = logging.getLogger(__name__)
SERVER_CA_BUNDLE = "broker-server-ca"
SERVER_CERT_BUNDLE = "broker-server-certificate"
ADMIN_BUNDLE = "broker-admin"
RELOAD_MARK = "Reloading config."


@dataclass(frozen=True)
class BrokerPorts:
    device: int  # mutual TLS, for devices and gateways
    service: int  # username/password on loopback, for the operator and ingest


class LocalBroker:
    """Owns the broker's files under `root`; `publish()` is the TrustPublisher of the platform.

    A changed bundle is loaded with a reload (SIGHUP): connected sessions stay, and a revoked
    certificate fails the handshake from then on (its live session is ended by the broker
    backend when the identity is disabled).
    """

    def __init__(self, root: Path, ports: BrokerPorts, *, host: str = "127.0.0.1",
                 statistics_interval: int | None = None) -> None:
        self.root = root
        self.statistics_interval = statistics_interval
        self.ports = ports
        self.host = host
        self._store = FileMaterialStore(root / "pki")
        self._broker: MosquittoBroker | None = None
        self._lock = asyncio.Lock()
        self.reloads = 0
        #: Seconds the first start took with a seeded dynamic-security state, if it had one.
        self.cold_start_seeded: float | None = None

    @property
    def trust_dir(self) -> Path:
        return self.root / "trust"

    @property
    def ca_bundle_file(self) -> Path:
        return self.trust_dir / "ca-bundle.pem"

    @property
    def crl_bundle_file(self) -> Path:
        return self.trust_dir / "crl-bundle.pem"

    @property
    def server_ca_file(self) -> Path:
        """What devices verify the broker with (goes into every device Secret)."""
        return self._store.path(SERVER_CA_BUNDLE) / "ca.crt"

    @property
    def has_state(self) -> bool:
        """Whether Mosquitto has a dynamic-security state of its own (not a first start)."""
        return (self.root / "mosquitto" / "dynamic-security.json").exists()

    async def admin_password(self) -> str:
        """The operator's dynamic-security password, created once."""
        bundle = await self._store.get(ADMIN_BUNDLE)
        if bundle is None:
            bundle = {"password": secrets.token_urlsafe(24).encode()}
            await self._store.put(ADMIN_BUNDLE, bundle)
        return bundle["password"].decode()

    async def start(self, identities: Sequence[BrokerIdentity] = ()) -> None:
        """Start Mosquitto; on a cold start its dynamic-security state already holds
        `identities`, so they need no command each (see `dynsec_with_identities`)."""
        server_ca = await self._server_ca()
        await self._server_certificate(server_ca)
        self.trust_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.ca_bundle_file.exists():
            # Mosquitto will not start with an empty CA file; the platform CA signs no
            # client certificates, so trusting it for clients admits nobody.
            self._write(self.ca_bundle_file, server_ca.cert_pem)
            self._write(self.crl_bundle_file, await self._server_crl())
        certificate_dir = self._store.path(SERVER_CERT_BUNDLE)
        config = MosquittoConfig(
            data_dir=self.root / "mosquitto", service_port=self.ports.service,
            admin_password=await self.admin_password(), bind_address=self.host,
            tls=TLSListener(port=self.ports.device, ca_file=self.ca_bundle_file,
                            cert_file=certificate_dir / "tls.crt",
                            key_file=certificate_dir / "tls.key",
                            crl_file=self.crl_bundle_file),
            sys_interval=self.statistics_interval)
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._broker = MosquittoBroker(config)
        started = time.monotonic()
        await asyncio.to_thread(self._broker.start, 10.0, identities)
        if identities and self.cold_start_seeded is None:
            self.cold_start_seeded = time.monotonic() - started

    async def stop(self) -> None:
        if self._broker is not None:
            await asyncio.to_thread(self._broker.stop)

    async def publish(self, ca_bundle: bytes, crl_bundle: bytes) -> None:
        """Write the tenants' bundles (plus the platform CA's) and restart on a change."""
        async with self._lock:
            server_ca = await self._server_ca()
            ca_bundle = server_ca.cert_pem + ca_bundle
            crl_bundle = await self._server_crl() + crl_bundle
            changed = (self._read(self.ca_bundle_file) != ca_bundle
                       or self._read(self.crl_bundle_file) != crl_bundle)
            if not changed:
                return
            self._write(self.ca_bundle_file, ca_bundle)
            self._write(self.crl_bundle_file, crl_bundle)
            if self._broker is not None and self._broker.running:
                await self._reload()

    async def _reload(self, seconds: float = 10.0) -> None:
        """SIGHUP makes Mosquitto re-read its CA file and CRL in place: sessions stay up, and
        from then on a revoked certificate cannot complete the handshake."""
        assert self._broker is not None
        before = self._broker.log_tail(10_000).count(RELOAD_MARK)
        self._broker.reload()
        deadline = asyncio.get_running_loop().time() + seconds
        while self._broker.log_tail(10_000).count(RELOAD_MARK) <= before:
            if asyncio.get_running_loop().time() > deadline:
                log.warning("Mosquitto did not confirm the reload; restarting it instead")
                await asyncio.to_thread(self._broker.restart)
                break
            await asyncio.sleep(0.05)
        self.reloads += 1

    def log_tail(self) -> str:
        return self._broker.log_tail() if self._broker else ""

    async def _server_ca(self) -> CertificateAuthority:
        bundle = await self._store.get(SERVER_CA_BUNDLE)
        if bundle is not None:
            return load_ca(bundle["ca.crt"], bundle["ca.key"])
        ca = create_server_ca()
        await self._store.put(SERVER_CA_BUNDLE, {"ca.crt": ca.cert_pem, "ca.key": ca.key_pem})
        return ca

    async def _server_crl(self) -> bytes:
        """The platform CA's CRL: it revokes nothing, but Mosquitto wants one for every CA."""
        bundle = await self._store.get(SERVER_CA_BUNDLE)
        assert bundle is not None
        if "crl.pem" not in bundle:
            ca = load_ca(bundle["ca.crt"], bundle["ca.key"])
            bundle = {**bundle, "crl.pem": build_crl(ca, [], next_update_days=3650)}
            await self._store.put(SERVER_CA_BUNDLE, bundle)
        return bundle["crl.pem"]

    async def _server_certificate(self, ca: CertificateAuthority) -> None:
        if await self._store.get(SERVER_CERT_BUNDLE) is not None:
            return
        issued = issue_server_certificate(ca, ["localhost"], [self.host])
        assert issued.key_pem is not None
        await self._store.put(SERVER_CERT_BUNDLE, {"tls.crt": issued.cert_pem,
                                                   "tls.key": issued.key_pem})

    @staticmethod
    def _read(path: Path) -> bytes | None:
        return path.read_bytes() if path.exists() else None

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(data)
        temporary.chmod(0o600)
        temporary.replace(path)
