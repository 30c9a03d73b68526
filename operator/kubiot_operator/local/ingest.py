"""One ingest process per tenant, run from the same Deployment the operator would apply.

The Deployment's environment is the single description of how ingest is configured; here its
`secretKeyRef`s are resolved from the local object store and the process is started directly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp

from kubiot_operator.kube.client import DEPLOYMENTS, SECRETS

from .objects import FileObjects
from .ports import free_port

log = logging.getLogger("kubiot.local")
RESTART_DELAY = 2.0
STOP_TIMEOUT = 30.0
PR_SET_PDEATHSIG = 1


def resolve_environment(container: dict[str, Any], secrets: dict[str, dict[str, Any]],
                        pod_name: str) -> dict[str, str]:
    """A container's env with secret and field references resolved."""
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        source = item.get("valueFrom") or {}
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            data = (secrets.get(ref["name"]) or {}).get("data") or {}
            if ref["key"] in data:
                env[item["name"]] = base64.b64decode(data[ref["key"]]).decode()
        elif "fieldRef" in source:
            env[item["name"]] = pod_name
    return env


def die_with_parent() -> None:
    """Linux: SIGTERM the ingest if the stack itself is killed, so none is left behind."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class IngestProcess:
    def __init__(self, tenant: str, env: dict[str, str], log_file: Path, *,
                 namespace: str = "") -> None:
        self.tenant = tenant
        self.namespace = namespace
        self.env = env
        self.log_file = log_file
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def metrics_port(self) -> int:
        return int(self.env["KUBIOT_INGEST_METRICS_PORT"])

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as output:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kubiot_ingest.main",
                env={**os.environ, **self.env}, stdout=output, stderr=output,
                stdin=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent)
        self.starts += 1

    async def stop(self) -> None:
        """SIGTERM, so ingest flushes and commits what it holds, then wait."""
        if not self.running:
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("ingest for %s did not stop in %.0f s; killing it", self.tenant,
                        STOP_TIMEOUT)
            self.process.kill()
            await self.process.wait()


async def _ready(session: aiohttp.ClientSession, process: IngestProcess) -> bool:
    url = process.metrics_url.removesuffix("/metrics") + "/readyz"
    try:
        async with session.get(url) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


class IngestSupervisor:
    """Keeps exactly one ingest process per tenant Deployment, restarting crashed ones."""

    def __init__(self, objects: FileObjects, log_dir: Path) -> None:
        self.objects = objects
        self.log_dir = log_dir
        self.processes: dict[str, IngestProcess] = {}
        self._metrics_ports: dict[str, str] = {}

    async def supervise(self, interval: float = 1.0) -> None:
        while True:
            await self.reconcile()
            await asyncio.sleep(interval)

    async def reconcile(self) -> None:
        wanted: dict[str, dict[str, str]] = {}
        namespaces: dict[str, str] = {}
        deployments = await self.objects.list(DEPLOYMENTS)
        for deployment in deployments:
            labels = deployment["metadata"].get("labels") or {}
            tenant = labels.get("kubiot.io/tenant")
            if not tenant or labels.get("app.kubernetes.io/component") != "ingest":
                continue
            namespace = deployment["metadata"]["namespace"]
            secrets = {s["metadata"]["name"]: s
                       for s in await self.objects.list(SECRETS, namespace)}
            container = deployment["spec"]["template"]["spec"]["containers"][0]
            env = resolve_environment(container, secrets, f"{tenant}-ingest-local")
            # Each process needs its own metrics port on one machine.
            port = self._metrics_ports.setdefault(tenant, str(free_port()))
            env["KUBIOT_INGEST_METRICS_PORT"] = port
            if "KUBIOT_INGEST_DATABASE_DSN" in env and "KUBIOT_INGEST_BROKER_PASSWORD" in env:
                wanted[tenant] = env
                namespaces[tenant] = namespace
        for tenant in set(self.processes) - set(wanted):
            await self.processes.pop(tenant).stop()
        for tenant, env in wanted.items():
            current = self.processes.get(tenant)
            if current is not None and current.env == env and current.running:
                continue
            if current is not None:
                if current.running:
                    await current.stop()
                elif current.env == env:
                    log.warning("ingest for %s exited with %s; restarting", tenant,
                                current.process.returncode if current.process else "?")
                    await asyncio.sleep(RESTART_DELAY)
            process = IngestProcess(tenant, env, self.log_dir / f"{tenant}.log",
                                    namespace=namespaces[tenant])
            process.starts = current.starts if current else 0
            await process.start()
            self.processes[tenant] = process
            log.info("ingest for tenant %s started (metrics %s, log %s)", tenant,
                     process.metrics_url, process.log_file)
        await self._report(deployments)

    async def _report(self, deployments: list[dict[str, Any]]) -> None:
        """Write each Deployment's status as a cluster would: one replica available while its
        process runs, so the Tenant's IngestReady reads the same status as in a cluster."""
        for deployment in deployments:
            meta = deployment["metadata"]
            tenant = (meta.get("labels") or {}).get("kubiot.io/tenant", "")
            process = self.processes.get(tenant)
            available = 1 if process is not None and process.running else 0
            status = {"observedGeneration": meta.get("generation", 1), "replicas": 1,
                      "readyReplicas": available, "availableReplicas": available}
            if deployment.get("status") != status:
                await self.objects.patch(DEPLOYMENTS, meta["name"], {"status": status},
                                         meta["namespace"], subresource="status")

    async def wait_ready(self, seconds: float = 60.0) -> bool:
        """Until every ingest answers /readyz (subscribed, database up), so that nothing the
        simulated devices send in the first seconds falls on a subscription not yet made."""
        deadline = asyncio.get_running_loop().time() + seconds
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while asyncio.get_running_loop().time() < deadline:
                if all([await _ready(session, p) for p in self.processes.values()]):
                    return True
                await asyncio.sleep(0.2)
        log.warning("ingest not ready after %.0f s; continuing", seconds)
        return False

    async def stop(self) -> None:
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                await process.stop()
