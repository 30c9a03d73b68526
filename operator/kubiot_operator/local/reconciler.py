"""The local stack's stand-in for the API server and kopf: manifests in, controllers run.

Each pass applies the manifests to the object store (like `kubectl apply` of the folder, with
pruning), runs the controller of every resource whose spec changed or whose retry is due, and
runs the delete controllers of resources whose manifests are gone. Devices provisioned by claim
have no manifest: they are never pruned, and a controller that creates one asks for a pass.

`kubiot local approve` (like `kubectl label device ... kubiot.io/approved=true`) leaves a file
in the approvals folder; the next pass labels the Device and reconciles it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubiot_operator.controllers.kinds import CONTROLLERS, Controller, apply_outcome
from kubiot_operator.controllers.platform import Event, EventType, Platform
from kubiot_operator.kube.client import DEVICES, GATEWAYS, TENANTS, kind_of
from kubiot_operator.kube.secrets import secret_object
from kubiot_operator.manifests import ManifestSet, load_resources, manifest_files
from kubiot_operator.models.tenant import TenantSpec
from kubiot_operator.pki import TenantAuthority
from kubiot_operator.reconcile.provisioning import APPROVED_LABEL, PROVISIONED_LABEL
from kubiot_operator.reconcile.tenant import tenant_namespace

from .broker import LocalBroker
from .objects import FileObjects

log = logging.getLogger("kubiot.local")
FULL_PASS_SECONDS = 60.0
#: Reconciles of one kind run this many at a time (certificates are issued in threads, the
#: broker answers while the next request is prepared); kinds still go in ORDER.
CONCURRENT_RECONCILES = 32


def _key(obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return kind_of(obj).plural, meta.get("namespace", ""), meta["name"]


def approval_file(approvals: Path, namespace: str, device: str) -> Path:
    """Where `kubiot local approve` asks the running stack to approve a Device."""
    return approvals / f"{namespace}_{device}"  # DNS labels hold no `_`


class LocalReconciler:
    def __init__(self, objects: FileObjects, manifests: Path,
                 approvals: Path | None = None) -> None:
        self.objects = objects
        self.manifests = manifests
        self.approvals = approvals
        self._requested = False
        self._platform: Platform | None = None
        self._database_dsn = ""
        self._retry_at: dict[tuple[str, str, str], float] = {}
        self._signature: tuple[tuple[str, float, int], ...] = ()
        self._problems: list[str] = []
        self._last_full_pass = 0.0
        self._loaded: tuple[tuple[tuple[str, float, int], ...], ManifestSet] | None = None
        self._lock = asyncio.Lock()
        self._approved: set[tuple[str, str, str]] = set()
        self.passes = 0

    @staticmethod
    def reconciled_kinds() -> tuple[str, ...]:
        """The plurals of the kinds this stack reconciles, in the order it does."""
        return tuple(controller.resource.plural for controller in CONTROLLERS)

    async def prepare_trust(self, authority: TenantAuthority, broker: LocalBroker) -> None:
        """Create every tenant's CA and hand the bundles to the broker before it starts."""
        tenants = []
        for resource in (await self._load()).resources:
            if resource["kind"] == "Tenant":
                name = resource["metadata"]["name"]
                await authority.ensure_ca(name, TenantSpec.model_validate(resource["spec"]).ca)
                tenants.append(name)
        await broker.publish(await authority.ca_bundle(tenants),
                             await authority.crl_bundle(tenants))

    async def _load(self) -> ManifestSet:
        """The manifests, validated as the API server would admit them; read again only when
        a file changed (validating ten thousand takes a while), in a thread so the MQTT
        session keeps its keepalives meanwhile."""
        signature = self.manifest_signature()
        if self._loaded is None or self._loaded[0] != signature:
            self._loaded = signature, await asyncio.to_thread(load_resources, [self.manifests])
        return self._loaded[1]

    def attach(self, platform: Platform, *, database_dsn: str) -> None:
        self._platform = platform
        self._database_dsn = database_dsn
        platform.resource_created = self.request_pass

    def request_pass(self, _: dict[str, Any] | None = None) -> None:
        """Run a pass soon: a controller created a resource to reconcile."""
        self._requested = True

    def manifest_signature(self) -> tuple[tuple[str, float, int], ...]:
        signature = []
        for path in manifest_files([self.manifests]):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            signature.append((str(path), stat.st_mtime, stat.st_size))
        return tuple(signature)

    async def watch(self, interval: float) -> None:
        """Re-sync on every manifest edit, when a retry is due, and once a minute regardless."""
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            due = any(at <= now for at in self._retry_at.values())
            approved = await self._take_approvals()
            if (self.manifest_signature() != self._signature or due
                    or now - self._last_full_pass > FULL_PASS_SECONDS):
                await self.sync()
            elif self._requested or approved:
                await self.reconcile_new()

    async def _take_approvals(self) -> set[tuple[str, str, str]]:
        """Label the Devices `kubiot local approve` named; their keys, to be reconciled."""
        approved: set[tuple[str, str, str]] = set()
        if self.approvals is None or not self.approvals.is_dir():
            return approved
        for request in sorted(self.approvals.iterdir()):
            namespace, _, name = request.name.partition("_")
            request.unlink(missing_ok=True)
            device = await self.objects.get(DEVICES, name, namespace)
            if device is None:
                log.warning("approval for %s/%s: no such Device", namespace, name)
                continue
            await self.objects.patch(DEVICES, name, {"metadata": {"labels": {
                APPROVED_LABEL: "true"}}}, namespace)
            log.info("Device %s/%s approved", namespace, name)
            approved.add(_key(device))
        self._approved |= approved
        return approved

    async def sync(self) -> None:
        async with self._lock:
            with self.objects.saves_held():
                await self._sync()

    async def reconcile_new(self) -> None:
        """Run the controllers of resources created or approved since the last pass only:
        a provisioning burst must not re-apply every manifest for each new Device."""
        async with self._lock:
            self._requested = False
            approved, self._approved = self._approved, set()
            for controller in CONTROLLERS:
                for obj in await self.objects.list(controller.resource.api):
                    status = obj.get("status") or {}
                    fresh = status.get("observedGeneration") != obj["metadata"].get("generation")
                    if fresh or _key(obj) in approved:
                        await self._run(controller.reconcile, obj)

    async def apply_manifests(self) -> tuple[dict[tuple[str, str, str], dict[str, Any]],
                                             set[tuple[str, str, str]]]:
        """Put the manifests into the store (as `kubectl apply` would); returns what they
        want, by key, and the keys whose spec or labels changed."""
        self._signature = self.manifest_signature()
        loaded = await self._load()
        if loaded.problems != self._problems:
            for problem in loaded.problems:
                log.warning("manifest refused: %s", problem)
            self._problems = loaded.problems
        wanted = {_key(r): r for r in loaded.resources}
        changed: set[tuple[str, str, str]] = set()
        for key, resource in wanted.items():
            before = await self.objects.get(kind_of(resource), key[2], key[1] or None)
            after = await self.objects.replace_spec(resource)
            if before is None or before.get("spec") != after.get("spec") or (
                    before["metadata"].get("labels") != after["metadata"].get("labels")):
                changed.add(key)
        return wanted, changed

    async def _sync(self) -> None:
        assert self._platform is not None
        self._requested = False
        approved, self._approved = self._approved, set()
        wanted, changed = await self.apply_manifests()
        full = time.monotonic() - self._last_full_pass > FULL_PASS_SECONDS
        if full:
            self._last_full_pass = time.monotonic()
        for controller in reversed(CONTROLLERS):
            kind = controller.resource.api
            for obj in await self.objects.list(kind):
                labels = obj["metadata"].get("labels") or {}
                if _key(obj) not in wanted and labels.get(PROVISIONED_LABEL) != "true":
                    await self._run(controller.delete, obj, with_status=False)
                    await self.objects.delete(kind, obj["metadata"]["name"],
                                              obj["metadata"].get("namespace"))
                    self._retry_at.pop(_key(obj), None)
        await self._ensure_database_secrets()
        now = time.monotonic()
        slots = asyncio.Semaphore(CONCURRENT_RECONCILES)

        async def run(reconcile: Controller, obj: dict[str, Any]) -> None:
            async with slots:
                await self._run(reconcile, obj)

        for controller in CONTROLLERS:
            kind = controller.resource.api
            work = []
            for obj in await self.objects.list(kind):
                key = _key(obj)
                status = obj.get("status") or {}
                due = key in self._retry_at and self._retry_at[key] <= now
                fresh = status.get("observedGeneration") != obj["metadata"].get("generation")
                if (full or due or fresh or key in changed or key in approved
                        or kind == GATEWAYS):
                    work.append(run(controller.reconcile, obj))
            await asyncio.gather(*work)
        self.passes += 1

    async def _run(self, step: Controller, obj: dict[str, Any], *,
                   with_status: bool = True) -> None:
        assert self._platform is not None
        key = _key(obj)
        where = "/".join(p for p in (key[1], key[2]) if p)
        metrics = self._platform.metrics
        kind = str(obj["kind"])
        # Counted as the operator's handlers count them, so the operator dashboard and alerts
        # read the same figures from the local stack.
        try:
            with metrics.reconciling(kind):
                outcome = await step(self._platform, obj)
        except Exception as exc:  # the stack keeps running; the next pass retries
            metrics.reconcile_errors.labels(kind, type(exc).__name__).inc()
            log.warning("%s %s: %s; retrying", kind, where, exc)
            self._retry_at[key] = time.monotonic() + 5
            return
        if outcome.retry_after is not None and not outcome.planned:
            metrics.reconcile_errors.labels(kind, outcome.retry_reason).inc()
        await apply_outcome(obj, outcome, write_status=self._write_status,
                            post_event=_log_event, with_status=with_status)
        if outcome.retry_after is not None:
            self._retry_at[key] = time.monotonic() + outcome.retry_after
        else:
            self._retry_at.pop(key, None)

    async def _write_status(self, obj: dict[str, Any], status: dict[str, Any]) -> None:
        meta = obj["metadata"]
        await self.objects.patch(kind_of(obj), meta["name"], {"status": status},
                                 meta.get("namespace"), subresource="status")

    async def _ensure_database_secrets(self) -> None:
        """Every tenant namespace gets the platform database DSN its ingest reads."""
        assert self._platform is not None
        secret_name = self._platform.ingest.platform_database_secret
        for tenant in await self.objects.list(TENANTS):
            try:
                spec = TenantSpec.model_validate(tenant.get("spec") or {})
            except ValidationError:
                continue
            namespace = tenant_namespace(tenant["metadata"]["name"], spec)
            await self.objects.ensure(secret_object(secret_name, namespace, {
                self._platform.ingest.platform_database_key: self._database_dsn.encode()}))


def _log_event(obj: dict[str, Any], event: Event) -> None:
    """The local stack has no event API: its events go to the log."""
    meta = obj["metadata"]
    where = "/".join(p for p in (meta.get("namespace"), meta["name"]) if p)
    level = logging.INFO if event.type is EventType.NORMAL else logging.WARNING
    log.log(level, "%s %s: %s %s", obj["kind"], where, event.reason, event.message)
