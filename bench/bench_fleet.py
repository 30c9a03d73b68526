"""The operator's own work per Device, at fleet sizes, independent of any API server's speed.

Runs the real controllers (the code the kopf handlers call, asking the same fleet index),
the real PKI and a real Mosquitto over an in-process object store that counts every request
by verb and every object it returns. For each size: one Tenant, one Gateway per 100 children
(1% of the devices are behind gateways), a FirmwareRelease rolling out to all of them, and N
Devices applied at once. It prints the wall time until every Device is Ready, API requests
per Device by verb, objects returned per Device, operator CPU per Device and peak RSS; then
the same for a steady-state window in which every device reports presence and state through
the broker. The broker starts with the fleet's identities already in its dynamic-security
state (as `make dev` does on a cold start); the time that write took and the time spent
waiting on the broker are printed apart.

RSS is this process's: it holds the object store too (what an API server would hold), so it
is an upper bound of the operator's. The machine may be shared: compare figures from one run.

    .venv/bin/python bench/bench_fleet.py [--sizes 1000 5000 10000] [--steady-seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import copy
import gc
import json
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kubiot_contract.topics import (  # noqa: E402
    OPERATOR_USERNAME,
    device_root,
    operator_client_id,
    presence_topic,
    report_filters,
    state_reported_topic,
)
from kubiot_operator.brokers import (  # noqa: E402
    BrokerBackend,
    MosquittoDynsecBackend,
    SyncResult,
)
from kubiot_operator.controllers.commands import CommandResults  # noqa: E402
from kubiot_operator.controllers.device import reconcile_device  # noqa: E402
from kubiot_operator.controllers.firmware import reconcile_release, rollout_due  # noqa: E402
from kubiot_operator.controllers.fleet import FleetIndex  # noqa: E402
from kubiot_operator.controllers.gateway import GatewayRefresher, reconcile_gateway  # noqa: E402
from kubiot_operator.controllers.platform import Outcome, Platform  # noqa: E402
from kubiot_operator.controllers.reports import ReportPump  # noqa: E402
from kubiot_operator.controllers.resync import identities_wanted, resync_all  # noqa: E402
from kubiot_operator.controllers.tenant import reconcile_tenant  # noqa: E402
from kubiot_operator.kube.client import (  # noqa: E402
    KINDS_BY_API,
    TENANTS,
    Conflict,
    KubeKind,
    NotFound,
    kind_of,
)
from kubiot_operator.kube.secrets import SecretMaterialStore  # noqa: E402
from kubiot_operator.local.broker import BrokerPorts, LocalBroker  # noqa: E402
from kubiot_operator.local.objects import merge_patch, selector_matches  # noqa: E402
from kubiot_operator.local.ports import free_port  # noqa: E402
from kubiot_operator.metrics import OperatorMetrics  # noqa: E402
from kubiot_operator.models.tenant import TenantSpec  # noqa: E402
from kubiot_operator.mqtt import OperatorMqtt  # noqa: E402
from kubiot_operator.pki import TenantAuthority  # noqa: E402
from kubiot_operator.reconcile.identity import BrokerEndpoint  # noqa: E402
from kubiot_operator.reconcile.tenant import IngestEnvironment  # noqa: E402

API = "kubiot.io/v1alpha1"
TENANT = "fleet"
CHILDREN_PER_GATEWAY = 100
PAGE = 500  # objects per list page, as the operator's API client asks for
VERBS = ("get", "list", "create", "patch", "delete")
TARGET_SECONDS = 60.0
TARGET_RSS_MB = 300.0

Key = tuple[str, str, str]
#: Which work a request is made for ("Device" while a Device reconciles), to attribute it.
ON_BEHALF: contextvars.ContextVar[str] = contextvars.ContextVar("on_behalf", default="other")


class CountingObjects:
    """An in-process API server for the controllers' `Objects` port that counts what it serves.

    Semantics as the operator relies on them: merge patches, a status subresource, conflicts on
    create, lists in pages of `PAGE`. Writes are shown to `fleet`, as the watch shows them to
    the operator's index. `apply` is the user's `kubectl apply`, not counted.
    """

    def __init__(self) -> None:
        self.fleet = FleetIndex()
        self.requests: Counter[str] = Counter()
        self.by_work: Counter[tuple[str, str]] = Counter()  # (work, verb)
        self.returned = 0
        self._objects: dict[Key, dict[str, Any]] = {}
        self._serial = 0

    def reset_counts(self) -> None:
        self.requests.clear()
        self.by_work.clear()
        self.returned = 0

    def _count(self, verb: str, requests: int = 1) -> None:
        self.requests[verb] += requests
        self.by_work[(ON_BEHALF.get(), verb)] += requests

    @staticmethod
    def _key(kind: KubeKind, name: str, namespace: str | None) -> Key:
        return kind.plural, (namespace or "") if kind.namespaced else "", name

    def _key_of(self, obj: Mapping[str, Any]) -> Key:
        return self._key(kind_of(obj), obj["metadata"]["name"], obj["metadata"].get("namespace"))

    def apply(self, obj: dict[str, Any]) -> None:
        self._store(copy.deepcopy(obj))

    def _store(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        self._serial += 1
        meta.setdefault("uid", f"uid-{self._serial}")
        meta.setdefault("creationTimestamp",
                        f"2026-01-01T00:00:00.{self._serial:06d}Z")  # order of arrival
        meta.setdefault("generation", 1)
        self._objects[self._key_of(obj)] = obj
        self.fleet.observe(obj)
        return obj

    def _answer(self, verb: str, obj: dict[str, Any] | None) -> dict[str, Any] | None:
        self._count(verb)
        if obj is None:
            return None
        self.returned += 1
        # A copy, as a client gets a decoded answer and not the server's own object.
        return copy.deepcopy(obj)

    async def served_kinds(self, api_version: str) -> frozenset[str]:
        self._count("get")
        if api_version.startswith("monitoring.coreos.com/"):
            return frozenset()
        return frozenset(kind for api, kind in KINDS_BY_API if api == api_version)

    async def get(self, kind: KubeKind, name: str, namespace: str | None = None
                  ) -> dict[str, Any] | None:
        return self._answer("get", self._objects.get(self._key(kind, name, namespace)))

    async def list(self, kind: KubeKind, namespace: str | None = None,
                   label_selector: str | None = None) -> list[dict[str, Any]]:
        items = [obj for (plural, ns, _), obj in sorted(self._objects.items())
                 if plural == kind.plural and (namespace is None or ns == namespace)
                 and selector_matches(obj["metadata"].get("labels") or {}, label_selector)]
        self._count("list", max(1, -(-len(items) // PAGE)))
        self.returned += len(items)
        return copy.deepcopy(items)

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._count("create")
        if self._key_of(obj) in self._objects:
            raise Conflict(409, f"{obj['metadata']['name']} already exists")
        self.returned += 1
        return copy.deepcopy(self._store(copy.deepcopy(obj)))

    async def ensure(self, obj: dict[str, Any]) -> dict[str, Any]:
        # As the API client does it: create, and on a conflict patch.
        try:
            return await self.create(obj)
        except Conflict:
            pass
        patch = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
        patch["metadata"] = {k: obj["metadata"][k] for k in ("labels", "annotations",
                                                             "ownerReferences")
                             if k in obj["metadata"]}
        return await self.patch(kind_of(obj), obj["metadata"]["name"], patch,
                                obj["metadata"].get("namespace"))

    async def patch(self, kind: KubeKind, name: str, patch: Mapping[str, Any],
                    namespace: str | None = None, subresource: str | None = None
                    ) -> dict[str, Any]:
        key = self._key(kind, name, namespace)
        current = self._objects.get(key)
        self._count("patch")
        if current is None:
            raise NotFound(404, f"{kind.plural} {namespace}/{name}")
        if subresource == "status":
            patch = {"status": patch.get("status", {})}
        merged = merge_patch(current, patch)
        self._objects[key] = merged
        self.fleet.observe(merged)
        self.returned += 1
        return copy.deepcopy(merged)

    async def delete(self, kind: KubeKind, name: str, namespace: str | None = None) -> bool:
        self._count("delete")
        gone = self._objects.pop(self._key(kind, name, namespace), None)
        if gone is not None and namespace is not None:
            self.fleet.forget(gone["kind"], namespace, name)
        return gone is not None

    def watched(self, kind: KubeKind, name: str, namespace: str | None) -> dict[str, Any]:
        """The object as the watch delivers it to a handler (no API request)."""
        return copy.deepcopy(self._objects[self._key(kind, name, namespace)])

    def phases(self, plural: str) -> Counter[str]:
        return Counter((obj.get("status") or {}).get("phase", "-")
                       for (kind, _, _), obj in self._objects.items() if kind == plural)


class TimedBroker:
    """The broker backend, with the time spent waiting on it added up."""

    def __init__(self, backend: BrokerBackend) -> None:
        self._backend = backend
        self.seconds = 0.0  # wall time during which at least one call was waiting on it
        self.writes = 0
        self._active = 0
        self._since = 0.0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._backend, name)
        if not asyncio.iscoroutinefunction(attribute):
            return attribute

        async def timed(*args: Any, **kwargs: Any) -> Any:
            if self._active == 0:
                self._since = time.perf_counter()
            self._active += 1
            try:
                result = await attribute(*args, **kwargs)
            finally:
                self._active -= 1
                if self._active == 0:
                    self.seconds += time.perf_counter() - self._since
            if isinstance(result, SyncResult):
                self.writes += result.writes
            return result

        return timed


@dataclass
class Window:
    """What one measured stretch cost."""

    seconds: float
    cpu: float
    requests: Counter[str]
    by_work: Counter[tuple[str, str]]
    returned: int
    broker_seconds: float
    devices: int
    extra: dict[str, str] = field(default_factory=dict)

    def per_device(self, value: float) -> float:
        return value / self.devices


@dataclass
class SizeResult:
    size: int
    gateways: int
    seed_seconds: float
    seeded: int
    cold: Window
    steady: Window | None
    resync: Window
    rss_mb: float
    store_mb: float


def tenant_body() -> dict[str, Any]:
    return {"apiVersion": API, "kind": "Tenant", "metadata": {"name": TENANT},
            "spec": {"displayName": "Fleet", "ingest": {"enabled": True}}}


def device_body(index: int, gateways: int) -> dict[str, Any]:
    labels = {"fleet": "all"}
    if index % CHILDREN_PER_GATEWAY == 0 and gateways:
        labels["site"] = f"site-{(index // CHILDREN_PER_GATEWAY) % gateways}"
    return {"apiVersion": API, "kind": "Device",
            "metadata": {"name": f"dev-{index:05d}", "namespace": TENANT, "labels": labels},
            "spec": {"model": "sensor-v2"}}


def gateway_body(index: int) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "Gateway",
            "metadata": {"name": f"gw-{index:03d}", "namespace": TENANT},
            "spec": {"selector": {"matchLabels": {"site": f"site-{index}"}}}}


def release_body() -> dict[str, Any]:
    return {"apiVersion": API, "kind": "FirmwareRelease",
            "metadata": {"name": "fw-2", "namespace": TENANT},
            "spec": {"version": "2.0.0",
                     "artifact": {"url": "https://firmware.example/2.0.0.bin",
                                  "sha256": "b" * 64, "size": 1024},
                     "selector": {"matchLabels": {"fleet": "all"}}}}


def deep_size(value: Any, seen: set[int] | None = None) -> int:
    """Bytes held by a JSON-like value (dicts, lists, strings, numbers), shared parts once."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in value.items())
    elif isinstance(value, list):
        size += sum(deep_size(item, seen) for item in value)
    return size


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def measure(store: CountingObjects, broker: TimedBroker, devices: int,
                  work: Callable[[], Awaitable[dict[str, str] | None]]) -> Window:
    store.reset_counts()
    broker_before = broker.seconds
    cpu, wall = time.process_time(), time.perf_counter()
    extra = await work() or {}
    return Window(time.perf_counter() - wall, time.process_time() - cpu,
                  Counter(store.requests), Counter(store.by_work), store.returned,
                  broker.seconds - broker_before,
                  devices, extra)


async def run_size(size: int, *, workers: int, steady_seconds: float, root: Path) -> SizeResult:
    gateways = max(1, size // 100 // CHILDREN_PER_GATEWAY) if size >= CHILDREN_PER_GATEWAY else 0
    store = CountingObjects()
    store.apply(tenant_body())
    for index in range(gateways):
        store.apply(gateway_body(index))
    store.apply(release_body())
    for index in range(size):
        store.apply(device_body(index, gateways))

    # The broker is kubiot's to start: its state begins with every identity the fleet wants.
    seed = await identities_wanted(store, TENANT, TenantSpec.model_validate(
        tenant_body()["spec"]))
    store.reset_counts()  # that was the stack's start-up, not the reconciles being measured
    local = LocalBroker(root / "broker", BrokerPorts(free_port(), free_port()))
    metrics = OperatorMetrics()
    authority = TenantAuthority(SecretMaterialStore(cast(Any, store), "kubiot-system"))
    await local.start(seed)
    backend = MosquittoDynsecBackend("127.0.0.1", local.ports.service, OPERATOR_USERNAME,
                                     await local.admin_password())
    await backend.__aenter__()
    broker = TimedBroker(backend)
    reports = ReportPump(store, metrics, flush_seconds=1.0, patches_per_second=500)
    results = CommandResults()
    mqtt = OperatorMqtt("127.0.0.1", local.ports.service, OPERATOR_USERNAME,
                        await local.admin_password(),
                        client_id=operator_client_id("reports-bench"),
                        subscriptions=report_filters(), on_message=reports.on_message,
                        on_command_result=results.on_result)
    platform = Platform(
        objects=store, authority=authority, broker=cast(BrokerBackend, broker), messenger=mqtt,
        trust=local, metrics=metrics,
        endpoint=BrokerEndpoint("127.0.0.1", local.ports.device,
                                local.server_ca_file.read_bytes()),
        ingest=IngestEnvironment(image="ingest", broker_host="127.0.0.1",
                                 broker_port=local.ports.service,
                                 platform_database_secret="db", platform_database_key="dsn"),
        ca_namespace="kubiot-system", fleet=store.fleet)
    results.attach(platform)
    semaphore = asyncio.Semaphore(workers)

    async def write_status(body: dict[str, Any], outcome: Outcome) -> None:
        meta = body["metadata"]
        await store.patch(kind_of(body), meta["name"], {"status": outcome.status},
                          meta.get("namespace"), subresource="status")

    async def handle(controller: Callable[[Platform, dict[str, Any]], Awaitable[Outcome]],
                     body: dict[str, Any]) -> None:
        # What a kopf handler does: run the controller, write the status it concluded.
        ON_BEHALF.set(str(body["kind"]))
        async with semaphore:
            outcome = await controller(platform, body)
            if outcome.status and kind_of(body).plural != "firmwarereleases":
                await write_status(body, outcome)

    refresher = GatewayRefresher(platform, write_status)
    platform.gateway_refresh = refresher.request
    tasks = [asyncio.create_task(mqtt.run()), asyncio.create_task(reports.run()),
             asyncio.create_task(refresher.run())]
    stop_timer = asyncio.Event()

    async def release_timer() -> None:
        # kopf's timer on the release, only while a rollout is due.
        while not stop_timer.is_set():
            await asyncio.sleep(5.0)
            body = await store.get(KINDS_BY_API[(API, "FirmwareRelease")], "fw-2", TENANT)
            if body is not None and rollout_due(body):
                await handle(reconcile_release, body)

    try:
        await mqtt.wait_connected(30)

        async def cold() -> dict[str, str]:
            await handle(reconcile_tenant, store.watched(TENANTS, TENANT, None))
            applied = [b for b in store.fleet.devices(TENANT)]
            tasks.append(asyncio.create_task(release_timer()))
            gateway_kind = KINDS_BY_API[(API, "Gateway")]
            device_kind = KINDS_BY_API[(API, "Device")]
            await asyncio.gather(
                *(handle(reconcile_gateway, store.watched(gateway_kind, g.name, TENANT))
                  for g in store.fleet.gateways(TENANT)),
                *(handle(reconcile_device, store.watched(device_kind, d.name, TENANT))
                  for d in applied))
            ready = store.phases("devices").get("Ready", 0)
            return {"ready": f"{ready}/{size}"}

        cold_window = await measure(store, broker, size, cold)

        steady_window = None
        if steady_seconds > 0:
            steady_window = await measure(store, broker, size, lambda: steady(
                local, size, steady_seconds, reports))
        resync_window = await measure(store, broker, size, lambda: resync_pass(platform))
    finally:
        stop_timer.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await backend.aclose()
        await local.stop()
    rss = peak_rss_mb()
    store_mb = deep_size(store._objects) / 1024 / 1024
    return SizeResult(size, gateways, local.cold_start_seeded or 0.0, len(seed), cold_window,
                      steady_window, resync_window, rss, store_mb)


async def resync_pass(platform: Platform) -> dict[str, str]:
    writes = await resync_all(platform)
    return {"broker writes": str(writes)}


async def steady(local: LocalBroker, devices: int, seconds: float, reports: ReportPump
                 ) -> dict[str, str]:
    """Every device reports presence and its state once in the window, through the broker."""
    import aiomqtt

    started = time.perf_counter()
    async with aiomqtt.Client("127.0.0.1", local.ports.service, username=OPERATOR_USERNAME,
                              password=await local.admin_password(),
                              identifier=operator_client_id("bench-devices"),
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        spacing = seconds / max(1, devices)
        for index in range(devices):
            root = device_root(TENANT, f"dev-{index:05d}")
            await client.publish(presence_topic(root), b"online", qos=1, retain=True)
            await client.publish(state_reported_topic(root),
                                 json.dumps({"firmware": "1.0.0", "battery": 90}).encode(),
                                 qos=1, retain=True)
            target = started + spacing * (index + 1)
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
    remaining = seconds - (time.perf_counter() - started)
    if remaining > 0:
        await asyncio.sleep(remaining)
    await reports.flush()
    return {"ignored reports": str(reports.ignored)}


def print_window(title: str, window: Window) -> None:
    per = {verb: window.per_device(window.requests.get(verb, 0)) for verb in VERBS}
    total = sum(window.requests.values())
    print(f"  {title}: {window.seconds:7.1f} s wall, {window.broker_seconds:6.1f} s of it "
          f"waiting on the broker; operator CPU {window.cpu:6.1f} s "
          f"({1000 * window.per_device(window.cpu):.2f} ms/device)")
    print(f"    API requests/device {window.per_device(total):.2f}: "
          + ", ".join(f"{verb} {value:.2f}" for verb, value in per.items())
          + f"; objects returned/device {window.per_device(window.returned):.2f}"
          + "".join(f"; {k} {v}" for k, v in window.extra.items()))
    devices = {verb: window.by_work.get(("Device", verb), 0) for verb in VERBS}
    if any(devices.values()):
        print(f"    per Device reconcile {window.per_device(sum(devices.values())):.2f} requests: "
              + ", ".join(f"{verb} {window.per_device(n):.2f}" for verb, n in devices.items()))


def report(result: SizeResult) -> None:
    print(f"{result.size} devices, {result.gateways} gateways, 1 FirmwareRelease rolling out")
    print(f"  broker cold start with {result.seeded} identities written before it started: "
          f"{result.seed_seconds:.2f} s (Mosquitto's own write, apart from the operator's)")
    print_window("until all Ready", result.cold)
    if result.steady is not None:
        print_window(f"steady state ({result.steady.seconds:.0f} s of reports)", result.steady)
    print_window("one drift-repair pass (paginated lists)", result.resync)
    operator_mb = result.rss_mb - result.store_mb
    print(f"  peak RSS {result.rss_mb:.0f} MB (this process), of which the object store (the "
          f"API server's part) holds {result.store_mb:.0f} MB: operator about {operator_mb:.0f} MB")
    device_lists = result.cold.by_work.get(("Device", "list"), 0)
    operator_mb = result.rss_mb - result.store_mb
    verdicts = [f"{'ok' if result.cold.cpu < TARGET_SECONDS else 'OVER'}: operator work "
                f"{result.cold.cpu:.1f} s < {TARGET_SECONDS:.0f} s",
                f"{'ok' if operator_mb < TARGET_RSS_MB else 'OVER'}: operator RSS "
                f"{operator_mb:.0f} MB < {TARGET_RSS_MB:.0f} MB",
                f"{'ok' if device_lists == 0 else 'LISTS'}: "
                f"{device_lists} list requests in Device reconciles"]
    print("  " + "; ".join(verdicts))


async def run(sizes: list[int], workers: int, steady_seconds: float) -> list[SizeResult]:
    results = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="kubiot-bench-fleet-") as root:
            result = await run_size(size, workers=workers, steady_seconds=steady_seconds,
                                    root=Path(root))
        report(result)
        results.append(result)
        gc.collect()
    if len(results) > 1:
        first, last = results[0], results[-1]
        ratio = (sum(last.cold.requests.values()) / last.size) / max(
            1e-9, sum(first.cold.requests.values()) / first.size)
        print(f"requests/device at {last.size} vs {first.size}: x{ratio:.2f}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 5_000, 10_000])
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=50)
    args = parser.parse_args(argv)
    asyncio.run(run(args.sizes, args.workers, args.steady_seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
