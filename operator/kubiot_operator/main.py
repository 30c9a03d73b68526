"""`kubiot-operator`: run the operator against the cluster in the current context or pod."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

import kopf
from pydantic import ValidationError

from kubiot_operator.handlers import Operator
from kubiot_operator.logs import configure_logging
from kubiot_operator.settings import OperatorSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubiot-operator", description=__doc__)
    parser.add_argument("--namespace", "-n", action="append", default=[],
                        help="Watch only these namespaces (Tenants are cluster-wide anyway).")
    parser.add_argument("--peering", action="store_true",
                        help="Coordinate with other replicas through kopf peering "
                        "(needs kopf's peering CRDs); by default one replica runs standalone.")
    parser.add_argument("--print-settings", action="store_true",
                        help="Print the settings in force (secrets masked) and exit.")
    args = parser.parse_args(argv)
    try:
        settings = OperatorSettings()
    except ValidationError as exc:
        print(f"kubiot-operator: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if args.print_settings:
        print(json.dumps(settings.model_dump(mode="json"), indent=2, sort_keys=True))
        return 0
    configure_logging(settings.log_format)
    operator = Operator(settings)
    logging.getLogger(__name__).info("starting kubiot operator", extra={
        "broker": settings.broker.value, "namespace": settings.namespace})
    asyncio.run(kopf.operator(
        registry=operator.registry, standalone=not args.peering,
        clusterwide=not args.namespace, namespaces=args.namespace,
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
