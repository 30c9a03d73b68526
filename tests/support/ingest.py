"""Fixture pieces for the ingest tests: a broker with the ingest's credentials, publishers,
the service in-process or as a real `kubiot-ingest` process, and queries on what it stored."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from kubiot_contract.topics import (
    AccessRules,
    device_root,
    ingest_access,
    ingest_username,
)
from kubiot_operator.local.mosquitto import MosquittoBroker, MosquittoConfig
from kubiot_operator.local.ports import free_port
from tests.support.dynsec import client_commands, send_commands

REPO = Path(__file__).resolve().parents[2]
PUBLISHER_USERNAME = "test-publisher"


@dataclass(frozen=True)
class BrokerAccess:
    """A running broker and the credentials the tests use on it."""

    host: str
    port: int
    ingest_username: str
    ingest_password: str
    publisher_username: str
    publisher_password: str


@contextmanager
def broker_for_tenant(tenant: str) -> Iterator[tuple[MosquittoBroker, BrokerAccess]]:
    """Mosquitto with dynamic security: the ingest's client has exactly the contract's rules;
    a publisher may publish anywhere under the tenant's root (standing in for its devices)."""
    data_dir = Path(tempfile.mkdtemp(prefix="kubiot-mqtt-"))
    admin_password = secrets.token_urlsafe(12)
    config = MosquittoConfig(data_dir=data_dir, service_port=free_port(),
                             admin_password=admin_password)
    broker = MosquittoBroker(config)
    broker.start()
    try:
        access = BrokerAccess("127.0.0.1", config.service_port, ingest_username(tenant),
                              secrets.token_urlsafe(12), PUBLISHER_USERNAME,
                              secrets.token_urlsafe(12))
        send_commands(access.host, access.port, config.admin_username, admin_password,
                      client_commands(access.ingest_username, access.ingest_password,
                                      ingest_access(tenant))
                      + client_commands(access.publisher_username, access.publisher_password,
                                        AccessRules(frozenset({f"{tenant}/#"}), frozenset())))
        yield broker, access
    finally:
        broker.stop()


def ingest_environment(tenant: str, access: BrokerAccess, dsn: str, **extra: Any) -> dict[str, str]:
    """The KUBIOT_INGEST_* variables the operator would set, pointing at the test servers."""
    values: dict[str, Any] = {
        "TENANT": tenant,
        "BROKER_HOST": access.host,
        "BROKER_PORT": access.port,
        "BROKER_USERNAME": access.ingest_username,
        "BROKER_PASSWORD": access.ingest_password,
        "DATABASE_DSN": dsn,
        "DATABASE_SCHEMA": f"tenant_{tenant.replace('-', '_')}",
        "BATCH_SIZE": 500,
        "BATCH_MAX_DELAY_MS": 50,
        "METRICS_PORT": free_port(),
        "METRICS_HOST": "127.0.0.1",
        "CLIENT_ID": f"ingest-{tenant}",
        "RETRY_MAX_DELAY_S": 1,
        # The tests' samples carry fixed dates; a long retention keeps them inside the stored
        # window (the ingest dead-letters older samples) whatever day the tests run.
        "RETENTION_DAYS": 3650,
        **extra,
    }
    return {f"KUBIOT_INGEST_{key}": str(value) for key, value in values.items()}


def sample(seq: int, ts: datetime | None = None, **values: Any) -> dict[str, Any]:
    moment = ts or datetime(2026, 11, 24, 10, 0, tzinfo=UTC) + timedelta(milliseconds=seq)
    return {"v": 1, "ts": moment.isoformat(), "seq": seq,
            "values": values or {"flow": seq * 0.5, "on": seq % 2 == 0}}


@dataclass(frozen=True)
class Tally:
    """Stored telemetry against what was sent, counted by (device, seq)."""

    stored: frozenset[tuple[str, int]]
    lost: frozenset[tuple[str, int]]  # sent, not stored
    duplicated: frozenset[tuple[str, int]]  # a metric of the sample stored more than once
    unexpected: frozenset[tuple[str, int]]  # stored, never counted as sent


async def tally_telemetry(dsn: str, schema: str, sent: Iterable[tuple[str, int]]) -> Tally:
    """Compare the tenant's telemetry table with the (device, seq) pairs sent.

    A sample stored twice under another `ts` (a device that made it anew instead of sending
    the same bytes again) shows as duplicated, as does one stored twice by any other way.
    """
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(f"""
            SELECT device, seq, max(copies) AS copies FROM (
                SELECT device, seq, metric, count(*) AS copies FROM {schema}.telemetry
                GROUP BY device, seq, metric) AS per_metric
            GROUP BY device, seq""")
    finally:
        await connection.close()
    stored = frozenset((row["device"], row["seq"]) for row in rows)
    expected = frozenset(sent)
    return Tally(stored, expected - stored,
                 frozenset((row["device"], row["seq"]) for row in rows if row["copies"] > 1),
                 stored - expected)


class Publisher:
    """A real MQTT client publishing QoS 1 messages and waiting for their PUBACKs."""

    def __init__(self, access: BrokerAccess, client_id: str | None = None) -> None:
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                   client_id=client_id or f"pub-{secrets.token_hex(4)}",
                                   protocol=mqtt.MQTTv5)
        self._client.username_pw_set(access.publisher_username, access.publisher_password)
        self._client.max_inflight_messages_set(20)
        self._client.max_queued_messages_set(0)
        connected = threading.Event()
        self._client.on_connect = lambda *_args: connected.set()
        self._client.connect(access.host, access.port)
        self._client.loop_start()
        if not connected.wait(10):
            raise TimeoutError("publisher did not connect")

    def publish(self, topic: str, payload: bytes | str | dict[str, Any] | list[Any],
                retain: bool = False) -> mqtt.MQTTMessageInfo:
        body = json.dumps(payload) if isinstance(payload, dict | list) else payload
        return self._client.publish(topic, body, qos=1, retain=retain)

    def publish_all(self, messages: Iterable[tuple[str, Any]], timeout: float = 60) -> int:
        infos = [self.publish(topic, payload) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout)
        return len(infos)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Stream:
    """Telemetry from devices `dev-0` to `dev-2`: 10 messages every 50 ms from a thread until
    stopped; keeps the (device, seq) of each one the broker acknowledged."""

    def __init__(self, access: BrokerAccess, tenant: str) -> None:
        self.access, self.tenant = access, tenant
        self.acknowledged: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    @property
    def sent(self) -> int:
        return len(self.acknowledged)

    def _run(self) -> None:
        with Publisher(self.access) as publisher:
            while not self._stop.is_set():
                device, first = f"dev-{self.sent % 3}", self.sent
                publisher.publish_all(
                    (f"{device_root(self.tenant, device)}/telemetry", sample(first + i))
                    for i in range(10))
                self.acknowledged += [(device, first + i) for i in range(10)]
                self._stop.wait(0.05)

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


class IngestProcess:
    """`kubiot-ingest` as a real child process."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.env['KUBIOT_INGEST_METRICS_PORT']}"

    def start(self) -> IngestProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "kubiot_ingest.main"],
                                        env=self.env, stdout=log, stderr=log, cwd=REPO)
        log.close()
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


async def metrics_text(process: IngestProcess) -> str:
    """What the process's /metrics serves."""
    async with aiohttp.ClientSession() as session, \
            session.get(f"{process.metrics_url}/metrics") as response:
        return await response.text()


async def process_ready(process: IngestProcess) -> bool:
    """Whether /readyz says ready; raises when the process has exited."""
    assert process.process is not None
    if process.process.poll() is not None:
        raise AssertionError(f"kubiot-ingest exited early:\n{process.log()}")
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(f"{process.metrics_url}/readyz") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False
