"""`kubiot`: the command-line tool. Validate manifests offline, print CRDs, show access rules,
send commands to devices."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from kubiot_contract import topics as contract
from kubiot_operator.cli_command import add_parser as add_command_parser
from kubiot_operator.crd.generate import render
from kubiot_operator.local.cli import add_parser as add_local_parser
from kubiot_operator.manifests import load_resources
from kubiot_operator.models import KINDS


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
