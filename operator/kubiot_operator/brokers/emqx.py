"""EMQX 5 backend over its REST API (`/api/v5`), authenticated with an API key and secret.

Rules live in the built-in database authorization source, one rule list per username; password
identities also get a user in the built-in database authenticator. kubiot owns exactly the
usernames the topic contract can produce for a tenant (`{tenant}.{device}`, `{tenant}.gw.*`,
`{tenant}.svc.ingest`); the admin's other users are never read as kubiot's nor touched.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from kubiot_operator.contract import AccessRules, ContractError, parse_username

from .base import (
    NOTHING_DONE,
    BrokerHealth,
    BrokerIdentity,
    CertificateCredential,
    Credential,
    PasswordCredential,
    SyncResult,
    password_fingerprint,
)
from .errors import BrokerAuthError, BrokerError, BrokerRejected, BrokerUnavailable
from .plan import (
    Change,
    ChangeEnabled,
    ChangePassword,
    ChangeRules,
    CreateIdentity,
    RemoveIdentity,
    describe,
    plan_identity,
    plan_tenant,
)
from .retry import Backoff, CircuitBreaker

Rule = dict[str, Any]
RULES_PATH = "/authorization/sources/built_in_database/rules/users"
#: Rules kubiot writes: (permission, action, topic). qos and retain keep EMQX's defaults.
_RuleKey = tuple[str, str, str]
#: Put first in a disabled identity's list: EMQX stops at the first matching rule.
DENY_ALL: _RuleKey = ("deny", "all", "#")
#: Zone settings without which a device could choose another identity's client id and resume
#: or end its session: over TLS the certificate's CN must be both username and client id.
SESSION_BINDING: dict[str, str] = {"peer_cert_as_username": "cn", "peer_cert_as_clientid": "cn"}


# --- pure translation -----------------------------------------------------------------------------

def rule_keys(rules: AccessRules, enabled: bool) -> list[_RuleKey]:
    """The rule list kubiot keeps for an identity, in order."""
    keys = [DENY_ALL] if not enabled else []
    keys += [("allow", "publish", t) for t in sorted(rules.publish)]
    keys += [("allow", "subscribe", t) for t in sorted(rules.subscribe)]
    return keys


def rules_body(keys: Iterable[_RuleKey]) -> list[Rule]:
    return [{"permission": p, "action": a, "topic": t} for p, a, t in keys]


def parse_rules(rules: Iterable[Mapping[str, Any]]) -> tuple[list[_RuleKey], bool]:
    """(rule keys, exact): exact when every rule is one kubiot could have written as is."""
    keys, exact = [], True
    for rule in rules:
        key = (str(rule.get("permission")), str(rule.get("action")), str(rule.get("topic")))
        qos, retain = rule.get("qos", [0, 1, 2]), rule.get("retain", "all")
        if sorted(qos) != [0, 1, 2] or retain != "all":
            exact = False
        keys.append(key)
    return keys, exact


def identity_from_rules(username: str, keys: Sequence[_RuleKey],
                        credential: Credential) -> BrokerIdentity:
    owner = parse_username(username)
    enabled = not keys or keys[0] != DENY_ALL
    publish = {t for p, a, t in keys if p == "allow" and a == "publish"}
    subscribe = {t for p, a, t in keys if p == "allow" and a == "subscribe"}
    return BrokerIdentity(username, owner.tenant, owner.kind,
                          AccessRules(frozenset(publish), frozenset(subscribe)), credential,
                          enabled)


def session_binding_gaps(global_zone: Any) -> list[str]:
    """The `mqtt.*` settings of EMQX's global zone that differ from SESSION_BINDING."""
    mqtt = global_zone.get("mqtt") if isinstance(global_zone, dict) else None
    mqtt = mqtt if isinstance(mqtt, dict) else {}
    return [f"mqtt.{key} = {value} (is {mqtt.get(key, 'unset')})"
            for key, value in SESSION_BINDING.items() if mqtt.get(key) != value]


def error_of(status: int, body: Any) -> tuple[str, str]:
    """(code, message) of an EMQX error body `{"code": ..., "message": ...}`."""
    if isinstance(body, dict):
        return str(body.get("code", status)), str(body.get("message", ""))
    return str(status), str(body)[:200]


def raise_for(status: int, body: Any, what: str) -> None:
    """Map an HTTP failure to the broker error the operator understands."""
    code, message = error_of(status, body)
    text = f"{what}: HTTP {status} {code} {message}".strip()
    if status == 401:
        raise BrokerAuthError(text)
    if status == 429 or status >= 500:
        raise BrokerUnavailable(text)
    raise BrokerRejected(text, reason="BrokerRejected")


# --- the backend ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Observed:
    identity: BrokerIdentity
    keys: list[_RuleKey]
    exact: bool


class EmqxBackend:
    """Broker access control through EMQX 5's REST API."""

    def __init__(self, base_url: str, api_key: str, api_secret: str, *,
                 authenticator_id: str = "password_based:built_in_database",
                 timeout: float = 10.0, page_size: int = 100, create_batch: int = 100,
                 backoff: Backoff | None = None, breaker: CircuitBreaker | None = None,
                 session: aiohttp.ClientSession | None = None) -> None:
        self._api = base_url.rstrip("/") + "/api/v5"
        credentials = base64.b64encode(f"{api_key}:{api_secret}".encode()).decode()
        self._headers = {"Authorization": f"Basic {credentials}", "Accept": "application/json"}
        self._authenticator = quote(authenticator_id, safe="")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._page_size, self._create_batch = page_size, create_batch
        self._backoff = backoff or Backoff()
        self._breaker = breaker or CircuitBreaker()
        self._session = session
        self._own_session = session is None
        # EMQX never shows a stored password: remember what this process set, so a resync
        # rewrites a password once after a restart and never again.
        self._fingerprints: dict[str, str] = {}
        self._sessions_bound = False
        #: HTTP requests that changed something: for tests and metrics.
        self.writes_sent = 0

    async def __aenter__(self) -> EmqxBackend:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    # --- HTTP ---------------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
            self._own_session = True
        return self._session

    async def _request(self, method: str, path: str, *, body: Any = None,
                       params: Mapping[str, str | int] | None = None,
                       missing_ok: bool = False) -> tuple[int, Any]:
        """One call with retries and the circuit breaker; 404 passes when `missing_ok`."""
        what = f"{method} {path}"

        async def once() -> tuple[int, Any]:
            try:
                async with self._client().request(
                        method, self._api + path, json=body, params=params,
                        headers=self._headers) as response:
                    payload: Any = None
                    if response.status != 204:
                        try:
                            payload = await response.json(content_type=None)
                        except ValueError:
                            payload = await response.text()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise BrokerUnavailable(f"{what}: {exc!r}") from exc
            if status == 404 and missing_ok:
                return status, payload
            if status >= 400:
                raise_for(status, payload, what)
            return status, payload

        if method != "GET":
            self.writes_sent += 1
        return await self._backoff.run(lambda: self._breaker.call(once))

    async def _pages(self, path: str, params: Mapping[str, str | int] | None = None
                     ) -> list[dict[str, Any]]:
        """Every item of a paginated list (`data` + `meta.hasnext`)."""
        items: list[dict[str, Any]] = []
        page = 1
        while True:
            query = {**(params or {}), "page": page, "limit": self._page_size}
            _, body = await self._request("GET", path, params=query)
            items += body.get("data", [])
            meta = body.get("meta", {})
            if not meta.get("hasnext", False):
                return items
            page += 1

    # --- reading ------------------------------------------------------------------------------

    async def _password_users(self, tenant: str) -> set[str]:
        users = await self._pages(f"/authentication/{self._authenticator}/users",
                                  {"like_user_id": f"{tenant}."})
        return {u["user_id"] for u in users if _owned_by(u.get("user_id", ""), tenant)}

    def _credential(self, username: str, has_password: bool) -> Credential:
        if has_password:
            return PasswordCredential("", self._fingerprints.get(username, ""))
        return CertificateCredential()

    async def _observe_tenant(self, tenant: str) -> dict[str, _Observed]:
        entries, passwords = await asyncio.gather(
            self._pages(RULES_PATH, {"like_username": f"{tenant}."}),
            self._password_users(tenant))
        observed = {}
        for entry in entries:
            username = entry.get("username", "")
            if not _owned_by(username, tenant):
                continue
            keys, exact = parse_rules(entry.get("rules", []))
            identity = identity_from_rules(username, keys,
                                           self._credential(username, username in passwords))
            observed[username] = _Observed(identity, keys, exact)
        # A user without rules is what a half-finished create or removal leaves behind.
        for username in sorted(passwords - observed.keys()):
            identity = identity_from_rules(username, [], self._credential(username, True))
            observed[username] = _Observed(identity, [], True)
        return observed

    async def _observe(self, username: str) -> _Observed | None:
        """One identity: its rule list and whether it has an authentication user."""
        status, body = await self._request("GET", f"{RULES_PATH}/{quote(username, safe='')}",
                                           missing_ok=True)
        status_user, _ = await self._request(
            "GET", f"/authentication/{self._authenticator}/users/{quote(username, safe='')}",
            missing_ok=True)
        if status == 404 and status_user == 404:
            return None
        # A user without rules is what a half-finished create or removal leaves behind.
        keys, exact = parse_rules(body.get("rules", []) if status != 404 else [])
        identity = identity_from_rules(username, keys,
                                       self._credential(username, status_user != 404))
        return _Observed(identity, keys, exact)

    # --- writing ------------------------------------------------------------------------------

    async def _kick(self, username: str) -> int:
        """End every live session of the username; returns the number of kicks sent."""
        clients = await self._pages("/clients", {"username": username})
        for client in clients:
            await self._request("DELETE", f"/clients/{quote(client['clientid'], safe='')}",
                                missing_ok=True)
        return len(clients)

    async def _put_rules(self, identity: BrokerIdentity) -> None:
        keys = rule_keys(identity.rules, identity.enabled)
        await self._request("PUT", f"{RULES_PATH}/{quote(identity.username, safe='')}",
                            body={"username": identity.username, "rules": rules_body(keys)})

    async def _set_password(self, identity: BrokerIdentity, *, create: bool) -> None:
        assert isinstance(identity.credential, PasswordCredential)
        password = identity.credential.password
        users = f"/authentication/{self._authenticator}/users"
        if create:
            try:
                await self._request("POST", users, body={
                    "user_id": identity.username, "password": password, "is_superuser": False})
            except BrokerRejected as exc:
                if "ALREADY_EXISTS" not in str(exc):
                    raise
                create = False
        if not create:
            await self._request("PUT", f"{users}/{quote(identity.username, safe='')}",
                                body={"password": password, "is_superuser": False})
        self._fingerprints[identity.username] = password_fingerprint(identity.username,
                                                                     password)

    async def _create(self, identities: Sequence[BrokerIdentity]) -> None:
        """Create rule lists many at a time; a batch that clashes falls back to PUTs."""
        for start in range(0, len(identities), self._create_batch):
            batch = identities[start:start + self._create_batch]
            body = [{"username": i.username,
                     "rules": rules_body(rule_keys(i.rules, i.enabled))} for i in batch]
            try:
                await self._request("POST", RULES_PATH, body=body)
            except BrokerRejected as exc:
                if "ALREADY_EXISTS" not in str(exc):
                    raise
                for identity in batch:
                    await self._put_rules(identity)
        for identity in identities:
            if isinstance(identity.credential, PasswordCredential):
                await self._set_password(identity, create=True)

    async def _remove(self, username: str, has_password: bool) -> None:
        await self._request("DELETE", f"{RULES_PATH}/{quote(username, safe='')}",
                            missing_ok=True)
        if has_password:
            await self._request(
                "DELETE",
                f"/authentication/{self._authenticator}/users/{quote(username, safe='')}",
                missing_ok=True)
            self._fingerprints.pop(username, None)
        await self._kick(username)

    async def _apply(self, changes: Sequence[Change],
                     observed: Mapping[str, _Observed]) -> SyncResult:
        before = self.writes_sent
        creates = [c.identity for c in changes if isinstance(c, CreateIdentity)]
        # PUT replaces the whole rule list: one write covers rules and enabled together.
        rewrite: dict[str, BrokerIdentity] = {}
        kick: set[str] = set()
        passwords: list[BrokerIdentity] = []
        for change in changes:
            match change:
                case RemoveIdentity(username):
                    seen = observed.get(username)
                    await self._remove(username, seen is not None and isinstance(
                        seen.identity.credential, PasswordCredential))
                case ChangeRules(identity) | ChangeEnabled(identity):
                    rewrite[identity.username] = identity
                    if not identity.enabled:
                        kick.add(identity.username)
                case ChangePassword(identity):
                    passwords.append(identity)
        await self._create(creates)
        for identity in rewrite.values():
            await self._put_rules(identity)
        for identity in passwords:
            await self._set_password(identity, create=False)
        for username in sorted(kick):
            # The authorization cache of a live session would keep old answers: end it.
            await self._kick(username)
        return SyncResult(self.writes_sent - before, tuple(describe(c) for c in changes))

    def _repairs(self, wanted: Iterable[BrokerIdentity], changes: Sequence[Change],
                 observed: Mapping[str, _Observed]) -> list[Change]:
        """Rewrite rule lists that hold what kubiot never writes (order, qos, denies)."""
        touched = {c.identity.username for c in changes
                   if isinstance(c, ChangeRules | ChangeEnabled | CreateIdentity)}
        touched |= {c.username for c in changes if isinstance(c, RemoveIdentity)}
        repairs: list[Change] = []
        for identity in wanted:
            seen = observed.get(identity.username)
            if seen is None or identity.username in touched:
                continue
            if not seen.exact or seen.keys != rule_keys(identity.rules, identity.enabled):
                repairs.append(ChangeRules(identity, identity.rules, identity.rules))
        return repairs

    # --- the backend interface ----------------------------------------------------------------

    async def health(self) -> BrokerHealth:
        try:
            _, body = await self._request("GET", "/authorization/sources/built_in_database")
        except BrokerError as exc:
            return BrokerHealth(False, f"{exc.reason}: {exc}")
        if isinstance(body, dict) and body.get("enable") is False:
            return BrokerHealth(False, "the built_in_database authorization source is disabled")
        try:
            await self._require_session_binding()
        except BrokerError as exc:
            return BrokerHealth(False, str(exc))
        return BrokerHealth(True, f"EMQX REST API answers at {self._api}")

    async def _require_session_binding(self) -> None:
        """Refuse a broker that lets devices choose their client id (checked until it holds)."""
        if self._sessions_bound:
            return
        _, body = await self._request("GET", "/configs/global_zone")
        gaps = session_binding_gaps(body)
        if gaps:
            raise BrokerRejected(
                "EMQX lets devices choose their MQTT client id, so one device could take over "
                "another identity's session; set in its configuration: " + ", ".join(gaps),
                reason="BrokerSessionsNotBound")
        self._sessions_bound = True

    async def ensure_tenant(self, tenant: str) -> SyncResult:
        # EMQX has no per-tenant object: `authorization.no_match = deny` is the default deny.
        parse_username(f"{tenant}.svc.ingest")  # validates the tenant name
        await self._require_session_binding()
        return NOTHING_DONE

    async def ensure_identity(self, identity: BrokerIdentity) -> SyncResult:
        seen = await self._observe(identity.username)
        observed = {identity.username: seen} if seen else {}
        changes = plan_identity(seen.identity if seen else None, identity)
        changes += self._repairs([identity], changes, observed)
        return await self._apply(changes, observed)

    async def set_enabled(self, username: str, enabled: bool) -> SyncResult:
        seen = await self._observe(username)
        if seen is None:
            if enabled:
                raise BrokerRejected(f"{username} has no broker identity to enable",
                                     reason="BrokerIdentityMissing")
            return NOTHING_DONE
        if seen.identity.enabled == enabled:
            return NOTHING_DONE
        wanted = BrokerIdentity(username, seen.identity.tenant, seen.identity.kind,
                                seen.identity.rules, seen.identity.credential, enabled)
        return await self._apply([ChangeEnabled(wanted, enabled)], {username: seen})

    async def remove_identity(self, username: str) -> SyncResult:
        seen = await self._observe(username)
        if seen is None:
            return NOTHING_DONE
        return await self._apply([RemoveIdentity(username)], {username: seen})

    async def remove_tenant(self, tenant: str) -> SyncResult:
        observed = await self._observe_tenant(tenant)
        return await self._apply([RemoveIdentity(u) for u in sorted(observed)], observed)

    async def list_identities(self, tenant: str) -> list[BrokerIdentity]:
        observed = await self._observe_tenant(tenant)
        return [observed[u].identity for u in sorted(observed)]

    async def resync(self, tenant: str, wanted: Iterable[BrokerIdentity]) -> SyncResult:
        wanted = list(wanted)
        foreign = [w.username for w in wanted if w.tenant != tenant]
        if foreign:
            raise ValueError(f"identities of another tenant in a resync of {tenant}: {foreign}")
        observed = await self._observe_tenant(tenant)
        changes = plan_tenant([o.identity for o in observed.values()], wanted)
        changes += self._repairs(wanted, changes, observed)
        return await self._apply(changes, observed)


def _owned_by(username: str, tenant: str) -> bool:
    """True for the usernames the contract gives the tenant's identities."""
    try:
        return parse_username(username).tenant == tenant
    except ContractError:
        return False
