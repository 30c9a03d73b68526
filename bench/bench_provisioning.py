"""How long N factory-fresh devices take to provision by claim, and what sharing a claim costs.

Runs the operator's provisioning path for real on one machine: a Mosquitto with mutual TLS and
dynamic security, the Tenant and Device controllers over the local stack's object store, the
provisioning desk on the operator's MQTT session, and `FactoryDevice`s (simulator/factory.py)
asking for their identities.

Baseline, in the same run: the same number of devices booting at once, each with a claim of its
own, so no device ever takes another's session. Then all of them at once on one shared claim
(each connect ends the session of the device before it: the cost of sharing a claim), and all
at once spread over a few claims.

    .venv/bin/python bench/bench_provisioning.py [--count N] [--claims K]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from kubiot_contract.topics import OPERATOR_USERNAME, REPORTS_CLIENT_ID, report_filters
from kubiot_operator.brokers import MosquittoDynsecBackend
from kubiot_operator.controllers.device import reconcile_device
from kubiot_operator.controllers.platform import Platform
from kubiot_operator.controllers.provisioning import ProvisioningDesk, route_messages
from kubiot_operator.controllers.tenant import reconcile_tenant
from kubiot_operator.kube.client import DEVICES, SECRETS, TENANTS
from kubiot_operator.kube.secrets import secret_data
from kubiot_operator.local.broker import BrokerPorts, LocalBroker
from kubiot_operator.local.objects import FileObjects
from kubiot_operator.local.ports import free_port
from kubiot_operator.metrics import OperatorMetrics
from kubiot_operator.mqtt import OperatorMqtt
from kubiot_operator.pki import MemoryMaterialStore, TenantAuthority
from kubiot_operator.reconcile.identity import BrokerEndpoint
from kubiot_operator.reconcile.tenant import IngestEnvironment
from kubiot_operator.simulator.credentials import DeviceCredentials
from kubiot_operator.simulator.factory import (
    FactoryDevice,
    FactoryState,
    claim_credentials,
    ignore_lost_claim_sessions,
)

TENANT = "bench"
#: A tenant holds at most 32 claims (ProvisioningSpec), so the baseline stops at 32 devices.
MAX_CLAIMS = 32


@dataclass(frozen=True)
class Run:
    name: str
    seconds: float
    requests: int
    lost_sessions: int
    count: int

    def line(self, baseline: Run | None) -> str:
        ratio = f"{self.seconds / baseline.seconds:5.1f}x" if baseline else "    -"
        return (f"{self.name:<34} {self.seconds:8.2f} s {ratio}  "
                f"{self.count / self.seconds:7.1f} devices/s  "
                f"{self.requests / self.count:5.2f} requests  "
                f"{self.lost_sessions / self.count:5.2f} lost sessions per device")


class Operator:
    """The provisioning path of the operator, as the local stack assembles it."""

    def __init__(self, root: Path) -> None:
        self.broker = LocalBroker(root / "broker", BrokerPorts(free_port(), free_port()))
        self.objects = FileObjects(root / "objects.json")
        self.desk = ProvisioningDesk()
        self._tasks: list[asyncio.Task[Any]] = []
        self.platform: Platform | None = None

    @contextlib.asynccontextmanager
    async def running(self, claims: int) -> AsyncIterator[list[DeviceCredentials]]:
        await self.broker.start()
        password = await self.broker.admin_password()
        backend = MosquittoDynsecBackend("127.0.0.1", self.broker.ports.service,
                                         OPERATOR_USERNAME, password)
        await backend.__aenter__()
        mqtt = OperatorMqtt("127.0.0.1", self.broker.ports.service, OPERATOR_USERNAME,
                            password, client_id=REPORTS_CLIENT_ID,
                            subscriptions=report_filters(),
                            on_message=route_messages(lambda topic, payload: None, self.desk))
        platform = self.platform = Platform(
            objects=self.objects, authority=TenantAuthority(MemoryMaterialStore()),
            broker=backend, messenger=mqtt, trust=self.broker,
            metrics=OperatorMetrics(CollectorRegistry()),
            endpoint=BrokerEndpoint("127.0.0.1", self.broker.ports.device,
                                    self.broker.server_ca_file.read_bytes()),
            ingest=IngestEnvironment(image="bench", broker_host="127.0.0.1",
                                     broker_port=self.broker.ports.service,
                                     platform_database_secret="db",
                                     platform_database_key="dsn"),
            ca_namespace="bench-system")
        # What the API server's watch does in a cluster: a created Device gets reconciled.
        platform.resource_created = lambda body: self._spawn(self._reconcile_device(body))
        try:
            self._spawn(mqtt.run())
            self._spawn(self.desk.run(platform))
            await mqtt.wait_connected(30)
            yield await self._tenant(claims)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await backend.aclose()
            await self.broker.stop()

    def _spawn(self, work: Any) -> None:
        self._tasks.append(asyncio.create_task(work))

    async def _reconcile_device(self, body: dict[str, Any]) -> None:
        assert self.platform is not None
        outcome = await reconcile_device(self.platform, body)
        await self.objects.patch(DEVICES, body["metadata"]["name"], {"status": outcome.status},
                                 body["metadata"]["namespace"], subresource="status")

    async def _tenant(self, claims: int) -> list[DeviceCredentials]:
        assert self.platform is not None
        names = [f"line-{i}" for i in range(1, claims + 1)]
        body = await self.objects.ensure({
            "apiVersion": "kubiot.io/v1alpha1", "kind": "Tenant",
            "metadata": {"name": TENANT},
            "spec": {"ingest": {"enabled": False}, "provisioning": {
                "enabled": True, "devicesPerMinute": 100_000,
                "claims": [{"name": name} for name in names]}}})
        outcome = await reconcile_tenant(self.platform, body)
        await self.objects.patch(TENANTS, TENANT, {"status": outcome.status})
        bundles = []
        for name in names:
            secret = await self.objects.get(SECRETS, f"{name}-claim-credentials", TENANT)
            assert secret is not None, outcome.status
            bundles.append(claim_credentials(secret_data(secret)))
        return bundles


async def provision(name: str, devices: list[FactoryDevice]) -> Run:
    started = time.perf_counter()
    await asyncio.gather(*(device.provision() for device in devices))
    seconds = time.perf_counter() - started
    assert all(d.state is FactoryState.PROVISIONED for d in devices)
    return Run(name, seconds, sum(d.requests for d in devices),
               sum(d.lost_sessions for d in devices), len(devices))


async def measure(count: int, claims: int) -> list[Run]:
    with tempfile.TemporaryDirectory(prefix="kubiot-bench-") as tmp:
        operator = Operator(Path(tmp))
        async with operator.running(count) as bundles:
            ignore_lost_claim_sessions(asyncio.get_running_loop())
            serials = iter(range(1, 3 * count + 1))

            def fleet(claims_used: int) -> list[FactoryDevice]:
                return [FactoryDevice(bundles[i % claims_used], f"sn-{next(serials):06d}",
                                      check_hostname=False) for i in range(count)]

            return [
                await provision("all at once, a claim each", fleet(count)),
                await provision("all at once, one claim", fleet(1)),
                await provision(f"all at once, {claims} claims", fleet(claims)),
            ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20, help="devices per run")
    parser.add_argument("--claims", type=int, default=4, help="claims of the last run")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= MAX_CLAIMS:
        parser.error(f"--count must be 1 to {MAX_CLAIMS} (a claim each for the baseline)")
    if not 1 <= args.claims <= args.count:
        parser.error("--claims must be 1 to --count")
    logging.basicConfig(level=logging.WARNING)
    runs = asyncio.run(measure(args.count, args.claims))
    print(f"provisioning {args.count} factory-fresh devices by claim "
          "(Mosquitto, the Tenant and Device controllers, the desk):")
    for run in runs:
        print("  " + run.line(runs[0] if run is not runs[0] else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
