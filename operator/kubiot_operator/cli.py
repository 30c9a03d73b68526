"""`kubiot`: the command-line tool. Validate manifests offline, print CRDs, show access rules,
send commands to devices and approve provisioned devices."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kubiot_contract import topics as contract
from kubiot_operator.cli_command import add_parser as add_command_parser
from kubiot_operator.crd.generate import render
from kubiot_operator.kube.client import DEVICES, Connection, KubeClient, KubeError
from kubiot_operator.local.cli import add_parser as add_local_parser
from kubiot_operator.manifests import load_resources
from kubiot_operator.models import KINDS
from kubiot_operator.reconcile.provisioning import (
    APPROVED_LABEL,
    PROVISIONED_LABEL,
    awaiting_approval,
)


def cmd_validate(args: argparse.Namespace) -> int:
    """Check kubiot resources in files or folders the way the API server would admit them."""
    loaded = load_resources(args.paths)
    for problem in loaded.problems:
        print(problem, file=sys.stderr)
    print(f"{loaded.checked} kubiot resources checked, {len(loaded.problems)} invalid")
    return 1 if loaded.problems else 0


def cmd_crds(_: argparse.Namespace) -> int:
    """Print every CRD as one YAML stream, ready for `kubectl apply -f -`."""
    sys.stdout.write("---\n".join(render(kind) for kind in KINDS))
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    """Print what an identity may publish and subscribe to, from the topic contract."""
    try:
        if args.gateway:
            username = contract.gateway_username(args.tenant, args.gateway)
            rules = contract.gateway_access(args.tenant, args.gateway, args.children or [])
        else:
            username = contract.device_username(args.tenant, args.device)
            rules = contract.device_access(args.tenant, args.device)
    except contract.ContractError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"username: {username}")
    for action, filters in (("publish", rules.publish), ("subscribe", rules.subscribe)):
        print(f"{action}:")
        for topic_filter in sorted(filters):
            print(f"  {topic_filter}")
    return 0


class ApprovalRefused(Exception):
    """The Device cannot be approved (it does not exist, or was not provisioned by claim)."""


async def approve_device(kube: KubeClient, namespace: str, name: str) -> str:
    """Label a provisioned Device approved, as `kubectl label` would; returns what happened."""
    device = await kube.get(DEVICES, name, namespace)
    if device is None:
        raise ApprovalRefused(f"no Device {namespace}/{name}")
    labels = device["metadata"].get("labels") or {}
    if labels.get(PROVISIONED_LABEL) != "true":
        raise ApprovalRefused(f"Device {namespace}/{name} was not provisioned by claim; it "
                              "needs no approval")
    if not awaiting_approval(labels):
        return f"Device {namespace}/{name} was already approved"
    await kube.patch(DEVICES, name, {"metadata": {"labels": {APPROVED_LABEL: "true"}}},
                     namespace)
    return f"Device {namespace}/{name} approved"


def cluster_connection() -> Connection:
    """The cluster the kubeconfig (or, in a pod, the service account) points at."""
    import kopf

    settings, logger = kopf.OperatorSettings(), logging.getLogger("kubiot.cli")
    info: Any = (kopf.login_with_service_account(settings=settings, logger=logger)
                 or kopf.login_with_kubeconfig(settings=settings, logger=logger))
    if info is None:
        raise ApprovalRefused("no Kubernetes credentials: set KUBECONFIG or ~/.kube/config")
    return Connection.from_kopf(info)


def cmd_approve(args: argparse.Namespace) -> int:
    """Approve Devices waiting for approval (provisioning by claim with manual approval)."""
    async def approve_all(connection: Connection) -> int:
        status = 0
        async with KubeClient(connection) as kube:
            for target in args.devices:
                namespace, _, name = target.partition("/")
                try:
                    if not namespace or not name:
                        raise ApprovalRefused(f"{target}: give <namespace>/<device>")
                    print(await approve_device(kube, namespace, name))
                except (ApprovalRefused, KubeError) as exc:
                    print(exc, file=sys.stderr)
                    status = 1
        return status

    try:
        connection = cluster_connection()
    except ApprovalRefused as exc:
        print(exc, file=sys.stderr)
        return 1
    return asyncio.run(approve_all(connection))


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="kubiot", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help=cmd_validate.__doc__)
    validate.add_argument("paths", nargs="+", help="manifest files or folders")
    validate.set_defaults(run=cmd_validate)

    crds = commands.add_parser("crds", help=cmd_crds.__doc__)
    crds.set_defaults(run=cmd_crds)

    rules = commands.add_parser("rules", help=cmd_rules.__doc__)
    rules.add_argument("--tenant", required=True)
    who = rules.add_mutually_exclusive_group(required=True)
    who.add_argument("--device")
    who.add_argument("--gateway")
    rules.add_argument("--children", nargs="*", help="devices the gateway serves")
    rules.set_defaults(run=cmd_rules)
    add_command_parser(commands)

    approve = commands.add_parser("approve", help=cmd_approve.__doc__)
    approve.add_argument("devices", nargs="+", metavar="NAMESPACE/DEVICE")
    approve.set_defaults(run=cmd_approve)
    add_local_parser(commands)
    return root


#: The exit status of a process ended by SIGPIPE, as a shell reports it.
CLOSED_PIPE_STATUS = 128 + 13


def run_to_a_pipe(run: Callable[[], int | None]) -> int | None:
    """Run a command whose reader may go away (`kubiot local tail | head`): stop quietly then,
    as Unix tools do, instead of a BrokenPipeError traceback."""
    try:
        status = run()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it somewhere that cannot fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return CLOSED_PIPE_STATUS
    return status


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    raise SystemExit(run_to_a_pipe(lambda: args.run(args)))
