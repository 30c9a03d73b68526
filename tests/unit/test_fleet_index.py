"""The fleet index answers what controllers used to list the API for."""

from __future__ import annotations

from typing import Any

from kubiot_operator.controllers.fleet import FleetIndex
from kubiot_operator.models.common import LabelSelector

API = "kubiot.io/v1alpha1"


def device(name: str, created: str, labels: dict[str, str] | None = None, *,
           suspended: bool = False, deleting: bool = False, namespace: str = "acme"
           ) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels or {},
                            "creationTimestamp": created}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    return {"apiVersion": API, "kind": "Device", "metadata": meta,
            "spec": {"suspended": suspended}, "status": {"online": True}}


def gateway(name: str, match: dict[str, str], *, suspended: bool = False) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "Gateway",
            "metadata": {"name": name, "namespace": "acme"},
            "spec": {"selector": {"matchLabels": match}, "suspended": suspended}}


def test_quota_order_is_oldest_first_and_forgets_deleted_devices() -> None:
    fleet = FleetIndex()
    fleet.observe(device("b", "2026-01-01T00:00:02Z"))
    fleet.observe(device("a", "2026-01-01T00:00:02Z"))
    fleet.observe(device("z", "2026-01-01T00:00:01Z"))
    assert [d.name for d in fleet.admitted("acme", 2)] == ["z", "a"]
    assert fleet.devices_before("acme", "2026-01-01T00:00:02Z", "b") == 2

    fleet.observe(device("z", "2026-01-01T00:00:01Z", deleting=True))
    assert fleet.devices_before("acme", "2026-01-01T00:00:02Z", "b") == 1
    assert fleet.device_count("acme") == 2
    fleet.forget("Device", "acme", "a")
    assert [d.name for d in fleet.devices("acme")] == ["b"]


def test_a_relabelled_device_moves_between_gateways() -> None:
    fleet = FleetIndex()
    fleet.observe(gateway("gw-b", {"site": "b"}))
    fleet.observe(gateway("gw-a", {"site": "a"}))
    fleet.observe(device("pump", "t1", {"site": "a", "bus": "modbus"}))
    assert fleet.serving_gateway("acme", {"site": "a"}) == "gw-a"
    assert fleet.children("acme", LabelSelector(match_labels={"site": "a"})) == ["pump"]

    fleet.observe(device("pump", "t1", {"site": "b"}))
    assert fleet.children("acme", LabelSelector(match_labels={"site": "a"})) == []
    assert fleet.children("acme", LabelSelector(match_labels={"site": "b"})) == ["pump"]


def test_suspended_gateways_serve_nobody_and_suspended_devices_are_no_children() -> None:
    fleet = FleetIndex()
    fleet.observe(gateway("gw", {"site": "a"}, suspended=True))
    fleet.observe(device("quiet", "t1", {"site": "a"}, suspended=True))
    fleet.observe(device("loud", "t2", {"site": "a"}))
    assert fleet.serving_gateway("acme", {"site": "a"}) is None
    assert fleet.children("acme", LabelSelector(match_labels={"site": "a"})) == ["loud"]


def test_namespaces_are_apart_and_other_kinds_are_ignored() -> None:
    fleet = FleetIndex()
    fleet.observe(device("d", "t1", namespace="other"))
    fleet.observe({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "s", "namespace": "acme"}})
    assert fleet.device_count("acme") == 0
    assert fleet.device_count("other") == 1
