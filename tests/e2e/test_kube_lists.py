"""The operator's API client reads collections in chunks, as kube-apiserver serves them, and
starts a list again when its continue token expires."""

from __future__ import annotations

from typing import Any

import pytest

from kubiot_operator.kube import client as kube_client
from kubiot_operator.kube.client import DEVICES, Connection, Gone, KubeClient
from tests.support.kube_emulator import KubeEmulator

pytestmark = pytest.mark.timeout(120)
API = "kubiot.io/v1alpha1"


async def fleet(kube: KubeEmulator, count: int) -> None:
    await kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "acme"}})
    for index in range(count):
        await kube.create({"apiVersion": API, "kind": "Device",
                           "metadata": {"name": f"d-{index:03d}", "namespace": "acme"},
                           "spec": {}})


async def test_the_emulator_serves_chunks_and_refuses_an_expired_token() -> None:
    async with KubeEmulator() as kube:
        await fleet(kube, 5)
        path = "/apis/kubiot.io/v1alpha1/namespaces/acme/devices"
        status, first = await kube.request("GET", path, params={"limit": "2"})
        assert status == 200 and [i["metadata"]["name"] for i in first["items"]] == [
            "d-000", "d-001"]
        assert first["metadata"]["remainingItemCount"] == 3
        token = first["metadata"]["continue"]
        status, second = await kube.request("GET", path, params={"limit": "2",
                                                                 "continue": token})
        assert [i["metadata"]["name"] for i in second["items"]] == ["d-002", "d-003"]

        kube.cluster.compact()
        status, expired = await kube.request("GET", path, params={"limit": "2",
                                                                  "continue": token})
        assert status == 410 and expired["reason"] == "Expired"


async def test_a_list_whose_token_expires_is_taken_again_from_the_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube_client, "LIST_PAGE_SIZE", 3)
    async with KubeEmulator() as kube, KubeClient(Connection(server=kube.url)) as client:
        await fleet(kube, 10)
        send = client._send
        chunks: list[dict[str, Any]] = []

        async def compacting_once(*args: Any) -> tuple[int, Any]:
            status, body = await send(*args)
            chunks.append(body)
            if len(chunks) == 2:  # etcd compacts while the list is under way
                kube.cluster.compact()
            return status, body

        monkeypatch.setattr(client, "_send", compacting_once)
        devices = await client.list(DEVICES, "acme")

        assert [d["metadata"]["name"] for d in devices] == [f"d-{i:03d}" for i in range(10)]
        assert any(chunk.get("reason") == "Expired" for chunk in chunks)


async def test_a_list_that_keeps_expiring_fails_with_gone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube_client, "LIST_PAGE_SIZE", 3)
    async with KubeEmulator() as kube, KubeClient(Connection(server=kube.url)) as client:
        await fleet(kube, 10)
        send = client._send

        async def always_compacting(*args: Any) -> tuple[int, Any]:
            answer = await send(*args)
            kube.cluster.compact()
            return answer

        monkeypatch.setattr(client, "_send", always_compacting)
        with pytest.raises(Gone):
            await client.list(DEVICES, "acme")
