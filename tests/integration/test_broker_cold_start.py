"""A broker started with its identities already in its dynamic-security state."""

from __future__ import annotations

from pathlib import Path

from kubiot_contract.topics import (
    IdentityKind,
    device_access,
    device_root,
    device_username,
    gateway_access,
    gateway_username,
    telemetry_topic,
)
from kubiot_operator.brokers import BrokerIdentity, CertificateCredential, PasswordCredential
from tests.integration.conftest import start_tls_mosquitto
from tests.support.mqtt_client import ConnectRefused, MqttTestClient

TENANT = "acme"


def device(name: str, *, enabled: bool = True) -> BrokerIdentity:
    return BrokerIdentity(device_username(TENANT, name), TENANT, IdentityKind.DEVICE,
                          device_access(TENANT, name), CertificateCredential(), enabled)


async def test_seeded_identities_need_no_write_and_are_confined(tmp_path: Path) -> None:
    wanted = [
        device("pump-1"), device("pump-2"), device("quiet", enabled=False),
        BrokerIdentity(gateway_username(TENANT, "gw"), TENANT, IdentityKind.GATEWAY,
                       gateway_access(TENANT, "gw", ["pump-2"]), CertificateCredential()),
        BrokerIdentity(device_username(TENANT, "legacy"), TENANT, IdentityKind.DEVICE,
                       device_access(TENANT, "legacy"), PasswordCredential("s3cret-pass")),
    ]
    broker = start_tls_mosquitto(tmp_path, wanted)
    try:
        async with broker.backend() as backend:
            assert (await backend.ensure_tenant(TENANT)).writes == 0
            for identity in wanted:
                assert (await backend.ensure_identity(identity)).writes == 0, identity.username
            assert (await backend.resync(TENANT, wanted)).writes == 0
        assert broker.dynsec_logged_writes() == 0

        pki = broker.pki
        own_cert = pki.issue(TENANT, IdentityKind.DEVICE, "pump-1")
        with broker.device_client(own_cert).connect() as own:
            assert own.publish(telemetry_topic(device_root(TENANT, "pump-1"))).accepted
            assert not own.publish(telemetry_topic(device_root(TENANT, "pump-2"))).accepted
        quiet = broker.device_client(pki.issue(TENANT, IdentityKind.DEVICE, "quiet"))
        try:
            with quiet.connect() as connected:
                assert not connected.publish(
                    telemetry_topic(device_root(TENANT, "quiet"))).accepted
        except ConnectRefused:
            pass  # refused outright is as good as confined
        cfg = broker.config
        with MqttTestClient("127.0.0.1", cfg.service_port, client_id="legacy-1",
                            username=device_username(TENANT, "legacy"),
                            password="s3cret-pass").connect() as legacy:
            assert legacy.publish(telemetry_topic(device_root(TENANT, "legacy"))).accepted
    finally:
        broker.broker.stop()


async def test_a_broker_with_a_state_of_its_own_keeps_it(tmp_path: Path) -> None:
    broker = start_tls_mosquitto(tmp_path, [device("first")])
    broker.broker.stop()
    assert broker.broker.prepare([device("second")]) is False
    state = broker.config.dynsec_file.read_text()
    assert "acme.first" in state and "acme.second" not in state
