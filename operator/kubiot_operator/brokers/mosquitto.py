"""Mosquitto 2 backend: dynamic-security commands over MQTT v5, batched many to a message.

Mosquitto 2.0 rewrites its whole dynamic-security file after every write command, so the cost
of a write grows with the number of identities: this backend sends only what differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import aiomqtt

from kubiot_contract.topics import ADMIN_CLIENT_ID, ContractError, parse_username

from . import dynsec
from .base import (
    MANAGED_MARKER,
    NOTHING_DONE,
    BrokerHealth,
    BrokerIdentity,
    SyncResult,
)
from .dynsec import Command
from .errors import BrokerAuthError, BrokerError, BrokerRejected, BrokerUnavailable
from .plan import (
    Change,
    ChangeEnabled,
    ChangeRules,
    CreateIdentity,
    RemoveIdentity,
    describe,
    plan_identity,
    plan_tenant,
)
from .retry import Backoff, CircuitBreaker

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
#: MQTT CONNACK codes (v3 and v5) that mean the admin login itself was refused.
_AUTH_REFUSED = frozenset({4, 5, 134, 135})
T = TypeVar("T")


@dataclass(frozen=True)
class _Snapshot:
    """Everything kubiot manages on the broker, read in one round trip."""

    clients: dict[str, dynsec.ClientRecord]
    roles: dict[str, Sequence[Mapping[str, Any]]]  # kubiot roles by name -> ACLs

    def identity(self, username: str) -> BrokerIdentity | None:
        client = self.clients.get(username)
        if client is None:
            return None
        return dynsec.observed_identity(client, self.roles.get(dynsec.role_name(username)))

    def role_needs_rewrite(self, username: str) -> bool:
        acls = self.roles.get(dynsec.role_name(username))
        return acls is None or not dynsec.role_is_exact(acls)

    def tenant_identities(self, tenant: str) -> list[BrokerIdentity]:
        found = (self.identity(c.username) for c in self.clients.values() if c.tenant == tenant)
        return sorted((i for i in found if i is not None), key=lambda i: i.username)

    def orphan_roles(self, tenant: str) -> set[str]:
        """Identity roles of the tenant whose client is gone (a half-finished removal)."""
        orphans = set()
        prefix = f"{MANAGED_MARKER}:"
        for name in self.roles:
            username = name.removeprefix(prefix)
            try:
                owner = parse_username(username)
            except ContractError:
                continue
            if owner.tenant == tenant and username not in self.clients:
                orphans.add(name)
        return orphans


class MosquittoDynsecBackend:
    """Broker access control through Mosquitto's dynamic-security plugin.

    `timeout` bounds each wait for the broker (connect, one batch's acknowledgement, replies);
    with very many identities a batch of writes can take longer, so raise it or lower
    `batch_size` for a first bulk load.
    """

    def __init__(self, host: str, port: int, username: str, password: str, *,
                 tls: ssl.SSLContext | None = None, client_id: str = ADMIN_CLIENT_ID,
                 timeout: float = 10.0, batch_size: int = 200,
                 backoff: Backoff | None = None, breaker: CircuitBreaker | None = None) -> None:
        self._host, self._port = host, port
        self._username, self._password = username, password
        self._tls, self._client_id, self._timeout = tls, client_id, timeout
        self._batch_size = batch_size
        self._backoff = backoff or Backoff()
        self._breaker = breaker or CircuitBreaker()
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._known_tenants: set[str] = set()
        #: Commands sent on the wire, and how many of them wrote: for tests and metrics.
        self.commands_sent = 0
        self.writes_sent = 0

    # --- connection ---------------------------------------------------------------------------

    async def __aenter__(self) -> MosquittoDynsecBackend:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def _connect(self) -> aiomqtt.Client:
        if self._client is not None:
            return self._client
        client = aiomqtt.Client(
            self._host, self._port, username=self._username, password=self._password,
            identifier=self._client_id, protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=self._tls, timeout=self._timeout,
            # The broker answers no PINGREQ while it executes a long batch: a keepalive shorter
            # than the longest wait would drop the connection in the middle of a bulk load.
            keepalive=max(60, int(2 * self._timeout)),
        )
        try:
            await _honouring_cancellation(client.__aenter__(), lambda: _close_quietly(client))
        except aiomqtt.MqttCodeError as exc:
            if _code(exc) in _AUTH_REFUSED:
                raise BrokerAuthError(f"broker refused the admin login: {exc}") from exc
            raise BrokerUnavailable(f"cannot connect to {self._host}:{self._port}: {exc}") from exc
        except (aiomqtt.MqttError, OSError) as exc:
            raise BrokerUnavailable(f"cannot connect to {self._host}:{self._port}: {exc}") from exc
        try:
            await _honouring_cancellation(client.subscribe(RESPONSE_TOPIC, qos=1),
                                          lambda: _close_quietly(client))
        except aiomqtt.MqttError as exc:
            await _close_quietly(client)
            raise BrokerUnavailable(f"cannot subscribe to {RESPONSE_TOPIC}: {exc}") from exc
        self._client = client
        self._reader = asyncio.create_task(self._read_responses(client))
        return client

    async def _read_responses(self, client: aiomqtt.Client) -> None:
        try:
            async for message in client.messages:
                self._dispatch(message.payload)
        except aiomqtt.MqttError:
            pass
        finally:
            self._drop_connection(client, "connection to the broker lost")

    def _dispatch(self, payload: Any) -> None:
        try:
            responses = json.loads(payload)["responses"]
            key = responses[0].get("correlationData")
        except (ValueError, KeyError, IndexError, TypeError):
            return
        future = self._pending.pop(key, None) if isinstance(key, str) else None
        if future is not None and not future.done():
            future.set_result(responses)

    def _drop_connection(self, client: aiomqtt.Client, why: str) -> None:
        if self._client is client:
            self._client = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BrokerUnavailable(why))
                # A batch whose publish failed first is never awaited: mark the error seen, so
                # it is not logged again as "never retrieved" (an awaiting send still gets it).
                future.exception()
        self._pending.clear()

    async def aclose(self) -> None:
        client, reader = self._client, self._reader
        self._client, self._reader = None, None
        if reader is not None:
            reader.cancel()
            # Not `await reader` under suppress(CancelledError): that would also swallow a
            # cancellation of the task closing the backend.
            await asyncio.wait({reader})
        if client is not None:
            await _close_quietly(client)

    # --- sending commands ---------------------------------------------------------------------

    async def _roundtrip(self, commands: Sequence[Command]) -> list[dict[str, Any]]:
        """Send commands, many to a message, and return every response in order."""
        if not commands:
            return []

        async def attempt() -> list[dict[str, Any]]:
            return await self._breaker.call(lambda: self._send_batches(commands))

        async with self._lock:
            return await self._backoff.run(attempt)

    async def _send_batches(self, commands: Sequence[Command]) -> list[dict[str, Any]]:
        client = await self._connect()
        loop = asyncio.get_running_loop()
        futures = []
        keys: list[str] = []
        try:
            for start in range(0, len(commands), self._batch_size):
                batch = [dict(c) for c in commands[start:start + self._batch_size]]
                key = f"kubiot-{next(self._ids)}"
                keys.append(key)
                batch[0]["correlationData"] = key
                future: asyncio.Future[list[dict[str, Any]]] = loop.create_future()
                self._pending[key] = future
                futures.append(future)
                await _honouring_cancellation(
                    client.publish(CONTROL_TOPIC, json.dumps({"commands": batch}), qos=1))
                self.commands_sent += len(batch)
                self.writes_sent += sum(1 for c in batch if dynsec.is_write(c))
            # Mosquitto acknowledges a control message after executing it, so once the last
            # PUBACK is in, the replies are on their way.
            async with asyncio.timeout(self._timeout):
                replies = await asyncio.gather(*futures)
        except TimeoutError as exc:
            await self._reset()
            raise BrokerUnavailable(f"no dynamic-security reply within {self._timeout}s") from exc
        except aiomqtt.MqttError as exc:
            await self._reset()
            raise BrokerUnavailable(f"publishing to the broker failed: {exc}") from exc
        finally:
            for key, future in zip(keys, futures, strict=True):
                self._pending.pop(key, None)
                if not future.done():
                    future.cancel()
        return [response for reply in replies for response in reply]

    async def _reset(self) -> None:
        await self.aclose()
        self._pending.clear()

    async def _write(self, commands: Sequence[Command], details: Iterable[str] = ()
                     ) -> SyncResult:
        """Send write commands; harmless errors (already so) pass, others raise BrokerRejected."""
        responses = await self._roundtrip(commands)
        failures = [f"{r.get('command')}: {r['error']}" for r in responses
                    if r.get("error") and not _harmless(r["error"])]
        if failures:
            raise BrokerRejected("dynamic security refused: " + "; ".join(failures[:5]))
        return SyncResult(sum(1 for c in commands if dynsec.is_write(c)), tuple(details))

    async def _snapshot(self) -> _Snapshot:
        responses = await self._roundtrip([
            {"command": "listClients", "verbose": True, "count": -1},
            {"command": "listRoles", "verbose": True, "count": -1},
        ])
        data = [_data(r) for r in responses]
        clients = {}
        for raw in data[0].get("clients", []):
            record = dynsec.parse_client(raw)
            if record is not None:
                clients[record.username] = record
        roles = {r["rolename"]: r.get("acls", []) for r in data[1].get("roles", [])
                 if r.get("textname") == MANAGED_MARKER}
        return _Snapshot(clients, roles)

    async def _snapshot_of(self, username: str) -> _Snapshot:
        """The same for a single identity, without listing everything."""
        client_reply, role_reply = await self._roundtrip([
            {"command": "getClient", "username": username},
            {"command": "getRole", "rolename": dynsec.role_name(username)},
        ])
        clients = {}
        if not client_reply.get("error"):
            record = dynsec.parse_client(_data(client_reply).get("client", {}))
            if record is not None:
                clients[username] = record
        roles = {}
        if not role_reply.get("error"):
            role = _data(role_reply).get("role", {})
            if role.get("textname") == MANAGED_MARKER:
                roles[role["rolename"]] = role.get("acls", [])
        return _Snapshot(clients, roles)

    def _commands(self, changes: Sequence[Change], snapshot: _Snapshot) -> list[Command]:
        """Commands for planned changes; rules are diffed against the roles as they are."""
        commands: list[Command] = []
        roles = dict(snapshot.roles)
        for change in changes:
            commands += dynsec.change_commands(change, roles)
            if isinstance(change, RemoveIdentity):
                roles.pop(dynsec.role_name(change.username), None)  # deleted with its client
        return commands

    def _repairs(self, wanted: Iterable[BrokerIdentity], changes: Sequence[Change],
                 snapshot: _Snapshot) -> list[Change]:
        """Force a role rewrite where the plan saw nothing to do but the role is not exact."""
        planned = {c.identity.username for c in changes
                   if isinstance(c, ChangeRules | CreateIdentity)}
        removed = {c.username for c in changes if isinstance(c, RemoveIdentity)}
        return [ChangeRules(w, w.rules, w.rules) for w in wanted
                if w.username in snapshot.clients and w.username not in planned | removed
                and snapshot.role_needs_rewrite(w.username)]

    # --- the backend interface ----------------------------------------------------------------

    async def health(self) -> BrokerHealth:
        try:
            (reply,) = await self._roundtrip([{"command": "getDefaultACLAccess"}])
        except BrokerError as exc:
            return BrokerHealth(False, f"{exc.reason}: {exc}")
        if reply.get("error"):
            return BrokerHealth(False, f"dynamic security: {reply['error']}")
        return BrokerHealth(True, f"dynamic security answers on {self._host}:{self._port}")

    async def ensure_tenant(self, tenant: str) -> SyncResult:
        name = dynsec.tenant_group_name(tenant)
        role_reply, group_reply = await self._roundtrip([
            {"command": "getRole", "rolename": name},
            {"command": "getGroup", "groupname": name},
        ])
        group = _data(group_reply).get("group", {}) if not group_reply.get("error") else None
        commands = dynsec.tenant_commands(
            tenant, role_exists=not role_reply.get("error"), group_exists=group is not None,
            group_has_role=group is not None
            and any(r.get("rolename") == name for r in group.get("roles", [])),
        )
        result = await self._write(commands, [f"tenant {tenant}"] if commands else [])
        self._known_tenants.add(tenant)
        return result

    async def _tenant_ready(self, tenant: str) -> SyncResult:
        if tenant in self._known_tenants:
            return NOTHING_DONE
        return await self.ensure_tenant(tenant)

    async def ensure_identity(self, identity: BrokerIdentity) -> SyncResult:
        result = await self._tenant_ready(identity.tenant)
        snapshot = await self._snapshot_of(identity.username)
        changes = plan_identity(snapshot.identity(identity.username), identity)
        changes += self._repairs([identity], changes, snapshot)
        return result + await self._write(self._commands(changes, snapshot),
                                          [describe(c) for c in changes])

    async def set_enabled(self, username: str, enabled: bool) -> SyncResult:
        snapshot = await self._snapshot_of(username)
        current = snapshot.identity(username)
        if current is None:
            if enabled:
                raise BrokerRejected(f"{username} has no broker identity to enable",
                                     reason="BrokerIdentityMissing")
            return NOTHING_DONE
        if current.enabled == enabled:
            return NOTHING_DONE
        change = ChangeEnabled(current, enabled)
        return await self._write(dynsec.change_commands(change), [describe(change)])

    async def remove_identity(self, username: str) -> SyncResult:
        snapshot = await self._snapshot_of(username)
        if username not in snapshot.clients and not snapshot.roles:
            return NOTHING_DONE
        return await self._write(dynsec.remove_commands(username), [f"remove {username}"])

    async def remove_tenant(self, tenant: str) -> SyncResult:
        snapshot = await self._snapshot()
        commands: list[Command] = []
        for identity in snapshot.tenant_identities(tenant):
            commands += dynsec.remove_commands(identity.username)
        commands += [{"command": "deleteRole", "rolename": r}
                     for r in sorted(snapshot.orphan_roles(tenant))]
        name = dynsec.tenant_group_name(tenant)
        commands += [{"command": "deleteGroup", "groupname": name},
                     {"command": "deleteRole", "rolename": name}]
        self._known_tenants.discard(tenant)
        return await self._write(commands, [f"remove tenant {tenant}"])

    async def list_identities(self, tenant: str) -> list[BrokerIdentity]:
        return (await self._snapshot()).tenant_identities(tenant)

    async def resync(self, tenant: str, wanted: Iterable[BrokerIdentity]) -> SyncResult:
        wanted = list(wanted)
        foreign = [w.username for w in wanted if w.tenant != tenant]
        if foreign:
            raise ValueError(f"identities of another tenant in a resync of {tenant}: {foreign}")
        result = await self._tenant_ready(tenant)
        snapshot = await self._snapshot()
        changes = plan_tenant(snapshot.tenant_identities(tenant), wanted)
        changes += self._repairs(wanted, changes, snapshot)
        wanted_names = {w.username for w in wanted}
        orphans = [{"command": "deleteRole", "rolename": r}
                   for r in sorted(snapshot.orphan_roles(tenant))
                   if r.removeprefix(f"{MANAGED_MARKER}:") not in wanted_names]
        commands = orphans + self._commands(changes, snapshot)
        return result + await self._write(commands, [describe(c) for c in changes])


def _data(response: Mapping[str, Any]) -> dict[str, Any]:
    data = response.get("data")
    return data if isinstance(data, dict) else {}


def _harmless(error: str) -> bool:
    return error in dynsec.HARMLESS_ERRORS or "already" in error


def _code(exc: aiomqtt.MqttCodeError) -> int:
    rc = exc.rc
    if rc is None:
        return -1
    return rc if isinstance(rc, int) else int(rc.value)


async def _honouring_cancellation(call: Awaitable[T],
                                  undo: Callable[[], Awaitable[None]] | None = None) -> T:
    """Await an aiomqtt call, and re-raise a cancellation it swallowed (after `undo`).

    aiomqtt bounds its waits (CONNACK, SUBACK, PUBACK) with `asyncio.wait_for`, which on
    Python 3.11 returns the result instead of raising when the task is cancelled in the instant
    the broker's answer arrives; the faster the broker answers, the likelier that is. A task
    cancelled there (the resync loop of a stopping operator) would carry on into its next wait,
    and the stop, which waits for it, would never end.
    """
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0

    def swallowed() -> bool:
        return task is not None and task.cancelling() > before

    try:
        result = await call
    except Exception as exc:
        if swallowed():
            raise asyncio.CancelledError from exc
        raise
    if swallowed():
        if undo is not None:
            await undo()
        raise asyncio.CancelledError
    return result


async def _close_quietly(client: aiomqtt.Client) -> None:
    with contextlib.suppress(aiomqtt.MqttError, OSError):
        await client.__aexit__(None, None, None)
