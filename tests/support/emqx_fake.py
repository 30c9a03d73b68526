"""An in-process HTTP fake of the parts of EMQX 5's REST API that kubiot uses.

It imitates EMQX 5.8, read from the v5.8.9 source (`emqx_authz_api_mnesia`,
`emqx_authz_api_sources`, `emqx_authn_api`, `emqx_mgmt_api`, `emqx_mgmt_api_clients`): the
built-in database authorization rules per username, the built-in database authenticator's users,
clients (list by username, kick) and the global zone's configuration. Errors are
`{"code": ..., "message": ...}` with EMQX's codes and messages. Tests can inject failures (429,
5xx) and read every request made.

Refusals modelled as EMQX makes them:
* `max_rules` (default 100; the source's config shows it): a POST of many users is checked user
  by user in body order before anything is stored, so the first existing user (409
  `ALREADY_EXISTS`) or the first list over the limit (400 `BAD_REQUEST`) refuses the whole batch;
  a PUT over the limit is a 400 too.
* No built_in_database authorization source (`source_configured = False`): the source and every
  rules path answer 404 `NOT_FOUND` "Not found: built_in_database", the same code a missing
  username gets.
* No password_based:built_in_database authenticator (`authenticators` without it): the users
  paths answer 404 `NOT_FOUND` when the global chain has no authenticator at all, and 400
  `BAD_REQUEST` ("User error: ...") when it has others; `GET /authentication/{id}` answers 404.
* Paginated lists carry `meta.count` only without a `like_*` parameter (EMQX does not count fuzzy
  queries), and `meta.hasnext` is true whenever a page is full: EMQX stops reading once the page
  is filled, so a last page that is exactly full still says there may be more.

Connections are modelled too, as EMQX 5.8 treats them (`emqx_channel:set_peercert_infos`,
`maybe_username_as_clientid`, `maybe_assign_clientid` and `emqx_cm`'s session takeover): a TLS
client's username and client id become its certificate's CN only when the zone says
`peer_cert_as_username` / `peer_cert_as_clientid = cn`; otherwise the client id is whatever the
client asked for, and a second connection with a live client id ends the first one and, with
clean start 0, takes its session over. Not modelled: MQTT itself (no sockets), authorization of
topics, per-listener zones and authenticator chains (everything here is in the global zone and
chain), the rule schema's finer checks (topic syntax, qos values), clusters (one node), and
EMQX before 5.8 (no `max_rules`).
"""

from __future__ import annotations

import base64
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from kubiot_contract.topics import topic_matches
from kubiot_operator.local.ports import free_port

AUTHENTICATOR_ID = "password_based:built_in_database"
MAX_LIMIT = 10000
Json = dict[str, Any]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]


@dataclass
class _Failure:
    status: int
    code: str
    message: str
    method: str | None


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


def _normalise_rule(rule: Any) -> Json:
    """Validate one rule and fill EMQX's defaults, as EMQX formats stored rules."""
    if not isinstance(rule, dict) or not isinstance(rule.get("topic"), str):
        raise ValueError("rule needs a topic")
    if rule.get("permission") not in ("allow", "deny"):
        raise ValueError(f"bad permission {rule.get('permission')!r}")
    if rule.get("action") not in ("publish", "subscribe", "all"):
        raise ValueError(f"bad action {rule.get('action')!r}")
    return {"topic": rule["topic"], "permission": rule["permission"], "action": rule["action"],
            "qos": list(rule.get("qos", [0, 1, 2])), "retain": rule.get("retain", "all")}


#: The global zone's MQTT settings that matter to kubiot, with EMQX 5.8's defaults.
DEFAULT_ZONE_MQTT: Json = {
    "peer_cert_as_username": "disabled",
    "peer_cert_as_clientid": "disabled",
    "use_username_as_clientid": False,
}


@dataclass
class Session:
    """What EMQX keeps under a client id: subscriptions, and messages queued while offline."""

    subscriptions: set[str] = field(default_factory=set)
    queued: list[str] = field(default_factory=list)


@dataclass
class Connection:
    """One client connection as the broker sees it, after the broker chose its client id."""

    clientid: str
    username: str | None
    session: Session
    connected: bool = True
    ended_by: str | None = None  # the client id of the connection that took this one over

    def subscribe(self, topic_filter: str) -> None:
        self.session.subscriptions.add(topic_filter)

    def close(self) -> None:
        self.connected = False


@dataclass
class EmqxFake:
    """State and handlers; `start()` serves it on a free loopback port."""

    api_key: str = "kubiot"
    api_secret: str = "secret"
    max_rules: int = 100
    #: False: EMQX runs without the built_in_database authorization source.
    source_configured: bool = True
    #: The global authentication chain's authenticator ids, in order.
    authenticators: list[str] = field(default_factory=lambda: [AUTHENTICATOR_ID])
    rules: dict[str, list[Json]] = field(default_factory=dict)
    users: dict[str, Json] = field(default_factory=dict)
    zone_mqtt: Json = field(default_factory=lambda: dict(DEFAULT_ZONE_MQTT))
    connections: dict[str, Connection] = field(default_factory=dict)  # by client id
    sessions: dict[str, Session] = field(default_factory=dict)  # by client id
    requests: list[Request] = field(default_factory=list)
    _failures: deque[_Failure] = field(default_factory=deque)
    _runner: web.AppRunner | None = None
    url: str = ""

    # --- test controls ------------------------------------------------------------------------

    def fail_next(self, count: int, status: int = 503, code: str = "SERVICE_UNAVAILABLE",
                  message: str = "try again later", method: str | None = None) -> None:
        """The next `count` requests (of `method`, if given) get this error instead."""
        for _ in range(count):
            self._failures.append(_Failure(status, code, message, method))

    def connect(self, clientid: str, *, username: str | None = None,
                peer_cert_cn: str | None = None, clean_start: bool = True) -> Connection:
        """A client's CONNECT, as EMQX handles it; returns the connection it got."""
        zone = self.zone_mqtt
        if peer_cert_cn is not None:
            # set_peercert_infos: over TLS the certificate decides, or the field stays unset.
            username = peer_cert_cn if zone["peer_cert_as_username"] == "cn" else username
            if zone["peer_cert_as_clientid"] == "cn":
                clientid = peer_cert_cn
            elif zone["use_username_as_clientid"] and username:
                clientid = username
        elif zone["use_username_as_clientid"] and username:
            clientid = username
        live = self.connections.get(clientid)
        if live is not None and live.connected:
            live.connected, live.ended_by = False, clientid  # takeover: the old one is kicked
        session = self.sessions.get(clientid)
        if session is None or clean_start:
            session = self.sessions[clientid] = Session()
        connection = self.connections[clientid] = Connection(clientid, username, session)
        return connection

    def connect_client(self, clientid: str, username: str) -> Connection:
        """A service client on a listener without TLS."""
        return self.connect(clientid, username=username)

    def deliver(self, topic: str) -> int:
        """Queue a message in every session subscribed to `topic`; the number of sessions."""
        count = 0
        for session in self.sessions.values():
            if any(topic_matches(f, topic) for f in session.subscriptions):
                session.queued.append(topic)
                count += 1
        return count

    @property
    def clients(self) -> dict[str, str | None]:
        """Live connections: client id -> username."""
        return {c: conn.username for c, conn in self.connections.items() if conn.connected}

    def writes(self) -> list[Request]:
        return [r for r in self.requests if r.method != "GET"]

    async def start(self) -> str:
        app = web.Application(middlewares=[self._middleware])
        base = "/api/v5"
        rules = f"{base}/authorization/sources/built_in_database/rules/users"
        users = f"{base}/authentication/{{id}}/users"
        app.router.add_get(f"{base}/authorization/sources/built_in_database", self._source)
        app.router.add_get(f"{base}/authentication/{{id}}", self._authenticator)
        app.router.add_get(rules, self._list_rules)
        app.router.add_post(rules, self._create_rules)
        app.router.add_get(f"{rules}/{{username}}", self._get_rules)
        app.router.add_put(f"{rules}/{{username}}", self._put_rules)
        app.router.add_delete(f"{rules}/{{username}}", self._delete_rules)
        app.router.add_get(users, self._list_users)
        app.router.add_post(users, self._create_user)
        app.router.add_get(f"{users}/{{user_id}}", self._get_user)
        app.router.add_put(f"{users}/{{user_id}}", self._put_user)
        app.router.add_delete(f"{users}/{{user_id}}", self._delete_user)
        app.router.add_get(f"{base}/configs/global_zone", self._global_zone)
        app.router.add_get(f"{base}/clients", self._list_clients)
        app.router.add_delete(f"{base}/clients/{{clientid}}", self._kick)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- plumbing -----------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(Request(request.method, request.path, dict(request.query)))
        expected = "Basic " + base64.b64encode(
            f"{self.api_key}:{self.api_secret}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return _error(401, "BAD_API_KEY_OR_SECRET", "Check api_key/api_secret")
        for failure in list(self._failures):
            if failure.method in (None, request.method):
                self._failures.remove(failure)
                return _error(failure.status, failure.code, failure.message)
        response: web.StreamResponse = await handler(request)
        return response

    @staticmethod
    def _page(request: web.Request, items: list[Json]) -> web.Response:
        try:
            page = int(request.query.get("page", "1"))
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return _error(400, "INVALID_PARAMETER", "page_limit_invalid")
        if page < 1 or not 1 <= limit <= MAX_LIMIT:
            return _error(400, "INVALID_PARAMETER", "page_limit_invalid")
        chunk = items[(page - 1) * limit:page * limit]
        meta: Json = {"page": page, "limit": limit, "hasnext": len(chunk) == limit}
        if not any(key.startswith("like_") for key in request.query):
            meta["count"] = len(items)
        return web.json_response({"data": chunk, "meta": meta})

    def _check_authenticator(self, request: web.Request) -> web.Response | None:
        """What emqx_authn_chains answers for a users call on an authenticator it lacks."""
        authenticator = request.match_info["id"]
        if authenticator in self.authenticators:
            return None
        if not self.authenticators:  # an empty chain does not exist at all
            return _error(404, "NOT_FOUND", "Authenticator not found in the 'global' scope")
        return _error(400, "BAD_REQUEST",
                      f'User error: {{not_found,{{authenticator,<<"{authenticator}">>}}}}')

    def _check_source(self) -> web.Response | None:
        """emqx_authz_api_sources:with_source, which guards every rules path."""
        if self.source_configured:
            return None
        return _error(404, "NOT_FOUND", "Not found: built_in_database")

    def _valid_rules(self, rules: Any) -> list[Json]:
        if not isinstance(rules, list):
            raise ValueError("rules must be a list")
        return [_normalise_rule(r) for r in rules]

    # --- authorization ------------------------------------------------------------------------

    async def _source(self, request: web.Request) -> web.Response:
        if (missing := self._check_source()) is not None:
            return missing
        return web.json_response({"type": "built_in_database", "enable": True,
                                  "max_rules": self.max_rules})

    async def _list_rules(self, request: web.Request) -> web.Response:
        if (missing := self._check_source()) is not None:
            return missing
        like = request.query.get("like_username", "")
        items = [{"username": u, "rules": r} for u, r in self.rules.items() if like in u]
        return self._page(request, items)

    async def _create_rules(self, request: web.Request) -> web.Response:
        if (missing := self._check_source()) is not None:
            return missing
        body = await request.json()
        if not isinstance(body, list):
            return _error(400, "BAD_REQUEST", "expected a list of {username, rules}")
        try:
            entries = [(str(e["username"]), self._valid_rules(e["rules"])) for e in body]
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, "BAD_REQUEST", f"Bad username or bad rule schema: {exc}")
        # ensure_rules_is_valid: user by user, the first problem refuses the whole batch.
        for username, rules in entries:
            if username in self.rules:
                return _error(409, "ALREADY_EXISTS", f"User '{username}' already exist")
            if len(rules) > self.max_rules:
                return _error(400, "BAD_REQUEST", f"The rules length of User '{username}' "
                                                  "exceeds the maximum limit.")
        for username, rules in entries:
            self.rules[username] = rules
        return web.Response(status=204)

    async def _get_rules(self, request: web.Request) -> web.Response:
        if (missing := self._check_source()) is not None:
            return missing
        username = request.match_info["username"]
        if username not in self.rules:
            return _error(404, "NOT_FOUND", "Not Found")
        return web.json_response({"username": username, "rules": self.rules[username]})

    async def _put_rules(self, request: web.Request) -> web.Response:
        if (missing := self._check_source()) is not None:
            return missing
        username = request.match_info["username"]
        body = await request.json()
        if not isinstance(body, dict) or body.get("username") != username:
            return _error(400, "BAD_REQUEST", "Bad username or bad rule schema")
        try:
            rules = self._valid_rules(body.get("rules"))
        except ValueError as exc:
            return _error(400, "BAD_REQUEST", f"Bad username or bad rule schema: {exc}")
        if len(rules) > self.max_rules:
            return _error(400, "BAD_REQUEST", "The rules length exceeds the maximum limit.")
        self.rules[username] = rules
        return web.Response(status=204)

    async def _delete_rules(self, request: web.Request) -> web.Response:
        if (missing := self._check_source()) is not None:
            return missing
        username = request.match_info["username"]
        if self.rules.pop(username, None) is None:
            return _error(404, "NOT_FOUND", "Username Not Found")
        return web.Response(status=204)

    # --- authentication -----------------------------------------------------------------------

    async def _authenticator(self, request: web.Request) -> web.Response:
        authenticator = request.match_info["id"]
        if authenticator not in self.authenticators:
            return _error(404, "NOT_FOUND", f"Authenticator '{authenticator}' does not exist")
        mechanism, backend = authenticator.split(":", 1)
        return web.json_response({"id": authenticator, "mechanism": mechanism,
                                  "backend": backend, "enable": True})

    async def _list_users(self, request: web.Request) -> web.Response:
        if (missing := self._check_authenticator(request)) is not None:
            return missing
        like = request.query.get("like_user_id", "")
        items = [{"user_id": u, "is_superuser": v["is_superuser"]}
                 for u, v in self.users.items() if like in u]
        return self._page(request, items)

    async def _create_user(self, request: web.Request) -> web.Response:
        if (missing := self._check_authenticator(request)) is not None:
            return missing
        body = await request.json()
        if not isinstance(body, dict) or not body.get("user_id") or not body.get("password"):
            return _error(400, "BAD_REQUEST", "user_id and password are required")
        if body["user_id"] in self.users:
            return _error(409, "ALREADY_EXISTS", "User already exists")
        superuser = bool(body.get("is_superuser", False))
        self.users[body["user_id"]] = {"password": body["password"], "is_superuser": superuser}
        return web.json_response({"user_id": body["user_id"], "is_superuser": superuser},
                                 status=201)

    async def _get_user(self, request: web.Request) -> web.Response:
        if (missing := self._check_authenticator(request)) is not None:
            return missing
        user_id = request.match_info["user_id"]
        if user_id not in self.users:
            return _error(404, "NOT_FOUND", "User not found")
        return web.json_response({"user_id": user_id,
                                  "is_superuser": self.users[user_id]["is_superuser"]})

    async def _put_user(self, request: web.Request) -> web.Response:
        if (missing := self._check_authenticator(request)) is not None:
            return missing
        user_id = request.match_info["user_id"]
        if user_id not in self.users:
            return _error(404, "NOT_FOUND", "User not found")
        body = await request.json()
        if not isinstance(body, dict) or not body.get("password"):
            return _error(400, "BAD_REQUEST", "password is required")
        self.users[user_id] = {"password": body["password"],
                               "is_superuser": bool(body.get("is_superuser", False))}
        return web.json_response({"user_id": user_id,
                                  "is_superuser": self.users[user_id]["is_superuser"]})

    async def _delete_user(self, request: web.Request) -> web.Response:
        if (missing := self._check_authenticator(request)) is not None:
            return missing
        if self.users.pop(request.match_info["user_id"], None) is None:
            return _error(404, "NOT_FOUND", "User not found")
        return web.Response(status=204)

    # --- clients ------------------------------------------------------------------------------

    async def _list_clients(self, request: web.Request) -> web.Response:
        username = request.query.get("username")
        items = [{"clientid": c, "username": u, "connected": True}
                 for c, u in self.clients.items() if username in (None, u)]
        return self._page(request, items)

    async def _kick(self, request: web.Request) -> web.Response:
        connection = self.connections.get(request.match_info["clientid"])
        if connection is None or not connection.connected:
            return _error(404, "CLIENTID_NOT_FOUND", "Client ID not found")
        connection.close()
        return web.Response(status=204)

    # --- configuration ------------------------------------------------------------------------

    async def _global_zone(self, request: web.Request) -> web.Response:
        return web.json_response({"mqtt": dict(self.zone_mqtt)})
