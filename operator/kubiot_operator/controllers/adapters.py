"""The adapters a controller talks through, as protocols: Kubernetes-like objects, MQTT
publishing, and the trust material (CA and CRL bundles) brokers read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from kubiot_operator.models.api import KubeKind


class Objects(Protocol):
    """Kubernetes objects (KubeClient in a cluster, a file-backed store in the local stack)."""

    async def served_kinds(self, api_version: str) -> frozenset[str]: ...

    async def get(self, kind: KubeKind, name: str, namespace: str | None = None
                  ) -> dict[str, Any] | None: ...

    async def list(self, kind: KubeKind, namespace: str | None = None,
                   label_selector: str | None = None) -> list[dict[str, Any]]: ...

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A new object; raises Conflict when one of that name exists."""

    async def ensure(self, obj: dict[str, Any]) -> dict[str, Any]: ...

    async def patch(self, kind: KubeKind, name: str, patch: Mapping[str, Any],
                    namespace: str | None = None, subresource: str | None = None
                    ) -> dict[str, Any]: ...

    async def delete(self, kind: KubeKind, name: str, namespace: str | None = None) -> bool: ...


class Messenger(Protocol):
    """The operator's own MQTT connection, for what it sends to devices."""

    async def publish(self, topic: str, payload: bytes, *, retain: bool, qos: int = 1,
                      correlation_data: bytes | None = None,
                      response_topic: str | None = None) -> None:
        """Publish; a command carries MQTT v5 correlation data and a response topic."""


class TrustPublisher(Protocol):
    """Puts the tenant CA bundle and the CRL bundle where the broker reads them."""

    async def publish(self, ca_bundle: bytes, crl_bundle: bytes) -> None: ...
