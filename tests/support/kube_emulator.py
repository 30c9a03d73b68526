"""An in-process Kubernetes API (kmock) that behaves enough like a cluster to run kopf against.

    async with KubeEmulator() as kube, run_operator(kube, registry=registry) as run:
        await kube.apply(manifest)
        await kube.wait_for("kubiot.io/v1alpha1", "Device", "d1", is_ready, namespace="acme")
        await run.kill()  # a crash; a new run_operator() on the same `kube` resumes from its state

kmock's `KubernetesEmulator` stores objects and serves discovery, lists, watches and patches, but
keeps no resourceVersion, generation or uid, replays every object on each watch, ignores label
selectors, stores `generateName` objects under no name, cannot route `/api/v1/namespaces[/x]`,
turns a failed JSON-patch `test` into a 500 and PUT into nothing, and lets a main-endpoint patch
overwrite `status`. `ClusterEmulator` adds those parts of the API contract that kopf and the
operator rely on. Still not emulated: garbage collection by `ownerReferences` (children stay when
their owner goes), namespace-deletion cascades, the existence check of a namespace on create,
server-side apply and strategic-merge semantics (both are plain JSON merge patches: lists are
replaced, never merged by key), schema validation, defaulting and CEL rules of the CRDs, and
DELETED events for objects that stop matching a watched label selector.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import contextvars
import copy
import dataclasses
import datetime
import re
import secrets
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import aiohttp.test_utils
import aiohttp.web
import attrs
import jsonpatch
import kmock
import kopf
import yaml
from kmock._internal import dicts as kmock_dicts
from kmock._internal import enums as kmock_enums
from kmock._internal import rendering as kmock_rendering

JsonDict = dict[str, Any]
CRDS_DIR = Path(__file__).resolve().parents[2] / "crds"
REQUEST_HISTORY = 200
_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")


# --- What the cluster serves -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ResourceSpec:
    """One served resource: its API coordinates and what discovery says about it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    subresources: frozenset[str] = frozenset()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """The `group/version/plural` key kmock uses for `resources` and `objects`."""
        return f"{self.group}/{self.version}/{self.plural}" if self.group else \
            f"{self.version}/{self.plural}"

    def url(self, namespace: str | None = None, name: str | None = None,
            subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        parts = [base]
        if self.namespaced and namespace is not None:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name is not None:
            parts.append(name)
        if subresource is not None:
            parts.append(subresource)
        return "/".join(parts)


BUILTIN_RESOURCES: tuple[ResourceSpec, ...] = (
    ResourceSpec("", "v1", "namespaces", "Namespace", False, frozenset({"status"})),
    ResourceSpec("", "v1", "secrets", "Secret", True),
    ResourceSpec("", "v1", "configmaps", "ConfigMap", True),
    ResourceSpec("", "v1", "services", "Service", True, frozenset({"status"})),
    ResourceSpec("", "v1", "events", "Event", True),
    ResourceSpec("apps", "v1", "deployments", "Deployment", True, frozenset({"status", "scale"})),
    ResourceSpec("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True,
                 frozenset({"status"})),
    ResourceSpec("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True),
    ResourceSpec("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor", True),
    ResourceSpec("coordination.k8s.io", "v1", "leases", "Lease", True),
    ResourceSpec("events.k8s.io", "v1", "events", "Event", True),
)


def resources_from_crd(crd: Mapping[str, Any]) -> list[ResourceSpec]:
    """The served versions of one CustomResourceDefinition."""
    spec = crd["spec"]
    return [
        ResourceSpec(
            group=spec["group"], version=version["name"], plural=spec["names"]["plural"],
            kind=spec["names"]["kind"], namespaced=spec["scope"] == "Namespaced",
            subresources=frozenset((version.get("subresources") or {}).keys()),
        )
        for version in spec["versions"] if version.get("served", True)
    ]


def kubiot_resources(crds_dir: Path = CRDS_DIR) -> list[ResourceSpec]:
    """kubiot's custom resources, read from the generated CRD manifests."""
    found: list[ResourceSpec] = []
    for path in sorted(crds_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                found.extend(resources_from_crd(doc))
    return found


# --- Pure API semantics ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LabelRequirement:
    """One term of a label selector: `key op values`."""

    key: str
    operator: str  # "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "exists":
            return self.key in labels
        if self.operator == "!exists":
            return self.key not in labels
        if self.operator == "in":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values


_SET_TERM = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ_TERM = re.compile(r"^\s*([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)\s*$")
_EXISTS_TERM = re.compile(r"^\s*(!?)\s*([\w./-]+)\s*$")


def _split_selector(text: str) -> list[str]:
    """Split on commas that are not inside `in (...)` value lists."""
    terms, depth, current = [], 0, ""
    for char in text:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [term for term in terms if term.strip()]


def parse_label_selector(text: str) -> list[LabelRequirement]:
    """Parse a Kubernetes label selector string (equality- and set-based)."""
    requirements: list[LabelRequirement] = []
    for term in _split_selector(text):
        if match := _SET_TERM.match(term):
            values = frozenset(v.strip() for v in match[3].split(",") if v.strip())
            requirements.append(LabelRequirement(match[1], match[2], values))
        elif match := _EQ_TERM.match(term):
            operator = "notin" if match[2] == "!=" else "in"
            requirements.append(LabelRequirement(match[1], operator, frozenset({match[3]})))
        elif match := _EXISTS_TERM.match(term):
            operator = "!exists" if match[1] else "exists"
            requirements.append(LabelRequirement(match[2], operator))
        else:
            raise ValueError(f"unparseable label selector term: {term!r}")
    return requirements


def matches_label_selector(obj: Mapping[str, Any], selector: str | None) -> bool:
    """Whether an object's labels satisfy a label selector (no selector matches everything)."""
    if not selector:
        return True
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(req.matches(labels) for req in parse_label_selector(selector))


_SYSTEM_METADATA = ("uid", "creationTimestamp", "generation", "resourceVersion", "name",
                    "namespace", "deletionTimestamp", "deletionGracePeriodSeconds")


def settle_update(old: Mapping[str, Any], patched: Mapping[str, Any], *, subresource: str | None,
                  status_is_subresource: bool, resource_version: str) -> JsonDict | None:
    """The stored object after a patch, as the API server would keep it; None if nothing changed.

    Writes to `/status` keep only the status; writes to the main endpoint of a resource with a
    status subresource keep the old status; system metadata cannot be changed by clients;
    `generation` grows when anything but metadata and status changes.
    """
    new = copy.deepcopy(dict(patched))
    if subresource == "status":
        new = {**copy.deepcopy(dict(old)), "status": new.get("status")}
        if new["status"] is None:
            del new["status"]
    elif status_is_subresource:
        new.pop("status", None)
        if "status" in old:
            new["status"] = copy.deepcopy(old["status"])
    old_meta = old.get("metadata") or {}
    meta = new.setdefault("metadata", {})
    for field in _SYSTEM_METADATA:
        if field in old_meta:
            meta[field] = old_meta[field]
        else:
            meta.pop(field, None)
    if new == old:
        return None
    outside = {k: v for k, v in new.items() if k not in ("metadata", "status")}
    old_outside = {k: v for k, v in old.items() if k not in ("metadata", "status")}
    if outside != old_outside:
        meta["generation"] = int(old_meta.get("generation", 1)) + 1
    meta["resourceVersion"] = resource_version
    return new


def apply_patch(obj: Mapping[str, Any], patch: Any) -> JsonDict:
    """Apply a JSON merge patch (a dict) or a JSON patch (a list of ops) to an object.

    Raises ValueError when the patch cannot apply, including a failed `test` op.
    """
    if isinstance(patch, list):
        try:
            return dict(jsonpatch.apply_patch(copy.deepcopy(dict(obj)), patch))
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise ValueError(str(exc)) from exc
    if isinstance(patch, Mapping):
        return dict(kmock_dicts.merge_patch_dict(obj, patch))
    raise ValueError(f"unsupported patch body: {type(patch).__name__}")


def _as_revision(value: str | None) -> int:
    """A resourceVersion as a number; anything unparseable counts as "from the beginning"."""
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- The emulator ------------------------------------------------------------------------------

_NAMESPACE_PATH = re.compile(
    r"^/api/v1/namespaces(?:/(?P<name>[^/]+)(?:/(?P<sub>status|finalize))?)?/?$")
_NAMESPACES = kmock.resource("", "v1", "namespaces")


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with resourceVersion, generation, uid, generateName, label
    selectors, status-subresource isolation, namespaces and 422 on failed JSON-patch tests."""

    _revision: int = attrs.field(default=0, init=False)

    def next_resource_version(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _with_new_version(self, obj: Mapping[str, Any]) -> JsonDict:
        # A deletion is a change too: watchers resuming from an older version must still see it.
        copied = copy.deepcopy(dict(obj))
        copied.setdefault("metadata", {})["resourceVersion"] = self.next_resource_version()
        return copied

    def _is_namespaced(self, resource: Any) -> bool:
        try:
            return self.resources[resource].namespaced is not False
        except KeyError:
            return True

    def _status_is_subresource(self, resource: Any) -> bool:
        try:
            return "status" in self.resources[resource].subresources
        except KeyError:
            return False

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        try:
            return await self._serve(raw_request)
        finally:
            # kmock matches each request against its whole request log, which makes a long run
            # quadratic; only the recent past is kept for assertions.
            if len(self._requests) > REQUEST_HISTORY:
                del self._requests[:-REQUEST_HISTORY]

    async def _serve(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock's path parser reads `/api/v1/namespaces/x` as "namespace x, no resource"; route
        # the Namespace resource itself by hand, everything else through kmock's own parsing.
        match = _NAMESPACE_PATH.match(raw_request.path)
        if match is None:
            response: aiohttp.web.StreamResponse = await super().__call__(raw_request)
            return response
        await raw_request.read()
        try:
            request = await self._parse_namespace_request(raw_request, match)
            self._requests.append(request)
            handled: aiohttp.web.StreamResponse = await self._handle(request)
            return handled
        except Exception as exc:
            error: aiohttp.web.StreamResponse = await self._render_error(exc)
            return error

    async def _parse_namespace_request(self, raw_request: aiohttp.web.BaseRequest,
                                       match: re.Match[str]) -> Any:
        try:
            data = await raw_request.json()
        except ValueError:
            data = None
        name, sub = match["name"], match["sub"]
        method, query = raw_request.method.upper(), dict(raw_request.query)
        action: kmock_enums.action | None
        if method == "GET" and query.get("watch") == "true":
            action = kmock_enums.action.WATCH
        elif name is None:
            action = {"GET": kmock_enums.action.LIST, "POST": kmock_enums.action.CREATE}.get(method)
        else:
            action = {"GET": kmock_enums.action.FETCH, "PATCH": kmock_enums.action.UPDATE,
                      "DELETE": kmock_enums.action.DELETE}.get(method)
        return kmock_rendering.Request(
            id=len(self._requests), raw_request=raw_request, url=raw_request.url,
            method=raw_request.method, params=query, headers=dict(raw_request.headers),
            cookies=dict(raw_request.cookies), data=data, body=await raw_request.read(),
            text=await raw_request.text(), action=action, resource=_NAMESPACES,
            namespace=None, name=name, subresource=sub,
        )

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        action = request.action
        named = request.resource is not None and request.name is not None
        # kmock leaves PUT without an action (so without a fallback); it is a full replacement.
        replacing = named and request.method == kmock_enums.method.PUT
        mutating = replacing or (request.resource is not None and (
            action == kmock_enums.action.CREATE
            or (named and action in (kmock_enums.action.UPDATE, kmock_enums.action.DELETE))))
        if not mutating:
            response: aiohttp.web.StreamResponse = await super()._handle(request)
            return response

        async with self._lock:
            released = await self._mutate(request, replace=replacing)
        try:
            if replacing:
                stored = self._objects[(request.resource, request.namespace, request.name)]
                return aiohttp.web.json_response(stored.last.raw)
            # Skip kmock's own state keeping (done above); keep its response rendering.
            rendered: aiohttp.web.StreamResponse = \
                await super(kmock.KubernetesEmulator, self)._handle(request)
            return rendered
        finally:
            if released is not None:
                # Like kmock: forget a released object only after its last state was returned.
                async with self._lock:
                    gone = self._with_new_version(self._objects[released].raw)
                    self._objects[released].delete()
                    await self._buses[request.resource].put({"type": "DELETED", "object": gone})

    async def _mutate(self, request: Any, *, replace: bool = False) -> Any:
        """Change the stored state for one create/patch/replace/delete; return a key to release."""
        if request.action == kmock_enums.action.CREATE:
            await self._create(request)
            return None
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        stored = self._objects[key]
        old: JsonDict = stored.raw
        meta = old.get("metadata") or {}
        if request.action == kmock_enums.action.DELETE:
            if meta.get("deletionTimestamp"):
                return None
            if meta.get("finalizers"):
                new = copy.deepcopy(old)
                new["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0,
                                       resourceVersion=self.next_resource_version())
                stored.history.append(new)
                await self._buses[request.resource].put({"type": "MODIFIED", "object": new})
                return None
            stored.delete()
            gone = self._with_new_version(old)
            await self._buses[request.resource].put({"type": "DELETED", "object": gone})
            return None

        if replace:
            patched = self._replacement(old, request.data)
        else:
            try:
                patched = apply_patch(old, request.data)
            except ValueError as exc:
                raise kmock.KubernetesError(status=422, reason="Invalid",
                                            message=str(exc)) from exc
        new_state = settle_update(
            old, patched, subresource=request.subresource,
            status_is_subresource=self._status_is_subresource(request.resource),
            resource_version=str(self._revision + 1))
        if new_state is None:
            return None
        self.next_resource_version()
        stored.history.append(new_state)
        await self._buses[request.resource].put({"type": "MODIFIED", "object": new_state})
        new_meta = new_state["metadata"]
        return key if new_meta.get("deletionTimestamp") and not new_meta.get("finalizers") else None

    @staticmethod
    def _replacement(old: Mapping[str, Any], body: Any) -> JsonDict:
        if not isinstance(body, dict):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="no object body")
        sent = (body.get("metadata") or {}).get("resourceVersion")
        current = (old.get("metadata") or {}).get("resourceVersion")
        if sent and sent != current:
            raise kmock.KubernetesError(
                status=409, reason="Conflict",
                message=f"the object has been modified (resourceVersion {current}, not {sent})")
        return body

    async def _create(self, request: Any) -> None:
        obj = request.data
        if not isinstance(obj, dict):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="no object body")
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{secrets.token_hex(3)}"
        if not meta.get("name"):
            raise kmock.KubernetesError(status=422, reason="Invalid", message="name is required")
        if request.namespace:
            meta["namespace"] = request.namespace
        if not self._is_namespaced(request.resource):
            meta.pop("namespace", None)  # as the API server does for cluster-scoped kinds
        key = (request.resource, meta.get("namespace"), meta["name"])
        if key in self._objects and not self._objects[key].deleted:
            raise kmock.KubernetesError(status=409, reason="AlreadyExists",
                                        message=f"{meta['name']} already exists")
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1,
                    resourceVersion=self.next_resource_version())
        meta.pop("deletionTimestamp", None)
        # `request.data` is mutated in place on purpose: kmock's create response reads it.
        stored = copy.deepcopy(obj)
        if key in self._objects:
            self._objects[key].create(stored)
        else:
            self._objects[key] = stored
        await self._buses[request.resource].put({"type": "ADDED", "object": stored})

    async def _serve_list(self, request: Any) -> Any:
        payload: Any = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        payload["items"] = [copy.deepcopy(item) for item in payload["items"]
                            if matches_label_selector(item, selector)]
        payload["metadata"]["resourceVersion"] = str(self._revision)
        return payload

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        selector = request.params.get("labelSelector")
        since = _as_revision(request.params.get("resourceVersion"))
        async for event in super()._serve_watch(request):
            if not isinstance(event, dict):
                yield event
            # kmock replays every stored object as ADDED when a watch starts; a real API server
            # sends only what changed after the requested resourceVersion. Replaying stale states
            # makes kopf retry patches against versions it has already moved past.
            elif _as_revision(event["object"]["metadata"].get("resourceVersion")) <= since:
                continue
            # Unlike a real API server, an object that stops matching sends no DELETED event.
            elif matches_label_selector(event["object"], selector):
                yield event


# --- The test-facing harness -------------------------------------------------------------------

class KubeEmulatorError(RuntimeError):
    """The emulated API answered a harness call with an error status."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body!r}")
        self.status = status
        self.body = body


class _QuietTestServer(aiohttp.test_utils.RawTestServer):
    """kmock's default server, without an access-log line for every request kopf makes."""

    async def _make_runner(self, debug: bool = True, **kwargs: Any) -> aiohttp.web.ServerRunner:
        runner: aiohttp.web.ServerRunner = await super()._make_runner(
            debug=debug, access_log=None, **kwargs)
        return runner


class KubeEmulator:
    """A running `ClusterEmulator` on a free loopback port, with kubectl-like helpers."""

    def __init__(self, resources: Iterable[ResourceSpec] | None = None) -> None:
        specs = list(resources) if resources is not None else \
            [*BUILTIN_RESOURCES, *kubiot_resources()]
        self._specs = {(spec.api_version, spec.kind): spec for spec in specs}
        self.cluster = ClusterEmulator()
        for spec in specs:
            self.cluster.resources[spec.key] = kmock.ResourceInfo(
                kind=spec.kind, namespaced=spec.namespaced, verbs=set(_VERBS),
                subresources=set(spec.subresources))
        self._stack = contextlib.AsyncExitStack()
        self._server: Any = None

    async def __aenter__(self) -> Self:
        await self._stack.enter_async_context(self.cluster)
        self._server = await self._stack.enter_async_context(
            kmock.Server(self.cluster, server_cls=_QuietTestServer))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._stack.aclose()

    @property
    def url(self) -> str:
        return str(self._server.url).rstrip("/")

    def spec(self, api_version: str, kind: str) -> ResourceSpec:
        try:
            return self._specs[(api_version, kind)]
        except KeyError:
            raise LookupError(f"{api_version} {kind} is not served by the emulator") from None

    async def request(self, method: str, path: str, *, body: Any = None,
                      content_type: str = "application/json",
                      params: Mapping[str, str] | None = None) -> tuple[int, Any]:
        """A raw API call: the HTTP status and the decoded JSON answer."""
        client: aiohttp.ClientSession = self._server.client
        headers = {"Content-Type": content_type} if body is not None else {}
        async with client.request(method, path, json=body, headers=headers,
                                  params=params) as response:
            return response.status, await response.json(content_type=None)

    async def _checked(self, method: str, path: str, **kwargs: Any) -> Any:
        status, body = await self.request(method, path, **kwargs)
        if status >= 400:
            raise KubeEmulatorError(status, body)
        return body

    async def create(self, obj: Mapping[str, Any]) -> JsonDict:
        """POST a new object; fails with 409 if it exists."""
        spec = self.spec(obj["apiVersion"], obj["kind"])
        namespace = (obj.get("metadata") or {}).get("namespace")
        result: JsonDict = await self._checked("POST", spec.url(namespace), body=dict(obj))
        return result

    async def apply(self, obj: Mapping[str, Any]) -> JsonDict:
        """Create the object, or merge-patch everything but its status into the existing one."""
        meta = obj.get("metadata") or {}
        existing = await self.get(obj["apiVersion"], obj["kind"], meta["name"],
                                  meta.get("namespace"))
        if existing is None:
            return await self.create(obj)
        body = {k: v for k, v in obj.items() if k != "status"}
        return await self.patch(obj["apiVersion"], obj["kind"], meta["name"], body,
                                namespace=meta.get("namespace"))

    async def get(self, api_version: str, kind: str, name: str,
                  namespace: str | None = None) -> JsonDict | None:
        spec = self.spec(api_version, kind)
        status, body = await self.request("GET", spec.url(namespace, name))
        if status == 404:
            return None
        if status >= 400:
            raise KubeEmulatorError(status, body)
        result: JsonDict = body
        return result

    async def list(self, api_version: str, kind: str, namespace: str | None = None,
                   label_selector: str | None = None) -> list[JsonDict]:
        spec = self.spec(api_version, kind)
        params = {"labelSelector": label_selector} if label_selector else None
        body = await self._checked("GET", spec.url(namespace), params=params)
        items: list[JsonDict] = body["items"]
        return items

    async def patch(self, api_version: str, kind: str, name: str, patch: Any,
                    namespace: str | None = None, subresource: str | None = None) -> JsonDict:
        """Merge-patch (dict) or JSON-patch (list of ops) an object or its subresource."""
        spec = self.spec(api_version, kind)
        content_type = "application/json-patch+json" if isinstance(patch, list) else \
            "application/merge-patch+json"
        result: JsonDict = await self._checked("PATCH", spec.url(namespace, name, subresource),
                                               body=patch, content_type=content_type)
        return result

    async def delete(self, api_version: str, kind: str, name: str,
                     namespace: str | None = None) -> None:
        """Delete like the API server: objects with finalizers only get a deletionTimestamp."""
        spec = self.spec(api_version, kind)
        await self._checked("DELETE", spec.url(namespace, name))

    async def wait_for(self, api_version: str, kind: str, name: str,
                       predicate: Callable[[JsonDict | None], object],
                       namespace: str | None = None,
                       timeout: float = 10.0) -> JsonDict | None:  # noqa: ASYNC109
        """Poll the object until `predicate(obj)` holds (obj is None while it does not exist)."""
        deadline = time.monotonic() + timeout
        while True:
            obj = await self.get(api_version, kind, name, namespace)
            if predicate(obj):
                return obj
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{kind} {namespace or ''}/{name} did not satisfy the condition within "
                    f"{timeout:.1f}s; last seen: {obj!r}")
            await asyncio.sleep(0.05)

    def events(self, name: str | None = None) -> builtins.list[JsonDict]:
        """core/v1 Events stored so far, optionally only those about the named object."""
        found: builtins.list[JsonDict] = []
        for key in list(self.cluster.objects):
            resource = key[0]
            if (resource.group, resource.version, resource.plural) != ("", "v1", "events"):
                continue
            stored = self.cluster.objects[key]
            if stored.deleted:
                continue
            event: JsonDict = copy.deepcopy(stored.raw)
            if name is None or (event.get("involvedObject") or {}).get("name") == name:
                found.append(event)
        return found


# --- Running kopf against it -------------------------------------------------------------------

SettingsHook = Callable[[kopf.OperatorSettings], None]


@dataclasses.dataclass
class _LoginTarget:
    url: str = ""


# Keyed by registry, so a registry reused across tests gets one login handler, re-aimed per run.
_LOGIN_TARGETS: weakref.WeakKeyDictionary[kopf.OperatorRegistry, _LoginTarget] = \
    weakref.WeakKeyDictionary()


def _point_login_at(registry: kopf.OperatorRegistry, url: str) -> None:
    """Register (once per registry) a login handler that connects kopf to `url`."""
    target = _LOGIN_TARGETS.get(registry)
    if target is None:
        target = _LOGIN_TARGETS[registry] = _LoginTarget()

        @kopf.on.login(registry=registry, id="kube-emulator")
        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=target.url, insecure=True,
                                       default_namespace="default")

    target.url = url


def fast_settings(settings: kopf.OperatorSettings) -> None:
    """Settings that keep kopf standalone, quiet about discovery, and quick to stop."""
    settings.peering.standalone = True
    settings.scanning.disabled = True
    settings.watching.reconnect_backoff = 0.1
    settings.queueing.exit_timeout = 0.5
    settings.networking.error_backoffs = [0.1, 0.2, 0.5]


_OPERATOR_MARK: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "kube_emulator_operator", default=None)
TaskFactory = Callable[..., "asyncio.Future[Any]"]


class _TasksNotOwnedByOperator(Collection["asyncio.Task[Any]"]):
    """Every task except those the operator (kopf or its handlers) created.

    On exit, kopf waits for and then cancels every task of the loop created since it started.
    In the test's loop that includes the emulator's server tasks (watch streams, connections of
    the test's own client) and the test's own background tasks: they would stall each stop by
    kopf's 5-second grace period, and a crash would break the emulator for the next operator.
    """

    def __init__(self, owned: weakref.WeakSet[asyncio.Task[Any]]) -> None:
        self._owned = owned

    def __contains__(self, task: object) -> bool:
        return task not in self._owned

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _marking_factory(previous: TaskFactory | None, mark: object,
                     owned: weakref.WeakSet[asyncio.Task[Any]]) -> TaskFactory:
    """A task factory that records tasks created from within the operator's context."""

    def create(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        task = previous(loop, coro, **kwargs) if previous is not None else \
            asyncio.Task(coro, loop=loop, **kwargs)
        # Tasks inherit the creator's context, so everything spawned under kopf carries the mark.
        if _OPERATOR_MARK.get() is mark and isinstance(task, asyncio.Task):
            owned.add(task)
        return task

    return create


async def _serve_as_operator(owned: weakref.WeakSet[asyncio.Task[Any]],
                             **kwargs: Any) -> None:
    """`kopf.operator()`, except that on exit it stops only the operator's own tasks."""
    root_tasks = await kopf.spawn_tasks(**kwargs)
    await kopf.run_tasks(root_tasks, ignored=_TasksNotOwnedByOperator(owned))


@dataclasses.dataclass
class OperatorRun:
    """A kopf operator running as a task in the current event loop."""

    task: asyncio.Task[None]
    stop_flag: asyncio.Event
    ready_flag: asyncio.Event

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Ask kopf to stop gracefully and wait for it."""
        self.stop_flag.set()
        if not self.task.done():
            await asyncio.wait_for(asyncio.shield(self.task), timeout)

    async def kill(self) -> None:
        """Cancel the operator abruptly, as a crash would, and wait for the task to end."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@contextlib.asynccontextmanager
async def run_operator(
    emulator: KubeEmulator,
    *,
    registry: kopf.OperatorRegistry,
    settings_hook: SettingsHook | None = None,
    namespaces: Collection[str] = (),
    clusterwide: bool = True,
    memo: object | None = None,
    ready_timeout: float = 10.0,
) -> AsyncIterator[OperatorRun]:
    """Run kopf with `registry` against the emulator until the block exits (then stop it)."""
    _point_login_at(registry, emulator.url)
    settings = kopf.OperatorSettings()
    fast_settings(settings)
    if settings_hook is not None:
        settings_hook(settings)
    stop_flag, ready_flag = asyncio.Event(), asyncio.Event()
    mark, owned = object(), weakref.WeakSet[asyncio.Task[Any]]()
    context = contextvars.copy_context()
    context.run(_OPERATOR_MARK.set, mark)
    loop = asyncio.get_running_loop()
    previous_factory = loop.get_task_factory()
    loop.set_task_factory(_marking_factory(previous_factory, mark, owned))
    task = loop.create_task(_serve_as_operator(
        owned, registry=registry, settings=settings, standalone=True,
        clusterwide=clusterwide and not namespaces, namespaces=namespaces,
        stop_flag=stop_flag, ready_flag=ready_flag, memo=memo,
    ), name="kopf operator", context=context)
    run = OperatorRun(task=task, stop_flag=stop_flag, ready_flag=ready_flag)
    try:
        ready = asyncio.ensure_future(run.ready_flag.wait())
        done, _ = await asyncio.wait({ready, run.task}, timeout=ready_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            if run.task.done():
                run.task.result()  # surface why kopf exited
            raise TimeoutError(f"kopf was not ready within {ready_timeout:.1f}s")
        yield run
    finally:
        try:
            if run.task.done():
                if not run.task.cancelled():
                    run.task.result()
            else:
                try:
                    await run.stop()
                except TimeoutError:
                    await run.kill()
        finally:
            loop.set_task_factory(previous_factory)
