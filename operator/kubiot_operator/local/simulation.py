"""The local stack's simulated fleet: every device and gateway with a key kubiot generated
connects with its issued certificate; devices behind a gateway are spoken for by it.

Credential bundles are also exported to `.kubiot/devices/<namespace>/<name>/`, the files a
firmware engineer would flash, and claim bundles to `.kubiot/claims/<namespace>/<claim>/`, what
manufacturing flashes onto factory-fresh devices (`kubiot local factory` runs such devices).
Devices whose key never left them (CSR) are not simulated here: they simulate themselves.

A Device annotated `kubiot.io/simulate: silent@2.0.0` (or `anomalous@…`, `offline@…`; see
`simulator/faults.py`) acknowledges an update to that version and then shows the fault, so a
release's health gate can be tried; the annotation is read again on every pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubiot_operator.kube.client import DEVICES, GATEWAYS, SECRETS
from kubiot_operator.kube.secrets import secret_data
from kubiot_operator.reconcile.identity import KIND_LABEL
from kubiot_operator.simulator import BundleIncomplete, DeviceCredentials, SimulatedDevice
from kubiot_operator.simulator.faults import SIMULATE_ANNOTATION, Faults, parse_faults
from kubiot_operator.simulator.gateway import SimulatedGateway, gateway_credentials

from .credentials import export_bundle
from .objects import FileObjects

log = logging.getLogger("kubiot.local")


@dataclass
class Running:
    task: asyncio.Task[None]
    fingerprint: tuple[Any, ...]
    device: SimulatedDevice | None = None  # None for a gateway


class Simulation:
    def __init__(self, objects: FileObjects, bundle_dir: Path, *, interval: float,
                 enabled: bool = True, claim_dir: Path | None = None) -> None:
        self.objects = objects
        self.bundle_dir = bundle_dir
        self.claim_dir = claim_dir
        self.interval = interval
        self.enabled = enabled
        self.running: dict[tuple[str, str, str], Running] = {}
        # What each bundle folder was last written from: with ten thousand devices, comparing
        # every file on disk every second would be most of the stack's work.
        self._exported: dict[tuple[str, str, str], int] = {}
        self._faults: dict[tuple[str, str, str], Faults] = {}
        self._refused: dict[tuple[str, str, str], str] = {}  # the bad annotation last logged

    async def run(self, poll_seconds: float = 1.0) -> None:
        while True:
            await self.reconcile()
            await asyncio.sleep(poll_seconds)

    async def reconcile(self) -> None:
        if self.claim_dir is not None:
            for bundle in await self.objects.list(SECRETS, label_selector=f"{KIND_LABEL}=claim"):
                meta = bundle["metadata"]
                name = meta["name"].removesuffix("-claim-credentials")
                export_bundle(bundle, self.claim_dir / meta["namespace"] / name)
        wanted: dict[tuple[str, str, str], tuple[tuple[Any, ...], Any]] = {}
        for kind, collection in (("device", DEVICES), ("gateway", GATEWAYS)):
            for obj in await self.objects.list(collection):
                meta, status = obj["metadata"], obj.get("status") or {}
                namespace, name = meta["namespace"], meta["name"]
                secret = await self.objects.get(SECRETS, f"{name}-{kind}-credentials", namespace)
                if secret is None:
                    continue
                exported = hash(json.dumps(secret.get("data") or {}, sort_keys=True))
                if self._exported.get((kind, namespace, name)) != exported:
                    export_bundle(secret, self.bundle_dir / namespace / name)
                    self._exported[(kind, namespace, name)] = exported
                files = secret_data(secret)
                suspended = bool((obj.get("spec") or {}).get("suspended"))
                if not self.enabled or suspended or "tls.key" not in files:
                    continue
                if status.get("phase") != "Ready":
                    continue
                if kind == "device" and status.get("gateway"):
                    continue  # its gateway speaks for it
                children = tuple(status.get("children") or ()) if kind == "gateway" else ()
                key = (kind, namespace, name)
                self._faults[key] = self._faults_of(key, meta)
                wanted[key] = ((files["tls.crt"], children), (files, children))
        for key in set(self.running) - set(wanted):
            await self._stop(key)
        for key, (fingerprint, (files, children)) in wanted.items():
            current = self.running.get(key)
            if current is not None and current.fingerprint == fingerprint:
                if current.device is not None:
                    current.device.faults = self._faults.get(key, Faults())
                continue
            if current is not None:
                await self._stop(key)
            try:
                runner, device = self._runner(key[0], files, children)
            except BundleIncomplete as exc:
                log.warning("cannot simulate %s/%s: %s", key[1], key[2], exc)
                continue
            if device is not None:
                device.faults = self._faults.get(key, Faults())
            task = asyncio.create_task(runner, name=f"simulated-{key[0]}-{key[2]}")
            self.running[key] = Running(task, fingerprint, device)
            log.info("simulating %s %s/%s", key[0], key[1], key[2])

    def _faults_of(self, key: tuple[str, str, str], meta: dict[str, Any]) -> Faults:
        """The faults the Device's annotation asks for; a bad one is logged (once) and ignored."""
        text = (meta.get("annotations") or {}).get(SIMULATE_ANNOTATION) or ""
        try:
            faults = parse_faults(text)
        except ValueError as exc:
            if self._refused.get(key) != text:
                log.warning("%s/%s: annotation %s ignored: %s", key[1], key[2],
                            SIMULATE_ANNOTATION, exc)
                self._refused[key] = text
            return Faults()
        self._refused.pop(key, None)
        if str(faults) != str(self._faults.get(key, Faults())):
            log.info("simulated %s/%s shows faults %r", key[1], key[2], str(faults) or "none")
        return faults

    def _runner(self, kind: str, files: dict[str, bytes], children: tuple[str, ...]
                ) -> tuple[Any, SimulatedDevice | None]:
        if kind == "gateway":
            gateway = SimulatedGateway(gateway_credentials(files), children,
                                       telemetry_seconds=self.interval, check_hostname=False)
            return gateway.run(), None
        device = SimulatedDevice(DeviceCredentials.from_secret_data(files),
                                 telemetry_seconds=self.interval, check_hostname=False)
        return device.run(), device

    async def _stop(self, key: tuple[str, str, str]) -> None:
        running = self.running.pop(key)
        running.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running.task

    async def stop(self) -> None:
        for key in list(self.running):
            await self._stop(key)
