"""Secrets as the home of PKI material and of the bundles brokers read."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from kubiot_operator.reconcile.tenant import MANAGED_BY

from .client import SECRETS, KubeClient

TRUST_SECRET = "kubiot-broker-trust"
#: Keys of the trust Secret, the file names docs/brokers.md mounts them as: EMQX's and
#: Mosquitto's `cacertfile`/`cafile`, and Mosquitto's `crlfile` (EMQX fetches CRLs instead).
TENANT_CAS_KEY = "tenant-cas.pem"
TENANT_CRLS_KEY = "tenant-crls.pem"


def secret_object(name: str, namespace: str, data: Mapping[str, bytes],
                  labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {**MANAGED_BY, **(labels or {})}},
        "data": {k: base64.b64encode(v).decode() for k, v in sorted(data.items())},
    }


def secret_data(secret: Mapping[str, Any]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}


class SecretMaterialStore:
    """The PKI's MaterialStore on Secrets in the operator's namespace."""

    def __init__(self, kube: KubeClient, namespace: str) -> None:
        self._kube = kube
        self._namespace = namespace

    async def get(self, name: str) -> dict[str, bytes] | None:
        secret = await self._kube.get(SECRETS, name, self._namespace)
        return None if secret is None else secret_data(secret)

    async def put(self, name: str, data: Mapping[str, bytes]) -> None:
        await self._kube.ensure(secret_object(name, self._namespace, data))

    async def delete(self, name: str) -> None:
        await self._kube.delete(SECRETS, name, self._namespace)


class SecretTrustPublisher:
    """Writes the CA and CRL bundles into one Secret that the broker mounts.

    `namespace` is the broker's: a pod can mount Secrets of its own namespace only. With
    `include_crls` False (EMQX, which fetches each tenant's CRL from the operator), the Secret
    holds the CA certificates only: CRLs grow with revocations, CAs do not, and a Secret holds
    1 MiB at most for every tenant together."""

    def __init__(self, kube: KubeClient, namespace: str, name: str = TRUST_SECRET, *,
                 include_crls: bool = True) -> None:
        self._kube = kube
        self._namespace = namespace
        self._name = name
        self._include_crls = include_crls

    async def publish(self, ca_bundle: bytes, crl_bundle: bytes) -> None:
        files = {TENANT_CAS_KEY: ca_bundle}
        if self._include_crls:
            files[TENANT_CRLS_KEY] = crl_bundle
        await self._kube.ensure(secret_object(self._name, self._namespace, files))
