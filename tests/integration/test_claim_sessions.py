"""A provisioning claim's session on a real Mosquitto: bound to its certificate like a device's.

A claim is shared by every device of a production line, so two of them holding it at once is
normal: the second takes the first one's session over, which is why the device side of
provisioning is a short exchange retried with jitter. No one else can take a claim's session,
and a claim cannot take anyone's.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from kubiot_contract.topics import (
    IdentityKind,
    ProvisioningMessage,
    claim_access,
    claim_client_id,
    claim_root,
    claim_username,
    device_access,
    device_client_id,
    device_username,
    provisioning_topic,
)
from kubiot_operator.brokers import BrokerIdentity, CertificateCredential, MosquittoDynsecBackend
from tests.integration.conftest import TlsMosquitto
from tests.integration.test_client_id_binding import Attacker, connections_logged_as

RESPONSE = provisioning_topic(claim_root("acme", "line-1"), "sn-0001",
                              ProvisioningMessage.RESPONSE)
REQUEST = provisioning_topic(claim_root("acme", "line-1"), "sn-0001", ProvisioningMessage.REQUEST)


async def _setup(dynsec: MosquittoDynsecBackend) -> None:
    await dynsec.ensure_tenant("acme")
    await dynsec.ensure_identity(BrokerIdentity(
        claim_username("acme", "line-1"), "acme", IdentityKind.CLAIM,
        claim_access("acme", "line-1"), CertificateCredential()))
    await dynsec.ensure_identity(BrokerIdentity(
        device_username("acme", "pump-1"), "acme", IdentityKind.DEVICE,
        device_access("acme", "pump-1"), CertificateCredential()))


async def test_a_second_holder_of_a_claim_takes_the_first_ones_session_over(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend) -> None:
    await _setup(dynsec)
    claim = mosquitto_tls.pki.issue("acme", IdentityKind.CLAIM, "line-1")
    with mosquitto_tls.device_client(claim, f"first-{secrets.token_hex(3)}") as first, \
            mosquitto_tls.device_client(claim, f"second-{secrets.token_hex(3)}") as second:
        first.connect()
        assert first.subscribe(RESPONSE).accepted
        second.connect()  # asks for another client id, and gets the claim's all the same
        assert first.wait_disconnected(5), "the first holder's session was taken over"
        assert second.subscribe(RESPONSE).accepted
        assert second.publish(REQUEST, b"{}").accepted
    assert connections_logged_as(mosquitto_tls, claim_client_id("acme", "line-1")) >= 2


async def test_a_claim_and_a_device_cannot_take_each_others_sessions(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend, tmp_path: Path) -> None:
    await _setup(dynsec)
    await dynsec.ensure_identity(BrokerIdentity(
        device_username("acme", "pump-2"), "acme", IdentityKind.DEVICE,
        device_access("acme", "pump-2"), CertificateCredential()))
    pki = mosquitto_tls.pki
    claim_id = claim_client_id("acme", "line-1")
    with mosquitto_tls.device_client(pki.issue("acme", IdentityKind.DEVICE, "pump-1")) as pump, \
            mosquitto_tls.device_client(pki.issue("acme", IdentityKind.CLAIM, "line-1")) as claim:
        pump.connect()
        claim.connect()
        # A device asks for the claim's client id: it is connected as itself, the claim stays.
        device = Attacker.holding(mosquitto_tls, pki.issue("acme", IdentityKind.DEVICE,
                                                           "pump-2"), tmp_path)
        before = connections_logged_as(mosquitto_tls, claim_id)
        assert device.subscribe_as(claim_id, RESPONSE, "#") == []
        assert claim.connected
        assert connections_logged_as(mosquitto_tls, claim_id) == before
        # A holder of the claim asks for a device's client id: the device stays.
        holder = Attacker.holding(mosquitto_tls, pki.issue("acme", IdentityKind.CLAIM, "line-1"),
                                  tmp_path)
        assert holder.subscribe_as(device_client_id("acme", "pump-1"), "#") == []
        assert pump.connected
        assert connections_logged_as(mosquitto_tls, claim_id) > before
