"""Planned changes as dynamic-security commands and EMQX rule lists, and back."""

from __future__ import annotations

import json

from kubiot_contract.topics import (
    AccessRules,
    IdentityKind,
    device_access,
    device_username,
    ingest_access,
    ingest_username,
)
from kubiot_operator.brokers import (
    BrokerIdentity,
    CertificateCredential,
    PasswordCredential,
    dynsec,
    emqx,
)
from kubiot_operator.brokers.plan import ChangeEnabled, ChangeRules, CreateIdentity


def device(name: str, *, enabled: bool = True) -> BrokerIdentity:
    return BrokerIdentity(device_username("acme", name), "acme", IdentityKind.DEVICE,
                          device_access("acme", name), CertificateCredential(), enabled)


def test_create_makes_a_marked_role_and_client_in_the_tenant_group() -> None:
    role, client = dynsec.change_commands(CreateIdentity(device("d1")))
    assert role["command"] == "createRole"
    assert role["rolename"] == "kubiot:acme.d1"
    assert {a["topic"] for a in role["acls"] if a["acltype"] == "publishClientSend"} == (
        device_access("acme", "d1").publish)
    assert client["command"] == "createClient"
    assert client["roles"] == [{"rolename": "kubiot:acme.d1"}]
    assert client["groups"] == [{"groupname": "kubiot:tenant:acme"}]
    assert "password" not in client
    assert json.loads(client["textdescription"]) == {"tenant": "acme", "kind": "device",
                                                     "credential": "certificate"}


def test_a_disabled_identity_is_created_without_its_role_and_disabled() -> None:
    commands = dynsec.change_commands(CreateIdentity(device("d1", enabled=False)))
    assert commands[1]["roles"] == []
    assert commands[-1] == {"command": "disableClient", "username": "acme.d1"}


def test_disable_detaches_the_role_because_certificates_skip_the_password_check() -> None:
    commands = dynsec.change_commands(ChangeEnabled(device("d1"), False))
    assert [c["command"] for c in commands] == ["disableClient", "removeClientRole"]


def test_listing_reads_back_exactly_what_was_written() -> None:
    identity = BrokerIdentity(ingest_username("acme"), "acme", IdentityKind.INGEST,
                              ingest_access("acme"), PasswordCredential("pw"))
    role, client = dynsec.change_commands(CreateIdentity(identity))
    listed = {**client, "roles": client["roles"], "groups": client["groups"]}
    record = dynsec.parse_client(listed)
    assert record is not None
    observed = dynsec.observed_identity(record, role["acls"])
    assert observed.rules == identity.rules
    assert observed.enabled
    assert isinstance(observed.credential, PasswordCredential)
    assert observed.credential.password == ""
    assert observed.credential.fingerprint


def test_clients_without_the_mark_are_not_kubiots() -> None:
    assert dynsec.parse_client({"username": "admin", "roles": []}) is None
    assert dynsec.parse_client({"username": "x", "textname": "kubiot",
                                "textdescription": "not json"}) is None


def test_role_repair_removes_hand_added_acls_and_adds_missing_ones() -> None:
    identity = device("d1")
    written = dynsec.acls_for(identity.rules)
    tampered = [*written[1:], {"acltype": "subscribePattern", "topic": "#", "priority": 0,
                               "allow": True}]
    commands = dynsec.role_repair_commands(identity, tampered)
    assert commands == [
        {"command": "removeRoleACL", "rolename": "kubiot:acme.d1",
         "acltype": "subscribePattern", "topic": "#"},
        {"command": "addRoleACL", "rolename": "kubiot:acme.d1", **written[0]},
    ]
    assert dynsec.role_repair_commands(identity, written) == []
    recreated = dynsec.role_repair_commands(identity, None)
    assert [c["command"] for c in recreated] == ["createRole", "addClientRole"]


def test_rule_changes_become_role_acl_commands() -> None:
    grant = AccessRules(frozenset({"acme/devices/d1/x"}), frozenset())
    revoke = AccessRules(frozenset(), frozenset({"acme/devices/d1/y"}))
    commands = dynsec.change_commands(ChangeRules(device("d1"), grant, revoke))
    assert [(c["command"], c["topic"]) for c in commands] == [
        ("removeRoleACL", "acme/devices/d1/y"), ("addRoleACL", "acme/devices/d1/x")]


def test_tenant_default_deny_sits_below_identity_allows() -> None:
    role, group, link = dynsec.tenant_commands("acme", role_exists=False, group_exists=False,
                                               group_has_role=False)
    assert {(a["topic"], a["allow"]) for a in role["acls"]} == {("acme/#", False)}
    assert all(a["priority"] < 0 for a in role["acls"])
    assert group["groupname"] == link["groupname"] == "kubiot:tenant:acme"
    assert dynsec.tenant_commands("acme", role_exists=True, group_exists=True,
                                  group_has_role=True) == []


def test_emqx_rule_list_round_trip_and_disabled_marker() -> None:
    identity = device("d1", enabled=False)
    keys = emqx.rule_keys(identity.rules, identity.enabled)
    assert keys[0] == emqx.DENY_ALL
    body = emqx.rules_body(keys)
    parsed, exact = emqx.parse_rules([{**r, "qos": [0, 1, 2], "retain": "all"} for r in body])
    assert exact
    assert emqx.identity_from_rules("acme.d1", parsed, CertificateCredential()) == identity
    _, exact = emqx.parse_rules([{**body[0], "qos": [1]}])
    assert not exact
