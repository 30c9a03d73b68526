"""Kubernetes-like objects without Kubernetes: the local stack's store, kept in one JSON file.

It implements the controllers' `Objects` port with the semantics they rely on: merge patches,
a status subresource, label-selector lists, and create-or-update. Every write is saved, so a
restarted stack finds its Secrets (and thus its certificates) again.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

from kubiot_operator.controllers.fleet import FleetIndex
from kubiot_operator.kube.client import KINDS_BY_API, Conflict, KubeError, NotFound, kind_of
from kubiot_operator.models.api import KubeKind

Key = tuple[str, str, str]  # plural, namespace ("" when cluster-scoped), name
#: A write is saved at once when the last save is older than this…
SAVE_AFTER_SECONDS = 1.0
#: …and at least this many times as long as that save took, so a large store (ten thousand
#: devices and their Secrets) spends at most a fifth of its time rewriting its file.
SAVE_COST_FACTOR = 5.0


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def selector_matches(labels: Mapping[str, str], selector: str | None) -> bool:
    """`a=b,c!=d,e` label selectors, the subset the controllers use."""
    if not selector:
        return True
    for requirement in selector.split(","):
        requirement = requirement.strip()
        if "!=" in requirement:
            key, value = requirement.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in requirement:
            key, value = requirement.split("=", 1)
            if labels.get(key.strip().rstrip("=")) != value.strip():
                return False
        elif requirement not in labels:
            return False
    return True


class FileObjects:
    """The `Objects` port over a JSON file. Every write is shown to `fleet`, the index the
    controllers ask about the fleet, as a watch shows it to the operator in a cluster."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fleet = FleetIndex()
        self._objects: dict[Key, dict[str, Any]] = {}
        self._generation = 0
        self._dirty = False
        self._saved_at = 0.0
        self._save_seconds = 0.0
        self._held = 0
        if path.exists():
            for obj in json.loads(path.read_text()):
                self._objects[self._key_of(obj)] = obj
                self.fleet.observe(obj)

    async def served_kinds(self, api_version: str) -> frozenset[str]:
        """The kinds the store keeps, as discovery would list them. There is no Prometheus
        Operator without a cluster, so its API is not served."""
        if api_version.startswith("monitoring.coreos.com/"):
            return frozenset()
        return frozenset(kind for api, kind in KINDS_BY_API if api == api_version)

    @staticmethod
    def _key_of(obj: Mapping[str, Any]) -> Key:
        kind = kind_of(obj)
        meta = obj["metadata"]
        return kind.plural, meta.get("namespace", "") if kind.namespaced else "", meta["name"]

    @staticmethod
    def _key(kind: KubeKind, name: str, namespace: str | None) -> Key:
        return kind.plural, (namespace or "") if kind.namespaced else "", name

    def _save(self) -> None:
        """Record a write; the file follows at once, or soon after for a large store (see
        `flush`). What a crash loses is re-done by the next reconcile: a credential not saved
        is issued again."""
        self._generation += 1
        self._dirty = True
        wait = max(SAVE_AFTER_SECONDS, SAVE_COST_FACTOR * self._save_seconds)
        if not self._held and time.monotonic() - self._saved_at >= wait:
            self.flush()

    @contextlib.contextmanager
    def saves_held(self) -> Iterator[None]:
        """Write the file once at the end instead of along the way (a reconcile pass over
        thousands of objects); a crash meanwhile loses only what the next pass re-does."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            if not self._held:
                self.flush()

    def flush(self) -> None:
        """Write the file now if anything changed since it was last written."""
        if not self._dirty:
            return
        started = time.monotonic()
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(list(self._objects.values()), sort_keys=True))
        os.chmod(temporary, 0o600)
        temporary.replace(self.path)
        self._dirty = False
        self._saved_at = time.monotonic()
        self._save_seconds = self._saved_at - started

    async def flush_periodically(self, seconds: float = SAVE_AFTER_SECONDS) -> None:
        """Keep the file at most about `seconds` behind (plus a large store's save time)."""
        while True:
            await asyncio.sleep(seconds)
            if not self._held:
                self.flush()

    @property
    def generation(self) -> int:
        """Grows with every write (the CLI and the summary line poll it)."""
        return self._generation

    async def get(self, kind: KubeKind, name: str, namespace: str | None = None
                  ) -> dict[str, Any] | None:
        obj = self._objects.get(self._key(kind, name, namespace))
        return copy.deepcopy(obj) if obj is not None else None

    async def list(self, kind: KubeKind, namespace: str | None = None,
                   label_selector: str | None = None) -> list[dict[str, Any]]:
        return [copy.deepcopy(obj) for (plural, ns, _), obj in sorted(self._objects.items())
                if plural == kind.plural and (namespace is None or ns == namespace)
                and selector_matches(obj["metadata"].get("labels") or {}, label_selector)]

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store a new object; Conflict when one of that name exists."""
        if self._key_of(obj) in self._objects:
            raise Conflict(409, f"{obj['kind']} {obj['metadata']['name']} already exists")
        return await self.ensure(obj)

    async def ensure(self, obj: dict[str, Any]) -> dict[str, Any]:
        key = self._key_of(obj)
        current = self._objects.get(key)
        if current is None:
            stored = copy.deepcopy(obj)
            meta = stored["metadata"]
            meta.setdefault("uid", str(uuid4()))
            meta.setdefault("creationTimestamp",
                            datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"))
            meta["generation"] = 1
        else:
            body = {k: v for k, v in obj.items() if k not in ("status", "metadata")}
            stored = merge_patch(current, body)
            meta_patch = {k: obj["metadata"][k] for k in ("labels", "annotations",
                                                          "ownerReferences")
                          if k in obj["metadata"]}
            stored["metadata"] = merge_patch(current["metadata"], meta_patch)
            if stored.get("spec") != current.get("spec"):
                stored["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        self._objects[key] = stored
        self.fleet.observe(stored)
        self._save()
        return copy.deepcopy(stored)

    async def replace_spec(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Like `kubectl apply` of a whole manifest: spec and labels become exactly `obj`'s."""
        key = self._key_of(obj)
        current = self._objects.get(key)
        if current is None:
            return await self.ensure(obj)
        stored = copy.deepcopy(current)
        stored["spec"] = copy.deepcopy(obj.get("spec"))
        stored["metadata"]["labels"] = copy.deepcopy(obj["metadata"].get("labels") or {})
        if stored["spec"] != current.get("spec"):
            stored["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        self._objects[key] = stored
        self.fleet.observe(stored)
        self._save()
        return copy.deepcopy(stored)

    async def patch(self, kind: KubeKind, name: str, patch: Mapping[str, Any],
                    namespace: str | None = None, subresource: str | None = None
                    ) -> dict[str, Any]:
        key = self._key(kind, name, namespace)
        current = self._objects.get(key)
        if current is None:
            raise NotFound(404, f"{kind.plural} {namespace or ''}/{name} not found")
        if subresource not in (None, "status"):
            raise KubeError(400, f"no subresource {subresource}")
        if subresource == "status":
            patch = {"status": patch.get("status", {})}
        stored = merge_patch(current, patch)
        self._objects[key] = stored
        self.fleet.observe(stored)
        self._save()
        return copy.deepcopy(stored)

    async def delete(self, kind: KubeKind, name: str, namespace: str | None = None) -> bool:
        key = self._key(kind, name, namespace)
        gone = self._objects.pop(key, None)
        if gone is None:
            return False
        self.fleet.forget(gone["kind"], key[1], name)
        # Without a garbage collector, children owned by the object go with it here.
        uid_owned = [k for k, obj in self._objects.items()
                     if any(ref.get("name") == name and ref.get("kind") == kind_name(kind)
                            for ref in obj["metadata"].get("ownerReferences") or [])]
        for child in uid_owned:
            orphan = self._objects.pop(child, None)
            if orphan is not None:
                self.fleet.forget(orphan["kind"], child[1], child[2])
        self._save()
        return True


def kind_name(kind: KubeKind) -> str:
    return next(name for (_, name), k in KINDS_BY_API.items() if k == kind)
