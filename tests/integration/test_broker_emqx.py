"""The EMQX backend against an HTTP fake of EMQX's REST API."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

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
from kubiot_operator.contract import (
    IdentityKind,
    device_access,
    device_username,
    gateway_access,
    gateway_username,
    ingest_access,
    ingest_username,
)
from tests.support.emqx_fake import EmqxFake


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
    with pytest.raises(BrokerRejected, match="BAD_REQUEST") as caught:
        await emqx.ensure_identity(device("acme", "too-many-rules"))
    assert not caught.value.retryable
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
