"""The operator for real: kopf on the Kubernetes emulator, a real Mosquitto, real MQTT clients."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.test_utils
import kmock
import kopf
import pytest
import yaml
from cryptography import x509
from prometheus_client import CollectorRegistry

from kubiot_contract.topics import IdentityKind
from kubiot_operator.handlers.http import http_app
from kubiot_operator.handlers.runtime import Runtime
from kubiot_operator.kube.client import TENANTS, Connection, KubeClient, KubeError
from kubiot_operator.kube.secrets import SecretMaterialStore, SecretTrustPublisher, secret_data
from kubiot_operator.local.ports import free_port
from kubiot_operator.pki import TenantAuthority, revoked_serials
from kubiot_operator.settings import OperatorSettings
from tests.support.dynsec import send_commands
from tests.support.kube_emulator import CORE_RESOURCES, KubeEmulator, kubiot_resources
from tests.support.mqtt_client import ConnectRefused
from tests.support.operator_env import (
    API,
    OperatorEnv,
    condition,
    example_documents,
    is_ready,
    operator_env,
)
from tests.support.tools import REPO_ROOT, require_tool, run_tool
from tests.support.waiting import async_wait_until

pytestmark = pytest.mark.timeout(180)
DEVICES = ("flow-meter-01", "flow-meter-02", "pressure-01", "pressure-02",
           "chlorine-analyzer-01")


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[OperatorEnv]:
    async with operator_env(tmp_path) as environment:
        yield environment


async def apply_examples(env: OperatorEnv) -> None:
    """As a user would: the Tenant, then (once its namespace exists) what goes in it."""
    await env.apply(*example_documents("tenant.yaml"))
    await env.wait("Namespace", "acme", lambda namespace: namespace is not None)
    await env.apply(*example_documents("gateway.yaml", "devices.yaml"))


async def wait_all_ready(env: OperatorEnv, seconds: float = 60) -> None:
    await env.wait("Tenant", "acme", is_ready, timeout=seconds)
    for name in DEVICES:
        await env.wait("Device", name, is_ready, namespace="acme", timeout=seconds)
    await env.wait("Gateway", "pumphouse-1", lambda g: is_ready(g) and (
        g or {}).get("status", {}).get("childCount") == 2, namespace="acme", timeout=seconds)


def refused(env: OperatorEnv, files: dict[str, bytes], name: str) -> bool:
    """True when the broker will not let this credential in (handshake or CONNACK)."""
    client = env.device_client(files, name)
    try:
        client.connect()
    except ConnectRefused:
        return True
    try:
        outcome = client.publish(f"acme/devices/{name}/telemetry", b'{"ts":1,"values":{"x":1}}')
        subscribed = client.subscribe(f"acme/devices/{name}/state/desired")
        return not outcome.accepted and not subscribed.accepted
    finally:
        client.close()


def bundle_revocations(bundle: bytes) -> set[int]:
    """Every serial revoked by any CRL of a concatenated bundle."""
    marker = b"-----BEGIN X509 CRL-----"
    serials: set[int] = set()
    for part in bundle.split(marker)[1:]:
        serials |= revoked_serials(marker + part)
    return serials


async def test_examples_become_ready_with_working_least_privilege_credentials(
        env: OperatorEnv) -> None:
    async with env.running():
        await apply_examples(env)
        await wait_all_ready(env)

        tenant = await env.kube.get(API, "Tenant", "acme")
        assert tenant is not None
        assert tenant["status"]["phase"] == "Ready"
        assert tenant["status"]["deviceCount"] == 5
        deployment = await env.kube.get("apps/v1", "Deployment", "acme-ingest", "acme")
        assert deployment is not None and deployment["spec"]["replicas"] == 2
        for kind, name in (("Service", "acme-ingest"), ("Secret", "acme-ingest-broker")):
            assert await env.kube.get("v1", kind, name, "acme") is not None

        device = await env.kube.get(API, "Device", "pressure-01", "acme")
        assert device is not None
        status = device["status"]
        assert status["username"] == "acme.pressure-01"
        assert status["certificate"]["serial"]
        flow = await env.kube.get(API, "Device", "flow-meter-01", "acme")
        assert flow is not None and flow["status"]["gateway"] == "pumphouse-1"
        csr_device = await env.device_credentials("chlorine-analyzer-01")
        assert "tls.key" not in csr_device and b"BEGIN CERTIFICATE" in csr_device["tls.crt"]

        files = await env.device_credentials("pressure-01")
        with env.device_client(files, "pressure-01").connect() as client:
            root = "acme/devices/pressure-01"
            assert client.publish(f"{root}/telemetry", b'{"ts":1,"values":{"bar":2.1}}').accepted
            assert client.subscribe(f"{root}/state/desired").accepted
            assert not client.publish("acme/devices/pressure-02/telemetry", b"{}").accepted
            assert not client.publish("globex/devices/x/telemetry", b"{}").accepted
            assert not client.subscribe("#").accepted
            assert not client.subscribe("$SYS/#").accepted

        gateway = await env.device_credentials("pumphouse-1", kind="gateway")
        with env.device_client(gateway, "pumphouse-1").connect() as client:
            assert client.publish("acme/devices/flow-meter-01/telemetry", b"{}").accepted
            assert not client.publish("acme/devices/pressure-01/telemetry", b"{}").accepted


async def test_desired_state_is_published_retained_to_the_device(env: OperatorEnv) -> None:
    async with env.running():
        await apply_examples(env)
        await env.wait("Device", "flow-meter-01", is_ready, namespace="acme", timeout=60)
        gateway = await env.wait("Gateway", "pumphouse-1", is_ready, namespace="acme")
        assert gateway is not None
        files = await env.device_credentials("pumphouse-1", kind="gateway")
        with env.device_client(files, "pumphouse-1").connect() as client:
            assert client.subscribe("acme/devices/flow-meter-01/state/desired").accepted
            message = client.next_message(timeout=5)
            assert message is not None and message.retain
            assert message.payload == b'{"samplingIntervalSeconds":10}'


async def test_deleting_a_device_revokes_it(env: OperatorEnv) -> None:
    async with env.running():
        await apply_examples(env)
        await wait_all_ready(env)
        files = await env.device_credentials("pressure-02")
        device = await env.kube.get(API, "Device", "pressure-02", "acme")
        assert device is not None
        serial = device["status"]["certificate"]["serial"]
        with env.device_client(files, "pressure-02").connect() as client:
            await env.kube.delete(API, "Device", "pressure-02", "acme")
            await env.wait("Device", "pressure-02", lambda d: d is None, namespace="acme")
            assert await asyncio.to_thread(client.wait_disconnected, 5)
        assert int(serial, 16) in bundle_revocations(env.broker.crl_bundle_file.read_bytes())
        assert await asyncio.to_thread(refused, env, files, "pressure-02")


async def test_suspend_and_resume(env: OperatorEnv) -> None:
    async with env.running():
        await apply_examples(env)
        await wait_all_ready(env)
        before = await env.device_credentials("pressure-01")
        await env.kube.patch(API, "Device", "pressure-01", {"spec": {"suspended": True}},
                             namespace="acme")
        suspended = await env.wait("Device", "pressure-01", lambda d: (d or {}).get(
            "status", {}).get("phase") == "Suspended", namespace="acme")
        assert condition(suspended, "Ready")["reason"] == "Suspended"  # type: ignore[index]
        assert await asyncio.to_thread(refused, env, before, "pressure-01")

        await env.kube.patch(API, "Device", "pressure-01", {"spec": {"suspended": False}},
                             namespace="acme")
        await env.wait("Device", "pressure-01", is_ready, namespace="acme")
        after = await env.device_credentials("pressure-01")
        assert after["tls.crt"] != before["tls.crt"]
        assert not await asyncio.to_thread(refused, env, after, "pressure-01")


async def test_an_invalid_spec_is_reported_and_the_operator_keeps_running(
        env: OperatorEnv) -> None:
    # The CRD refuses such a spec; a cluster that still has an older, laxer CRD does not.
    devices = env.kube.spec(API, "Device")
    del env.kube.cluster.schemas[kmock.resource(devices.group, devices.version, devices.plural)]
    async with env.running():
        await env.apply(*example_documents("tenant.yaml"))
        await env.wait("Tenant", "acme", is_ready, timeout=60)
        broken: dict[str, Any] = {
            "apiVersion": API, "kind": "Device",
            "metadata": {"name": "broken-1", "namespace": "acme"},
            "spec": {"identity": {"type": "Smartcard"}},
        }
        await env.apply(broken)
        device = await env.wait("Device", "broken-1", lambda d: condition(d, "Ready")
                                is not None, namespace="acme")
        ready = condition(device, "Ready")
        assert ready is not None and ready["status"] == "False"
        assert ready["reason"] == "InvalidSpec"
        assert "spec.identity.type" in ready["message"]

        async def warned() -> bool:  # kopf posts events from a queue of its own
            return any(e.get("reason") == "InvalidSpec" for e in env.kube.events("broken-1"))

        await async_wait_until(warned, timeout=10, message="an InvalidSpec event")

        fine = copy.deepcopy(broken)
        fine["metadata"]["name"] = "fine-1"
        fine["spec"] = {}
        await env.apply(fine)
        await env.wait("Device", "fine-1", is_ready, namespace="acme")


async def test_an_operator_killed_mid_reconcile_converges_without_duplicates(
        env: OperatorEnv) -> None:
    names = [f"sensor-{i:02d}" for i in range(20)]
    async with env.running() as run:
        await env.apply(*example_documents("tenant.yaml"))
        await env.wait("Tenant", "acme", is_ready, timeout=60)
        for name in names:
            await env.apply({"apiVersion": API, "kind": "Device",
                             "metadata": {"name": name, "namespace": "acme"}, "spec": {}})
        await env.wait("Device", names[0], is_ready, namespace="acme")
        await run.kill()
    async with env.running():
        for name in names:
            await env.wait("Device", name, is_ready, namespace="acme", timeout=60)
    secrets = [s for s in await env.kube.list("v1", "Secret", "acme")
               if s["metadata"]["name"].endswith("-device-credentials")]
    assert sorted(s["metadata"]["name"] for s in secrets) == sorted(
        f"{n}-device-credentials" for n in names)
    for name in names:
        device = await env.kube.get(API, "Device", name, "acme")
        files = await env.device_credentials(name)
        assert device is not None
        certificate = x509.load_pem_x509_certificate(files["tls.crt"])
        assert device["status"]["certificate"]["serial"] == f"{certificate.serial_number:x}"
    backend = env.operators[-1].platform.broker
    identities = await backend.list_identities("acme")
    usernames = [i.username for i in identities]
    assert len(usernames) == len(set(usernames))
    assert {f"acme.{n}" for n in names} <= set(usernames)


async def test_a_broker_identity_deleted_by_hand_comes_back_with_the_next_resync(
        tmp_path: Path) -> None:
    async with operator_env(tmp_path, resync_period_seconds=5) as env, env.running():
        await apply_examples(env)
        await wait_all_ready(env)
        files = await env.device_credentials("pressure-01")
        # Delete just after a pass, so that the refusal is seen before the next one repairs it.
        passes = env.operators[-1].platform.metrics.resync_passes
        done = passes._value.get()

        async def a_pass_completed() -> bool:
            return bool(passes._value.get() > done)

        await async_wait_until(a_pass_completed, timeout=30,
                               message="a drift repair pass completed")
        await asyncio.to_thread(
            send_commands, "127.0.0.1", env.broker.ports.service, "kubiot-operator",
            env.settings.broker_admin_password.get_secret_value(),
            [{"command": "deleteClient", "username": "acme.pressure-01"}])
        assert await asyncio.to_thread(refused, env, files, "pressure-01")

        async def admitted_again() -> bool:
            return not await asyncio.to_thread(refused, env, files, "pressure-01")

        await async_wait_until(admitted_again, timeout=30, interval=1,
                               message="drift repair restored the device")
        drift = env.operators[-1].platform.metrics.drift_repairs.labels("acme", "resync")
        assert drift._value.get() >= 1


async def test_a_tenant_is_ready_on_a_cluster_without_the_prometheus_operator(
        tmp_path: Path) -> None:
    async with operator_env(tmp_path, resources=[*CORE_RESOURCES, *kubiot_resources()]) as env, \
            env.running():
        await env.apply(*example_documents("tenant.yaml"))

        tenant = await env.wait("Tenant", "acme", is_ready, timeout=30)

        monitoring = condition(tenant, "Monitoring")
        assert monitoring is not None and monitoring["status"] == "False"
        assert monitoring["reason"] == "PrometheusOperatorAbsent"
        assert "ServiceMonitor" in monitoring["message"]
        for api, kind in (("apps/v1", "Deployment"), ("v1", "Service"),
                          ("policy/v1", "PodDisruptionBudget"),
                          ("networking.k8s.io/v1", "NetworkPolicy")):
            assert await env.kube.get(api, kind, "acme-ingest", "acme") is not None, kind


async def test_a_tenant_never_takes_over_a_namespace_it_did_not_create(env: OperatorEnv) -> None:
    await env.kube.create({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": "monitoring"}})
    async with env.running():
        await env.apply(*example_documents("tenant.yaml"))
        await env.wait("Tenant", "acme", is_ready, timeout=60)
        for name, namespace in (("intruder", "monitoring"), ("globex", "acme")):
            await env.apply({"apiVersion": API, "kind": "Tenant", "metadata": {"name": name},
                             "spec": {"namespace": namespace}})

        intruder = await env.wait("Tenant", "intruder", lambda t: condition(t, "Ready")
                                  is not None)
        globex = await env.wait("Tenant", "globex", lambda t: condition(t, "Ready") is not None)
        for tenant, message in ((intruder, "kubiot did not create"),
                                (globex, "belongs to Tenant acme")):
            ready = condition(tenant, "Ready")
            assert ready is not None and ready["status"] == "False"
            assert ready["reason"] == "NamespaceTaken" and message in ready["message"]
        for name in ("monitoring", "acme"):
            namespace = await env.kube.get("v1", "Namespace", name)
            assert namespace is not None
            owners = {r["name"] for r in namespace["metadata"].get("ownerReferences") or []}
            assert owners <= {"acme"}

        await env.kube.delete(API, "Tenant", "intruder")
        await env.kube.delete(API, "Tenant", "globex")
        await env.wait("Tenant", "intruder", lambda t: t is None)
        await env.wait("Tenant", "globex", lambda t: t is None)
        assert await env.kube.get("v1", "Namespace", "monitoring") is not None
        assert await env.kube.get(API, "Tenant", "acme") is not None
        assert await env.kube.get("v1", "Namespace", "acme") is not None


async def test_deleting_a_tenant_leaves_nothing_behind_and_brings_no_ca_back(
        env: OperatorEnv) -> None:
    operator_namespace = env.settings.namespace
    # The namespace controller empties kinds in any order. The hardest for kubiot: its own
    # kinds first, so their finalizers run while the credential Secrets are still there.
    env.kube.cluster.namespace_content_order = lambda kinds: sorted(
        kinds, key=lambda resource: resource.group != "kubiot.io")
    env.kube.cluster.namespace_content_pause = 0.5
    async with env.running():
        before = {s["metadata"]["name"] for s in await env.kube.list(
            "v1", "Secret", operator_namespace)}
        await apply_examples(env)
        await wait_all_ready(env)
        assert await env.kube.get("v1", "Secret", "tenant-acme-ca", operator_namespace)

        await env.kube.delete(API, "Tenant", "acme")

        await env.wait("Tenant", "acme", lambda t: t is None, timeout=60)
        await env.wait("Namespace", "acme", lambda n: n is None, timeout=60)
        for name in DEVICES:
            assert await env.kube.get(API, "Device", name, "acme") is None
        # Whatever the namespace's teardown set off has run by now: nothing may come back.
        await asyncio.sleep(1)
        after = {s["metadata"]["name"] for s in await env.kube.list(
            "v1", "Secret", operator_namespace)}
        assert not {s for s in after - before if "acme" in s}, sorted(after - before)
        namespaces = [n["metadata"]["name"] for n in await env.kube.list("v1", "Namespace")]
        assert namespaces == [operator_namespace]


async def test_a_bad_report_field_is_dropped_and_the_rest_of_the_report_reaches_status(
        env: OperatorEnv) -> None:
    async with env.running():
        await env.apply(*example_documents("tenant.yaml"))
        await env.wait("Tenant", "acme", is_ready, timeout=60)
        await env.apply({"apiVersion": API, "kind": "Device",
                         "metadata": {"name": "beta-1", "namespace": "acme"}, "spec": {}})
        await env.wait("Device", "beta-1", is_ready, namespace="acme")
        files = await env.device_credentials("beta-1")
        with env.device_client(files, "beta-1").connect() as client:
            client.publish("acme/devices/beta-1/presence", b"online", retain=True)
            client.publish("acme/devices/beta-1/state/reported",
                           b'{"firmware": "1.2.0 beta", "temperature": 21}', retain=True)
            device = await env.wait("Device", "beta-1", lambda d: bool(
                (d or {}).get("status", {}).get("reported")), namespace="acme")

    assert device is not None
    status = device["status"]
    assert status["online"] is True and status["lastSeen"]
    assert status["reported"] == {"firmware": "1.2.0 beta", "temperature": 21}
    assert "current" not in status.get("firmware", {})
    rejected = env.operators[-1].platform.metrics.report_fields_rejected
    assert rejected.labels("Device", "firmware.current")._value.get() == 1


async def test_a_rotated_service_account_token_is_read_again(tmp_path: Path) -> None:
    port = free_port()
    async with operator_env(tmp_path, authenticate=True, metrics_port=port) as env:
        token_file = tmp_path / "token"  # as a projected service-account token is mounted
        token_file.write_text(env.kube.issue_token())

        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=env.kube.url, insecure=True,
                                       token=token_file.read_text())

        async with env.running(env.operator(login=login)):
            await env.apply(*example_documents("tenant.yaml"))
            await env.wait("Tenant", "acme", is_ready, timeout=60)
            old = token_file.read_text()
            token_file.write_text(env.kube.issue_token())  # the kubelet rotates it
            env.kube.expire_token(old)

            await env.apply({"apiVersion": API, "kind": "Device",
                             "metadata": {"name": "after-rotation", "namespace": "acme"},
                             "spec": {}})

            await env.wait("Device", "after-rotation", is_ready, namespace="acme", timeout=30)
            async with aiohttp.ClientSession() as session, session.get(
                    f"http://127.0.0.1:{port}/healthz") as probe:
                assert probe.status == 200


async def test_the_liveness_probe_fails_while_the_api_keeps_refusing_the_credentials(
        kube_with_tokens: KubeEmulator) -> None:
    token = kube_with_tokens.issue_token()
    connection = Connection(server=kube_with_tokens.url, token=token, insecure=True)
    now = [0.0]
    runtime = Runtime(OperatorSettings(api_refusal_limit_seconds=60), connection)
    app = http_app(CollectorRegistry(), ready=lambda: True, authority=lambda: None,
                   unhealthy=runtime.unhealthy)
    async with KubeClient(connection, relogin=lambda: connection, clock=lambda: now[0]) as client, \
            aiohttp.test_utils.TestClient(aiohttp.test_utils.TestServer(app)) as http:
        runtime.kube = client
        await client.list(TENANTS)
        kube_with_tokens.expire_token(token)  # and no newer one to read

        with pytest.raises(KubeError) as refused:
            await client.list(TENANTS)
        now[0] = 30
        early = await http.get("/healthz")
        now[0] = 61
        late = await http.get("/healthz")
        late_text = await late.text()

    assert refused.value.status == 401
    assert early.status == 200
    assert late.status == 503 and "refused" in late_text


@pytest.fixture
async def kube_with_tokens() -> AsyncIterator[KubeEmulator]:
    async with KubeEmulator(authenticate=True) as emulator:
        yield emulator


async def test_the_broker_trust_bundle_is_published_where_the_broker_can_mount_it(
        tmp_path: Path) -> None:
    settings = OperatorSettings(namespace="kubiot-system", broker_trust_namespace="emqx")
    async with KubeEmulator() as kube, KubeClient(Connection(server=kube.url)) as client:
        for namespace in ("kubiot-system", "emqx"):
            await kube.create({"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": namespace}})
        authority = TenantAuthority(SecretMaterialStore(client, settings.namespace))
        issued = await authority.issue("acme", IdentityKind.DEVICE, "d1", validity_days=30)
        await authority.revoke("acme", issued.serial)
        trust = SecretTrustPublisher(client, settings.broker_trust_namespace or "")
        await trust.publish(await authority.ca_bundle(["acme"]),
                            await authority.crl_bundle(["acme"]))

        secret = await kube.get("v1", "Secret", "kubiot-broker-trust", "emqx")

    assert secret is not None
    files = secret_data(secret)  # the file names docs/brokers.md mounts
    assert b"BEGIN CERTIFICATE" in files["tenant-cas.pem"]
    assert issued.serial in bundle_revocations(files["tenant-crls.pem"])


async def test_a_broker_that_fetches_crls_gets_a_trust_bundle_of_cas_only() -> None:
    async with KubeEmulator() as kube, KubeClient(Connection(server=kube.url)) as client:
        await kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "emqx"}})
        trust = SecretTrustPublisher(client, "emqx", include_crls=False)
        await trust.publish(b"CAS", b"CRLS" * 300_000)  # CRLs this large would not fit

        secret = await kube.get("v1", "Secret", "kubiot-broker-trust", "emqx")

    assert secret is not None and secret_data(secret) == {"tenant-cas.pem": b"CAS"}


async def test_turning_ingest_off_removes_the_ingest_objects(env: OperatorEnv) -> None:
    async with env.running():
        await env.apply(*example_documents("tenant.yaml"))
        await env.wait("Tenant", "acme", is_ready, timeout=60)
        assert await env.kube.get("apps/v1", "Deployment", "acme-ingest", "acme") is not None

        await env.kube.patch(API, "Tenant", "acme", {"spec": {"ingest": {"enabled": False}}})

        await env.wait("Deployment", "acme-ingest", lambda d: d is None, namespace="acme")
        for api, kind in (("v1", "Service"), ("policy/v1", "PodDisruptionBudget"),
                          ("networking.k8s.io/v1", "NetworkPolicy"),
                          ("monitoring.coreos.com/v1", "ServiceMonitor")):
            assert await env.kube.get(api, kind, "acme-ingest", "acme") is None, kind
        tenant = await env.wait("Tenant", "acme", lambda t: (condition(t, "IngestReady") or {})
                                .get("reason") == "Disabled")
        assert is_ready(tenant)


def chart_grants() -> set[tuple[str, str, str]]:
    """(verb, group, resource) the chart's ClusterRole and Role grant the operator."""
    result = run_tool(require_tool("helm"), "template", "kubiot", REPO_ROOT / "charts/kubiot",
                      "--namespace", "kubiot-system")
    assert result.returncode == 0, result.stderr
    grants = set()
    for obj in yaml.safe_load_all(result.stdout):
        if obj and obj["kind"] in ("ClusterRole", "Role"):
            for rule in obj["rules"]:
                grants |= {(verb, group, resource) for verb in rule["verbs"]
                           for group in rule["apiGroups"] for resource in rule["resources"]}
    return grants


#: Granted for what these tests leave out: kopf's discovery of CRDs appearing (scanning is off
#: in the tests), and PodMonitors (for clusters serving PodMonitor but not ServiceMonitor).
UNEXERCISED = {*{(verb, "apiextensions.k8s.io", "customresourcedefinitions")
                 for verb in ("get", "list", "watch")},
               *{(verb, "monitoring.coreos.com", "podmonitors")
                 for verb in ("create", "patch", "delete")},
               # Provisioning by claim creates Devices: tests/e2e/test_operator_provisioning.py.
               ("create", "kubiot.io", "devices")}


async def test_the_chart_grants_exactly_what_the_operator_uses(env: OperatorEnv) -> None:
    async with env.running():
        await apply_examples(env)
        await env.apply(*example_documents("firmware-release.yaml"))
        await wait_all_ready(env)
        await env.apply(*example_documents("device-commands.yaml"))
        await env.wait("DeviceCommand", "ping-pressure-01", lambda c: bool(
            ((c or {}).get("status") or {}).get("phase")), namespace="acme")
        await env.kube.delete(API, "Device", "pressure-02", "acme")
        await env.wait("Device", "pressure-02", lambda d: d is None, namespace="acme")
        await env.kube.patch(API, "Tenant", "acme", {"spec": {"ingest": {"replicas": 3}}})
        await env.wait("Deployment", "acme-ingest", lambda d: (d or {}).get(
            "spec", {}).get("replicas") == 3, namespace="acme")
        await env.kube.patch(API, "Tenant", "acme", {"spec": {"ingest": {"enabled": False}}})
        await env.wait("Deployment", "acme-ingest", lambda d: d is None, namespace="acme")
        await env.kube.delete(API, "Tenant", "acme")
        await env.wait("Namespace", "acme", lambda n: n is None, timeout=60)

    used = env.kube.cluster.client_verbs
    granted = chart_grants()
    assert not used - granted, f"used but not granted: {sorted(used - granted)}"
    unused = granted - used - UNEXERCISED
    assert not unused, f"granted but never used: {sorted(unused)}"


async def test_ingest_ready_follows_the_deployments_real_status(env: OperatorEnv) -> None:
    env.kube.cluster.deployments_available = False  # say, the ingest image cannot be pulled
    async with env.running():
        await env.apply(*example_documents("tenant.yaml"))

        tenant = await env.wait("Tenant", "acme", lambda t: condition(t, "IngestReady")
                                is not None, timeout=60)

        ingest = condition(tenant, "IngestReady")
        assert ingest is not None and ingest["status"] == "False"
        assert ingest["reason"] == "Unavailable" and "acme/acme-ingest" in ingest["message"]
        assert not is_ready(tenant)
