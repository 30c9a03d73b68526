"""Sessions belong to identities on EMQX: the backend refuses a broker that lets devices choose
their client id, and with the configuration it asks for no device can take over a session."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kubiot_contract.topics import (
    REPORTS_CLIENT_ID,
    device_client_id,
    device_username,
    ingest_client_id,
    ingest_username,
)
from kubiot_operator.brokers import BrokerRejected
from kubiot_operator.brokers.emqx import SESSION_BINDING, EmqxBackend
from tests.support.emqx_fake import DEFAULT_ZONE_MQTT, EmqxFake

REPO = Path(__file__).resolve().parents[2]
TELEMETRY = "acme/devices/pump-1/telemetry"


@pytest.fixture
async def emqx(emqx_fake: EmqxFake) -> AsyncIterator[EmqxBackend]:
    async with EmqxBackend(emqx_fake.url, emqx_fake.api_key, emqx_fake.api_secret) as backend:
        yield backend


async def test_a_broker_with_emqx_defaults_is_refused_with_the_settings_to_change(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    emqx_fake.zone_mqtt = dict(DEFAULT_ZONE_MQTT)

    with pytest.raises(BrokerRejected) as refused:
        await emqx.ensure_tenant("acme")

    assert refused.value.reason == "BrokerSessionsNotBound"
    assert "mqtt.peer_cert_as_clientid = cn" in str(refused.value)
    health = await emqx.health()
    assert not health.ok and "peer_cert_as_clientid" in health.detail

    emqx_fake.zone_mqtt.update(SESSION_BINDING)
    await emqx.ensure_tenant("acme")
    assert (await emqx.health()).ok


async def test_the_documented_configuration_is_what_the_backend_checks() -> None:
    documented = (REPO / "docs" / "brokers.md").read_text()
    for key, value in SESSION_BINDING.items():
        assert re.search(rf"^mqtt\.{key} = {value}\b", documented, re.MULTILINE), key


@pytest.mark.parametrize("victim", [device_client_id("acme", "pump-1"), REPORTS_CLIENT_ID,
                                    ingest_client_id("acme")])
async def test_a_device_asking_for_a_live_client_id_gets_its_own(
        emqx_fake: EmqxFake, victim: str) -> None:
    live = emqx_fake.connect(victim, username=device_username("acme", "pump-1"),
                             peer_cert_cn=device_username("acme", "pump-1")) \
        if victim.startswith("acme.") else emqx_fake.connect_client(victim, "kubiot-operator")

    attacker = emqx_fake.connect(victim, peer_cert_cn="globex.probe-1", clean_start=False)

    assert attacker.clientid == "globex.probe-1" and attacker.username == "globex.probe-1"
    assert live.connected and live.ended_by is None


async def test_a_device_cannot_resume_the_ingest_session() -> None:
    emqx = EmqxFake(zone_mqtt={**DEFAULT_ZONE_MQTT, **SESSION_BINDING})
    ingest = emqx.connect(ingest_client_id("acme"), username=ingest_username("acme"),
                          clean_start=False)
    ingest.subscribe("acme/devices/+/telemetry")
    ingest.close()
    assert emqx.deliver(TELEMETRY) == 1

    attacker = emqx.connect(ingest_client_id("acme"), peer_cert_cn="globex.probe-1",
                            clean_start=False)

    assert attacker.session.queued == []
    back = emqx.connect(ingest_client_id("acme"), username=ingest_username("acme"),
                        clean_start=False)
    assert back.session.queued == [TELEMETRY]


async def test_with_emqx_defaults_the_fake_shows_the_takeover_it_guards_against() -> None:
    emqx = EmqxFake()
    ingest = emqx.connect(ingest_client_id("acme"), username=ingest_username("acme"),
                          clean_start=False)
    ingest.subscribe("acme/devices/+/telemetry")
    emqx.deliver(TELEMETRY)

    attacker = emqx.connect(ingest_client_id("acme"), peer_cert_cn="globex.probe-1",
                            clean_start=False)

    assert not ingest.connected and ingest.ended_by == ingest_client_id("acme")
    assert attacker.session.queued == [TELEMETRY]
