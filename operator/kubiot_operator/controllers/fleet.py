"""What the operator knows about its fleet without asking the API server.

An in-memory index of Devices, Gateways and FirmwareReleases, fed by the watch the operator
already has (kopf's indexing handlers in a cluster, the object store's own writes in the local
stack). Controllers ask it "the devices of this namespace", "how many come before this one",
"which gateway serves these labels", "the children of this gateway", so a reconcile costs a
constant number of API requests whatever the size of the fleet.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kubiot_operator.models.common import LabelSelector
from kubiot_operator.models.device import DeviceSpec
from kubiot_operator.models.gateway import GatewaySpec
from kubiot_operator.reconcile.selectors import selector_matches

DEVICE, GATEWAY, RELEASE = "Device", "Gateway", "FirmwareRelease"
INDEXED_KINDS = (DEVICE, GATEWAY, RELEASE)


@dataclass(frozen=True)
class DeviceEntry:
    """The few facts about a Device that other resources decide with."""

    name: str
    labels: Mapping[str, str]
    created: str
    model: str | None
    suspended: bool
    valid: bool  # the spec parses; an invalid one reports itself and serves nobody
    firmware: Mapping[str, Any]
    online: bool
    gateway: str | None
    ready: bool

    @property
    def order(self) -> tuple[str, str]:
        """Quota order: oldest first, by name among equals."""
        return self.created, self.name


@dataclass(frozen=True)
class GatewayEntry:
    name: str
    body: dict[str, Any]
    spec: GatewaySpec | None  # None when the spec does not parse


@dataclass
class _Namespace:
    devices: dict[str, DeviceEntry] = field(default_factory=dict)
    order: list[tuple[str, str]] = field(default_factory=list)  # sorted DeviceEntry.order
    by_label: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    gateways: dict[str, GatewayEntry] = field(default_factory=dict)
    releases: dict[str, dict[str, Any]] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.devices or self.gateways or self.releases)


class FleetIndex:
    """Devices, Gateways and FirmwareReleases by namespace, kept current by `observe`/`forget`.

    Objects being deleted are left out: every question asked of the fleet is about the
    resources that stay.
    """

    def __init__(self) -> None:
        self._namespaces: dict[str, _Namespace] = {}

    # --- feeding ------------------------------------------------------------------------------

    def observe(self, body: Mapping[str, Any]) -> None:
        """Record an object as a watch event (or a store write) shows it."""
        kind, meta = body.get("kind"), body.get("metadata") or {}
        if kind not in INDEXED_KINDS or "namespace" not in meta:
            return
        if meta.get("deletionTimestamp"):
            self.forget(str(kind), meta["namespace"], meta["name"])
            return
        space = self._namespaces.setdefault(meta["namespace"], _Namespace())
        if kind == DEVICE:
            self._put_device(space, _device_entry(body))
        elif kind == GATEWAY:
            space.gateways[meta["name"]] = _gateway_entry(body)
        else:
            space.releases[meta["name"]] = dict(body)

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """The object is gone (or going)."""
        space = self._namespaces.get(namespace)
        if space is None:
            return
        if kind == DEVICE:
            self._drop_device(space, name)
        elif kind == GATEWAY:
            space.gateways.pop(name, None)
        elif kind == RELEASE:
            space.releases.pop(name, None)
        if space.empty():
            del self._namespaces[namespace]

    def _put_device(self, space: _Namespace, entry: DeviceEntry) -> None:
        self._drop_device(space, entry.name)
        space.devices[entry.name] = entry
        bisect.insort(space.order, entry.order)
        for pair in entry.labels.items():
            space.by_label.setdefault(pair, set()).add(entry.name)

    @staticmethod
    def _drop_device(space: _Namespace, name: str) -> None:
        old = space.devices.pop(name, None)
        if old is None:
            return
        at = bisect.bisect_left(space.order, old.order)
        if at < len(space.order) and space.order[at] == old.order:
            del space.order[at]
        for pair in old.labels.items():
            names = space.by_label.get(pair)
            if names is not None:
                names.discard(name)
                if not names:
                    del space.by_label[pair]

    # --- asking -------------------------------------------------------------------------------

    def _space(self, namespace: str) -> _Namespace:
        return self._namespaces.get(namespace) or _Namespace()

    def device_count(self, namespace: str) -> int:
        return len(self._space(namespace).devices)

    def gateway_count(self, namespace: str) -> int:
        return len(self._space(namespace).gateways)

    def devices(self, namespace: str) -> list[DeviceEntry]:
        """The namespace's devices, by name."""
        space = self._space(namespace)
        return [space.devices[name] for name in sorted(space.devices)]

    def device(self, namespace: str, name: str) -> DeviceEntry | None:
        return self._space(namespace).devices.get(name)

    def devices_before(self, namespace: str, created: str, name: str) -> int:
        """How many devices of the namespace come before this one in quota order."""
        return bisect.bisect_left(self._space(namespace).order, (created, name))

    def admitted(self, namespace: str, limit: int | None) -> list[DeviceEntry]:
        """The devices within the quota, oldest first."""
        space = self._space(namespace)
        order = space.order if limit is None else space.order[:limit]
        return [space.devices[name] for _, name in order]

    def gateways(self, namespace: str) -> list[GatewayEntry]:
        """The namespace's gateways, by name."""
        space = self._space(namespace)
        return [space.gateways[name] for name in sorted(space.gateways)]

    def serving_gateway(self, namespace: str, labels: Mapping[str, str]) -> str | None:
        """The first (by name) gateway in service whose selector picks these labels."""
        for gateway in self.gateways(namespace):
            if (gateway.spec is not None and not gateway.spec.suspended
                    and selector_matches(gateway.spec.selector, labels)):
                return gateway.name
        return None

    def children(self, namespace: str, selector: LabelSelector) -> list[str]:
        """The devices a gateway's selector picks that it may serve: valid, not suspended;
        sorted by name. Exact labels narrow the candidates before the expressions are checked."""
        space = self._space(namespace)
        candidates: set[str] | None = None
        for pair in (selector.match_labels or {}).items():
            named = space.by_label.get(pair, set())
            candidates = set(named) if candidates is None else candidates & named
            if not candidates:
                return []
        pool = space.devices.keys() if candidates is None else candidates
        picked = []
        for name in pool:
            entry = space.devices[name]
            if entry.valid and not entry.suspended and selector_matches(selector, entry.labels):
                picked.append(name)
        return sorted(picked)

    def releases(self, namespace: str) -> list[dict[str, Any]]:
        """The namespace's FirmwareReleases (whole objects: there are few), by name."""
        space = self._space(namespace)
        return [space.releases[name] for name in sorted(space.releases)]


def _device_entry(body: Mapping[str, Any]) -> DeviceEntry:
    meta = body["metadata"]
    spec, status = body.get("spec") or {}, body.get("status") or {}
    try:
        parsed: DeviceSpec | None = DeviceSpec.model_validate(spec)
    except ValidationError:
        parsed = None
    return DeviceEntry(
        name=meta["name"], labels=dict(meta.get("labels") or {}),
        created=meta.get("creationTimestamp") or "", model=spec.get("model"),
        suspended=bool(parsed and parsed.suspended), valid=parsed is not None,
        firmware=dict(status.get("firmware") or {}), online=status.get("online") is True,
        gateway=status.get("gateway"), ready=status.get("phase") == "Ready")


def _gateway_entry(body: Mapping[str, Any]) -> GatewayEntry:
    try:
        spec: GatewaySpec | None = GatewaySpec.model_validate(body.get("spec") or {})
    except ValidationError:
        spec = None
    return GatewayEntry(body["metadata"]["name"], dict(body), spec)
