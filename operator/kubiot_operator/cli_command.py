"""`kubiot command <namespace>/<device|selector> <name> [--param k=v] [--wait]`.

Creates a DeviceCommand and, with `--wait`, prints each device's answer as it lands in status
(like `kubectl run --rm -i`), then exits 0 when every target succeeded and 1 otherwise.

In a cluster it talks to the API server with the kubeconfig (`KUBECONFIG` or ~/.kube/config);
with `--local` it writes the manifest into the local stack's manifest folder, as `kubiot local
issue` does, and reads status from the stack's object store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Protocol, TextIO

import yaml
from pydantic import ValidationError

from kubiot_operator import API_GROUP, API_VERSION
from kubiot_operator.kube.client import DEVICECOMMANDS, Connection, KubeClient
from kubiot_operator.models.command import DeviceCommandSpec, TargetState

TERMINAL = {s.value for s in (TargetState.SUCCEEDED, TargetState.FAILED, TargetState.TIMED_OUT,
                              TargetState.OFFLINE, TargetState.CANCELLED)}
#: How long `--wait` waits beyond the command's own timeout for the operator to conclude.
GRACE_SECONDS = 30.0
_REQUIREMENT = re.compile(r"^(?P<neg>!)?(?P<key>[A-Za-z0-9./_-]+)((?P<op>!=|==|=)(?P<value>.*))?$")


class UsageError(ValueError):
    """The command line asks for something that cannot be a DeviceCommand."""


def parse_target(text: str) -> tuple[str, dict[str, Any]]:
    """`acme/pump-1` names a device; `acme/fleet=pumps,ring!=canary` selects by labels."""
    namespace, _, what = text.partition("/")
    if not namespace or not what:
        raise UsageError(f"target {text!r} must be <namespace>/<device> or "
                         "<namespace>/<label selector>")
    if not any(c in what for c in "=!,"):
        return namespace, {"devices": [what]}
    labels: dict[str, str] = {}
    expressions: list[dict[str, Any]] = []
    for requirement in what.split(","):
        match = _REQUIREMENT.match(requirement.strip())
        if match is None or (match["neg"] and match["op"]):
            raise UsageError(f"cannot read the selector requirement {requirement!r}")
        key, op, value = match["key"], match["op"], match["value"]
        if op in ("=", "=="):
            labels[key] = value
        elif op == "!=":
            expressions.append({"key": key, "operator": "NotIn", "values": [value]})
        else:
            expressions.append({"key": key,
                                "operator": "DoesNotExist" if match["neg"] else "Exists"})
    selector: dict[str, Any] = {}
    if labels:
        selector["matchLabels"] = labels
    if expressions:
        selector["matchExpressions"] = expressions
    return namespace, {"selector": selector}


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """`k=v` pairs; a value that reads as JSON (`1200`, `true`, `{"a": 1}`) is taken as such."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--param {pair!r} must be key=value")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def command_manifest(*, namespace: str, targets: dict[str, Any], command: str,
                     params: dict[str, Any], timeout_seconds: int, offline_policy: str,
                     name: str | None = None) -> dict[str, Any]:
    """The DeviceCommand to create; raises UsageError naming what the schema refuses."""
    spec: dict[str, Any] = {"targets": targets, "command": command,
                            "timeoutSeconds": timeout_seconds, "offlinePolicy": offline_policy}
    if params:
        spec["parameters"] = params
    try:
        DeviceCommandSpec.model_validate(spec)
    except ValidationError as exc:
        raise UsageError("; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                   for e in exc.errors()[:3])) from None
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "DeviceCommand",
            "metadata": {"name": name or f"{command}-{secrets.token_hex(3)}",
                         "namespace": namespace,
                         "labels": {f"{API_GROUP}/created-by": "kubiot-command"}},
            "spec": spec}


class CommandStore(Protocol):
    """Where DeviceCommands are created and read back."""

    async def create(self, manifest: dict[str, Any]) -> None: ...

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None: ...


class ClusterCommands:
    """The API server, through the operator's own client."""

    def __init__(self, kube: KubeClient) -> None:
        self._kube = kube

    async def create(self, manifest: dict[str, Any]) -> None:
        await self._kube.create(manifest)

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._kube.get(DEVICECOMMANDS, name, namespace)


class LocalCommands:
    """The local stack: a manifest in its folder, status from its object store."""

    def __init__(self, data: Path, manifests: Path) -> None:
        self._data, self._manifests = data, manifests

    async def create(self, manifest: dict[str, Any]) -> None:
        if not (self._data / "objects.json").exists():
            raise UsageError(f"no local stack data in {self._data}; start one with `make dev`")
        path = self._manifests / f"command-{manifest['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubiot_operator.local.objects import FileObjects  # the stack's store, read afresh

        return await FileObjects(self._data / "objects.json").get(DEVICECOMMANDS, name, namespace)


def _target_line(target: dict[str, Any]) -> str:
    parts = [target["device"], target["state"]]
    if target.get("message"):
        parts.append(str(target["message"]))
    if target.get("data"):
        parts.append(json.dumps(target["data"], sort_keys=True, separators=(",", ":")))
    return "  ".join(parts)


async def send_command(store: CommandStore, manifest: dict[str, Any], *, wait: bool,
                       out: TextIO, poll_seconds: float = 0.5) -> int:
    """Create the command; with `wait`, print answers as they come and return the exit status."""
    meta, spec = manifest["metadata"], manifest["spec"]
    namespace, name = meta["namespace"], meta["name"]
    await store.create(manifest)
    print(f"devicecommand {namespace}/{name} created: {spec['command']}", file=out, flush=True)
    if not wait:
        return 0
    printed: set[str] = set()
    deadline = time.monotonic() + spec["timeoutSeconds"] + GRACE_SECONDS
    while time.monotonic() < deadline:
        body = await store.get(namespace, name)
        runs = ((body or {}).get("status") or {}).get("runs") or []
        if runs:
            run = runs[-1]
            for target in run.get("targets") or []:
                if target["state"] in TERMINAL and target["device"] not in printed:
                    printed.add(target["device"])
                    print(_target_line(target), file=out, flush=True)
            if run.get("completedAt"):
                counts = run.get("counts") or {}
                print(f"{counts.get('succeeded', 0)}/{counts.get('targeted', 0)} succeeded, "
                      f"{counts.get('failed', 0)} failed, {counts.get('timedOut', 0)} timed out, "
                      f"{counts.get('offline', 0)} offline", file=out, flush=True)
                return 0 if run.get("phase") == "Succeeded" else 1
        ready = [c for c in ((body or {}).get("status") or {}).get("conditions") or []
                 if c.get("type") == "Ready" and c.get("status") == "False"]
        if ready and ready[0].get("reason") != "TenantNotFound":
            print(f"refused: {ready[0].get('reason')}: {ready[0].get('message')}", file=out)
            return 1
        await asyncio.sleep(poll_seconds)
    print(f"no conclusion within {spec['timeoutSeconds'] + GRACE_SECONDS:.0f} s; is the "
          "operator running?", file=out)
    return 1


def _cluster_connection() -> Connection:
    import kopf  # the operator's dependency; it reads the kubeconfig as kubectl does

    info = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
    if info is None:
        raise UsageError("no kubeconfig found (KUBECONFIG or ~/.kube/config); or use --local")
    return Connection.from_kopf(info)


async def send_from_arguments(args: argparse.Namespace, out: TextIO) -> int:
    """What `kubiot command` does once its arguments are parsed."""
    namespace, targets = parse_target(args.target)
    manifest = command_manifest(
        namespace=namespace, targets=targets, command=args.name,
        params=parse_params(args.param or []), timeout_seconds=args.timeout,
        offline_policy=args.offline)
    if args.local is not None:
        return await send_command(LocalCommands(args.local, args.manifests), manifest,
                                  wait=args.wait, out=out)
    async with KubeClient(_cluster_connection()) as kube:
        return await send_command(ClusterCommands(kube), manifest, wait=args.wait, out=out)


def cmd_command(args: argparse.Namespace) -> int:
    """Send a command to a device or to the devices a label selector picks."""
    try:
        return asyncio.run(send_from_arguments(args, sys.stdout))
    except UsageError as exc:
        print(f"kubiot command: {exc}", file=sys.stderr)
        return 2


def add_parser(commands: Any) -> None:
    command = commands.add_parser("command", help=cmd_command.__doc__)
    command.add_argument("target", help="<namespace>/<device> or <namespace>/<label selector>, "
                         "for example acme/pump-1 or acme/fleet=pumps,ring!=canary")
    command.add_argument("name", help="the command: ping, set, reboot, ...")
    command.add_argument("--param", action="append", metavar="KEY=VALUE",
                         help="a parameter (repeatable); JSON values are read as such")
    command.add_argument("--wait", action="store_true",
                         help="print each device's answer as it comes, until all are in")
    command.add_argument("--timeout", type=int, default=30, help="seconds (default 30)")
    command.add_argument("--offline", choices=["Queue", "Fail"], default="Queue",
                         help="a device offline now: wait for it until the timeout (Queue), "
                         "or count it offline at once (Fail)")
    command.add_argument("--local", type=Path, metavar="DIR",
                         help="the local stack's data (.kubiot) instead of a cluster")
    command.add_argument("--manifests", type=Path, default=Path("manifests/examples"),
                         help="the local stack's manifest folder (with --local)")
    command.set_defaults(run=cmd_command)
