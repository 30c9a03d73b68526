"""Sessions belong to identities: no device can take another identity's client id (Mosquitto).

The attacker is a stock `mosquitto_sub` (MQTT v5) holding a valid certificate that kubiot
issued. It asks for a victim's client id with clean start 0 and a session expiry, which on a
broker that lets clients choose their id would resume the victim's session or end its
connection. The victims are a device of another tenant and of the same tenant, the tenant's
ingest (with telemetry queued in its offline session) and the operator.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubiot_contract.topics import (
    REPORTS_CLIENT_ID,
    IdentityKind,
    device_access,
    device_client_id,
    device_root,
    device_username,
    ingest_access,
    ingest_client_id,
    ingest_username,
    state_desired_topic,
    telemetry_topic,
)
from kubiot_operator.brokers import (
    BrokerIdentity,
    CertificateCredential,
    MosquittoDynsecBackend,
    PasswordCredential,
)
from kubiot_operator.pki import IssuedCertificate
from tests.integration.conftest import HOST, TlsMosquitto
from tests.support.mqtt_client import MqttTestClient
from tests.support.waiting import wait_until

#: How long a victim must stay connected after the attacker's CONNACK.
DISPLACEMENT_WINDOW_S = 1.5


def device(tenant: str, name: str) -> BrokerIdentity:
    return BrokerIdentity(device_username(tenant, name), tenant, IdentityKind.DEVICE,
                          device_access(tenant, name), CertificateCredential())


@dataclass
class Attacker:
    """A device certificate on disk, used by Mosquitto's own command-line client."""

    broker: TlsMosquitto
    cert_file: Path
    key_file: Path

    @classmethod
    def holding(cls, broker: TlsMosquitto, cert: IssuedCertificate, directory: Path) -> Attacker:
        assert cert.key_pem is not None
        stem = directory / f"attacker-{secrets.token_hex(3)}"
        stem.with_suffix(".crt").write_bytes(cert.cert_pem)
        stem.with_suffix(".key").write_bytes(cert.key_pem)
        return cls(broker, stem.with_suffix(".crt"), stem.with_suffix(".key"))

    def subscribe_as(self, client_id: str, *topic_filters: str) -> list[str]:
        """Connect with `client_id`, clean start 0, and return every message line received."""
        args = ["mosquitto_sub", "-h", HOST, "-p", str(self.broker.tls_port), "-V", "mqttv5",
                "--cafile", str(self.broker.pki.directory / "server-ca.crt"),
                "--cert", str(self.cert_file), "--key", str(self.key_file),
                "-i", client_id, "-c", "-x", "3600", "-q", "1", "-v",
                "-W", str(int(DISPLACEMENT_WINDOW_S + 1))]
        for topic_filter in topic_filters:
            args += ["-t", topic_filter]
        done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
        # 27 is mosquitto_sub's exit code for "timed out waiting", the normal end here.
        assert done.returncode in (0, 27), done.stderr
        return [line for line in done.stdout.splitlines() if line]


def connections_logged_as(broker: TlsMosquitto, client_id: str) -> int:
    log = broker.config.log_file.read_text()
    return log.count(f" as {client_id} ")


async def _setup(dynsec: MosquittoDynsecBackend, ingest_password: str) -> None:
    for tenant in ("acme", "globex"):
        await dynsec.ensure_tenant(tenant)
    for tenant, name in (("acme", "pump-1"), ("acme", "pump-2"), ("globex", "probe-1")):
        await dynsec.ensure_identity(device(tenant, name))
    await dynsec.ensure_identity(BrokerIdentity(
        ingest_username("acme"), "acme", IdentityKind.INGEST, ingest_access("acme"),
        PasswordCredential(ingest_password)))


@pytest.mark.parametrize(("attacker_tenant", "attacker_name"),
                         [("globex", "probe-1"), ("acme", "pump-2")],
                         ids=["across-tenants", "same-tenant"])
async def test_a_device_cannot_take_a_live_identitys_client_id(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend, tmp_path: Path,
        attacker_tenant: str, attacker_name: str) -> None:
    await _setup(dynsec, secrets.token_urlsafe(16))
    pki = mosquitto_tls.pki
    victim_cert = pki.issue("acme", IdentityKind.DEVICE, "pump-1")
    attacker = Attacker.holding(
        mosquitto_tls, pki.issue(attacker_tenant, IdentityKind.DEVICE, attacker_name), tmp_path)
    root = device_root("acme", "pump-1")

    with mosquitto_tls.device_client(victim_cert, device_client_id("acme", "pump-1")) as pump, \
            MqttTestClient(HOST, mosquitto_tls.config.service_port, client_id=REPORTS_CLIENT_ID,
                           username=mosquitto_tls.config.admin_username,
                           password=mosquitto_tls.config.admin_password) as operator:
        pump.connect()
        operator.connect()
        assert pump.subscribe(state_desired_topic(root)).accepted
        for victim_id in (device_client_id("acme", "pump-1"), REPORTS_CLIENT_ID):
            before = connections_logged_as(mosquitto_tls, victim_id)
            received = attacker.subscribe_as(victim_id, state_desired_topic(root), "#")
            assert received == []
            # Both victims kept their connection, and the attacker got its own id instead.
            assert connections_logged_as(mosquitto_tls, victim_id) == before
            assert pump.connected and operator.connected
        assert connections_logged_as(
            mosquitto_tls, device_client_id(attacker_tenant, attacker_name)) >= 2
        # The victim's session still works: desired state reaches the device, not the attacker.
        assert operator.publish(state_desired_topic(root), b'{"on": true}').accepted
        message = pump.next_message()
        assert message is not None and message.payload == b'{"on": true}'


async def test_a_device_cannot_resume_the_ingest_session_and_read_its_telemetry(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend, tmp_path: Path) -> None:
    password = secrets.token_urlsafe(16)
    await _setup(dynsec, password)
    pki = mosquitto_tls.pki
    ingest_id = ingest_client_id("acme")
    telemetry = telemetry_topic(device_root("acme", "pump-1"))

    # The ingest's persistent session, offline, with acme's telemetry queued in it.
    ingest = MqttTestClient(HOST, mosquitto_tls.config.service_port, client_id=ingest_id,
                            username=ingest_username("acme"), password=password)
    ingest.connect(clean_start=False, session_expiry_s=3600)
    assert ingest.subscribe("acme/devices/+/telemetry").accepted
    ingest.close()
    with mosquitto_tls.device_client(pki.issue("acme", IdentityKind.DEVICE, "pump-1"),
                                     device_client_id("acme", "pump-1")) as pump:
        pump.connect()
        for seq in range(5):
            assert pump.publish(telemetry, f'{{"seq": {seq}, "values": {{"p": 1}}}}').accepted

    attacker = Attacker.holding(
        mosquitto_tls, pki.issue("globex", IdentityKind.DEVICE, "probe-1"), tmp_path)
    assert attacker.subscribe_as(ingest_id, "acme/#", "#") == []

    # Everything queued for the ingest is still there for the ingest.
    ingest = MqttTestClient(HOST, mosquitto_tls.config.service_port, client_id=ingest_id,
                            username=ingest_username("acme"), password=password)
    with ingest:
        ingest.connect(clean_start=False, session_expiry_s=3600)
        got = [ingest.next_message() for _ in range(5)]
        assert [m.topic if m else None for m in got] == [telemetry] * 5


async def test_a_device_gets_its_certificates_name_as_client_id_whatever_it_asks(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend, tmp_path: Path) -> None:
    await _setup(dynsec, secrets.token_urlsafe(16))
    attacker = Attacker.holding(
        mosquitto_tls, mosquitto_tls.pki.issue("globex", IdentityKind.DEVICE, "probe-1"),
        tmp_path)
    before = connections_logged_as(mosquitto_tls, "globex.probe-1")
    attacker.subscribe_as("anything-at-all", "globex/devices/probe-1/state/desired")
    wait_until(lambda: connections_logged_as(mosquitto_tls, "globex.probe-1") > before,
               timeout=5)
    assert connections_logged_as(mosquitto_tls, "anything-at-all") == 0
