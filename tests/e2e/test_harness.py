"""The emulated cluster runs a real kopf operator: handlers, status, generations, finalizers,
events, and resuming after a crash behave as they would against a real API server."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kopf
import pytest

from tests.support.kube_emulator import (
    CORE_RESOURCES,
    PROMETHEUS_OPERATOR_RESOURCES,
    KubeEmulator,
    KubeEmulatorError,
    matches_label_selector,
    run_operator,
)

API = "kubiot.io/v1alpha1"


def device(name: str, namespace: str = "acme", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "Device",
            "metadata": {"name": name, "namespace": namespace, "labels": {"fleet": "a"}},
            "spec": spec or {"model": "sensor"}}


def tenant(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "Tenant", "metadata": {"name": name},
            "spec": spec or {"displayName": name}}


class Calls:
    """What the throwaway handlers saw, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []

    def count(self, what: str, name: str) -> int:
        return self.log.count((what, name))


def device_registry(calls: Calls) -> kopf.OperatorRegistry:
    """A tiny Device/Tenant operator: status on create/update, an event, a finalizer on delete."""
    registry = kopf.OperatorRegistry()

    @kopf.on.create("kubiot.io", "v1alpha1", "devices", registry=registry)
    def create_device(name: str, body: kopf.Body, meta: kopf.Meta, patch: kopf.Patch,
                      **_: Any) -> None:
        calls.log.append(("create", name))
        kopf.info(body, reason="Provisioned", message=f"device {name} provisioned")
        patch.status["phase"] = "Ready"
        patch.status["observedGeneration"] = meta["generation"]

    @kopf.on.update("kubiot.io", "v1alpha1", "devices", registry=registry)
    def update_device(name: str, meta: kopf.Meta, patch: kopf.Patch, **_: Any) -> None:
        calls.log.append(("update", name))
        patch.status["observedGeneration"] = meta["generation"]

    @kopf.on.delete("kubiot.io", "v1alpha1", "devices", registry=registry)
    def delete_device(name: str, **_: Any) -> None:
        calls.log.append(("delete", name))

    @kopf.on.create("kubiot.io", "v1alpha1", "tenants", registry=registry)
    def create_tenant(name: str, patch: kopf.Patch, **_: Any) -> None:
        calls.log.append(("create", name))
        patch.status["phase"] = "Ready"

    return registry


@pytest.fixture
async def kube() -> AsyncIterator[KubeEmulator]:
    """An emulated cluster with the namespaces these tests put objects in."""
    async with KubeEmulator() as emulator:
        for name in ("acme", "other"):
            await emulator.create({"apiVersion": "v1", "kind": "Namespace",
                                   "metadata": {"name": name}})
        yield emulator


def has_phase(phase: str) -> Any:
    return lambda obj: obj is not None and (obj.get("status") or {}).get("phase") == phase


async def test_create_handler_patches_status_of_namespaced_and_cluster_objects(
        kube: KubeEmulator) -> None:
    calls = Calls()
    async with run_operator(kube, registry=device_registry(calls)):
        await kube.apply(device("d1"))
        await kube.apply(tenant("acme"))

        dev = await kube.wait_for(API, "Device", "d1", has_phase("Ready"), namespace="acme")
        ten = await kube.wait_for(API, "Tenant", "acme", has_phase("Ready"))

    assert dev is not None and ten is not None
    assert dev["status"]["observedGeneration"] == 1
    assert dev["metadata"]["finalizers"]  # kopf guards the Device because it has a delete handler
    assert "namespace" not in ten["metadata"]
    assert calls.log.count(("create", "d1")) == 1


async def test_spec_update_bumps_generation_and_reruns_the_update_handler(
        kube: KubeEmulator) -> None:
    calls = Calls()
    async with run_operator(kube, registry=device_registry(calls)):
        await kube.apply(device("d1"))
        await kube.wait_for(API, "Device", "d1", has_phase("Ready"), namespace="acme")

        await kube.apply(device("d1", model="gateway-child"))

        updated = await kube.wait_for(
            API, "Device", "d1", lambda o: o and o["status"].get("observedGeneration") == 2,
            namespace="acme")

    assert updated is not None
    assert updated["metadata"]["generation"] == 2
    assert updated["spec"]["model"] == "gateway-child"
    assert calls.count("update", "d1") == 1


async def test_delete_runs_the_delete_handler_then_the_object_disappears(
        kube: KubeEmulator) -> None:
    calls = Calls()
    async with run_operator(kube, registry=device_registry(calls)):
        await kube.apply(device("d1"))
        await kube.wait_for(API, "Device", "d1", lambda o: o and o["metadata"].get("finalizers"),
                            namespace="acme")

        await kube.delete(API, "Device", "d1", namespace="acme")
        await kube.wait_for(API, "Device", "d1", lambda o: o is None, namespace="acme")

    assert calls.count("delete", "d1") == 1


async def test_events_posted_by_handlers_are_visible(kube: KubeEmulator) -> None:
    async with run_operator(kube, registry=device_registry(Calls())):
        await kube.apply(device("d1"))
        await kube.wait_for(API, "Device", "d1", has_phase("Ready"), namespace="acme")
        await kube.wait_for(API, "Device", "d1", lambda _: kube.events("d1"), namespace="acme")

    reasons = {event["reason"] for event in kube.events("d1")}
    assert "Provisioned" in reasons


async def test_a_new_operator_resumes_without_rerunning_finished_handlers(
        kube: KubeEmulator) -> None:
    calls = Calls()
    registry = device_registry(calls)
    async with run_operator(kube, registry=registry) as first:
        await kube.apply(device("d1"))
        await kube.wait_for(API, "Device", "d1", has_phase("Ready"), namespace="acme")
        await first.kill()

    async with run_operator(kube, registry=registry):
        await kube.apply(device("d2"))
        await kube.wait_for(API, "Device", "d2", has_phase("Ready"), namespace="acme")

    assert calls.count("create", "d1") == 1
    assert calls.count("create", "d2") == 1


async def test_label_selectors_filter_lists(kube: KubeEmulator) -> None:
    await kube.apply(device("d1"))
    other = device("d2")
    other["metadata"]["labels"] = {"fleet": "b"}
    await kube.apply(other)

    names = [o["metadata"]["name"]
             for o in await kube.list(API, "Device", "acme", label_selector="fleet in (a, c)")]

    assert names == ["d1"]


async def test_status_subresource_is_isolated_from_the_main_endpoint(kube: KubeEmulator) -> None:
    await kube.apply(device("d1"))
    await kube.patch(API, "Device", "d1", {"status": {"phase": "Ready"}}, namespace="acme",
                     subresource="status")

    after = await kube.patch(API, "Device", "d1", {"status": {"phase": "Lost"}},
                             namespace="acme")

    assert after["status"]["phase"] == "Ready"
    assert after["metadata"]["generation"] == 1


async def test_failed_json_patch_test_is_a_conflict_not_a_crash(kube: KubeEmulator) -> None:
    await kube.apply(device("d1"))
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": "stale"},
           {"op": "add", "path": "/metadata/finalizers", "value": ["x"]}]

    with pytest.raises(KubeEmulatorError) as failure:
        await kube.patch(API, "Device", "d1", ops, namespace="acme")

    assert failure.value.status == 422


async def test_namespaces_can_be_created_and_read(kube: KubeEmulator) -> None:
    await kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "globex"}})

    assert await kube.get("v1", "Namespace", "globex") is not None
    assert sorted(n["metadata"]["name"] for n in await kube.list("v1", "Namespace")) == [
        "acme", "globex", "other"]


async def test_an_object_in_a_namespace_that_does_not_exist_is_not_found(
        kube: KubeEmulator) -> None:
    with pytest.raises(KubeEmulatorError) as refused:
        await kube.create(device("d1", namespace="nowhere"))

    assert refused.value.status == 404 and "nowhere" in refused.value.body["message"]


async def test_killing_mid_reconcile_leaves_the_handler_to_the_next_operator(
        kube: KubeEmulator) -> None:
    attempts: list[str] = []
    in_progress = asyncio.Event()
    registry = kopf.OperatorRegistry()

    @kopf.on.create("kubiot.io", "v1alpha1", "devices", registry=registry)
    async def create_device(name: str, patch: kopf.Patch, **_: Any) -> None:
        attempts.append(name)
        if len(attempts) == 1:
            in_progress.set()
            await asyncio.Event().wait()  # the crash happens while the first attempt hangs here
        patch.status["phase"] = "Ready"

    async with run_operator(kube, registry=registry) as first:
        await kube.apply(device("d1"))
        await asyncio.wait_for(in_progress.wait(), timeout=5)
        await first.kill()

    async with run_operator(kube, registry=registry):
        await kube.wait_for(API, "Device", "d1", has_phase("Ready"), namespace="acme")

    assert attempts == ["d1", "d1"]


async def test_put_replaces_with_optimistic_concurrency(kube: KubeEmulator) -> None:
    created = await kube.apply(device("d1", model="a"))
    url = kube.spec(API, "Device").url("acme", "d1")
    replacement = {**created, "spec": {"model": "b"}}

    status, replaced = await kube.request("PUT", url, body=replacement)
    stale_status, _ = await kube.request("PUT", url, body=replacement)

    assert status == 200
    assert replaced["spec"] == {"model": "b"}
    assert replaced["metadata"]["generation"] == 2
    assert stale_status == 409


async def test_stopping_the_operator_leaves_the_tests_own_tasks_running(
        kube: KubeEmulator) -> None:
    async with run_operator(kube, registry=device_registry(Calls())):
        background = asyncio.create_task(asyncio.Event().wait())
        await kube.apply(device("d1"))
        await kube.wait_for(API, "Device", "d1", has_phase("Ready"), namespace="acme")

    still_running = not background.done()
    background.cancel()
    assert still_running
    assert await kube.get(API, "Device", "d1", "acme") is not None  # the emulator still serves


async def test_cluster_scoped_objects_ignore_a_namespace_in_the_manifest(
        kube: KubeEmulator) -> None:
    manifest = tenant("acme")
    manifest["metadata"]["namespace"] = "stray"

    created = await kube.create(manifest)

    assert "namespace" not in created["metadata"]
    assert await kube.get(API, "Tenant", "acme") is not None


@pytest.mark.parametrize(("selector", "labels", "expected"), [
    ("fleet=a", {"fleet": "a"}, True),
    ("fleet==a,site!=x", {"fleet": "a", "site": "y"}, True),
    ("fleet in (a, b),!retired", {"fleet": "b"}, True),
    ("fleet notin (a)", {"fleet": "a"}, False),
    ("gateway", {"fleet": "a"}, False),
])
def test_label_selector_semantics(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert matches_label_selector({"metadata": {"labels": labels}}, selector) is expected


async def test_a_namespace_restricted_operator_ignores_other_namespaces(
        kube: KubeEmulator) -> None:
    calls = Calls()
    async with run_operator(kube, registry=device_registry(calls), namespaces=["acme"]):
        await kube.apply(device("elsewhere", namespace="other"))
        await kube.apply(device("d1"))
        await kube.wait_for(API, "Device", "d1", has_phase("Ready"), namespace="acme")

    assert calls.log == [("create", "d1")]


# --- What a real cluster refuses -------------------------------------------------------------

def secret(name: str, namespace: str = "acme", size: int = 16) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name,
                                                               "namespace": namespace},
            "data": {"blob": base64.b64encode(b"x" * size).decode()}}


async def test_a_kind_whose_crd_is_not_installed_is_not_found() -> None:
    async with KubeEmulator(CORE_RESOURCES) as bare:
        monitor = PROMETHEUS_OPERATOR_RESOURCES[0]
        status, _ = await bare.request("POST", monitor.url("acme"), body={
            "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": "m", "namespace": "acme"}, "spec": {}})
        discovery, _ = await bare.request("GET", "/apis/monitoring.coreos.com/v1")

    assert status == 404
    assert discovery == 404


@pytest.mark.parametrize(("kind", "plural", "name", "accepted"), [
    ("Service", "services", "7eleven-ingest", False),
    ("Service", "services", "a" * 57 + "-ingest", False),
    ("Service", "services", "acme-ingest", True),
    ("Namespace", "namespaces", "acme.eu", False),
    ("Secret", "secrets", "tenant-acme.eu-ca", True),
    ("Secret", "secrets", "Tenant-acme", False),
])
async def test_names_are_checked_per_kind(kube: KubeEmulator, kind: str, plural: str, name: str,
                                          accepted: bool) -> None:
    spec = kube.spec("v1", kind)
    status, body = await kube.request("POST", spec.url("acme"), body={
        "apiVersion": "v1", "kind": kind, "metadata": {"name": name, "namespace": "acme"}})

    assert (status < 400) is accepted, body
    if not accepted:
        assert status == 422 and "metadata.name" in body["message"]


async def test_status_is_dropped_on_create_when_it_is_a_subresource(kube: KubeEmulator) -> None:
    manifest = device("d1")
    manifest["status"] = {"phase": "Ready"}

    created = await kube.create(manifest)

    assert "status" not in created
    assert "status" not in (await kube.get(API, "Device", "d1", "acme") or {})


async def test_a_secret_over_one_mebibyte_is_refused(kube: KubeEmulator) -> None:
    await kube.create(secret("small", size=1024 * 1024 - 64))
    with pytest.raises(KubeEmulatorError) as refused:
        await kube.create(secret("large", size=1024 * 1024 + 1))
    with pytest.raises(KubeEmulatorError) as grown:
        await kube.patch("v1", "Secret", "small", {"data": {"more": base64.b64encode(
            b"y" * 128).decode()}}, namespace="acme")

    assert refused.value.status == 422 and grown.value.status == 422


async def test_deleting_an_owner_deletes_its_dependents_through_their_finalizers(
        kube: KubeEmulator) -> None:
    owner = await kube.create(tenant("acme"))
    reference = {"apiVersion": API, "kind": "Tenant", "name": "acme",
                 "uid": owner["metadata"]["uid"]}
    held = device("d1")
    held["metadata"].update(ownerReferences=[reference], finalizers=["kubiot.io/cleanup"])
    await kube.create(held)
    loose = secret("s1")
    loose["metadata"]["ownerReferences"] = [reference]
    await kube.create(loose)
    await kube.create(secret("unrelated"))

    await kube.delete(API, "Tenant", "acme")

    await kube.wait_for("v1", "Secret", "s1", lambda s: s is None, "acme")
    waiting = await kube.wait_for(API, "Device", "d1", lambda d: bool(
        d and d["metadata"].get("deletionTimestamp")), "acme")
    assert waiting is not None
    await kube.patch(API, "Device", "d1", {"metadata": {"finalizers": None}}, namespace="acme")
    await kube.wait_for(API, "Device", "d1", lambda d: d is None, "acme")
    assert await kube.get("v1", "Secret", "unrelated", "acme") is not None


async def test_deleting_a_namespace_deletes_its_content_and_refuses_new_objects(
        kube: KubeEmulator) -> None:
    held = device("d1")
    held["metadata"]["finalizers"] = ["kubiot.io/cleanup"]
    await kube.create(held)
    await kube.create(secret("s1"))

    await kube.delete("v1", "Namespace", "acme")

    await kube.wait_for("v1", "Secret", "s1", lambda s: s is None, "acme")
    terminating = await kube.get("v1", "Namespace", "acme")
    assert terminating is not None and terminating["status"]["phase"] == "Terminating"
    with pytest.raises(KubeEmulatorError) as refused:
        await kube.create(secret("s2"))
    assert refused.value.status == 403
    await kube.patch(API, "Device", "d1", {"metadata": {"finalizers": None}}, namespace="acme")
    await kube.wait_for("v1", "Namespace", "acme", lambda n: n is None)


async def test_an_expired_token_is_refused() -> None:
    async with KubeEmulator(authenticate=True) as secured:
        token = secured.issue_token()
        url = f"{secured.url}{secured.spec(API, 'Tenant').url()}"
        async with aiohttp.ClientSession() as client:
            async with client.get(url, headers={"Authorization": f"Bearer {token}"}) as before:
                assert before.status == 200
            secured.expire_token(token)
            async with client.get(url, headers={"Authorization": f"Bearer {token}"}) as after:
                assert after.status == 401
            async with client.get(url) as anonymous:
                assert anonymous.status == 401


async def test_custom_resources_are_pruned_and_validated_against_their_crd(
        kube: KubeEmulator) -> None:
    with pytest.raises(KubeEmulatorError) as refused:
        await kube.create(device("d0", identity={"type": "Smartcard"}))
    await kube.create(device("d1"))
    with pytest.raises(KubeEmulatorError) as bad_status:
        await kube.patch(API, "Device", "d1", {"status": {"online": True, "firmware": {
            "current": "1.2.0 beta"}}}, namespace="acme", subresource="status")
    pruned = await kube.patch(API, "Device", "d1", {"status": {"online": True, "mood": "ok"}},
                              namespace="acme", subresource="status")

    assert refused.value.status == 422 and "spec.identity.type" in str(refused.value.body)
    assert bad_status.value.status == 422
    assert "status.firmware.current" in str(bad_status.value.body)
    assert pruned["status"] == {"online": True}
