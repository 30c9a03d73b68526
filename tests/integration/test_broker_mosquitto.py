"""The Mosquitto backend against a real broker: real devices with certificates, real refusals."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from kubiot_contract.topics import (
    IdentityKind,
    device_access,
    device_root,
    device_username,
    gateway_access,
    gateway_root,
    gateway_username,
    ingest_access,
    ingest_username,
    state_desired_topic,
    state_reported_topic,
    telemetry_topic,
)
from kubiot_operator.brokers import (
    Backoff,
    BrokerAuthError,
    BrokerIdentity,
    BrokerUnavailable,
    CertificateCredential,
    MosquittoDynsecBackend,
    PasswordCredential,
)
from kubiot_operator.local.ports import free_port
from tests.integration.conftest import TlsMosquitto
from tests.support.mqtt_client import ConnectRefused, MqttTestClient, tls_handshake_succeeds
from tests.support.waiting import wait_until

SESSION_END_TIMEOUT = 5.0


def device(tenant: str, name: str, *, enabled: bool = True) -> BrokerIdentity:
    return BrokerIdentity(device_username(tenant, name), tenant, IdentityKind.DEVICE,
                          device_access(tenant, name), CertificateCredential(), enabled)


def gateway(tenant: str, name: str, children: list[str]) -> BrokerIdentity:
    return BrokerIdentity(gateway_username(tenant, name), tenant, IdentityKind.GATEWAY,
                          gateway_access(tenant, name, children), CertificateCredential())


def connect_device(broker: TlsMosquitto, tenant: str, name: str,
                   kind: IdentityKind = IdentityKind.DEVICE) -> MqttTestClient:
    return broker.device_client(broker.pki.issue(tenant, kind, name)).connect()


def assert_locked_out(client: MqttTestClient, tenant: str, name: str) -> None:
    root = device_root(tenant, name)
    assert not client.publish(telemetry_topic(root), b'{"t": 1}').accepted
    assert not client.publish(state_reported_topic(root), b"{}", retain=True).accepted
    assert not client.subscribe(state_desired_topic(root)).accepted
    assert not client.subscribe(f"{root}/#").accepted


async def test_device_uses_its_own_topics_and_nothing_else(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend) -> None:
    await dynsec.ensure_identity(device("acme", "meter-1"))
    await dynsec.ensure_identity(device("acme", "meter-2"))
    root = device_root("acme", "meter-1")
    with mosquitto_tls.admin_client().connect() as operator:
        desired = json.dumps({"interval": 30}).encode()
        assert operator.publish(state_desired_topic(root), desired, retain=True).accepted

    with connect_device(mosquitto_tls, "acme", "meter-1") as meter:
        assert meter.publish(telemetry_topic(root), b'{"temperature": 21.5}').accepted
        assert meter.publish(telemetry_topic(root, "vibration"), b"[]").accepted
        assert meter.publish(state_reported_topic(root), b"{}", retain=True).accepted
        assert meter.subscribe(state_desired_topic(root)).accepted
        received = meter.next_message()
        assert received is not None
        assert (received.topic, received.payload, received.retain) == (
            state_desired_topic(root), desired, True)

        other = device_root("acme", "meter-2")
        assert not meter.publish(telemetry_topic(other)).accepted
        assert not meter.publish(state_desired_topic(root)).accepted  # cloud -> device only
        assert not meter.publish(telemetry_topic(device_root("globex", "meter-1"))).accepted
        assert not meter.publish("acme/anything").accepted
        for forbidden in ("#", "$SYS/#", "acme/#", "acme/devices/+/telemetry",
                          state_desired_topic(other), "$CONTROL/dynamic-security/#"):
            outcome = meter.subscribe(forbidden)
            assert not outcome.accepted, forbidden
            assert outcome.reason_code == 0x87, (forbidden, outcome)  # Not authorized


async def test_tenants_are_apart_even_for_equal_device_names(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend) -> None:
    await dynsec.ensure_identity(device("acme", "twin"))
    await dynsec.ensure_identity(device("globex", "twin"))
    with connect_device(mosquitto_tls, "globex", "twin") as twin:
        assert twin.publish(telemetry_topic(device_root("globex", "twin"))).accepted
        refused = twin.publish(telemetry_topic(device_root("acme", "twin")))
        assert not refused.accepted
        assert refused.reason_code == 0x87


async def test_disabling_ends_the_session_and_all_access(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend) -> None:
    await dynsec.ensure_identity(device("acme", "valve-1"))
    cert = mosquitto_tls.pki.issue("acme", IdentityKind.DEVICE, "valve-1")
    live = mosquitto_tls.device_client(cert).connect()
    assert live.publish(telemetry_topic(device_root("acme", "valve-1"))).accepted

    result = await dynsec.set_enabled(device_username("acme", "valve-1"), False)

    assert result.writes > 0
    assert live.wait_disconnected(SESSION_END_TIMEOUT)
    live.close()
    # The certificate is still valid, so the TLS login works; everything after it is refused.
    with mosquitto_tls.device_client(cert).connect() as again:
        assert_locked_out(again, "acme", "valve-1")
    assert (await dynsec.set_enabled(device_username("acme", "valve-1"), False)).writes == 0

    await dynsec.set_enabled(device_username("acme", "valve-1"), True)
    with mosquitto_tls.device_client(cert).connect() as back:
        assert back.publish(telemetry_topic(device_root("acme", "valve-1"))).accepted


async def test_ensure_identity_with_enabled_false_disables(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend) -> None:
    await dynsec.ensure_identity(device("acme", "valve-2"))
    live = connect_device(mosquitto_tls, "acme", "valve-2")
    await dynsec.ensure_identity(device("acme", "valve-2", enabled=False))
    assert live.wait_disconnected(SESSION_END_TIMEOUT)
    live.close()
    with connect_device(mosquitto_tls, "acme", "valve-2") as again:
        assert_locked_out(again, "acme", "valve-2")


async def test_removal_ends_the_session_and_all_access(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend) -> None:
    await dynsec.ensure_identity(device("acme", "pump-1"))
    live = connect_device(mosquitto_tls, "acme", "pump-1")

    await dynsec.remove_identity(device_username("acme", "pump-1"))

    assert live.wait_disconnected(SESSION_END_TIMEOUT)
    live.close()
    with connect_device(mosquitto_tls, "acme", "pump-1") as again:
        assert_locked_out(again, "acme", "pump-1")
    assert (await dynsec.remove_identity(device_username("acme", "pump-1"))).writes == 0


async def test_gateway_acts_for_its_children_and_a_child_added_later(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend) -> None:
    for child in ("ble-1", "ble-2", "ble-3"):
        await dynsec.ensure_identity(device("acme", child))
    await dynsec.ensure_identity(gateway("acme", "edge-1", ["ble-1", "ble-2"]))
    cert = mosquitto_tls.pki.issue("acme", IdentityKind.GATEWAY, "edge-1")

    with mosquitto_tls.device_client(cert).connect() as edge:
        assert edge.publish(telemetry_topic(gateway_root("acme", "edge-1"))).accepted
        assert edge.publish(telemetry_topic(device_root("acme", "ble-1"))).accepted
        assert edge.publish(state_reported_topic(device_root("acme", "ble-2"))).accepted
        assert edge.subscribe(state_desired_topic(device_root("acme", "ble-2"))).accepted
        assert not edge.publish(telemetry_topic(device_root("acme", "ble-3"))).accepted
        assert not edge.publish(telemetry_topic(device_root("globex", "ble-1"))).accepted
        assert not edge.subscribe("acme/devices/#").accepted

        children = ["ble-1", "ble-2", "ble-3"]
        result = await dynsec.ensure_identity(gateway("acme", "edge-1", children))

        added = device_access("acme", "ble-3")
        assert result.writes == len(added.publish) + len(added.subscribe)
        # The same session, still connected, may use the new child's topics at once.
        assert edge.connected
        assert edge.publish(telemetry_topic(device_root("acme", "ble-3"))).accepted
        assert edge.subscribe(state_desired_topic(device_root("acme", "ble-3"))).accepted
        assert (await dynsec.ensure_identity(gateway("acme", "edge-1", children))).writes == 0

        # A child taken away is refused at once too.
        await dynsec.ensure_identity(gateway("acme", "edge-1", ["ble-1", "ble-3"]))
        assert not edge.publish(telemetry_topic(device_root("acme", "ble-2"))).accepted
        assert edge.publish(telemetry_topic(device_root("acme", "ble-3"))).accepted


async def test_password_identity_on_the_service_listener(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend) -> None:
    username = ingest_username("globex")
    ingest = BrokerIdentity(username, "globex", IdentityKind.INGEST, ingest_access("globex"),
                            PasswordCredential("first-secret"))
    await dynsec.ensure_identity(ingest)
    assert (await dynsec.ensure_identity(ingest)).writes == 0
    port = mosquitto_tls.config.service_port
    with MqttTestClient("127.0.0.1", port, client_id="ingest-1", username=username,
                        password="first-secret").connect() as client:
        assert client.subscribe("globex/devices/+/telemetry").accepted
        assert not client.subscribe("acme/devices/+/telemetry").accepted
        assert not client.publish("globex/devices/x/state/desired").accepted

    rotated = BrokerIdentity(username, "globex", IdentityKind.INGEST, ingest_access("globex"),
                             PasswordCredential("second-secret"))
    assert (await dynsec.ensure_identity(rotated)).writes > 0
    with pytest.raises(ConnectRefused):
        MqttTestClient("127.0.0.1", port, client_id="ingest-2", username=username,
                       password="first-secret").connect()
    MqttTestClient("127.0.0.1", port, client_id="ingest-3", username=username,
                   password="second-secret").connect().close()


# --- drift --------------------------------------------------------------------------------------

async def raw_dynsec(broker: TlsMosquitto, *commands: dict[str, object]) -> None:
    """Change the broker behind the backend's back, as an admin with mosquitto_ctrl would."""
    with broker.admin_client().connect() as admin:
        assert admin.subscribe("$CONTROL/dynamic-security/v1/response").accepted
        assert admin.publish("$CONTROL/dynamic-security/v1",
                             json.dumps({"commands": list(commands)})).accepted
        reply = admin.next_message()
        assert reply is not None
        errors = [r for r in json.loads(reply.payload)["responses"] if "error" in r]
        assert not errors, errors


async def test_resync_restores_a_rule_removed_by_hand_then_sends_nothing(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend) -> None:
    wanted = [device("globex", f"drift-{i}") for i in range(5)]
    await dynsec.resync("globex", wanted)
    root = device_root("globex", "drift-0")
    await raw_dynsec(mosquitto_tls, {"command": "removeRoleACL",
                                     "rolename": f"kubiot:{device_username('globex', 'drift-0')}",
                                     "acltype": "publishClientSend",
                                     "topic": telemetry_topic(root)})
    with connect_device(mosquitto_tls, "globex", "drift-0") as meter:
        assert not meter.publish(telemetry_topic(root)).accepted

    result = await dynsec.resync("globex", wanted)

    assert result.writes == 1
    with connect_device(mosquitto_tls, "globex", "drift-0") as meter:
        assert meter.publish(telemetry_topic(root)).accepted
    logged, sent = mosquitto_tls.dynsec_logged_writes(), dynsec.writes_sent
    assert (await dynsec.resync("globex", wanted)).writes == 0
    assert dynsec.writes_sent == sent
    assert mosquitto_tls.dynsec_logged_writes() == logged  # nothing reached the broker either


async def test_resync_strips_hand_added_rules_and_removes_extra_identities(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend) -> None:
    wanted = [device("acme", "strict-1")]
    await dynsec.resync("acme", [*wanted, device("acme", "strict-extra")])
    username = device_username("acme", "strict-1")
    await raw_dynsec(mosquitto_tls,
                     {"command": "addRoleACL", "rolename": f"kubiot:{username}",
                      "acltype": "subscribePattern", "topic": "#", "allow": True,
                      "priority": 5},
                     {"command": "createClient", "username": "admin-own-tool"})
    with connect_device(mosquitto_tls, "acme", "strict-1") as meter:
        assert meter.subscribe("#").accepted  # the hand-made hole is real

    others_before = [i.username for i in await dynsec.list_identities("acme")
                     if not i.username.startswith("acme.strict")]
    result = await dynsec.resync("acme", wanted + [
        i for i in await dynsec.list_identities("acme")
        if not i.username.startswith("acme.strict")])

    assert result.writes > 0
    with connect_device(mosquitto_tls, "acme", "strict-1") as meter:
        assert not meter.subscribe("#").accepted
        assert meter.publish(telemetry_topic(device_root("acme", "strict-1"))).accepted
    listed = {i.username for i in await dynsec.list_identities("acme")}
    assert device_username("acme", "strict-extra") not in listed
    assert set(others_before) <= listed
    # The admin's own client is not kubiot's: never listed, never removed.
    assert "admin-own-tool" not in listed
    await raw_dynsec(mosquitto_tls, {"command": "getClient", "username": "admin-own-tool"})


async def test_list_identities_reads_back_what_was_written(
        dynsec: MosquittoDynsecBackend) -> None:
    written = [device("globex", "read-1"), device("globex", "read-2", enabled=False),
               gateway("globex", "read-gw", ["read-1"])]
    for identity in written:
        await dynsec.ensure_identity(identity)
    listed = {i.username: i for i in await dynsec.list_identities("globex")}
    for identity in written:
        assert listed[identity.username] == identity


async def test_remove_tenant_removes_everything_of_it(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend) -> None:
    await dynsec.ensure_tenant("globex")
    await dynsec.ensure_identity(device("globex", "gone-1"))
    live = connect_device(mosquitto_tls, "globex", "gone-1")
    await dynsec.remove_tenant("globex")
    assert live.wait_disconnected(SESSION_END_TIMEOUT)
    live.close()
    assert await dynsec.list_identities("globex") == []
    assert await dynsec.list_identities("acme") != []
    assert (await dynsec.ensure_tenant("globex")).writes > 0


# --- revocation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("apply_crl", ["reload", "restart"])
async def test_revoked_certificate_cannot_complete_the_handshake(
        make_mosquitto_tls: Callable[[], TlsMosquitto], apply_crl: str) -> None:
    broker: TlsMosquitto = make_mosquitto_tls()
    async with broker.backend() as backend:
        await backend.ensure_identity(device("acme", "stolen"))
        await backend.ensure_identity(device("acme", "honest"))
    stolen = broker.pki.issue("acme", IdentityKind.DEVICE, "stolen")
    honest = broker.pki.issue("acme", IdentityKind.DEVICE, "honest")
    broker.device_client(stolen).connect().close()
    assert tls_handshake_succeeds(broker.pki.client_context(stolen), "127.0.0.1",
                                  broker.tls_port)

    broker.pki.revoke("acme", stolen)
    if apply_crl == "reload":
        broker.broker.reload()
    else:
        broker.broker.restart()

    def refused_at_handshake() -> bool:
        return not tls_handshake_succeeds(broker.pki.client_context(stolen), "127.0.0.1",
                                          broker.tls_port)

    wait_until(refused_at_handshake, timeout=5, message="the revoked certificate is refused")
    with pytest.raises(ConnectRefused):
        broker.device_client(stolen).connect()
    assert tls_handshake_succeeds(broker.pki.client_context(honest), "127.0.0.1",
                                  broker.tls_port)
    with broker.device_client(honest).connect() as ok:
        assert ok.publish(telemetry_topic(device_root("acme", "honest"))).accepted


async def test_half_finished_removal_is_completed_or_reused(
        mosquitto_tls: TlsMosquitto, dynsec: MosquittoDynsecBackend) -> None:
    await dynsec.ensure_identity(device("acme", "phoenix"))
    await dynsec.ensure_identity(device("acme", "ghost"))
    for name in ("phoenix", "ghost"):  # the client went, its role stayed
        await raw_dynsec(mosquitto_tls, {"command": "deleteClient",
                                         "username": device_username("acme", name)})

    await dynsec.ensure_identity(device("acme", "phoenix"))
    with connect_device(mosquitto_tls, "acme", "phoenix") as phoenix:
        assert phoenix.publish(telemetry_topic(device_root("acme", "phoenix"))).accepted
    keep = [i for i in await dynsec.list_identities("acme")]
    await dynsec.resync("acme", keep)
    with mosquitto_tls.admin_client().connect() as admin:
        assert admin.subscribe("$CONTROL/dynamic-security/v1/response").accepted
        admin.publish("$CONTROL/dynamic-security/v1", json.dumps(
            {"commands": [{"command": "getRole", "rolename": "kubiot:acme.ghost"}]}))
        reply = admin.next_message()
        assert reply is not None
        assert json.loads(reply.payload)["responses"][0]["error"] == "Role not found"


async def test_admin_login_problems_are_typed(mosquitto_tls: TlsMosquitto) -> None:
    cfg = mosquitto_tls.config
    async with MosquittoDynsecBackend("127.0.0.1", cfg.service_port, cfg.admin_username,
                                      "wrong", timeout=2) as backend:
        with pytest.raises(BrokerAuthError):
            await backend.list_identities("acme")
        assert not (await backend.health()).ok

    async def no_wait(delay: float) -> None:
        pass

    async with MosquittoDynsecBackend(
            "127.0.0.1", free_port(), cfg.admin_username, cfg.admin_password, timeout=2,
            backoff=Backoff(attempts=2, sleep=no_wait)) as backend:
        with pytest.raises(BrokerUnavailable) as caught:
            await backend.ensure_tenant("acme")
        assert caught.value.retryable
    async with mosquitto_tls.backend() as backend:
        health = await backend.health()
        assert health.ok, health.detail
