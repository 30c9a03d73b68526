"""In-memory adapters for driving the firmware controller without Kubernetes or a broker."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kubiot_operator.brokers import BrokerBackend
from kubiot_operator.controllers.fleet import FleetIndex
from kubiot_operator.controllers.platform import Platform
from kubiot_operator.kube.client import KINDS_BY_API, Conflict, KubeError, kind_of
from kubiot_operator.local.objects import merge_patch
from kubiot_operator.metrics import OperatorMetrics
from kubiot_operator.models.api import KubeKind
from kubiot_operator.pki import MemoryMaterialStore, TenantAuthority
from kubiot_operator.reconcile.identity import BrokerEndpoint
from kubiot_operator.reconcile.tenant import IngestEnvironment
from tests.support.kube_emulator import KubeEmulator

API = "kubiot.io/v1alpha1"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def merge(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Apply a JSON merge patch to `target` in place (the local stack's merge_patch)."""
    merged = merge_patch(target, patch)
    target.clear()
    target.update(merged)
    return target


class MemoryObjects:
    """Kubernetes-like objects in a dict, keyed by (plural, namespace, name); every write is
    shown to `fleet`, as a watch would show it to the operator's index."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str | None, str], dict[str, Any]] = {}
        self.fleet = FleetIndex()
        self._created = 0

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind = kind_of(obj)
        meta = obj.setdefault("metadata", {})
        self._created += 1
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp",
                        (T0 + timedelta(seconds=self._created)).isoformat().replace("+00:00", "Z"))
        self.items[(kind.plural, meta.get("namespace"), meta["name"])] = obj
        self.fleet.observe(obj)
        return obj

    async def served_kinds(self, api_version: str) -> frozenset[str]:
        return frozenset(kind for api, kind in KINDS_BY_API if api == api_version)

    async def get(self, kind: KubeKind, name: str, namespace: str | None = None
                  ) -> dict[str, Any] | None:
        found = self.items.get((kind.plural, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    async def list(self, kind: KubeKind, namespace: str | None = None,
                   label_selector: str | None = None) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (plural, ns, _), o in sorted(self.items.items())
                if plural == kind.plural and (namespace is None or ns == namespace)]

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind = kind_of(obj)
        if (kind.plural, obj["metadata"].get("namespace"), obj["metadata"]["name"]) in self.items:
            raise Conflict(409, f"{obj['metadata']['name']} exists")
        return self.put(copy.deepcopy(obj))

    async def ensure(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self.put(copy.deepcopy(obj))

    async def patch(self, kind: KubeKind, name: str, patch: Mapping[str, Any],
                    namespace: str | None = None, subresource: str | None = None
                    ) -> dict[str, Any]:
        found = self.items.get((kind.plural, namespace, name))
        if found is None:
            raise KubeError(404, f"{kind.plural} {name} not found")
        merged = merge(found, patch)
        self.fleet.observe(merged)
        return merged

    async def delete(self, kind: KubeKind, name: str, namespace: str | None = None) -> bool:
        found = self.items.pop((kind.plural, namespace, name), None)
        if found is None:
            return False
        if namespace is not None:
            self.fleet.forget(found["kind"], namespace, name)
        return True


@dataclass
class Published:
    topic: str
    payload: bytes
    retain: bool
    correlation_data: bytes | None = None
    response_topic: str | None = None

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.payload)
        return value


@dataclass
class RecordingMessenger:
    """Keeps every publish, and the retained value per topic as a broker would."""

    published: list[Published] = field(default_factory=list)
    retained: dict[str, bytes] = field(default_factory=dict)

    async def publish(self, topic: str, payload: bytes, *, retain: bool, qos: int = 1,
                      correlation_data: bytes | None = None,
                      response_topic: str | None = None) -> None:
        self.published.append(Published(topic, payload, retain, correlation_data,
                                        response_topic))
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)

    def to(self, suffix: str) -> list[Published]:
        return [p for p in self.published if p.topic.endswith(suffix)]


class _NoTrust:
    async def publish(self, ca_bundle: bytes, crl_bundle: bytes) -> None:
        return None


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def memory_platform(objects: MemoryObjects, messenger: RecordingMessenger, clock: Clock
                    ) -> Platform:
    """A Platform over in-memory objects, a recording messenger and a real TenantAuthority."""
    broker: BrokerBackend = None  # type: ignore[assignment]  # the firmware controller has no use for it
    return Platform(
        objects=objects, authority=TenantAuthority(MemoryMaterialStore()), broker=broker,
        messenger=messenger, trust=_NoTrust(), metrics=OperatorMetrics(),
        endpoint=BrokerEndpoint("127.0.0.1", 8883, None),
        ingest=IngestEnvironment(image="ingest", broker_host="127.0.0.1", broker_port=1883,
                                 platform_database_secret="db", platform_database_key="url"),
        ca_namespace="kubiot-system", clock=clock, fleet=objects.fleet)


def tenant_objects(objects: MemoryObjects, tenant: str = "acme", namespace: str = "acme") -> None:
    objects.put({"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": namespace, "labels": {"kubiot.io/tenant": tenant}}})
    objects.put({"apiVersion": API, "kind": "Tenant", "metadata": {"name": tenant},
                 "spec": {"displayName": tenant}})


def device_body(name: str, namespace: str = "acme", *, labels: dict[str, str] | None = None,
                model: str = "sensor-v2", current: str | None = "1.0.0") -> dict[str, Any]:
    status = {"firmware": {"current": current}} if current else {}
    return {"apiVersion": API, "kind": "Device",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": labels if labels is not None else {"fleet": "a"}},
            "spec": {"model": model}, "status": status}


def release_body(name: str, version: str, *, namespace: str = "acme", **strategy: Any
                 ) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "version": version,
        "artifact": {"url": f"http://firmware.example/{version}.bin", "sha256": "a" * 64,
                     "size": 1024},
        "selector": {"matchLabels": {"fleet": "a"}},
    }
    paused = strategy.pop("paused", None)
    if paused is not None:
        spec["paused"] = paused
    if strategy:
        spec["strategy"] = strategy
    return {"apiVersion": API, "kind": "FirmwareRelease",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


@contextlib.asynccontextmanager
async def bounded_request_history(kube: KubeEmulator, keep: int = 10,
                                  every: float = 0.1) -> AsyncIterator[None]:
    """Keep the emulator's request log short while a large fleet runs.

    kmock matches every request against its whole request log, so a run of thousands of
    requests (fifty devices and their status patches) slows down quadratically.
    """
    async def trim() -> None:
        while True:
            await asyncio.sleep(every)
            del kube.cluster._requests[:-keep]

    task = asyncio.create_task(trim())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
