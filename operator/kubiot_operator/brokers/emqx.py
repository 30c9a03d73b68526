"""EMQX 5 backend over its REST API (`/api/v5`), authenticated with an API key and secret.

Rules live in the built-in database authorization source, one rule list per username; password
identities also get a user in the built-in database authenticator. kubiot owns exactly the
usernames the topic contract can produce for a tenant (`{tenant}.{device}`, `{tenant}.gw.*`,
`{tenant}.svc.ingest`); the admin's other users are never read as kubiot's nor touched.

Needs EMQX 5.8 or later: the source's `max_rules` (how many rules EMQX keeps per username) is read
from its configuration, which older versions do not have.
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

from kubiot_contract.topics import AccessRules, ContractError, parse_username

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
from .errors import (
    BrokerAuthError,
    BrokerError,
    BrokerIdentitiesRefused,
    BrokerNotConfigured,
    BrokerRejected,
    BrokerRuleLimit,
    BrokerUnavailable,
)
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
SOURCE_PATH = "/authorization/sources/built_in_database"
RULES_PATH = f"{SOURCE_PATH}/rules/users"
#: EMQX's error codes the backend acts on.
ALREADY_EXISTS = "ALREADY_EXISTS"
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


def granted(keys: Sequence[_RuleKey]) -> frozenset[_RuleKey]:
    """The allows a rule list grants: none behind a leading deny-all."""
    if keys and keys[0] == DENY_ALL:
        return frozenset()
    return frozenset(k for k in keys if k[0] == "allow")


def takes_away_an_allow(before: Sequence[_RuleKey], after: Sequence[_RuleKey]) -> bool:
    """True when `after` no longer grants something `before` did.

    EMQX checks a subscription once, at SUBSCRIBE: a live session keeps receiving on what it may
    no longer subscribe to until it is ended.
    """
    return bool(granted(before) - granted(after))


def rule_list_within(wanted: Sequence[_RuleKey], have: Sequence[_RuleKey] | None,
                     max_rules: int | None) -> list[_RuleKey] | None:
    """The rule list to write for `wanted` when EMQX keeps at most `max_rules` per username.

    Over the limit an enabled identity keeps only the allows it has and is still wanted to have,
    so it never gains one and loses those it should; one EMQX does not have yet gets nothing
    (None). A disabled one is written cut short: behind its deny-all nothing is granted anyway.
    """
    if max_rules is None or len(wanted) <= max_rules:
        return list(wanted)
    if wanted and wanted[0] == DENY_ALL:
        return list(wanted[:max_rules])
    if have is None:
        return None
    kept = set(have)
    return [k for k in wanted if k in kept]


def over_rule_limit(identity: BrokerIdentity, max_rules: int | None, *,
                    cause: BrokerError | None = None) -> BrokerRuleLimit | None:
    """The refusal for an enabled identity whose rules EMQX cannot keep, else None."""
    needed = len(rule_keys(identity.rules, True))
    if not identity.enabled or max_rules is None or needed <= max_rules:
        return None
    return BrokerRuleLimit(
        f"{identity.username} needs {needed} broker rules but EMQX keeps at most {max_rules} "
        "per username (max_rules of the built_in_database authorization source); raise "
        "max_rules or serve fewer devices from this identity",
        username=identity.username, rules=needed, max_rules=max_rules,
        status=cause.status if cause else None, code=cause.code if cause else None)


@dataclass(frozen=True)
class AuthorizationSource:
    """The built_in_database authorization source, as its configuration describes it."""

    enabled: bool
    #: Rules EMQX keeps per username; None on EMQX before 5.8, which has no such setting.
    max_rules: int | None


def authorization_source(body: Any) -> AuthorizationSource:
    """Read `GET /authorization/sources/built_in_database`."""
    config = body if isinstance(body, dict) else {}
    max_rules = config.get("max_rules")
    return AuthorizationSource(enabled=config.get("enable") is not False,
                               max_rules=max_rules if isinstance(max_rules, int) else None)


def session_binding_gaps(global_zone: Any) -> list[str]:
    """The `mqtt.*` settings of EMQX's global zone that differ from SESSION_BINDING."""
    mqtt = global_zone.get("mqtt") if isinstance(global_zone, dict) else None
    mqtt = mqtt if isinstance(mqtt, dict) else {}
    return [f"mqtt.{key} = {value} (is {mqtt.get(key, 'unset')})"
            for key, value in SESSION_BINDING.items() if mqtt.get(key) != value]


def error_of(status: int, body: Any) -> tuple[str | None, str]:
    """(code, message) of an EMQX error body `{"code": ..., "message": ...}`."""
    if isinstance(body, dict):
        code = body.get("code")
        return (str(code) if code is not None else None), str(body.get("message", ""))
    return None, str(body or "")[:200]


def error_for(status: int, body: Any, what: str) -> BrokerError:
    """The broker error the operator understands for an HTTP failure."""
    code, message = error_of(status, body)
    text = " ".join(part for part in (f"{what}: HTTP {status}", code, message) if part)
    if status == 401:
        return BrokerAuthError(text, status=status, code=code)
    if status == 429 or status >= 500:
        return BrokerUnavailable(text, status=status, code=code)
    return BrokerRejected(text, status=status, code=code)


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
        self._authenticator_id = authenticator_id
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
        # Read at every tenant resync and again whenever EMQX refuses a write, so an admin's
        # change of max_rules is seen without a read before every single write.
        self._source: AuthorizationSource | None = None
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
                raise error_for(status, payload, what)
            return status, payload

        if method != "GET":
            self.writes_sent += 1
        return await self._backoff.run(lambda: self._breaker.call(once))

    async def _pages(self, path: str, params: Mapping[str, str | int] | None = None
                     ) -> list[dict[str, Any]]:
        """Every item of a paginated list.

        EMQX gives no `meta.count` for `like_*` queries and may say `hasnext` before an empty
        page, so the end is the first page that is empty or says there is nothing after it.
        """
        items: list[dict[str, Any]] = []
        page = 1
        while True:
            query = {**(params or {}), "page": page, "limit": self._page_size}
            _, body = await self._request("GET", path, params=query)
            data = body.get("data", []) if isinstance(body, dict) else []
            items += data
            meta = body.get("meta", {}) if isinstance(body, dict) else {}
            if not data or not meta.get("hasnext", False):
                return items
            page += 1

    # --- what EMQX is configured with ---------------------------------------------------------

    async def _read_source(self) -> AuthorizationSource:
        """The authorization source's configuration, read now; refuses a broker without it."""
        status, body = await self._request("GET", SOURCE_PATH, missing_ok=True)
        if status == 404:
            code, message = error_of(status, body)
            raise BrokerNotConfigured(
                "EMQX has no built_in_database authorization source, where kubiot keeps every "
                f"identity's rules; add it to authorization.sources (EMQX: {message})",
                reason="BrokerAuthorizationSourceMissing", status=status, code=code)
        self._source = authorization_source(body)
        return self._source

    async def _max_rules(self) -> int | None:
        source = self._source if self._source is not None else await self._read_source()
        return source.max_rules

    async def _authenticator_missing(self) -> bool:
        """Whether EMQX lacks the authenticator that keeps password identities.

        Its users paths cannot tell: they answer 404 `NOT_FOUND` both for a missing user and
        for a chain without authenticators, and 400 `BAD_REQUEST` when the chain has others.
        """
        status, _ = await self._request("GET", f"/authentication/{self._authenticator}",
                                        missing_ok=True)
        return status == 404

    def _no_authenticator(self, username: str, cause: BrokerError) -> BrokerNotConfigured:
        return BrokerNotConfigured(
            f"{username} logs in with a password, but EMQX has no {self._authenticator_id} "
            "authenticator to keep it; add one to authentication, or give the identity a "
            "certificate", reason="BrokerAuthenticatorMissing", status=cause.status,
            code=cause.code)

    # --- reading ------------------------------------------------------------------------------

    async def _password_users(self, tenant: str) -> set[str]:
        try:
            users = await self._pages(f"/authentication/{self._authenticator}/users",
                                      {"like_user_id": f"{tenant}."})
        except BrokerRejected as exc:
            # Certificate-only brokers have no password authenticator, and need none.
            if exc.status in (400, 404) and await self._authenticator_missing():
                return set()
            raise
        return {u["user_id"] for u in users if _owned_by(u.get("user_id", ""), tenant)}

    async def _has_password_user(self, username: str) -> bool:
        try:
            status, _ = await self._request(
                "GET", f"/authentication/{self._authenticator}/users/{quote(username, safe='')}",
                missing_ok=True)
        except BrokerRejected as exc:
            if exc.status == 400 and await self._authenticator_missing():
                return False
            raise
        return status != 404

    def _credential(self, username: str, has_password: bool) -> Credential:
        if has_password:
            return PasswordCredential("", self._fingerprints.get(username, ""))
        return CertificateCredential()

    async def _observe_tenant(self, tenant: str) -> dict[str, _Observed]:
        await self._read_source()
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
        if status == 404:
            # A missing source answers 404 NOT_FOUND as well: never read that as "no identity".
            await self._read_source()
        has_password = await self._has_password_user(username)
        if status == 404 and not has_password:
            return None
        # A user without rules is what a half-finished create or removal leaves behind.
        keys, exact = parse_rules(body.get("rules", []) if status != 404 else [])
        identity = identity_from_rules(username, keys, self._credential(username, has_password))
        return _Observed(identity, keys, exact)

    # --- writing ------------------------------------------------------------------------------

    async def _kick(self, username: str) -> int:
        """End every live session of the username; returns the number of kicks sent."""
        clients = await self._pages("/clients", {"username": username})
        for client in clients:
            await self._request("DELETE", f"/clients/{quote(client['clientid'], safe='')}",
                                missing_ok=True)
        return len(clients)

    async def _put_rules(self, username: str, keys: Sequence[_RuleKey]) -> None:
        await self._request("PUT", f"{RULES_PATH}/{quote(username, safe='')}",
                            body={"username": username, "rules": rules_body(keys)})

    async def _refusal(self, identity: BrokerIdentity, exc: BrokerRejected) -> BrokerRejected:
        """What a refused rule-list write means: the limit, read again now, or EMQX's own word."""
        return over_rule_limit(identity, (await self._read_source()).max_rules, cause=exc) or exc

    async def _set_password(self, identity: BrokerIdentity, *, create: bool) -> None:
        assert isinstance(identity.credential, PasswordCredential)
        password = identity.credential.password
        users = f"/authentication/{self._authenticator}/users"
        try:
            if create:
                try:
                    await self._request("POST", users, body={
                        "user_id": identity.username, "password": password,
                        "is_superuser": False})
                except BrokerRejected as exc:
                    if exc.code != ALREADY_EXISTS:
                        raise
                    create = False
            if not create:
                await self._request("PUT", f"{users}/{quote(identity.username, safe='')}",
                                    body={"password": password, "is_superuser": False})
        except BrokerRejected as exc:
            if exc.status in (400, 404) and await self._authenticator_missing():
                raise self._no_authenticator(identity.username, exc) from exc
            raise
        self._fingerprints[identity.username] = password_fingerprint(identity.username,
                                                                     password)

    async def _create_one(self, identity: BrokerIdentity, keys: Sequence[_RuleKey],
                          refused: dict[str, BrokerRejected], *, exists: bool = False) -> None:
        """Write one new rule list (PUT when it turned out to exist); a 400 refuses it alone."""
        try:
            if not exists:
                try:
                    await self._request("POST", RULES_PATH, body=[
                        {"username": identity.username, "rules": rules_body(keys)}])
                    return
                except BrokerRejected as exc:
                    if exc.code != ALREADY_EXISTS:
                        raise
            # Made in the meantime (another replica, a hand): PUT replaces it whole.
            await self._put_rules(identity.username, keys)
        except BrokerRejected as exc:
            if exc.status != 400:
                raise
            refused[identity.username] = await self._refusal(identity, exc)

    async def _create(self, identities: Sequence[BrokerIdentity],
                      refused: dict[str, BrokerRejected]) -> None:
        """Create rule lists many at a time, leaving out the ones EMQX would refuse.

        EMQX checks a batch user by user before storing any of it: one refused list refuses the
        whole batch, so after a 400 each identity of that batch is written on its own.
        """
        waiting = list(identities)
        while waiting:
            max_rules = await self._max_rules()
            batch: list[tuple[BrokerIdentity, list[_RuleKey]]] = []
            while waiting and len(batch) < self._create_batch:
                identity = waiting.pop(0)
                refusal = over_rule_limit(identity, max_rules)
                keys = rule_list_within(rule_keys(identity.rules, identity.enabled), None,
                                        max_rules)
                if refusal is not None:
                    refused[identity.username] = refusal
                if keys is not None:
                    batch.append((identity, keys))
            if not batch:
                continue
            try:
                await self._request("POST", RULES_PATH, body=[
                    {"username": i.username, "rules": rules_body(keys)} for i, keys in batch])
            except BrokerRejected as exc:
                if exc.code == ALREADY_EXISTS:
                    for identity, keys in batch:
                        await self._create_one(identity, keys, refused, exists=True)
                elif exc.status == 400:
                    max_rules = (await self._read_source()).max_rules
                    for identity, keys in batch:
                        if (refusal := over_rule_limit(identity, max_rules)) is not None:
                            refused[identity.username] = refusal
                        else:
                            await self._create_one(identity, keys, refused)
                else:
                    raise

    async def _remove(self, username: str, has_password: bool) -> None:
        await self._request("DELETE", f"{RULES_PATH}/{quote(username, safe='')}",
                            missing_ok=True)
        if has_password:
            try:
                await self._request(
                    "DELETE",
                    f"/authentication/{self._authenticator}/users/{quote(username, safe='')}",
                    missing_ok=True)
            except BrokerRejected as exc:
                if not (exc.status == 400 and await self._authenticator_missing()):
                    raise
            self._fingerprints.pop(username, None)
        await self._kick(username)

    async def _rewrite(self, identity: BrokerIdentity, keys: list[_RuleKey],
                       seen: _Observed | None, refused: dict[str, BrokerRejected]) -> None:
        """Replace an identity's rule list; end its sessions when it loses an allow."""
        if seen is not None and seen.exact and seen.keys == keys:
            return
        try:
            await self._put_rules(identity.username, keys)
        except BrokerRejected as exc:
            if exc.status != 400:
                raise
            refused[identity.username] = await self._refusal(identity, exc)
            return
        if seen is None or takes_away_an_allow(seen.keys, keys):
            await self._kick(identity.username)

    async def _apply(self, changes: Sequence[Change],
                     observed: Mapping[str, _Observed]) -> SyncResult:
        """Carry out the changes, taking access away before granting any.

        Identities EMQX refuses are left out and reported together at the end, after every
        other change was made; raises BrokerIdentitiesRefused then.
        """
        before = self.writes_sent
        refused: dict[str, BrokerRejected] = {}
        creates = [c.identity for c in changes if isinstance(c, CreateIdentity)]
        # PUT replaces the whole rule list: one write covers rules and enabled together.
        rewrite: dict[str, BrokerIdentity] = {}
        passwords: list[BrokerIdentity] = []
        for change in changes:
            match change:
                case RemoveIdentity(username):
                    seen = observed.get(username)
                    await self._remove(username, seen is not None and isinstance(
                        seen.identity.credential, PasswordCredential))
                case ChangeRules(identity) | ChangeEnabled(identity):
                    rewrite[identity.username] = identity
                case ChangePassword(identity):
                    passwords.append(identity)
        if rewrite:
            max_rules = await self._max_rules()
            planned: list[tuple[BrokerIdentity, list[_RuleKey], _Observed | None]] = []
            for identity in rewrite.values():
                seen = observed.get(identity.username)
                if (refusal := over_rule_limit(identity, max_rules)) is not None:
                    refused[identity.username] = refusal
                keys = rule_list_within(rule_keys(identity.rules, identity.enabled),
                                        seen.keys if seen else None, max_rules)
                if keys is not None:
                    planned.append((identity, keys, seen))

            def grants_only(entry: tuple[BrokerIdentity, list[_RuleKey], _Observed | None]
                            ) -> bool:
                _, keys, seen = entry
                return seen is not None and not takes_away_an_allow(seen.keys, keys)

            # Disables and narrowings (with their kicks) before anything that grants: a failure
            # further on must not leave a session with access it has lost.
            planned.sort(key=grants_only)
            for identity, keys, seen in planned:
                await self._rewrite(identity, keys, seen, refused)
        await self._create(creates, refused)
        passwords = [i for i in creates if isinstance(i.credential, PasswordCredential)
                     and i.username not in refused] + passwords
        for identity in passwords:
            try:
                await self._set_password(identity, create=identity in creates)
            except BrokerRejected as exc:
                refused[identity.username] = exc
        result = SyncResult(self.writes_sent - before, tuple(describe(c) for c in changes))
        if refused:
            raise BrokerIdentitiesRefused(refused, applied=result)
        return result

    def _repairs(self, wanted: Iterable[BrokerIdentity], changes: Sequence[Change],
                 observed: Mapping[str, _Observed], max_rules: int | None) -> list[Change]:
        """Rewrite rule lists that hold what kubiot never writes (order, qos, denies)."""
        touched = {c.identity.username for c in changes
                   if isinstance(c, ChangeRules | ChangeEnabled | CreateIdentity)}
        touched |= {c.username for c in changes if isinstance(c, RemoveIdentity)}
        repairs: list[Change] = []
        for identity in wanted:
            seen = observed.get(identity.username)
            if seen is None or identity.username in touched:
                continue
            keys = rule_list_within(rule_keys(identity.rules, identity.enabled), seen.keys,
                                    max_rules)
            if not seen.exact or seen.keys != keys:
                repairs.append(ChangeRules(identity, identity.rules, identity.rules))
        return repairs

    # --- the backend interface ----------------------------------------------------------------

    async def health(self) -> BrokerHealth:
        try:
            source = await self._read_source()
        except BrokerError as exc:
            return BrokerHealth(False, f"{exc.reason}: {exc}")
        if not source.enabled:
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

    async def _apply_one(self, username: str, changes: Sequence[Change],
                         observed: Mapping[str, _Observed]) -> SyncResult:
        """`_apply` for one identity: its refusal is raised as is (BrokerRuleLimit, ...)."""
        try:
            return await self._apply(changes, observed)
        except BrokerIdentitiesRefused as exc:
            raise exc.refused[username] from exc

    async def ensure_identity(self, identity: BrokerIdentity) -> SyncResult:
        seen = await self._observe(identity.username)
        observed = {identity.username: seen} if seen else {}
        changes = plan_identity(seen.identity if seen else None, identity)
        changes += self._repairs([identity], changes, observed, await self._max_rules())
        return await self._apply_one(identity.username, changes, observed)

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
        return await self._apply_one(username, [ChangeEnabled(wanted, enabled)],
                                     {username: seen})

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
        """Raises BrokerIdentitiesRefused, after applying the rest, when EMQX refuses some."""
        wanted = list(wanted)
        foreign = [w.username for w in wanted if w.tenant != tenant]
        if foreign:
            raise ValueError(f"identities of another tenant in a resync of {tenant}: {foreign}")
        observed = await self._observe_tenant(tenant)
        changes = plan_tenant([o.identity for o in observed.values()], wanted)
        changes += self._repairs(wanted, changes, observed, await self._max_rules())
        return await self._apply(changes, observed)


def _owned_by(username: str, tenant: str) -> bool:
    """True for the usernames the contract gives the tenant's identities."""
    try:
        return parse_username(username).tenant == tenant
    except ContractError:
        return False
