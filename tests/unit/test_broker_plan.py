"""Planning broker changes: the fewest changes, and none when nothing differs."""

from __future__ import annotations

import pytest

from kubiot_contract.topics import (
    AccessRules,
    IdentityKind,
    device_access,
    device_username,
    gateway_access,
    gateway_username,
    ingest_access,
    ingest_username,
)
from kubiot_operator.brokers import (
    BrokerIdentity,
    CertificateCredential,
    PasswordCredential,
    password_fingerprint,
)
from kubiot_operator.brokers.plan import (
    ChangeEnabled,
    ChangePassword,
    ChangeRules,
    CreateIdentity,
    RemoveIdentity,
    describe,
    plan_identity,
    plan_tenant,
    rules_difference,
)


def device(name: str, *, enabled: bool = True, tenant: str = "acme") -> BrokerIdentity:
    return BrokerIdentity(device_username(tenant, name), tenant, IdentityKind.DEVICE,
                          device_access(tenant, name), CertificateCredential(), enabled)


def ingest(password: str, fingerprint: str | None = None) -> BrokerIdentity:
    credential = PasswordCredential(password, fingerprint or "")
    return BrokerIdentity(ingest_username("acme"), "acme", IdentityKind.INGEST,
                          ingest_access("acme"), credential)


def test_absent_identity_is_created() -> None:
    assert plan_identity(None, device("d1")) == [CreateIdentity(device("d1"))]


def test_equal_identity_needs_nothing() -> None:
    assert plan_identity(device("d1"), device("d1")) == []


def test_only_the_rule_difference_is_planned() -> None:
    old = BrokerIdentity(gateway_username("acme", "gw"), "acme", IdentityKind.GATEWAY,
                         gateway_access("acme", "gw", ["a", "b"]), CertificateCredential())
    new = BrokerIdentity(old.username, "acme", IdentityKind.GATEWAY,
                         gateway_access("acme", "gw", ["b", "c"]), CertificateCredential())
    (change,) = plan_identity(old, new)
    assert isinstance(change, ChangeRules)
    assert change.grant == device_access("acme", "c")
    assert change.revoke == device_access("acme", "a")
    assert describe(change) == f"rules of {old.username}: +9 -9"


def test_disable_comes_before_rule_changes_and_enable_after() -> None:
    narrower = BrokerIdentity(device_username("acme", "d1"), "acme", IdentityKind.DEVICE,
                              AccessRules(frozenset({"acme/devices/d1/telemetry"}), frozenset()),
                              CertificateCredential(), enabled=False)
    changes = plan_identity(device("d1"), narrower)
    assert [type(c) for c in changes] == [ChangeEnabled, ChangeRules]
    changes = plan_identity(narrower, device("d1"))
    assert [type(c) for c in changes] == [ChangeRules, ChangeEnabled]


def test_changed_kind_or_credential_recreates() -> None:
    as_password = BrokerIdentity(device_username("acme", "d1"), "acme", IdentityKind.DEVICE,
                                 device_access("acme", "d1"), PasswordCredential("x"))
    assert plan_identity(device("d1"), as_password) == [
        RemoveIdentity("acme.d1"), CreateIdentity(as_password)]


def test_password_is_set_when_its_fingerprint_differs_or_is_unknown() -> None:
    known = password_fingerprint(ingest_username("acme"), "old")
    assert plan_identity(ingest("", known), ingest("old")) == []
    assert plan_identity(ingest("", known), ingest("new")) == [ChangePassword(ingest("new"))]
    assert plan_identity(ingest(""), ingest("old")) == [ChangePassword(ingest("old"))]


def test_tenant_plan_removes_extras_and_creates_missing() -> None:
    observed = [device("d1"), device("d2"), device("extra")]
    wanted = [device("d1"), device("d2", enabled=False), device("d3")]
    changes = plan_tenant(observed, wanted)
    assert changes == [RemoveIdentity("acme.extra"), ChangeEnabled(device("d2", enabled=False),
                                                                    False),
                       CreateIdentity(device("d3"))]
    assert plan_tenant(wanted, wanted) == []


def test_an_identity_wanted_twice_is_a_mistake() -> None:
    with pytest.raises(ValueError, match="wanted twice"):
        plan_tenant([], [device("d1"), device("d1")])


def test_rules_difference_is_symmetric() -> None:
    a, b = device_access("acme", "a"), device_access("acme", "b")
    grant, revoke = rules_difference(a, b)
    assert grant == b
    assert revoke == a
    assert rules_difference(a, a) == (AccessRules(frozenset(), frozenset()),) * 2


def test_password_never_shows_in_repr() -> None:
    assert "hunter2" not in repr(ingest("hunter2"))
