"""Devices until Ready: the operator (kopf) on an emulated Kubernetes API and a real Mosquitto.

Applies N Devices to one tenant and prints the time until every one is Ready (certificate
issued, Secret written, broker identity and rules in Mosquitto, status patched) and the
operator process's peak memory. Beside it, measured in the same run: the time the API
emulator alone took to accept the N creates (the floor set by the API, with no operator), and
the time to issue N certificates and sync N broker identities without kopf or Kubernetes (the
floor set by the PKI and the broker). The API emulator runs in its own process, so the memory
figure is the operator's (and this script's loader, which holds nothing).

    .venv/bin/python bench/bench_operator.py [--count 1000 10000] [--workers 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import kopf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kubiot_contract.topics import (  # noqa: E402
    OPERATOR_USERNAME,
    IdentityKind,
    device_access,
    device_username,
)
from kubiot_operator.brokers import (  # noqa: E402
    BrokerIdentity,
    CertificateCredential,
    MosquittoDynsecBackend,
)
from kubiot_operator.handlers import Operator  # noqa: E402
from kubiot_operator.local.broker import BrokerPorts, LocalBroker  # noqa: E402
from kubiot_operator.local.ports import free_port  # noqa: E402
from kubiot_operator.pki import MemoryMaterialStore, TenantAuthority  # noqa: E402
from kubiot_operator.settings import OperatorSettings  # noqa: E402
from tests.support.kube_emulator import run_operator  # noqa: E402

API = "/apis/kubiot.io/v1alpha1"
TARGET_SECONDS = {1_000: 12.0, 10_000: 120.0}
TARGET_MEMORY_MB = 500

EMULATOR = """
import asyncio, sys
sys.path.insert(0, {repo!r})
from tests.support.kube_emulator import KubeEmulator
async def main():
    async with KubeEmulator() as emulator:
        print(emulator.url, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"""


@dataclass(frozen=True)
class Result:
    count: int
    create_seconds: float
    ready_seconds: float
    floor_seconds: float
    peak_mb: float


@dataclass(frozen=True)
class Emulator:
    url: str


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def create_devices(session: aiohttp.ClientSession, url: str, names: list[str]) -> float:
    semaphore = asyncio.Semaphore(64)

    async def create(name: str) -> None:
        body = {"apiVersion": "kubiot.io/v1alpha1", "kind": "Device",
                "metadata": {"name": name, "namespace": "bench"}, "spec": {}}
        for attempt in range(5):
            try:
                async with semaphore, session.post(f"{url}{API}/namespaces/bench/devices",
                                                   json=body) as response:
                    if response.status == 409:
                        return  # an earlier attempt got through
                    response.raise_for_status()
                    return
            except aiohttp.ServerDisconnectedError:
                await asyncio.sleep(0.1 * (attempt + 1))
        raise RuntimeError(f"could not create {name}")

    started = time.perf_counter()
    await asyncio.gather(*(create(n) for n in names))
    return time.perf_counter() - started


async def count_ready(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(f"{url}{API}/namespaces/bench/devices") as response:
        items: list[dict[str, Any]] = (await response.json()).get("items", [])
    return sum(1 for d in items if (d.get("status") or {}).get("phase") == "Ready")


async def floor(broker: LocalBroker, count: int) -> float:
    """The same certificates and broker identities, with no Kubernetes and no kopf."""
    authority = TenantAuthority(MemoryMaterialStore())
    await authority.ensure_ca("floor")
    backend = MosquittoDynsecBackend("127.0.0.1", broker.ports.service, OPERATOR_USERNAME,
                                     await broker.admin_password())
    async with backend:
        started = time.perf_counter()
        semaphore = asyncio.Semaphore(50)

        async def one(index: int) -> None:
            name = f"f{index}"
            async with semaphore:
                await authority.issue("floor", IdentityKind.DEVICE, name, validity_days=365)
                await backend.ensure_identity(BrokerIdentity(
                    device_username("floor", name), "floor", IdentityKind.DEVICE,
                    device_access("floor", name), CertificateCredential()))

        await asyncio.gather(*(one(i) for i in range(count)))
        elapsed = time.perf_counter() - started
        await backend.remove_tenant("floor")
    return elapsed


def start_emulator() -> tuple[subprocess.Popen[str], str]:
    """The Kubernetes API emulator in a process of its own; returns it and its URL."""
    emulator = subprocess.Popen([sys.executable, "-c", EMULATOR.format(repo=str(REPO))],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert emulator.stdout is not None
    return emulator, emulator.stdout.readline().strip()


async def run(count: int, workers: int, url: str) -> Result:
    root = Path(tempfile.mkdtemp(prefix="kubiot-bench-operator-"))
    broker = LocalBroker(root / "broker", BrokerPorts(free_port(), free_port()))
    await broker.start()
    try:
        floor_seconds = await floor(broker, count)
        settings = OperatorSettings(
            broker_admin_host="127.0.0.1", broker_admin_port=broker.ports.service,
            broker_admin_password=await broker.admin_password(), broker_public_host="127.0.0.1",
            broker_public_port=broker.ports.device, broker_ca_file=broker.server_ca_file,
            metrics_port=0, max_workers=workers, log_format="text")
        backend = MosquittoDynsecBackend("127.0.0.1", broker.ports.service, OPERATOR_USERNAME,
                                         await broker.admin_password())
        operator = Operator(settings, broker=backend, trust=broker,
                            login=lambda **_: kopf.ConnectionInfo(server=url, insecure=True))
        names = [f"device-{i:05d}" for i in range(count)]
        async with aiohttp.ClientSession() as session, run_operator(
                Emulator(url), registry=operator.registry, ready_timeout=60):  # type: ignore[arg-type]
            tenant = {"apiVersion": "kubiot.io/v1alpha1", "kind": "Tenant",
                      "metadata": {"name": "bench"},
                      "spec": {"namespace": "bench", "ingest": {"enabled": False}}}
            async with session.post(f"{url}{API}/tenants", json=tenant) as response:
                response.raise_for_status()
            while True:
                async with session.get(f"{url}{API}/tenants/bench") as response:
                    body = await response.json()
                if (body.get("status") or {}).get("phase") == "Ready":
                    break
                await asyncio.sleep(0.2)
            started = time.perf_counter()
            create_seconds = await create_devices(session, url, names)
            while True:
                if await count_ready(session, url) >= count:
                    break
                await asyncio.sleep(1.0)
            ready_seconds = time.perf_counter() - started
        return Result(count, create_seconds, ready_seconds, floor_seconds, peak_rss_mb())
    finally:
        await broker.stop()


def report(result: Result) -> None:
    target = TARGET_SECONDS.get(result.count)
    print(f"{result.count:>6} devices: all Ready in {result.ready_seconds:7.1f} s "
          f"({result.count / result.ready_seconds:6.0f}/s)"
          + (f"  target < {target:.0f} s" if target else ""))
    print(f"        floor, API creates alone:            {result.create_seconds:7.1f} s")
    print(f"        floor, PKI + broker without kopf:    {result.floor_seconds:7.1f} s")
    print(f"        operator process peak memory:        {result.peak_mb:7.0f} MB"
          f"  target < {TARGET_MEMORY_MB} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--workers", type=int, default=50, help="kopf max_workers")
    args = parser.parse_args(argv)
    failed = False
    for count in args.count:
        emulator, url = start_emulator()
        try:
            result = asyncio.run(run(count, args.workers, url))
        finally:
            with contextlib.suppress(Exception):
                emulator.communicate("", timeout=10)
            emulator.kill()
        report(result)
        target = TARGET_SECONDS.get(count)
        failed |= bool(target and result.ready_seconds > target)
        failed |= result.peak_mb > TARGET_MEMORY_MB
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
