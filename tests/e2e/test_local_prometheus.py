"""Alerts and dashboards on a real Prometheus: `make dev` with its Prometheus answers every
dashboard query, and real faults fire the chart's alerts, which resolve when the fault ends.

Prometheus loads the chart's own rules file; the stack's `--alert-for` cuts only their `for:`
durations (the chart's are up to 15 minutes), so an alert fires seconds after its cause. Their
rate windows are the chart's: an alert on a 5-minute rate resolves about 5 minutes after its
fault, which sets this test's length (about 6 minutes).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kubiot_contract.topics import (
    OPERATOR_USERNAME,
    PRESENCE_OFFLINE,
    PRESENCE_ONLINE,
    device_root,
    device_username,
    presence_topic,
    telemetry_topic,
)
from kubiot_operator.local.broker import ADMIN_BUNDLE
from kubiot_operator.local.postgres import PostgresServer
from kubiot_operator.local.stack import postgres_home
from tests.support.dashboards import dashboards, panel_queries
from tests.support.dynsec import send_commands
from tests.support.exported_metrics import metric_names_in
from tests.support.local_stack import (
    Stack,
    descendants,
    none_alive,
    pressure_sensor_release,
    running_stack,
)
from tests.support.mqtt_client import MqttTestClient
from tests.support.pki import make_csr
from tests.support.prometheus_api import PrometheusApi
from tests.support.waiting import async_wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
ALERT_FOR_SECONDS = 5
RESYNC_SECONDS = 10
#: From a fault to its alert firing: detection, a few scrapes, `for:` and an evaluation.
FIRE_SECONDS = 120
#: From a fault's end to its alert's end: the rules' 5-minute rate windows, plus margin.
RESOLVE_SECONDS = 420
TENANT = "acme"
#: The simulated devices with a key (the CSR analyzer in the examples has none here).
SIMULATED = 4
#: Metrics of dashboard panels the local stack does not produce, and why: their queries are
#: run but may come back empty.
NOT_LOCAL = {
    "kubiot_operator_broker_errors_total":
        "a series appears with the first failed broker call; no fault here fails one for sure",
}


#: A firmware version that makes the simulated pressure sensors send temperatures far above the
#: example Tenant's bounds once they run it (see simulator/faults.py).
BAD_VERSION = "9.9.9"


def _faulty_firmware(stack: Stack) -> None:
    """The pressure sensors misbehave on BAD_VERSION (Device annotation kubiot.io/simulate)."""
    stack.simulate_faults(("pressure-01", "pressure-02"), f"anomalous@{BAD_VERSION}")


def _bad_release() -> dict[str, object]:
    """A release of BAD_VERSION for the pressure sensors, gated on their health."""
    return pressure_sensor_release(BAD_VERSION, TENANT, {
        "canary": {"count": 1}, "waves": [100], "failureBudget": {"count": 0},
        "healthGate": {"soakSeconds": 30}})


@pytest.fixture
def stack() -> Iterator[Stack]:
    with running_stack("--alert-for", str(ALERT_FOR_SECONDS),
                       "--resync-seconds", str(RESYNC_SECONDS),
                       prepare=_faulty_firmware) as started:
        yield started


def _port(stack: Stack, name: str) -> int:
    ports = dict(line.split("=") for line in (stack.root / "ports.env").read_text().split())
    return int(ports[name])


def _processes(stack: Stack, marker: str) -> list[int]:
    """The stack's child processes whose command line contains `marker`."""
    assert stack.process is not None
    found = []
    for pid in descendants(stack.process.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in command:
            found.append(pid)
    return found


def _write_manifest(stack: Stack, name: str, document: dict[str, object]) -> Path:
    path = stack.manifests / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _device(name: str, namespace: str, spec: dict[str, object]) -> dict[str, object]:
    return {"apiVersion": "kubiot.io/v1alpha1", "kind": "Device",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


async def _fires(prometheus: PrometheusApi, stack: Stack, *names: str) -> None:
    async def all_firing() -> bool:
        assert stack.process is not None and stack.process.poll() is None, stack.output()
        return all([await prometheus.firing(name) for name in names])

    await async_wait_until(all_firing, timeout=FIRE_SECONDS, interval=1,
                           message=f"{', '.join(names)} firing")


async def _resolved(prometheus: PrometheusApi, *names: str, seconds: float = FIRE_SECONDS
                    ) -> None:
    async def gone() -> bool:
        return not (await prometheus.active_names() & set(names))

    await async_wait_until(gone, timeout=seconds, interval=1,
                           message=f"{', '.join(names)} resolved")


def _device_client(stack: Stack, name: str, key: ec.EllipticCurvePrivateKey) -> MqttTestClient:
    """A real device on the mutual-TLS listener with the certificate the stack issued."""
    files = stack.device_files(name)
    key_file = files / "test-key.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(cafile=str(files / "broker-ca.crt"))
    context.check_hostname = False
    context.load_cert_chain(files / "tls.crt", key_file)
    return MqttTestClient("127.0.0.1", _port(stack, "KUBIOT_DEVICE_PORT"),
                          client_id=device_username(TENANT, name), tls_context=context)


async def test_every_dashboard_query_answers_and_faults_fire_and_resolve_alerts(
        stack: Stack) -> None:
    started = time.monotonic()
    await async_wait_until(lambda: _ready(stack), timeout=120, interval=0.5,
                           message="the stack's ports")
    prometheus = PrometheusApi(f"http://127.0.0.1:{_port(stack, 'KUBIOT_PROMETHEUS_PORT')}")
    await async_wait_until(prometheus.ready, timeout=120, interval=0.5,
                           message="Prometheus ready")

    # Healthy: both targets scraped, every simulated device online, and no alert at all.
    async def healthy() -> bool:
        assert stack.process is not None and stack.process.poll() is None, stack.output()
        targets = await prometheus.targets_up()
        online = await prometheus.query(f'sum(kubiot_devices_online{{tenant="{TENANT}"}})')
        return (len(targets) == 2 and all(targets.values()) and bool(online)
                and float(online[0]["value"][1]) == SIMULATED
                and not await prometheus.alerts())

    await async_wait_until(healthy, timeout=180, interval=1,
                           message="targets up, devices online and no alert")

    # A device floods its telemetry topic with payloads that are not JSON: they are rejected
    # into the dead-letter table. It enrols with its own key (a CSR), as a real device would.
    # Meanwhile a Device names a namespace no Tenant owns: reconciles of it fail and retry.
    key = ec.generate_private_key(ec.SECP256R1())
    flood_manifest = _write_manifest(stack, "flood-probe", _device(
        "flood-probe", TENANT, {"identity": {"type": "CSR", "csr": make_csr(
            key, device_username(TENANT, "flood-probe")).decode()}}))
    stray_manifest = _write_manifest(stack, "stray", _device("stray", "unowned", {}))
    await async_wait_until(
        lambda: _exists(stack.device_files("flood-probe") / "tls.crt"), timeout=60,
        interval=0.5, message="the flooding device's certificate")
    root = device_root(TENANT, "flood-probe")
    client = _device_client(stack, "flood-probe", key).connect()
    try:
        assert client.publish(presence_topic(root), PRESENCE_ONLINE, retain=True).accepted
        # First a few good samples a second apart, the last far above the example Tenant's
        # temperature bounds: an anomaly.
        for temperature in (21.0, 21.5, 22.0, 500.0):
            assert client.publish(telemetry_topic(root), _sample(temperature)).accepted
            await asyncio.sleep(1)
        for _ in range(300):
            client.publish(telemetry_topic(root), b"{not json")
        await _fires(prometheus, stack, "KubiotIngestRejectingMessages",
                     "KubiotTelemetryAnomalies")
        # Then no telemetry at all while it stays connected: past the Tenant's silence rule
        # (five of its one-second intervals, and at least 30 s) it is silent, until it sends.
        await _fires(prometheus, stack, "KubiotDevicesSilent")
        assert client.publish(telemetry_topic(root), _sample(21.0)).accepted
        await _resolved(prometheus, "KubiotDevicesSilent")
        assert client.publish(presence_topic(root), PRESENCE_OFFLINE, retain=True).accepted
    finally:
        client.close()
    await async_wait_until(
        lambda: _has_series(prometheus, 'kubiot_operator_reconcile_errors_total'
                                        '{kind="Device",reason="TenantNotFound"}'),
        timeout=60, interval=1, message="a failed reconcile counted")
    flood_manifest.unlink()
    stray_manifest.unlink()

    # A firmware release whose canary installs it and then sends anomalous values: its health
    # gate aborts it and the canary is rolled back. Kept until the panels are checked.
    release_manifest = _write_manifest(stack, "bad-release", _bad_release())
    await _fires(prometheus, stack, "KubiotRolloutAborted")
    assert await _has_series(prometheus, "kubiot_rollout_health_gate_failures_total")

    # PostgreSQL stops: the ingest reports the database down and counts failed writes.
    database = PostgresServer(postgres_home(stack.root), port=stack.postgres_port, durable=True)
    database.stop()
    try:
        await _fires(prometheus, stack, "KubiotIngestDatabaseDown",
                     "KubiotIngestDatabaseErrors")
    finally:
        database.start()
    await _resolved(prometheus, "KubiotIngestDatabaseDown")

    # Devices go silent: two of the five are suspended, their simulations stop.
    for device in ("pressure-01", "pressure-02"):
        stack.set_suspended(device, True)
    await _fires(prometheus, stack, "KubiotDevicesOffline")
    for device in ("pressure-01", "pressure-02"):
        stack.set_suspended(device, False)
    await _resolved(prometheus, "KubiotDevicesOffline")

    # The ingest process hangs and stays hung: Prometheus cannot scrape it.
    [ingest] = _processes(stack, "kubiot_ingest.main")
    os.kill(ingest, signal.SIGSTOP)
    try:
        await _fires(prometheus, stack, "KubiotIngestDown")
    finally:
        os.kill(ingest, signal.SIGCONT)
    await _resolved(prometheus, "KubiotIngestDown")

    # The broker hangs: the ingest's keepalive runs out and it counts itself disconnected.
    # The devices keep what they sample meanwhile and deliver it once the broker is back, most
    # of a minute late: the stored telemetry's 95th percentile lag goes over 30 s.
    [broker] = _processes(stack, "mosquitto.conf")
    os.kill(broker, signal.SIGSTOP)
    try:
        await _fires(prometheus, stack, "KubiotIngestBrokerDisconnected")
    finally:
        os.kill(broker, signal.SIGCONT)
    await _resolved(prometheus, "KubiotIngestBrokerDisconnected")
    await _fires(prometheus, stack, "KubiotIngestLagHigh")

    # A device's broker identity deleted by hand comes back with the next drift repair: the
    # resync's, or the Device's own reconcile (the local stack runs a full pass every minute).
    password = (stack.root / "broker/pki" / ADMIN_BUNDLE / "password").read_text().strip()
    await asyncio.to_thread(
        send_commands, "127.0.0.1", _port(stack, "KUBIOT_SERVICE_PORT"), OPERATOR_USERNAME,
        password, [{"command": "deleteClient", "username": device_username(TENANT, "pressure-02")}])
    try:
        await async_wait_until(
            lambda: _has_series(prometheus, "kubiot_operator_drift_repairs_total > 0"),
            # A broker just resumed from SIGSTOP may hold the first pass up: several periods.
            timeout=RESYNC_SECONDS * 9, interval=1, message="the deleted identity repaired")
    except AssertionError as exc:
        assert stack.process is not None
        stack.process.send_signal(signal.SIGUSR1)  # the stack logs what each task waits on
        await asyncio.sleep(1)
        raise AssertionError(f"{exc}\n{stack.log.read_text(errors='replace')[-30000:]}") from None

    # Every query of every panel returns series, now that the faults have left their counters.
    empty = []
    for path in dashboards():
        for query in panel_queries(path):
            if metric_names_in([query.expr]) & NOT_LOCAL.keys():
                continue
            if not await prometheus.query(query.expr):
                empty.append(f"{query}: {query.expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)

    # The aborted release is deleted: its series go, and its alert with them.
    release_manifest.unlink()
    await _resolved(prometheus, "KubiotRolloutAborted")

    # The alerts on 5-minute rates resolve once their faults have left the window; then no
    # alert is left at all.
    await _resolved(prometheus, "KubiotIngestRejectingMessages", "KubiotIngestDatabaseErrors",
                    "KubiotIngestLagHigh", "KubiotTelemetryAnomalies", seconds=RESOLVE_SECONDS)
    await async_wait_until(lambda: _no_alerts(prometheus), timeout=RESOLVE_SECONDS, interval=1,
                           message="no alert active")

    # Ctrl-C: Prometheus stops with every other process of the stack.
    assert stack.process is not None
    [prometheus_pid] = _processes(stack, "--storage.tsdb.path")
    children = descendants(stack.process.pid)
    stack.process.send_signal(signal.SIGINT)
    assert stack.process.wait(timeout=90) == 0, stack.output()
    await async_wait_until(lambda: none_alive(children | {prometheus_pid}), timeout=10,
                           interval=0.2, message="every process of the stack exited")
    print(f"faults fired and resolved in {time.monotonic() - started:.0f} s")


def _sample(temperature: float) -> bytes:
    return json.dumps({"ts": datetime.now(UTC).isoformat(),
                       "values": {"temperature": temperature}}).encode()


async def _ready(stack: Stack) -> bool:
    assert stack.process is not None and stack.process.poll() is None, stack.output()
    path = stack.root / "ports.env"
    return path.exists() and "KUBIOT_PROMETHEUS_PORT" in path.read_text()


async def _exists(path: Path) -> bool:
    return await asyncio.to_thread(path.exists)


async def _has_series(prometheus: PrometheusApi, expr: str) -> bool:
    return bool(await prometheus.query(expr))


async def _no_alerts(prometheus: PrometheusApi) -> bool:
    return not await prometheus.alerts()
