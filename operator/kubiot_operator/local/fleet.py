"""Manifests for a fleet of a given size: one Tenant, its Devices (1% behind Gateways, one
Gateway per 100 of them) and a FirmwareRelease rolling out to all, for trying the platform
(or `make dev`) at scale."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kubiot_operator import API_GROUP, API_VERSION

API = f"{API_GROUP}/{API_VERSION}"
CHILDREN_PER_GATEWAY = 100
BEHIND_GATEWAYS = 100  # one device in this many is behind a gateway


def fleet_resources(tenant: str, devices: int, *, max_devices: int | None = None
                    ) -> Iterator[dict[str, Any]]:
    """The resources, tenant first; device names sort in creation order."""
    width = max(5, len(str(devices)))
    behind = devices // BEHIND_GATEWAYS
    gateways = -(-behind // CHILDREN_PER_GATEWAY)
    yield {"apiVersion": API, "kind": "Tenant", "metadata": {"name": tenant},
           "spec": {"displayName": f"{tenant} ({devices} devices)", "namespace": tenant,
                    "quotas": {"maxDevices": max_devices or devices},
                    "ingest": {"enabled": True, "replicas": 1}}}
    for index in range(gateways):
        name = f"gw-{index:03d}"
        yield {"apiVersion": API, "kind": "Gateway",
               "metadata": {"name": name, "namespace": tenant},
               "spec": {"model": "edgebox-v2", "maxChildren": CHILDREN_PER_GATEWAY,
                        "selector": {"matchLabels": {"kubiot.io/gateway": name}}}}
    for index in range(devices):
        labels = {"fleet": tenant}
        if index % BEHIND_GATEWAYS == 0 and index // BEHIND_GATEWAYS < behind:
            gateway = index // BEHIND_GATEWAYS // CHILDREN_PER_GATEWAY
            labels["kubiot.io/gateway"] = f"gw-{gateway:03d}"
        yield {"apiVersion": API, "kind": "Device",
               "metadata": {"name": f"dev-{index:0{width}d}", "namespace": tenant,
                            "labels": labels},
               "spec": {"model": "sensor-v2"}}
    yield {"apiVersion": API, "kind": "FirmwareRelease",
           "metadata": {"name": "sensor-2-0-0", "namespace": tenant},
           "spec": {"version": "2.0.0",
                    "artifact": {"url": "https://firmware.example/sensor-2.0.0.bin",
                                 "sha256": "0" * 64, "size": 1048576},
                    "selector": {"matchLabels": {"fleet": tenant}, "model": "sensor-v2"}}}
