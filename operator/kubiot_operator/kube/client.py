"""A small async client for the Kubernetes REST API: get, list, create, merge-patch, delete.

It speaks plain HTTP/JSON with the same credentials kopf logged in with, so the operator needs no
second notion of "the cluster", and the tests can point it at an API emulator. Those credentials
come from the `kubernetes` package's config loading (handlers.default_login); when the API
server refuses them (a projected service-account token rotated, an exec-plugin token expired),
the client logs in again the same way and retries once.
"""

from __future__ import annotations

import asyncio
import base64
import json as json_module
import os
import ssl
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

from kubiot_operator.models import (
    DEVICE,
    DEVICE_COMMAND,
    FIRMWARE_RELEASE,
    GATEWAY,
    KINDS,
    TENANT,
)
from kubiot_operator.models.api import KubeKind


class KubeError(RuntimeError):
    """The API server refused a request; `status` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


class Gone(KubeError):
    """410: what was asked for is no longer kept (an expired list continue token)."""


NAMESPACES = KubeKind("", "v1", "namespaces", namespaced=False)
SECRETS = KubeKind("", "v1", "secrets", namespaced=True)
SERVICES = KubeKind("", "v1", "services", namespaced=True)
DEPLOYMENTS = KubeKind("apps", "v1", "deployments", namespaced=True)
PODDISRUPTIONBUDGETS = KubeKind("policy", "v1", "poddisruptionbudgets", namespaced=True)
NETWORKPOLICIES = KubeKind("networking.k8s.io", "v1", "networkpolicies", namespaced=True)
SERVICEMONITORS = KubeKind("monitoring.coreos.com", "v1", "servicemonitors", namespaced=True)
PODMONITORS = KubeKind("monitoring.coreos.com", "v1", "podmonitors", namespaced=True)
# kubiot's own kinds, where the resource registry (models.KINDS) says they live.
TENANTS = TENANT.api
DEVICES = DEVICE.api
GATEWAYS = GATEWAY.api
FIRMWARERELEASES = FIRMWARE_RELEASE.api
DEVICECOMMANDS = DEVICE_COMMAND.api

KINDS_BY_API = {
    (k.api_version, kind): k
    for k, kind in (
        (NAMESPACES, "Namespace"), (SECRETS, "Secret"), (SERVICES, "Service"),
        (DEPLOYMENTS, "Deployment"), (PODDISRUPTIONBUDGETS, "PodDisruptionBudget"),
        (NETWORKPOLICIES, "NetworkPolicy"), (SERVICEMONITORS, "ServiceMonitor"),
        (PODMONITORS, "PodMonitor"),
        *((resource.api, resource.kind) for resource in KINDS),
    )
}


def kind_of(obj: Mapping[str, Any]) -> KubeKind:
    """The KubeKind of an object from its apiVersion and kind."""
    try:
        return KINDS_BY_API[(obj["apiVersion"], obj["kind"])]
    except KeyError:
        raise ValueError(f"unknown kind {obj.get('apiVersion')}/{obj.get('kind')}") from None


@dataclass(frozen=True)
class Connection:
    """Where the API server is and how to authenticate (as kopf logged in)."""

    server: str
    token: str | None = None
    ca_path: str | None = None
    ca_data: bytes | None = None
    certificate_path: str | None = None
    private_key_path: str | None = None
    username: str | None = None
    password: str | None = None
    insecure: bool = False

    @classmethod
    def from_kopf(cls, info: Any) -> Connection:
        """From a `kopf.ConnectionInfo` (inline certificate data is written to private files)."""
        certificate_path = _path_or_file(info.certificate_path, info.certificate_data, ".crt")
        private_key_path = _path_or_file(info.private_key_path, info.private_key_data, ".key")
        ca_data = info.ca_data.encode() if isinstance(info.ca_data, str) else info.ca_data
        return cls(server=info.server, token=info.token,
                   ca_path=str(info.ca_path) if info.ca_path else None,
                   ca_data=base64.b64decode(ca_data) if ca_data and b"BEGIN" not in ca_data
                   else ca_data,
                   certificate_path=certificate_path, private_key_path=private_key_path,
                   username=info.username, password=info.password,
                   insecure=bool(info.insecure))


def _path_or_file(path: Any, data: str | bytes | None, suffix: str) -> str | None:
    if path:
        return str(path)
    if not data:
        return None
    raw = data.encode() if isinstance(data, str) else data
    if b"BEGIN" not in raw:
        raw = base64.b64decode(raw)
    handle, name = tempfile.mkstemp(prefix="kubiot-kube-", suffix=suffix)
    with os.fdopen(handle, "wb") as file:
        file.write(raw)
    return name


#: Objects per page of a list; the API server's own default for kubectl is 500.
LIST_PAGE_SIZE = 500
#: Full lists started again after their continue token expired, before giving up.
LIST_ATTEMPTS = 3

#: Logs in again (as kopf's login handler does) and returns the fresh credentials, if any.
Relogin = Callable[[], Connection | None]


class KubeClient:
    """Async CRUD on Kubernetes objects. Use as `async with KubeClient(connection) as kube:`.

    `relogin` is called when the API server answers 401, so rotated credentials are picked up;
    `refused_for()` says how long it has kept refusing them (for the liveness probe)."""

    def __init__(self, connection: Connection, *, relogin: Relogin | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._connection = connection
        self._relogin = relogin
        self._clock = clock
        self._refused_since: float | None = None
        self._session: aiohttp.ClientSession | None = None

    def refused_for(self) -> float:
        """Seconds the API server has refused every request's credentials; 0 when it accepts."""
        return 0.0 if self._refused_since is None else self._clock() - self._refused_since

    def _authorization(self) -> dict[str, str]:
        if self._connection.token:
            return {"Authorization": f"Bearer {self._connection.token}"}
        if self._connection.username and self._connection.password:
            credentials = f"{self._connection.username}:{self._connection.password}"
            return {"Authorization": f"Basic {base64.b64encode(credentials.encode()).decode()}"}
        return {}

    async def __aenter__(self) -> KubeClient:
        self._session = aiohttp.ClientSession(
            base_url=self._connection.server.rstrip("/"), headers={"Accept": "application/json"},
            connector=aiohttp.TCPConnector(ssl=self._ssl_context(), limit=64),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _ssl_context(self) -> ssl.SSLContext | bool:
        if not self._connection.server.startswith("https"):
            return False
        if self._connection.insecure:
            return False
        context = ssl.create_default_context(
            cafile=self._connection.ca_path,
            cadata=self._connection.ca_data.decode() if self._connection.ca_data else None)
        if self._connection.certificate_path and self._connection.private_key_path:
            context.load_cert_chain(self._connection.certificate_path,
                                    self._connection.private_key_path)
        return context

    async def _request(self, method: str, path: str, *, json: Any = None,
                       params: Mapping[str, str] | None = None,
                       content_type: str = "application/json") -> Any:
        if self._session is None:
            raise RuntimeError("KubeClient is used outside `async with`")
        status, body = await self._send(method, path, json, params, content_type)
        if status == 401 and self._relogin is not None:
            fresh = await asyncio.to_thread(self._relogin)
            if fresh is not None:
                self._connection = fresh
                status, body = await self._send(method, path, json, params, content_type)
        if status == 401:
            if self._refused_since is None:
                self._refused_since = self._clock()
        else:
            self._refused_since = None
        return _checked(method, path, status, body)

    async def _send(self, method: str, path: str, json: Any, params: Mapping[str, str] | None,
                    content_type: str) -> tuple[int, Any]:
        assert self._session is not None
        headers = {"Content-Type": content_type, **self._authorization()}
        async with self._session.request(method, path, json=json, params=params,
                                         headers=headers) as response:
            text = await response.text()
            try:
                body = json_module.loads(text) if text.strip() else None
            except ValueError:
                body = text
            return response.status, body

    async def served_kinds(self, api_version: str) -> frozenset[str]:
        """The kinds the API server serves under `api_version` (discovery); empty when the
        group is not installed, as for a CRD-defined API whose CRDs are absent."""
        base = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
        try:
            body = await self._request("GET", base)
        except NotFound:
            return frozenset()
        return frozenset(str(r["kind"]) for r in (body or {}).get("resources", [])
                         if "/" not in str(r.get("name", "")))

    async def get(self, kind: KubeKind, name: str, namespace: str | None = None
                  ) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            result: dict[str, Any] = await self._request("GET", kind.path(namespace, name))
        except NotFound:
            return None
        return result

    async def list(self, kind: KubeKind, namespace: str | None = None,
                   label_selector: str | None = None) -> list[dict[str, Any]]:
        """Every object, fetched in pages of `LIST_PAGE_SIZE` (limit/continue), so neither the
        API server nor this process builds one answer of the whole collection."""
        first = {"limit": str(LIST_PAGE_SIZE)}
        if label_selector:
            first["labelSelector"] = label_selector
        for attempt in range(LIST_ATTEMPTS):
            items: list[dict[str, Any]] = []
            params = first
            try:
                while True:
                    body = await self._request("GET", kind.path(namespace), params=params) or {}
                    items += body.get("items", [])
                    token = (body.get("metadata") or {}).get("continue")
                    if not token:
                        return items
                    params = {**first, "continue": token}
            except Gone:
                # The list took longer than the API server keeps its snapshot (etcd compacts
                # every 5 minutes): start again, so the result is one consistent snapshot.
                if attempt == LIST_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind = kind_of(obj)
        namespace = obj["metadata"].get("namespace") if kind.namespaced else None
        created: dict[str, Any] = await self._request("POST", kind.path(namespace), json=obj)
        return created

    async def patch(self, kind: KubeKind, name: str, patch: Mapping[str, Any],
                    namespace: str | None = None, subresource: str | None = None
                    ) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386)."""
        patched: dict[str, Any] = await self._request(
            "PATCH", kind.path(namespace, name, subresource), json=patch,
            content_type="application/merge-patch+json")
        return patched

    async def delete(self, kind: KubeKind, name: str, namespace: str | None = None) -> bool:
        """Delete; False when it was already gone."""
        try:
            await self._request("DELETE", kind.path(namespace, name))
        except NotFound:
            return False
        return True

    async def ensure(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create the object, or bring an existing one's labels and content up to it."""
        kind = kind_of(obj)
        metadata = obj["metadata"]
        namespace = metadata.get("namespace") if kind.namespaced else None
        try:
            return await self.create(obj)
        except Conflict:
            pass
        patch = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
        patch["metadata"] = {k: metadata[k] for k in ("labels", "annotations", "ownerReferences")
                             if k in metadata}
        return await self.patch(kind, metadata["name"], patch, namespace)


def _checked(method: str, path: str, status: int, body: Any) -> Any:
    """The answer's body, or the typed error for its status."""
    if status == 404:
        raise NotFound(404, f"{method} {path}")
    if status == 409:
        raise Conflict(409, _message(body))
    if status == 410:
        raise Gone(410, f"{method} {path}: {_message(body)}")
    if status >= 400:
        raise KubeError(status, f"{method} {path}: {_message(body)}")
    return body


def _message(body: Any) -> str:
    if isinstance(body, dict):
        return str(body.get("message") or body)
    return str(body)
