"""The EMQX backend against an HTTP fake of EMQX's REST API."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kubiot_contract.topics import (
    IdentityKind,
    device_access,
    device_username,
    gateway_access,
    gateway_username,
    ingest_access,
    ingest_username,
)
from kubiot_operator.brokers import (
    Backoff,
    BrokerAuthError,
    BrokerIdentity,
    BrokerRejected,
    BrokerUnavailable,
    CertificateCredential,
    CircuitBreaker,
    CircuitOpen,
    PasswordCredential,
)
from kubiot_operator.brokers.emqx import RULES_PATH, EmqxBackend
from kubiot_operator.brokers.errors import (
    BrokerIdentitiesRefused,
    BrokerNotConfigured,
    BrokerRuleLimit,
)
from tests.support.emqx_fake import AUTHENTICATOR_ID, EmqxFake

DOCS = Path(__file__).resolve().parents[2] / "docs" / "brokers.md"


class Sleeps:
    """An injected sleep that records instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def emqx(emqx_fake: EmqxFake, sleeps: Sleeps, clock: FakeClock
               ) -> AsyncIterator[EmqxBackend]:
    async with EmqxBackend(
        emqx_fake.url, emqx_fake.api_key, emqx_fake.api_secret, page_size=100,
        backoff=Backoff(attempts=4, sleep=sleeps, random=lambda: 0.5),
        breaker=CircuitBreaker(threshold=5, cool_down=30, clock=clock),
    ) as backend:
        yield backend


def device(tenant: str, name: str, *, enabled: bool = True) -> BrokerIdentity:
    return BrokerIdentity(device_username(tenant, name), tenant, IdentityKind.DEVICE,
                          device_access(tenant, name), CertificateCredential(), enabled)


def gateway(tenant: str, name: str, children: list[str], *,
            enabled: bool = True) -> BrokerIdentity:
    return BrokerIdentity(gateway_username(tenant, name), tenant, IdentityKind.GATEWAY,
                          gateway_access(tenant, name, children), CertificateCredential(),
                          enabled)


def ingest(tenant: str, password: str = "pw") -> BrokerIdentity:
    return BrokerIdentity(ingest_username(tenant), tenant, IdentityKind.INGEST,
                          ingest_access(tenant), PasswordCredential(password))


def children(count: int, first: int = 0) -> list[str]:
    return [f"c{i:02}" for i in range(first, first + count)]


def allowed(fake: EmqxFake, username: str) -> set[tuple[str, str]]:
    return {(r["action"], r["topic"]) for r in fake.rules[username]
            if r["permission"] == "allow"}


async def test_create_then_nothing_to_do(emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    result = await emqx.ensure_identity(device("acme", "meter-1"))

    assert result.writes == 1
    rules = device_access("acme", "meter-1")
    assert allowed(emqx_fake, "acme.meter-1") == (
        {("publish", t) for t in rules.publish} | {("subscribe", t) for t in rules.subscribe})
    assert (await emqx.ensure_identity(device("acme", "meter-1"))).writes == 0
    assert await emqx.list_identities("acme") == [device("acme", "meter-1")]
    assert (await emqx.health()).ok


async def test_password_identity_gets_an_authentication_user(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    ingest = BrokerIdentity(ingest_username("acme"), "acme", IdentityKind.INGEST,
                            ingest_access("acme"), PasswordCredential("s3cret"))
    await emqx.ensure_identity(ingest)
    assert emqx_fake.users["acme.svc.ingest"] == {"password": "s3cret", "is_superuser": False}
    assert (await emqx.ensure_identity(ingest)).writes == 0

    rotated = BrokerIdentity(ingest.username, "acme", IdentityKind.INGEST,
                             ingest_access("acme"), PasswordCredential("n3w"))
    assert (await emqx.ensure_identity(rotated)).writes == 1
    assert emqx_fake.users["acme.svc.ingest"]["password"] == "n3w"
    assert "s3cret" not in repr(ingest)


async def test_update_replaces_the_rule_list_in_one_write(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    username = gateway_username("acme", "edge")
    await emqx.ensure_identity(BrokerIdentity(username, "acme", IdentityKind.GATEWAY,
                                              gateway_access("acme", "edge", ["a"]),
                                              CertificateCredential()))
    before = len(emqx_fake.writes())
    result = await emqx.ensure_identity(BrokerIdentity(
        username, "acme", IdentityKind.GATEWAY, gateway_access("acme", "edge", ["a", "b"]),
        CertificateCredential()))
    assert result.writes == 1
    (put,) = emqx_fake.writes()[before:]
    assert (put.method, put.path) == ("PUT", f"/api/v5{RULES_PATH}/{username}")
    assert ("publish", "acme/devices/b/telemetry") in allowed(emqx_fake, username)


async def test_delete_removes_rules_user_and_sessions(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    ingest = BrokerIdentity(ingest_username("acme"), "acme", IdentityKind.INGEST,
                            ingest_access("acme"), PasswordCredential("pw"))
    await emqx.ensure_identity(ingest)
    emqx_fake.connect_client("ingest-0", ingest.username)
    emqx_fake.connect_client("someone-else", "acme.other")

    await emqx.remove_identity(ingest.username)

    assert ingest.username not in emqx_fake.rules
    assert ingest.username not in emqx_fake.users
    assert emqx_fake.clients == {"someone-else": "acme.other"}
    assert (await emqx.remove_identity(ingest.username)).writes == 0


async def test_disable_kicks_the_live_session_and_denies_everything(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    await emqx.ensure_identity(device("acme", "valve"))
    emqx_fake.connect_client("valve-session", "acme.valve")

    result = await emqx.set_enabled("acme.valve", False)

    assert result.writes == 2  # the rule list, then the kick
    assert emqx_fake.clients == {}
    first = emqx_fake.rules["acme.valve"][0]
    assert (first["permission"], first["action"], first["topic"]) == ("deny", "all", "#")
    listed = await emqx.list_identities("acme")
    assert listed == [device("acme", "valve", enabled=False)]
    assert (await emqx.set_enabled("acme.valve", False)).writes == 0
    await emqx.set_enabled("acme.valve", True)
    assert emqx_fake.rules["acme.valve"][0]["permission"] == "allow"


async def test_resync_paginates_batches_and_leaves_foreign_users_alone(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    emqx_fake.rules["dashboard-admin"] = [
        {"topic": "#", "permission": "allow", "action": "all", "qos": [0, 1, 2],
         "retain": "all"}]
    emqx_fake.rules["globex.meter"] = []
    wanted = [device("acme", f"d{i:03}") for i in range(250)]

    result = await emqx.resync("acme", wanted)

    assert result.writes == 3  # 250 rule lists in POSTs of 100
    assert len(await emqx.list_identities("acme")) == 250
    pages = [r.query["page"] for r in emqx_fake.requests
             if r.method == "GET" and r.path.endswith("/rules/users")]
    assert pages[-3:] == ["1", "2", "3"]
    writes = len(emqx_fake.writes())
    assert (await emqx.resync("acme", wanted)).writes == 0
    assert len(emqx_fake.writes()) == writes

    result = await emqx.resync("acme", wanted[:200])
    assert result.writes == 50
    assert "dashboard-admin" in emqx_fake.rules
    assert "globex.meter" in emqx_fake.rules
    await emqx.remove_tenant("acme")
    assert set(emqx_fake.rules) == {"dashboard-admin", "globex.meter"}


async def test_resync_repairs_hand_edited_rules(emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    wanted = [device("acme", "m1"), device("acme", "m2")]
    await emqx.resync("acme", wanted)
    emqx_fake.rules["acme.m1"].insert(0, {"topic": "#", "permission": "allow",
                                          "action": "all", "qos": [0, 1, 2], "retain": "all"})
    del emqx_fake.rules["acme.m2"][0]

    result = await emqx.resync("acme", wanted)

    assert result.writes == 2
    assert ("all", "#") not in allowed(emqx_fake, "acme.m1")
    assert (await emqx.list_identities("acme")) == wanted
    assert (await emqx.resync("acme", wanted)).writes == 0


async def test_retries_429_and_5xx_with_backoff(emqx: EmqxBackend, emqx_fake: EmqxFake,
                                                sleeps: Sleeps) -> None:
    emqx_fake.fail_next(1, 429, "TOO_MANY_REQUESTS", "Rate limited")
    emqx_fake.fail_next(2, 503)

    await emqx.ensure_identity(device("acme", "patient"))

    assert "acme.patient" in emqx_fake.rules
    assert sleeps.delays == [pytest.approx(0.15), pytest.approx(0.3), pytest.approx(0.6)]


async def test_gives_up_after_the_last_attempt(emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    emqx_fake.fail_next(4, 500, "INTERNAL_ERROR", "boom")
    with pytest.raises(BrokerUnavailable, match="INTERNAL_ERROR") as caught:
        await emqx.ensure_identity(device("acme", "unlucky"))
    assert caught.value.retryable
    assert caught.value.reason == "BrokerUnavailable"


async def test_rejections_are_not_retried(emqx: EmqxBackend, emqx_fake: EmqxFake,
                                          sleeps: Sleeps) -> None:
    emqx_fake.max_rules = 3
    emqx_fake.fail_next(1, 400, "BAD_REQUEST", "Bad username or bad rule schema")
    with pytest.raises(BrokerRejected, match="Bad username") as caught:
        await emqx.ensure_identity(device("acme", "refused"))
    assert not caught.value.retryable
    assert (caught.value.status, caught.value.code) == (400, "BAD_REQUEST")
    assert sleeps.delays == []


async def test_wrong_api_secret_is_an_auth_error(emqx_fake: EmqxFake) -> None:
    async with EmqxBackend(emqx_fake.url, emqx_fake.api_key, "wrong") as backend:
        with pytest.raises(BrokerAuthError, match="BAD_API_KEY_OR_SECRET"):
            await backend.list_identities("acme")
        health = await backend.health()
    assert not health.ok
    assert "BrokerAuthenticationFailed" in health.detail


async def test_circuit_opens_fails_fast_then_lets_a_trial_through(
        emqx_fake: EmqxFake, clock: FakeClock, sleeps: Sleeps) -> None:
    breaker = CircuitBreaker(threshold=3, cool_down=30, clock=clock)
    async with EmqxBackend(emqx_fake.url, emqx_fake.api_key, emqx_fake.api_secret,
                           backoff=Backoff(attempts=1, sleep=sleeps),
                           breaker=breaker) as backend:
        emqx_fake.fail_next(3, 502, "BAD_GATEWAY", "down")
        for _ in range(3):
            with pytest.raises(BrokerUnavailable):
                await backend.remove_identity("acme.gone")  # one request each
        seen = len(emqx_fake.requests)

        with pytest.raises(CircuitOpen) as caught:
            await backend.remove_identity("acme.gone")
        assert caught.value.retryable
        assert len(emqx_fake.requests) == seen  # failed fast: nothing was sent

        clock.now += 31
        assert (await backend.remove_identity("acme.gone")).writes == 0
        assert not breaker.open


async def test_a_user_left_without_rules_is_found_and_cleaned_up(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    emqx_fake.users["acme.svc.ingest"] = {"password": "old", "is_superuser": False}
    emqx_fake.users["admin"] = {"password": "x", "is_superuser": True}

    assert [i.username for i in await emqx.list_identities("acme")] == ["acme.svc.ingest"]
    await emqx.resync("acme", [])

    assert set(emqx_fake.users) == {"admin"}


# --- max_rules ------------------------------------------------------------------------------------

async def test_a_gateway_over_max_rules_is_refused_while_the_rest_of_the_tenant_syncs(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    big = gateway("acme", "edge", children(11))  # 9 + 11 * 9 = 108 rules, EMQX keeps 100
    wanted = [device("acme", f"d{i}") for i in range(5)] + [big]

    with pytest.raises(BrokerIdentitiesRefused) as caught:
        await emqx.resync("acme", wanted)

    assert caught.value.reason == "BrokerRuleLimit"
    refusal = caught.value.refused[big.username]
    assert isinstance(refusal, BrokerRuleLimit)
    assert (refusal.username, refusal.rules, refusal.max_rules) == (big.username, 108, 100)
    assert caught.value.applied.writes == 1  # the five devices in one batch
    assert set(emqx_fake.rules) == {f"acme.d{i}" for i in range(5)}
    assert [r.method for r in emqx_fake.writes()] == ["POST"]


async def test_an_oversized_gateway_gets_a_rule_limit_error_and_nothing_new(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    with pytest.raises(BrokerRuleLimit) as caught:
        await emqx.ensure_identity(gateway("acme", "edge", children(11)))

    assert caught.value.reason == "BrokerRuleLimit"
    assert "108" in str(caught.value) and "max_rules" in str(caught.value)
    assert emqx_fake.writes() == []


async def test_a_gateway_growing_over_the_limit_keeps_only_what_it_still_may(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    await emqx.ensure_identity(gateway("acme", "edge", children(10)))  # 99 rules
    emqx_fake.connect("edge-session", username="acme.gw.edge", peer_cert_cn="acme.gw.edge")

    with pytest.raises(BrokerRuleLimit):  # c00 leaves, c10 and c11 come: 108 rules
        await emqx.ensure_identity(gateway("acme", "edge", children(11, first=1)))

    topics = {t for _, t in allowed(emqx_fake, "acme.gw.edge")}
    assert not any("/c00/" in t for t in topics)
    assert not any("/c10/" in t or "/c11/" in t for t in topics)
    assert any("/c01/" in t for t in topics)
    assert emqx_fake.clients == {}  # it lost an allow: its subscriptions must go too
    writes = len(emqx_fake.writes())
    with pytest.raises(BrokerRuleLimit):
        await emqx.ensure_identity(gateway("acme", "edge", children(11, first=1)))
    assert len(emqx_fake.writes()) == writes  # refused again, nothing rewritten


async def test_a_disabled_gateway_over_the_limit_is_cut_short_behind_its_deny_all(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    suspended = gateway("acme", "edge", children(11), enabled=False)

    await emqx.resync("acme", [suspended])  # nothing is granted, so nothing is refused

    first, *rest = emqx_fake.rules["acme.gw.edge"]
    assert (first["permission"], first["action"], first["topic"]) == ("deny", "all", "#")
    assert len(rest) == 99
    assert (await emqx.resync("acme", [suspended])).writes == 0


async def test_a_batch_refused_with_400_falls_back_to_one_write_per_identity(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    wanted = [device("acme", f"d{i}") for i in range(3)]
    emqx_fake.fail_next(1, 400, "BAD_REQUEST", "Bad username or bad rule schema", method="POST")

    result = await emqx.resync("acme", wanted)

    assert set(emqx_fake.rules) == {"acme.d0", "acme.d1", "acme.d2"}
    assert result.writes == 4  # the refused batch, then one POST each
    assert (await emqx.resync("acme", wanted)).writes == 0


async def test_a_lowered_limit_is_read_again_when_emqx_refuses(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    await emqx.resync("acme", [device("acme", "d0")])  # reads max_rules = 100
    emqx_fake.max_rules = 10  # the admin lowers it; a device needs 9 enabled, 10 disabled

    with pytest.raises(BrokerIdentitiesRefused) as caught:
        await emqx.resync("acme", [device("acme", "d0"), gateway("acme", "edge", children(1)),
                                   device("acme", "d1")])

    assert caught.value.reason == "BrokerRuleLimit"
    assert list(caught.value.refused) == ["acme.gw.edge"]
    assert set(emqx_fake.rules) == {"acme.d0", "acme.d1"}

    emqx_fake.max_rules = 5
    with pytest.raises(BrokerRuleLimit) as refused:
        await emqx.ensure_identity(device("acme", "d2"))
    assert refused.value.max_rules == 5


async def test_disables_and_kicks_come_before_creates(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    await emqx.resync("acme", [device("acme", "valve")])
    emqx_fake.connect("valve-session", username="acme.valve", peer_cert_cn="acme.valve")
    emqx_fake.fail_next(4, 503, method="POST")  # creating the new device fails for good

    with pytest.raises(BrokerUnavailable):
        await emqx.resync("acme", [device("acme", "valve", enabled=False),
                                   device("acme", "new")])

    assert emqx_fake.rules["acme.valve"][0]["permission"] == "deny"
    assert emqx_fake.clients == {}


# --- narrowing ------------------------------------------------------------------------------------

async def test_a_gateway_losing_a_child_loses_its_live_subscriptions(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    await emqx.ensure_identity(gateway("acme", "edge", ["a", "b"]))
    session = emqx_fake.connect("edge", username="acme.gw.edge", peer_cert_cn="acme.gw.edge")
    session.subscribe("acme/devices/b/cmd/+")

    result = await emqx.ensure_identity(gateway("acme", "edge", ["a"]))

    assert result.writes == 2  # the rule list, then the kick
    assert not session.connected
    # EMQX checked the subscription when it was made: only a new connection is checked again.


async def test_a_gateway_gaining_a_child_keeps_its_session(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    await emqx.ensure_identity(gateway("acme", "edge", ["a"]))
    session = emqx_fake.connect("edge", username="acme.gw.edge", peer_cert_cn="acme.gw.edge")

    assert (await emqx.ensure_identity(gateway("acme", "edge", ["a", "b"]))).writes == 1
    assert session.connected


async def test_a_hand_added_allow_is_repaired_and_its_sessions_kicked(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    await emqx.resync("acme", [device("acme", "m1")])
    emqx_fake.rules["acme.m1"].append({"topic": "#", "permission": "allow", "action": "all",
                                       "qos": [0, 1, 2], "retain": "all"})
    session = emqx_fake.connect("m1", username="acme.m1", peer_cert_cn="acme.m1")
    session.subscribe("#")

    assert (await emqx.resync("acme", [device("acme", "m1")])).writes == 2
    assert not session.connected


# --- a broker configured without the parts kubiot writes to ---------------------------------------

@pytest.mark.parametrize("authenticators", [[], ["jwt"]], ids=["no-chain", "other-only"])
async def test_a_certificate_only_broker_syncs_tenants_without_passwords(
        emqx: EmqxBackend, emqx_fake: EmqxFake, authenticators: list[str]) -> None:
    emqx_fake.authenticators = authenticators
    wanted = [device("acme", "d0"), gateway("acme", "edge", ["d0"])]

    await emqx.resync("acme", wanted)

    assert await emqx.list_identities("acme") == sorted(wanted, key=lambda i: i.username)
    assert (await emqx.resync("acme", wanted)).writes == 0
    await emqx.set_enabled("acme.d0", False)
    await emqx.remove_identity("acme.d0")
    await emqx.remove_tenant("acme")
    assert emqx_fake.rules == {}


@pytest.mark.parametrize("authenticators", [[], ["jwt"]], ids=["no-chain", "other-only"])
async def test_a_password_identity_without_the_authenticator_is_a_clear_error(
        emqx: EmqxBackend, emqx_fake: EmqxFake, authenticators: list[str]) -> None:
    emqx_fake.authenticators = authenticators

    with pytest.raises(BrokerNotConfigured) as caught:
        await emqx.ensure_identity(ingest("acme"))
    assert caught.value.reason == "BrokerAuthenticatorMissing"
    assert AUTHENTICATOR_ID in str(caught.value)

    with pytest.raises(BrokerIdentitiesRefused) as refused:
        await emqx.resync("acme", [device("acme", "d0"), ingest("acme")])
    assert refused.value.reason == "BrokerAuthenticatorMissing"
    assert "acme.d0" in emqx_fake.rules


async def test_a_missing_authorization_source_is_not_a_missing_identity(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    await emqx.ensure_identity(device("acme", "valve"))
    emqx_fake.source_configured = False

    for call in (emqx.set_enabled("acme.valve", False), emqx.remove_identity("acme.valve"),
                 emqx.ensure_identity(device("acme", "valve")), emqx.list_identities("acme"),
                 emqx.resync("acme", [])):
        with pytest.raises(BrokerNotConfigured) as caught:
            await call
        assert caught.value.reason == "BrokerAuthorizationSourceMissing"
        assert (caught.value.status, caught.value.code) == (404, "NOT_FOUND")
    health = await emqx.health()
    assert not health.ok and "BrokerAuthorizationSourceMissing" in health.detail


# --- codes and pages ------------------------------------------------------------------------------

async def test_a_create_that_finds_the_identity_there_matches_emqxs_code(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    # Another operator replica created it between the look and the write.
    emqx_fake.fail_next(1, 409, "ALREADY_EXISTS", "User 'acme.d0' already exist", method="POST")

    assert (await emqx.ensure_identity(device("acme", "d0"))).writes == 2  # POST, then PUT
    assert "acme.d0" in emqx_fake.rules


async def test_fuzzy_lists_carry_no_count_and_a_full_last_page_says_hasnext(
        emqx: EmqxBackend, emqx_fake: EmqxFake) -> None:
    wanted = [device("acme", f"d{i:03}") for i in range(200)]
    await emqx.resync("acme", wanted)
    emqx_fake.requests.clear()

    assert len(await emqx.list_identities("acme")) == 200

    pages = [r.query["page"] for r in emqx_fake.requests if r.path.endswith("/rules/users")]
    assert pages == ["1", "2", "3"]  # page 2 was full, so EMQX said there might be more


def test_every_refusal_reason_is_documented() -> None:
    documented = DOCS.read_text()
    for reason in ("BrokerRuleLimit", "BrokerAuthenticatorMissing",
                   "BrokerAuthorizationSourceMissing", "BrokerSessionsNotBound",
                   "BrokerRejected", "BrokerUnavailable", "BrokerAuthenticationFailed"):
        assert re.search(rf"`{reason}`", documented), reason
    assert "5.8" in documented
