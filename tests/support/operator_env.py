"""The operator end to end: kopf on the Kubernetes emulator, a real Mosquitto, real clients.

`OperatorEnv` owns a `LocalBroker` (Mosquitto with mutual TLS and dynamic security, the
platform's trust files) and runs the real `Operator` registry against a `KubeEmulator`. Tests
apply manifests, wait for status, and connect with the certificates the operator issued.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
import yaml

from kubiot_contract.topics import OPERATOR_USERNAME
from kubiot_operator.brokers import MosquittoDynsecBackend
from kubiot_operator.handlers import LoginFn, Operator
from kubiot_operator.kube.secrets import secret_data
from kubiot_operator.local.broker import BrokerPorts, LocalBroker
from kubiot_operator.local.ports import free_port
from kubiot_operator.settings import OperatorSettings
from tests.support.kube_emulator import KubeEmulator, OperatorRun, ResourceSpec, run_operator
from tests.support.mqtt_client import MqttTestClient

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"
API = "kubiot.io/v1alpha1"


def example_documents(*names: str) -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for name in names:
        documents += [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]
    return documents


def is_ready(obj: dict[str, Any] | None) -> bool:
    if obj is None:
        return False
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == kind:
            return dict(c)
    return None


@dataclass
class OperatorEnv:
    kube: KubeEmulator
    broker: LocalBroker
    root: Path
    settings: OperatorSettings
    operators: list[Operator] = field(default_factory=list)

    def operator(self, login: LoginFn | None = None) -> Operator:
        """The operator, logging in to the emulator (`login` overrides how)."""
        backend = MosquittoDynsecBackend("127.0.0.1", self.broker.ports.service,
                                         OPERATOR_USERNAME, self.settings.broker_admin_password
                                         .get_secret_value())
        operator = Operator(self.settings, broker=backend, trust=self.broker,
                            login=login or (lambda **_: kopf.ConnectionInfo(
                                server=self.kube.url, insecure=True)))
        self.operators.append(operator)
        return operator

    @contextlib.asynccontextmanager
    async def running(self, operator: Operator | None = None) -> AsyncIterator[OperatorRun]:
        operator = operator or self.operator()
        async with run_operator(self.kube, registry=operator.registry,
                                settings_hook=_quick_retries, ready_timeout=30) as run:
            yield run

    async def apply(self, *documents: dict[str, Any]) -> None:
        for document in documents:
            await self.kube.apply(document)

    async def wait(self, kind: str, name: str, predicate: Callable[[dict[str, Any] | None], bool],
                   namespace: str | None = None, timeout: float = 30,  # noqa: ASYNC109
                   ) -> dict[str, Any] | None:
        api = "v1" if kind in ("Secret", "Namespace") else (
            "apps/v1" if kind == "Deployment" else API)
        return await self.kube.wait_for(api, kind, name, predicate, namespace=namespace,
                                        timeout=timeout)

    async def device_credentials(self, name: str, namespace: str = "acme",
                                 kind: str = "device") -> dict[str, bytes]:
        secret = await self.kube.get("v1", "Secret", f"{name}-{kind}-credentials", namespace)
        assert secret is not None, f"no credentials for {name}"
        return secret_data(secret)

    def tls_context(self, files: dict[str, bytes], name: str) -> ssl.SSLContext:
        """A client context from a credential Secret, as a device would build it."""
        folder = self.root / "clients" / f"{name}-{len(list(self.root.glob('clients/*')))}"
        folder.mkdir(parents=True)
        for key in ("tls.crt", "tls.key", "broker-ca.crt"):
            (folder / key).write_bytes(files[key])
        context = ssl.create_default_context(cafile=str(folder / "broker-ca.crt"))
        context.check_hostname = False
        context.load_cert_chain(folder / "tls.crt", folder / "tls.key")
        return context

    def device_client(self, files: dict[str, bytes], name: str) -> MqttTestClient:
        return MqttTestClient("127.0.0.1", self.broker.ports.device,
                              client_id=f"{name}-{free_port()}",
                              tls_context=self.tls_context(files, name))


def _quick_retries(settings: kopf.OperatorSettings) -> None:
    settings.posting.enabled = True


@contextlib.asynccontextmanager
async def operator_env(root: Path, *, resources: Iterable[ResourceSpec] | None = None,
                       authenticate: bool = False,
                       **overrides: Any) -> AsyncIterator[OperatorEnv]:
    """An emulated cluster and a started broker; operators are started by the test.

    `resources`: the APIs the cluster serves (by default every built-in kind, the Prometheus
    Operator's and kubiot's). `authenticate`: the API refuses requests without a token the
    test issued (`env.kube.issue_token()`)."""
    broker = LocalBroker(root / "broker", BrokerPorts(free_port(), free_port()))
    await broker.start()
    try:
        settings = OperatorSettings(
            broker_admin_host="127.0.0.1", broker_admin_port=broker.ports.service,
            broker_admin_password=await broker.admin_password(),
            broker_public_host="127.0.0.1", broker_public_port=broker.ports.device,
            broker_ca_file=broker.server_ca_file, metrics_port=overrides.pop("metrics_port", 0),
            namespace="kubiot-system",
            resync_period_seconds=overrides.pop("resync_period_seconds", 3600),
            status_flush_seconds=0.2, log_format="text", **overrides)
        async with KubeEmulator(resources, authenticate=authenticate) as kube:
            # The operator's own namespace, as the chart's install creates it.
            await kube.create({"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": settings.namespace}})
            yield OperatorEnv(kube=kube, broker=broker, root=root, settings=settings)
    finally:
        await broker.stop()
