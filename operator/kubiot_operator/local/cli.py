"""`kubiot local …`: look into a running (or stopped) local stack.

    kubiot local status                  tenants, devices online, ports
    kubiot local devices                 every device with phase, online, firmware, cert expiry
    kubiot local issue --tenant acme --device sensor-9   add a device, wait, export its bundle
    kubiot local tail [--tenant acme]    print telemetry as it arrives
    kubiot local factory --count 20      factory-fresh devices that provision themselves by claim
    kubiot local approve acme/sn-0001    approve a Device waiting for approval
    kubiot local fleet --devices 10000 --out fleet/   manifests for a fleet of that size
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from kubiot_contract.topics import (
    OPERATOR_USERNAME,
    IdentityKind,
    device_username,
    validate_name,
)
from kubiot_operator import API_GROUP, API_VERSION
from kubiot_operator.kube.client import DEVICES, SECRETS, TENANTS
from kubiot_operator.models.tenant import TenantSpec
from kubiot_operator.reconcile.identity import credential_secret_name
from kubiot_operator.reconcile.provisioning import PROVISIONED_LABEL, awaiting_approval
from kubiot_operator.reconcile.tenant import tenant_namespace

from .broker import ADMIN_BUNDLE
from .credentials import BUNDLE_FILES, export_bundle, read_bundle
from .fleet import fleet_resources
from .objects import FileObjects
from .ports import saved_ports
from .reconciler import approval_file


def _objects(root: Path) -> FileObjects:
    path = root / "objects.json"
    if not path.exists():
        raise SystemExit(f"no local stack data in {root}; start one with `make dev`")
    return FileObjects(path)


def _ports(root: Path) -> dict[str, int]:
    return saved_ports(root)


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


async def cmd_status(args: argparse.Namespace) -> int:
    objects = _objects(args.dir)
    rows = [["TENANT", "PHASE", "NAMESPACE", "DEVICES", "ONLINE", "READY"]]
    devices = await objects.list(DEVICES)
    for tenant in await objects.list(TENANTS):
        status = tenant.get("status") or {}
        namespace = status.get("namespace", "")
        mine = [d for d in devices if d["metadata"].get("namespace") == namespace]
        rows.append([tenant["metadata"]["name"], _cell(status.get("phase")), _cell(namespace),
                     str(len(mine)),
                     str(sum(1 for d in mine if (d.get("status") or {}).get("online"))),
                     str(sum(1 for d in mine if (d.get("status") or {}).get("phase") == "Ready"))])
    print(_table(rows))
    ports = _ports(args.dir)
    if ports:
        print("\nports: " + ", ".join(f"{k.removeprefix('KUBIOT_').lower()}={v}"
                                      for k, v in sorted(ports.items())))
    return 0


async def cmd_devices(args: argparse.Namespace) -> int:
    objects = _objects(args.dir)
    rows = [["NAMESPACE", "DEVICE", "PHASE", "ONLINE", "FIRMWARE", "CERT EXPIRES", "LAST SEEN"]]
    for device in await objects.list(DEVICES):
        status = device.get("status") or {}
        firmware = (status.get("firmware") or {}).get("current")
        expiry = (status.get("certificate") or {}).get("notAfter")
        rows.append([device["metadata"]["namespace"], device["metadata"]["name"],
                     _cell(status.get("phase")), _cell(status.get("online")), _cell(firmware),
                     _cell(expiry), _cell(status.get("lastSeen"))])
    print(_table(rows))
    return 0


async def cmd_issue(args: argparse.Namespace) -> int:
    """Write a Device manifest, wait for the running stack to issue it, export the bundle."""
    tenant, device = validate_name(args.tenant, "tenant"), validate_name(args.device, "device")
    objects = _objects(args.dir)
    tenant_body = await objects.get(TENANTS, tenant)
    if tenant_body is None:
        print(f"no tenant {tenant} in the local stack", file=sys.stderr)
        return 1
    namespace = tenant_namespace(tenant, TenantSpec.model_validate(tenant_body.get("spec") or {}))
    manifest = args.manifests / f"device-{device}.yaml"
    if not manifest.exists():
        manifest.write_text(yaml.safe_dump({
            "apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "Device",
            "metadata": {"name": device, "namespace": namespace,
                         "labels": {f"{API_GROUP}/issued-by": "kubiot-local"}},
            "spec": {"model": args.model} if args.model else {},
        }, sort_keys=False))
        print(f"wrote {manifest}")
    deadline = time.monotonic() + args.wait
    name = credential_secret_name(IdentityKind.DEVICE, device)
    while time.monotonic() < deadline:
        secret = await FileObjects(args.dir / "objects.json").get(SECRETS, name, namespace)
        if secret is not None:
            out = args.out or Path(f"{device}-credentials")
            export_bundle(secret, out)
            print(f"credentials for {device_username(tenant, device)} in {out}/: "
                  + ", ".join(f for f in BUNDLE_FILES if (out / f).exists()))
            return 0
        await asyncio.sleep(0.5)
    print(f"the stack did not issue {device} within {args.wait:.0f} s; is `make dev` running?",
          file=sys.stderr)
    return 1


async def cmd_tail(args: argparse.Namespace) -> int:
    import aiomqtt

    ports = _ports(args.dir)
    admin = args.dir / "broker" / "pki" / ADMIN_BUNDLE / "password"
    if not ports or not admin.exists():
        print("no running local stack found", file=sys.stderr)
        return 1
    tenant = args.tenant or "+"
    device = args.device or "+"
    async with aiomqtt.Client("127.0.0.1", ports["KUBIOT_SERVICE_PORT"],
                              username=OPERATOR_USERNAME, password=admin.read_text().strip(),
                              identifier=f"kubiot-tail-{time.time_ns()}") as client:
        root = f"{tenant}/devices/{device}"
        for topic in (f"{root}/telemetry", f"{root}/telemetry/#"):
            await client.subscribe(topic, qos=0)
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            try:
                text = json.dumps(json.loads(payload), separators=(",", ":"))
            except ValueError:
                text = repr(payload[:200])
            print(f"{message.topic} {text}", flush=True)
    return 0


async def cmd_factory(args: argparse.Namespace) -> int:
    """Run factory-fresh devices holding only a claim: they provision, then send telemetry."""
    from kubiot_operator.simulator.credentials import BundleIncomplete
    from kubiot_operator.simulator.factory import (
        FactoryDevice,
        FactoryState,
        claim_credentials,
        ignore_lost_claim_sessions,
    )

    claims = args.dir / "claims"
    folder = claims / args.claim if args.claim else next(
        (path for path in sorted(claims.glob("*/*")) if path.is_dir()), None)
    if folder is None or not folder.is_dir():
        print(f"no claim bundle in {claims}; is `make dev` running with a Tenant that has "
              "spec.provisioning.claims?", file=sys.stderr)
        return 1
    try:
        claim = claim_credentials(read_bundle(folder))
    except BundleIncomplete as exc:
        print(f"the claim bundle in {folder} is incomplete: {exc}", file=sys.stderr)
        return 1
    devices = [FactoryDevice(claim, f"{args.serial_prefix}{i:04d}", model=args.model,
                             check_hostname=False, telemetry_seconds=args.telemetry_interval)
               for i in range(args.first, args.first + args.count)]
    ignore_lost_claim_sessions(asyncio.get_running_loop())
    print(f"{len(devices)} factory-fresh devices with claim {claim.username}")
    tasks = [asyncio.create_task(device.run(), name=device.serial) for device in devices]
    reported: set[str] = set()
    try:
        while True:
            for device in devices:
                if device.serial in reported or device.state in (FactoryState.FRESH,
                                                                 FactoryState.PENDING):
                    continue
                reported.add(device.serial)
                answer = device.last_answer
                detail = (f"as {device.claim.tenant}.{device.serial}"
                          if device.state is FactoryState.PROVISIONED else
                          f"{answer.reason}: {answer.message}" if answer else "")
                print(f"{device.serial} {device.state.value} {detail}", flush=True)
            if len(reported) == len(devices) and args.until_provisioned:
                break
            await asyncio.sleep(0.2)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return 0 if all(d.state is FactoryState.PROVISIONED for d in devices) else 1


async def cmd_approve(args: argparse.Namespace) -> int:
    """Ask the running stack to approve a Device waiting for approval."""
    namespace, _, device = args.device.partition("/")
    try:
        validate_name(namespace, "namespace")
        validate_name(device, "device")
    except ValueError as exc:
        print(f"{args.device}: give <namespace>/<device>: {exc}", file=sys.stderr)
        return 2
    objects = _objects(args.dir)
    body = await objects.get(DEVICES, device, namespace)
    if body is None:
        print(f"no Device {namespace}/{device} in the local stack", file=sys.stderr)
        return 1
    labels = body["metadata"].get("labels") or {}
    if labels.get(PROVISIONED_LABEL) != "true":
        print(f"Device {namespace}/{device} was not provisioned by claim; it needs no "
              "approval", file=sys.stderr)
        return 1
    if not awaiting_approval(labels):
        print(f"Device {namespace}/{device} was already approved")
        return 0
    approvals = args.dir / "approvals"
    approvals.mkdir(parents=True, exist_ok=True)
    approval_file(approvals, namespace, device).touch()
    print(f"Device {namespace}/{device} approved")
    return 0


async def cmd_fleet(args: argparse.Namespace) -> int:
    """Write the manifests of a fleet of `--devices` devices into `--out`."""
    validate_name(args.tenant)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.tenant}-fleet.yaml"
    resources = list(fleet_resources(args.tenant, args.devices))
    path.write_text(yaml.safe_dump_all(resources, sort_keys=False))
    print(f"{path}: 1 Tenant, {args.devices} Devices, "
          f"{sum(1 for r in resources if r['kind'] == 'Gateway')} Gateways, 1 FirmwareRelease; "
          f"run it with `make dev DEV_ARGS='--manifests {args.out}'`")
    return 0


def add_parser(commands: Any) -> None:
    local = commands.add_parser("local", help="Inspect the local stack that `make dev` runs.")
    local.add_argument("--dir", type=Path, default=Path(".kubiot"), help="The stack's data.")
    sub = local.add_subparsers(dest="local_command", required=True)
    sub.add_parser("status", help="Tenants and devices at a glance.").set_defaults(
        local_run=cmd_status)
    sub.add_parser("devices", help="Every device and its state.").set_defaults(
        local_run=cmd_devices)
    issue = sub.add_parser("issue", help="Add a device and export its credential bundle.")
    issue.add_argument("--tenant", required=True)
    issue.add_argument("--device", required=True)
    issue.add_argument("--model", help="spec.model of the new device")
    issue.add_argument("--manifests", type=Path, default=Path("manifests/examples"))
    issue.add_argument("--out", type=Path,
                       help="Folder for the bundle (default <device>-credentials)")
    issue.add_argument("--wait", type=float, default=30.0)
    issue.set_defaults(local_run=cmd_issue)
    tail = sub.add_parser("tail", help="Print telemetry as it arrives.")
    tail.add_argument("--tenant")
    tail.add_argument("--device")
    tail.set_defaults(local_run=cmd_tail)
    factory = sub.add_parser("factory", help="Run factory-fresh devices that provision "
                             "themselves with a claim, then send telemetry.")
    factory.add_argument("--count", type=int, default=10, help="How many devices.")
    factory.add_argument("--claim", help="<namespace>/<claim> (default: the first exported).")
    factory.add_argument("--serial-prefix", default="sn-",
                         help="Serials are <prefix><number>, e.g. sn-0001 (default sn-).")
    factory.add_argument("--first", type=int, default=1, help="The first serial's number.")
    factory.add_argument("--model", help="The hardware model the devices report.")
    factory.add_argument("--telemetry-interval", type=float, default=2.0)
    factory.add_argument("--until-provisioned", action="store_true",
                         help="Exit once every device is provisioned or refused.")
    factory.set_defaults(local_run=cmd_factory)
    approve = sub.add_parser("approve", help="Approve a provisioned Device (manual approval).")
    approve.add_argument("device", help="<namespace>/<device>")
    approve.set_defaults(local_run=cmd_approve)
    fleet = sub.add_parser("fleet", help="Write manifests for a fleet of N devices.")
    fleet.add_argument("--devices", type=int, required=True)
    fleet.add_argument("--tenant", default="fleet")
    fleet.add_argument("--out", type=Path, default=Path("fleet"),
                       help="Folder for the manifests (default fleet/)")
    fleet.set_defaults(local_run=cmd_fleet)
    local.set_defaults(run=lambda args: asyncio.run(args.local_run(args)))

