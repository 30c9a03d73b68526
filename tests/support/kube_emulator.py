"""An in-process Kubernetes API (kmock) that behaves enough like a cluster to run kopf against.

    async with KubeEmulator() as kube, run_operator(kube, registry=registry) as run:
        await kube.apply(manifest)
        await kube.wait_for("kubiot.io/v1alpha1", "Device", "d1", is_ready, namespace="acme")
        await run.kill()  # a crash; a new run_operator() on the same `kube` resumes from its state

It imitates kube-apiserver, its garbage collector and its namespace controller as of Kubernetes
1.30 (read from kubernetes/kubernetes: pkg/apis/core/validation, staging/.../apimachinery
validation of names, apiextensions-apiserver's customresource strategy, pkg/controller/
garbagecollector and pkg/controller/namespace/deletion).

kmock's `KubernetesEmulator` stores objects and serves discovery, lists, watches and patches, but
keeps no resourceVersion, generation or uid, replays every object on each watch, ignores label
selectors, stores `generateName` objects under no name, cannot route `/api/v1/namespaces[/x]`,
turns a failed JSON-patch `test` into a 500 and PUT into nothing, lets a main-endpoint patch
overwrite `status`, and serves any resource it is asked for. `ClusterEmulator` adds those parts
of the API contract that kopf and the operator rely on, and refuses what a real cluster refuses
where the product depends on it:

- only the declared resources are served (a CRD that is not installed answers 404, in discovery
  too);
- object names are checked per kind (a Service name is a DNS-1035 label, a Namespace a DNS-1123
  label, most others DNS-1123 subdomains) with 422;
- `.status` is dropped on create and on writes to the main resource when the kind has a status
  subresource;
- a custom resource is pruned of fields its CRD does not declare and checked against the
  CRD's OpenAPI schema on every write, status writes included (422 naming the fields);
- a Secret's or ConfigMap's data over 1 MiB is refused with 422, any object over etcd's 1.5 MiB
  request limit with 500;
- an object whose owner (by ownerReference uid) is gone is deleted, and a deleted Namespace
  deletes everything in it, both through finalizers (objects with finalizers wait for them);
  a terminating Namespace refuses new objects with 403, and an object in a namespace that does
  not exist is refused with 404;
- with `tokens`, a request without one of the accepted bearer tokens gets 401, and a token can
  be expired while clients hold it;
- lists are chunked as kube-apiserver chunks them (`limit`/`continue`, in namespace and name
  order), and `compact()` expires the continue tokens issued so far (410, reason Expired), as
  etcd's compaction does;
- a Deployment's status reports its replicas available once its generation is applied
  (`deployments_available=False`: never), as the deployment controller would.

Still not emulated: foreground and orphan
deletion propagation, server-side apply and strategic-merge semantics (both are plain JSON merge
patches: lists are replaced, never merged by key), defaulting and CEL rules of the CRDs,
schema validation of built-in kinds, admission webhooks, RBAC, and DELETED events for objects
that stop matching a watched label selector.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import contextvars
import copy
import dataclasses
import datetime
import json
import random
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
import jsonschema
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
    #: A CRD's openAPIV3Schema, which the API server prunes and validates every write with.
    schema: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False,
                                                         hash=False)

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


#: The kinds every cluster serves (those the operator and the tests touch).
CORE_RESOURCES: tuple[ResourceSpec, ...] = (
    ResourceSpec("", "v1", "namespaces", "Namespace", False, frozenset({"status"})),
    ResourceSpec("", "v1", "secrets", "Secret", True),
    ResourceSpec("", "v1", "configmaps", "ConfigMap", True),
    ResourceSpec("", "v1", "services", "Service", True, frozenset({"status"})),
    ResourceSpec("", "v1", "events", "Event", True),
    ResourceSpec("apps", "v1", "deployments", "Deployment", True, frozenset({"status", "scale"})),
    ResourceSpec("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True,
                 frozenset({"status"})),
    ResourceSpec("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True),
    ResourceSpec("coordination.k8s.io", "v1", "leases", "Lease", True),
    ResourceSpec("events.k8s.io", "v1", "events", "Event", True),
)
#: The Prometheus Operator's CRDs (kube-prometheus-stack installs them; minikube has none).
PROMETHEUS_OPERATOR_RESOURCES: tuple[ResourceSpec, ...] = (
    ResourceSpec("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor", True),
    ResourceSpec("monitoring.coreos.com", "v1", "podmonitors", "PodMonitor", True),
)
BUILTIN_RESOURCES: tuple[ResourceSpec, ...] = (*CORE_RESOURCES, *PROMETHEUS_OPERATOR_RESOURCES)


def resources_from_crd(crd: Mapping[str, Any]) -> list[ResourceSpec]:
    """The served versions of one CustomResourceDefinition."""
    spec = crd["spec"]
    return [
        ResourceSpec(
            group=spec["group"], version=version["name"], plural=spec["names"]["plural"],
            kind=spec["names"]["kind"], namespaced=spec["scope"] == "Namespaced",
            subresources=frozenset((version.get("subresources") or {}).keys()),
            schema=(version.get("schema") or {}).get("openAPIV3Schema"),
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


def _write_continue(revision: int, after: tuple[str, str]) -> str:
    text = json.dumps({"rv": revision, "after": list(after)})
    return base64.urlsafe_b64encode(text.encode()).decode()


def _read_continue(token: str) -> tuple[int, tuple[str, str]]:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
        return int(decoded["rv"]), (str(decoded["after"][0]), str(decoded["after"][1]))
    except (ValueError, KeyError, IndexError, TypeError):
        raise kmock.KubernetesError(status=400, reason="BadRequest",
                                    message="invalid continue token") from None


def _as_revision(value: str | None) -> int:
    """A resourceVersion as a number; anything unparseable counts as "from the beginning"."""
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- What a real API server refuses -----------------------------------------------------------

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

#: Kinds whose names are not DNS-1123 subdomains (apimachinery's NameIsDNSSubdomain, the rule of
#: every other kind, custom resources included): core validation's ValidateNamespaceName and
#: ValidateServiceName.
_NAME_RULES: dict[tuple[str, str], str] = {
    ("", "namespaces"): "label",
    ("", "services"): "dns1035",
}
#: pkg/apis/core: MaxSecretSize, and the same bound on a ConfigMap's data.
MAX_DATA_BYTES = 1024 * 1024
#: etcd's default --max-request-bytes: nothing larger can be stored.
MAX_OBJECT_BYTES = 1536 * 1024


def name_errors(group: str, plural: str, name: str) -> list[str]:
    """Why the API server refuses `name` for this kind (empty: it accepts it)."""
    rule = _NAME_RULES.get((group, plural), "subdomain")
    if rule == "label":
        if len(name) > 63:
            return ["must be no more than 63 characters"]
        if not _DNS1123_LABEL.match(name):
            return ["a lowercase RFC 1123 label must consist of lower case alphanumeric "
                    "characters or '-', and must start and end with an alphanumeric character"]
    elif rule == "dns1035":
        if len(name) > 63:
            return ["must be no more than 63 characters"]
        if not _DNS1035_LABEL.match(name):
            return ["a DNS-1035 label must consist of lower case alphanumeric characters or "
                    "'-', start with an alphabetic character, and end with an alphanumeric "
                    "character"]
    else:
        if len(name) > 253:
            return ["must be no more than 253 characters"]
        if not _DNS1123_SUBDOMAIN.match(name):
            return ["a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                    "characters, '-' or '.', and must start and end with an alphanumeric "
                    "character"]
    return []


def data_size(obj: Mapping[str, Any], *, base64_data: bool) -> int:
    """Bytes of a Secret's or ConfigMap's payload as the API server counts them (decoded).

    `base64_data`: `data` holds base64 (a Secret) rather than text (a ConfigMap)."""
    total = 0
    for field in ("data", "binaryData", "stringData"):
        encoded = field == "binaryData" or (field == "data" and base64_data)
        for key, value in (obj.get(field) or {}).items():
            raw = str(value)
            total += len(key) + (len(raw) * 3 // 4 - raw.count("=") if encoded
                                 else len(raw.encode()))
    return total


def size_refusal(group: str, plural: str, obj: Mapping[str, Any]) -> kmock.KubernetesError | None:
    """The error a too-large object gets, or None."""
    if group == "" and plural in ("secrets", "configmaps") and \
            data_size(obj, base64_data=plural == "secrets") > MAX_DATA_BYTES:
        kind = "Secret" if plural == "secrets" else "ConfigMap"
        return kmock.KubernetesError(
            status=422, reason="Invalid",
            message=f"{kind} \"{(obj.get('metadata') or {}).get('name')}\" is invalid: data: "
                    f"Too long: must have at most {MAX_DATA_BYTES} bytes")
    if len(json.dumps(obj)) > MAX_OBJECT_BYTES:
        return kmock.KubernetesError(status=500, reason="InternalError",
                                     message="etcdserver: request is too large")
    return None


def prune_unknown_fields(schema: Mapping[str, Any], value: Any) -> None:
    """Drop, in place, fields a structural schema does not declare, as the API server does."""
    if isinstance(value, dict):
        properties = schema.get("properties")
        if properties is not None:
            for key in list(value):
                if key in properties:
                    prune_unknown_fields(properties[key], value[key])
                elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                    del value[key]
        elif isinstance(schema.get("additionalProperties"), Mapping):
            for item in value.values():
                prune_unknown_fields(schema["additionalProperties"], item)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for item in value:
            prune_unknown_fields(schema["items"], item)


class CustomResourceSchema:
    """A CRD's schema as the API server applies it to each write: prune, then validate.

    The OpenAPI checks (types, patterns, lengths, bounds, enums, required fields) are made;
    defaulting and CEL rules (`x-kubernetes-validations`) are not."""

    def __init__(self, kind: str, schema: Mapping[str, Any]) -> None:
        self.kind = kind
        self.schema = schema
        self._validator = jsonschema.Draft7Validator(dict(schema))

    def admit(self, obj: JsonDict) -> None:
        """Prune `obj` in place; raise a 422 naming each invalid field."""
        for part, part_schema in (self.schema.get("properties") or {}).items():
            if part not in ("apiVersion", "kind", "metadata") and part in obj:
                prune_unknown_fields(part_schema, obj[part])
        problems = [f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: "
                    f"Invalid value: {error.instance!r}: {error.message}"
                    for error in self._validator.iter_errors(obj)]
        if problems:
            name = (obj.get("metadata") or {}).get("name")
            raise kmock.KubernetesError(
                status=422, reason="Invalid",
                message=f"{self.kind} \"{name}\" is invalid: " + ", ".join(sorted(problems)))


#: Requests carrying this header are the test harness's own, not a client's under test.
HARNESS_HEADER = "X-Kube-Emulator-Harness"


def rbac_attributes(method: str, path: str, query: Mapping[str, str]
                    ) -> tuple[str, str, str] | None:
    """(verb, API group, resource[/subresource]) an authorizer sees; None for discovery."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]
    if not rest:
        return None
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    named = len(rest) > 1
    verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(
        method.upper())
    if verb is None:
        verb = "watch" if query.get("watch") in ("true", "1") else ("get" if named else "list")
    return verb, group, resource


def owner_uids(obj: Mapping[str, Any]) -> set[str]:
    return {ref["uid"] for ref in (obj.get("metadata") or {}).get("ownerReferences") or []
            if ref.get("uid")}


# --- The emulator ------------------------------------------------------------------------------

_NAMESPACE_PATH = re.compile(
    r"^/api/v1/namespaces(?:/(?P<name>[^/]+)(?:/(?P<sub>status|finalize))?)?/?$")
_NAMESPACES = kmock.resource("", "v1", "namespaces")
_DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with resourceVersion, generation, uid, generateName, label
    selectors, status-subresource isolation, namespaces and 422 on failed JSON-patch tests."""

    _revision: int = attrs.field(default=0, init=False)
    #: Continue tokens of lists begun before this revision are refused (see `compact`).
    compacted_revision: int = attrs.field(default=0, init=False)
    #: Bearer tokens the API accepts; None: every request is accepted, as with no authentication.
    tokens: set[str] | None = attrs.field(default=None)
    # The garbage collector and the namespace controller: woken whenever something goes away.
    _collector: asyncio.Task[None] | None = attrs.field(default=None, init=False)
    _wake: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    #: Whether Deployments' pods become available (the deployment controller and kubelets that
    #: the emulator stands in for report every replica available); False: none ever does.
    deployments_available: bool = attrs.field(default=True)
    #: Custom resources' schemas, applied to every write.
    schemas: dict[Any, CustomResourceSchema] = attrs.field(factory=dict)
    #: Every (verb, group, resource) clients other than the test harness asked for: what their
    #: RBAC role must grant.
    client_verbs: set[tuple[str, str, str]] = attrs.field(factory=set)
    #: The order in which a terminating namespace's kinds are emptied (by default: any).
    namespace_content_order: Callable[[list[Any]], list[Any]] = attrs.field(
        default=lambda kinds: random.sample(kinds, len(kinds)))
    #: Seconds between two kinds, as the real controller's API calls take.
    namespace_content_pause: float = attrs.field(default=0.0)

    def next_resource_version(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _with_new_version(self, obj: Mapping[str, Any]) -> JsonDict:
        # A deletion is a change too: watchers resuming from an older version must still see it.
        copied = copy.deepcopy(dict(obj))
        copied.setdefault("metadata", {})["resourceVersion"] = self.next_resource_version()
        return copied

    # kmock's `resources[...]` creates what it is asked for: test membership first.
    def _is_namespaced(self, resource: Any) -> bool:
        return resource not in self.resources or self.resources[resource].namespaced is not False

    def _status_is_subresource(self, resource: Any) -> bool:
        return resource in self.resources and "status" in self.resources[resource].subresources

    def _authenticated(self, raw_request: aiohttp.web.BaseRequest) -> bool:
        if self.tokens is None:
            return True
        scheme, _, token = raw_request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and token in self.tokens

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if not self._authenticated(raw_request):
            await raw_request.read()
            return aiohttp.web.json_response({
                "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                "message": "Unauthorized", "reason": "Unauthorized", "code": 401}, status=401)
        if HARNESS_HEADER not in raw_request.headers:
            attributes = rbac_attributes(raw_request.method, raw_request.path,
                                         raw_request.query)
            if attributes is not None:
                self.client_verbs.add(attributes)
        if self._collector is None:
            self._collector = asyncio.get_running_loop().create_task(
                self._collect_garbage(), name="kube-emulator garbage collector")
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

    async def stop_collecting(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
            self._collector = None

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.resource.plural \
                and request.resource not in self.resources:
            # What an API server says for a kind whose CRD is not installed.
            raise kmock.KubernetesError(
                status=404, reason="NotFound",
                message="the server could not find the requested resource")
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
                    await self._remove(released)

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
        if request.action == kmock_enums.action.DELETE:
            await self._delete(key)
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
        refusal = size_refusal(request.resource.group, request.resource.plural, new_state)
        if refusal is not None:
            raise refusal
        if request.resource in self.schemas:
            self.schemas[request.resource].admit(new_state)
        self.next_resource_version()
        stored.history.append(new_state)
        await self._buses[request.resource].put({"type": "MODIFIED", "object": new_state})
        if request.resource == _DEPLOYMENTS:
            await self._report_deployments()  # pods start at once here
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
        resource = request.resource
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{secrets.token_hex(3)}"
        if not meta.get("name"):
            raise kmock.KubernetesError(status=422, reason="Invalid", message="name is required")
        problems = name_errors(resource.group, resource.plural, meta["name"])
        if problems:
            raise kmock.KubernetesError(
                status=422, reason="Invalid",
                message=f"{obj.get('kind', resource.plural)} \"{meta['name']}\" is invalid: "
                        f"metadata.name: Invalid value: \"{meta['name']}\": {problems[0]}")
        if request.namespace:
            meta["namespace"] = request.namespace
        if not self._is_namespaced(resource):
            meta.pop("namespace", None)  # as the API server does for cluster-scoped kinds
        elif not self._namespace_exists(meta.get("namespace")):
            raise kmock.KubernetesError(
                status=404, reason="NotFound",
                message=f"namespaces \"{meta.get('namespace')}\" not found")
        elif self._terminating(meta.get("namespace")):
            raise kmock.KubernetesError(
                status=403, reason="Forbidden",
                message=f"{resource.plural} \"{meta['name']}\" is forbidden: unable to create "
                        f"new content in namespace {meta.get('namespace')} because it is being "
                        "terminated")
        key = (resource, meta.get("namespace"), meta["name"])
        if key in self._objects and not self._objects[key].deleted:
            raise kmock.KubernetesError(status=409, reason="AlreadyExists",
                                        message=f"{meta['name']} already exists")
        if self._status_is_subresource(resource):
            obj.pop("status", None)  # the strategy's PrepareForCreate resets it
        if (resource.group, resource.plural) == ("", "namespaces"):
            obj["spec"] = {"finalizers": ["kubernetes"]}
            obj["status"] = {"phase": "Active"}
        refusal = size_refusal(resource.group, resource.plural, obj)
        if refusal is not None:
            raise refusal
        if resource in self.schemas:
            self.schemas[resource].admit(obj)
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
        if resource == _DEPLOYMENTS:
            await self._report_deployments()  # pods start at once here

    def _namespace_exists(self, namespace: str | None) -> bool:
        key = (_NAMESPACES, None, namespace)
        return key in self._objects and not self._objects[key].deleted

    def _terminating(self, namespace: str | None) -> bool:
        key = (_NAMESPACES, None, namespace)
        if namespace is None or key not in self._objects or self._objects[key].deleted:
            return False
        return bool(self._objects[key].raw["metadata"].get("deletionTimestamp"))

    async def _delete(self, key: Any) -> bool:
        """Delete as the API server does: mark an object with finalizers, remove the rest.

        A Namespace always waits for its `kubernetes` finalizer: the namespace controller
        (the collector below) removes its content first. Call with the lock held; True when
        this changed anything."""
        stored = self._objects[key]
        old: JsonDict = stored.raw
        meta = old.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return False
        is_namespace = key[0] == _NAMESPACES
        if meta.get("finalizers") or is_namespace:
            new = copy.deepcopy(old)
            new["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0,
                                   resourceVersion=self.next_resource_version())
            if is_namespace:
                new["status"] = {"phase": "Terminating"}
                self._wake.set()
            stored.history.append(new)
            await self._buses[key[0]].put({"type": "MODIFIED", "object": new})
            return True
        await self._remove(key)
        return True

    async def _remove(self, key: Any) -> None:
        """Forget an object for good and tell watchers; call with the lock held."""
        gone = self._with_new_version(self._objects[key].raw)
        self._objects[key].delete()
        await self._buses[key[0]].put({"type": "DELETED", "object": gone})
        self._wake.set()

    async def _collect_garbage(self) -> None:
        """The garbage collector and the namespace controller, in one loop.

        An object whose every owner (by uid) is gone is deleted, as with background
        propagation; a terminating Namespace has its content deleted kind by kind and goes once
        it is empty. Deletion honours finalizers, so this runs again after each removal."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            async with self._lock:
                live = {key: obj.raw for key, obj in self._objects.items() if not obj.deleted}
                uids = {raw["metadata"].get("uid") for raw in live.values()}
                for key, raw in live.items():
                    owners = owner_uids(raw)
                    if owners and not owners & uids:
                        await self._delete(key)
                terminating = sorted(key[2] for key, raw in live.items()
                                     if key[0] == _NAMESPACES
                                     and raw["metadata"].get("deletionTimestamp"))
            for namespace in terminating:
                await self._empty_namespace(namespace)

    async def _report_deployments(self) -> None:
        """What the deployment controller writes once the pods of a generation are up."""
        for key, stored in list(self._objects.items()):
            if key[0] != _DEPLOYMENTS or stored.deleted:
                continue
            raw = stored.raw
            generation = raw["metadata"].get("generation", 1)
            if (raw.get("status") or {}).get("observedGeneration") == generation:
                continue
            replicas = int((raw.get("spec") or {}).get("replicas", 1))
            available = replicas if self.deployments_available else 0
            new = copy.deepcopy(raw)
            new["status"] = {
                "observedGeneration": generation, "replicas": replicas,
                "updatedReplicas": replicas, "readyReplicas": available,
                "availableReplicas": available,
                "conditions": [{"type": "Available", "status": "True" if available or not
                                replicas else "False",
                                "reason": "MinimumReplicasAvailable" if available or not
                                replicas else "MinimumReplicasUnavailable"}]}
            new["metadata"]["resourceVersion"] = self.next_resource_version()
            stored.history.append(new)
            await self._buses[key[0]].put({"type": "MODIFIED", "object": new})

    async def _empty_namespace(self, namespace: str) -> None:
        """One pass of the namespace controller: delete every kind's objects, then the
        Namespace itself if nothing is left.

        The real controller walks the kinds in Go map order, that is in any order, with API
        calls in between: `namespace_content_order` and `namespace_content_pause` let a test
        pick the order and the time between two kinds."""
        async with self._lock:
            kinds = sorted({key[0] for key, obj in self._objects.items()
                            if key[1] == namespace and not obj.deleted}, key=str)
        for resource in self.namespace_content_order(kinds):
            deleted = False
            async with self._lock:
                for key in [k for k, obj in self._objects.items()
                            if k[0] == resource and k[1] == namespace and not obj.deleted]:
                    deleted = await self._delete(key) or deleted
            if deleted and self.namespace_content_pause:
                await asyncio.sleep(self.namespace_content_pause)
        async with self._lock:
            key = (_NAMESPACES, None, namespace)
            empty = not any(k[1] == namespace and not obj.deleted
                            for k, obj in self._objects.items())
            if empty and key in self._objects and not self._objects[key].deleted \
                    and not self._objects[key].raw["metadata"].get("finalizers"):
                await self._remove(key)

    async def _serve_list(self, request: Any) -> Any:
        payload: Any = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        items = [copy.deepcopy(item) for item in payload["items"]
                 if matches_label_selector(item, selector)]
        payload["metadata"]["resourceVersion"] = str(self._revision)
        # Chunked lists as kube-apiserver serves them: in key order (namespace, name), `limit`
        # at a time, the rest behind a `continue` token that names the last key returned and
        # the revision of the first chunk. Once that revision is compacted the token is refused
        # with 410 Gone (reason Expired), and the client has to list again from the start.
        items.sort(key=lambda item: (item["metadata"].get("namespace") or "",
                                     item["metadata"]["name"]))
        token = request.params.get("continue")
        if token:
            revision, after = _read_continue(token)
            if revision < self.compacted_revision:
                raise kmock.KubernetesError(
                    status=410, reason="Expired",
                    message="The provided continue parameter is too old to display a "
                            "consistent list result. You can start a new list without the "
                            "continue parameter.")
            items = [item for item in items if (item["metadata"].get("namespace") or "",
                                                item["metadata"]["name"]) > after]
        else:
            revision = self._revision
        limit = int(request.params.get("limit") or 0)
        if 0 < limit < len(items):
            last = items[limit - 1]["metadata"]
            payload["metadata"]["continue"] = _write_continue(
                revision, (last.get("namespace") or "", last["name"]))
            payload["metadata"]["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        payload["items"] = items
        return payload

    def compact(self) -> None:
        """Like etcd's compaction: continue tokens issued until now expire."""
        self.compacted_revision = int(self.next_resource_version())

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


#: kube-apiserver's --max-request-bytes default: larger bodies never reach validation.
MAX_REQUEST_BYTES = 3 * 1024 * 1024


class _ApiServer(aiohttp.web.Server):
    """aiohttp's low-level server taking request bodies as large as kube-apiserver does."""

    def _make_request(self, message: Any, payload: Any, protocol: Any, writer: Any,
                      task: asyncio.Task[None]) -> aiohttp.web.BaseRequest:
        return aiohttp.web.BaseRequest(message, payload, protocol, writer, task, self._loop,
                                       client_max_size=MAX_REQUEST_BYTES)


class _QuietTestServer(aiohttp.test_utils.RawTestServer):
    """kmock's default server, without an access-log line for every request kopf makes."""

    async def _make_runner(self, debug: bool = True, **kwargs: Any) -> aiohttp.web.ServerRunner:
        server = _ApiServer(self._handler, loop=self._loop, debug=debug, access_log=None,
                            **kwargs)
        return aiohttp.web.ServerRunner(server, debug=debug, access_log=None, **kwargs)


class KubeEmulator:
    """A running `ClusterEmulator` on a free loopback port, with kubectl-like helpers."""

    def __init__(self, resources: Iterable[ResourceSpec] | None = None, *,
                 authenticate: bool = False) -> None:
        """`resources`: what the cluster serves (by default the built-in kinds, the Prometheus
        Operator's and kubiot's). `authenticate`: refuse requests without an issued token."""
        specs = list(resources) if resources is not None else \
            [*BUILTIN_RESOURCES, *kubiot_resources()]
        self._specs = {(spec.api_version, spec.kind): spec for spec in specs}
        # The harness's own calls use a token of their own, which never expires.
        self._harness_token = secrets.token_urlsafe(16)
        self.cluster = ClusterEmulator(tokens={self._harness_token} if authenticate else None)
        for spec in specs:
            self.cluster.resources[spec.key] = kmock.ResourceInfo(
                kind=spec.kind, namespaced=spec.namespaced, verbs=set(_VERBS),
                subresources=set(spec.subresources))
            if spec.schema is not None:
                self.cluster.schemas[kmock.resource(spec.group, spec.version, spec.plural)] = \
                    CustomResourceSchema(spec.kind, spec.schema)
        self._stack = contextlib.AsyncExitStack()
        self._server: Any = None

    async def __aenter__(self) -> Self:
        await self._stack.enter_async_context(self.cluster)
        self._server = await self._stack.enter_async_context(
            kmock.Server(self.cluster, server_cls=_QuietTestServer))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.cluster.stop_collecting()
        await self._stack.aclose()

    @property
    def url(self) -> str:
        return str(self._server.url).rstrip("/")

    def issue_token(self) -> str:
        """A new bearer token the API accepts (like a freshly projected service-account token)."""
        if self.cluster.tokens is None:
            raise RuntimeError("the emulator was started without authenticate=True")
        token = secrets.token_urlsafe(16)
        self.cluster.tokens.add(token)
        return token

    def expire_token(self, token: str) -> None:
        """From now on, requests with `token` get 401."""
        if self.cluster.tokens is not None:
            self.cluster.tokens.discard(token)

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
        headers["Authorization"] = f"Bearer {self._harness_token}"
        headers[HARNESS_HEADER] = "1"
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
