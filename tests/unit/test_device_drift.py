"""A Device reconcile that has to put back access it had already applied counts a drift repair."""

from __future__ import annotations

from typing import Any

from kubiot_operator.brokers import BrokerIdentity, SyncResult
from kubiot_operator.brokers.base import NOTHING_DONE
from kubiot_operator.controllers.device import reconcile_device
from kubiot_operator.kube.client import DEVICES
from tests.support.firmware_env import (
    API,
    Clock,
    MemoryObjects,
    RecordingMessenger,
    memory_platform,
)


class Broker:
    """Holds identities like a broker; a hand-made deletion is `forget`."""

    def __init__(self) -> None:
        self.identities: dict[str, BrokerIdentity] = {}

    async def ensure_identity(self, identity: BrokerIdentity) -> SyncResult:
        if self.identities.get(identity.username) == identity:
            return NOTHING_DONE
        self.identities[identity.username] = identity
        return SyncResult(2, (f"create {identity.username}",))

    async def set_enabled(self, username: str, enabled: bool) -> SyncResult:
        return NOTHING_DONE

    async def remove_identity(self, username: str) -> SyncResult:
        self.identities.pop(username, None)
        return NOTHING_DONE


async def reconcile(objects: MemoryObjects, platform: Any) -> None:
    device = await objects.get(DEVICES, "pump-1", "acme")
    assert device is not None
    outcome = await reconcile_device(platform, device)
    await objects.patch(DEVICES, "pump-1", {"status": outcome.status}, "acme")


def repairs(platform: Any) -> float:
    value: float = platform.metrics.drift_repairs.labels("acme", "reconcile")._value.get()
    return value


async def test_putting_back_a_deleted_identity_is_a_drift_repair_but_the_first_apply_is_not(
        ) -> None:
    objects = MemoryObjects()
    platform = memory_platform(objects, RecordingMessenger(), Clock())
    broker = Broker()
    platform.broker = broker  # type: ignore[assignment]
    objects.put({"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": "acme", "labels": {"kubiot.io/tenant": "acme"}}})
    objects.put({"apiVersion": API, "kind": "Tenant", "metadata": {"name": "acme"}, "spec": {}})
    objects.put({"apiVersion": API, "kind": "Device",
                 "metadata": {"name": "pump-1", "namespace": "acme", "generation": 1},
                 "spec": {}})

    await reconcile(objects, platform)
    assert "acme.pump-1" in broker.identities
    assert repairs(platform) == 0  # applying the Device's access for the first time

    await reconcile(objects, platform)
    assert repairs(platform) == 0  # nothing had changed at the broker

    del broker.identities["acme.pump-1"]  # deleted by hand
    await reconcile(objects, platform)
    assert "acme.pump-1" in broker.identities
    assert repairs(platform) == 2

    device = await objects.get(DEVICES, "pump-1", "acme")
    assert device is not None
    objects.put({**device, "metadata": {**device["metadata"], "generation": 2},
                 "spec": {"model": "ps-10"}})
    del broker.identities["acme.pump-1"]
    await reconcile(objects, platform)
    assert repairs(platform) == 2  # a new generation's first apply is no repair
