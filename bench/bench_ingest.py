"""Ingest throughput, latency and memory, beside a row-per-message baseline and the broker.

    .venv/bin/python bench/bench_ingest.py [--seconds N] [--publishers P] [--live-devices D]
                                           [--rounds R]

Starts its own PostgreSQL and Mosquitto on free loopback ports, and `mosquitto_pub -l`
publisher processes sending QoS 1 telemetry for the backlogs (one device each, three metrics
per message).

Each consumer has a persistent session; while it is away, the publishers fill the broker with
a backlog of the same size for each, then the consumer is started and timed while it takes
the backlog, so that only the broker, the consumer and PostgreSQL share the machine. Once a
consumer is timed its session is ended, so that the broker does not go on queueing what the
later phases publish for a client that is gone:
  1. the broker ceiling: how fast a plain `mosquitto_sub` receives the backlog;
  2. the baseline: a subscriber inserting one row per message with asyncpg;
  3. kubiot-ingest: messages per second committed to PostgreSQL (and acknowledged), watched
     through the primary key on one connection (counting the rows would load the server);
(1) and (3) are taken in turns, `--rounds` times (2 by default), each round with a new
backlog and a new ingest process, and the ratio of (3) to (1) is the mean of each round's:
a machine that is faster in one round than in the next moves both sides of a ratio together.
While (3) runs, the CPU time each party spends per message: the ingest process's event-loop
thread and its other threads, its PostgreSQL backend, and the broker; then, on the last
round's ingest process, live:
  4. end-to-end latency (device timestamp to row written) with devices sending at half of
     (3), live: bench/paced_publisher.py, 10 devices by default, each stamping its samples
     just before it publishes them (its docstring says why it is not `mosquitto_pub -l`);
  5. the ingest process's peak RSS over the whole run;
then, without MQTT, in this process, on messages built like the published ones:
  6. the database ceiling: how fast the product's PostgreSQL sink (same settings, schema,
     migrations and idempotency key, same server) commits telemetry already decoded and
     validated in memory, in batches made by the product's batcher; and, taking turns with
     it batch by batch, a bare COPY of the same kind of rows into the same indexed table,
     one transaction per batch: the database's limit for this schema;
  7. where one message's time goes: the product's code timed stage by stage (CPU time of this
     thread, best of three): the subscriber receiving the same PUBLISH packets from a
     loopback connection into the inbox and acknowledging them, payload validation,
     building rows (classifying minus validating, plus batching), and the database write
     from (6) (wall time);
  8. what anomaly detection adds: the detector judging the same messages as the service does
     after a commit (bounds on both numeric metrics, a z-score on every metric, silence, and
     the health reports due), CPU time of this thread, best of three, beside the ingest's
     CPU per message from (3) with no rules: the target is under 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402

from kubiot_contract.health import (  # noqa: E402
    AnomalyRules,
    BoundsRule,
    SilenceRule,
    ZScoreRule,
)
from kubiot_contract.telemetry import parse_payload  # noqa: E402
from kubiot_contract.topics import device_root  # noqa: E402
from kubiot_ingest.anomaly import AnomalyDetector, judge_stored  # noqa: E402
from kubiot_ingest.batcher import Batch, Batcher  # noqa: E402
from kubiot_ingest.config import IngestSettings, load_settings  # noqa: E402
from kubiot_ingest.migrations import migrate  # noqa: E402
from kubiot_ingest.records import TELEMETRY_COLUMNS, InboundMessage, classify  # noqa: E402
from kubiot_ingest.service import postgres_sink  # noqa: E402
from kubiot_ingest.subscriber import Inbox, Subscriber  # noqa: E402
from kubiot_operator.local.postgres import postgres_server  # noqa: E402
from tests.support.ingest import (  # noqa: E402
    BrokerAccess,
    IngestProcess,
    broker_for_tenant,
    ingest_environment,
)
from tests.support.mqtt_wire import WireBroker, publish_packet  # noqa: E402

TENANT = "bench"
SCHEMA = "tenant_bench"
METRICS_PER_MESSAGE = 3
#: The ingest's batch age limit here (the service's default is 200 ms): a backlog fills its
#: batches by size long before, and live, half of it is the typical wait of a message.
BATCH_MAX_DELAY_MS = 50
MIN_CPU_WINDOW_S = 1.0
#: What (8) evaluates: every rule kind, on every numeric metric of the published messages.
BENCH_RULES = AnomalyRules(
    bounds=[BoundsRule(metric="temp", min=-40, max=85),
            BoundsRule(metric="humidity", min=0, max=100)],
    zscore=[ZScoreRule(metric="*")],
    silence=SilenceRule())


@dataclass
class Figures:
    #: The broker's ceiling and the ingest's rate of each round, taken in turns.
    ceilings: list[float] = field(default_factory=list)
    ingest_rates: list[float] = field(default_factory=list)
    baseline: float = 0.0
    latency_rate: float = 0.0
    latency_sent: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    latency_samples: int = 0
    rss_mb: float = 0.0
    #: CPU seconds per message while (3) ran, by party.
    cpu: dict[str, float] = field(default_factory=dict)
    db_ceiling: float = 0.0
    db_rows: float = 0.0
    #: Messages per second of a bare COPY of the same rows into the same table.
    raw_copy: float = 0.0
    #: Seconds per message of each stage of (7), and the database write's own CPU time.
    stages: dict[str, float] = field(default_factory=dict)
    db_client_cpu: float = 0.0
    #: Seconds per message of (8): classifying and batching, and the detector after them.
    classify_batch: float = 0.0
    detector: float = 0.0
    #: While (3) ran: batches committed, messages per batch, seconds per commit.
    batches: tuple[float, float, float] = (0.0, 0.0, 0.0)
    db_batches: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def ceiling(self) -> float:
        return sum(self.ceilings) / len(self.ceilings) if self.ceilings else 0.0

    @property
    def ingest(self) -> float:
        return sum(self.ingest_rates) / len(self.ingest_rates) if self.ingest_rates else 0.0

    @property
    def share(self) -> float:
        """Ingest ÷ broker ceiling: the mean of each round's ratio, so that a machine that is
        faster in one round than in another moves both sides of a ratio together."""
        pairs = zip(self.ingest_rates, self.ceilings, strict=True)
        ratios = [rate / ceiling for rate, ceiling in pairs if ceiling]
        return sum(ratios) / len(ratios) if ratios else 0.0


def ingest_env(access: BrokerAccess, dsn: str) -> dict[str, str]:
    """The ingest's configuration in every stage that runs the product's code."""
    return ingest_environment(TENANT, access, dsn, BATCH_SIZE=5000,
                              BATCH_MAX_DELAY_MS=BATCH_MAX_DELAY_MS, LOG_LEVEL="WARNING")


def payload_line(seq: int, ts: float) -> bytes:
    return (b'{"ts":%.6f,"seq":%d,"values":{"temp":%.2f,"humidity":%d,"ok":true}}\n'
            % (ts, seq, 20 + (seq % 100) / 10, 40 + seq % 20))


class Publishers:
    """P `mosquitto_pub -l` processes, one device each; lines written to their stdin."""

    def __init__(self, access: BrokerAccess, count: int, prefix: str) -> None:
        self.processes = [
            subprocess.Popen(
                ["mosquitto_pub", "-h", access.host, "-p", str(access.port), "-V", "mqttv5",
                 "-u", access.publisher_username, "-P", access.publisher_password,
                 "-q", "1", "-l", "-t", f"{device_root(TENANT, f'{prefix}-{i}')}/telemetry"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i in range(count)]
        self.sent = 0

    def close(self) -> None:
        """Close stdin so each publisher sends what it has read, waits for PUBACKs, and exits."""
        for process in self.processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in self.processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def db_count(dsn: str, sql: str) -> float:
    async def run() -> float:
        conn = await asyncpg.connect(dsn)
        try:
            return float(await conn.fetchval(sql) or 0)
        finally:
            await conn.close()
    return asyncio.run(run())


class Watcher:
    """One connection kept open for polling while a consumer is timed: opening a connection
    per look would have the server start a process each time."""

    def __init__(self, dsn: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._conn = self._loop.run_until_complete(asyncpg.connect(dsn))

    def fetchval(self, sql: str, *args: Any) -> Any:
        return self._loop.run_until_complete(self._conn.fetchval(sql, *args))

    def value(self, sql: str, *args: Any) -> float:
        return float(self.fetchval(sql, *args) or 0)

    def close(self) -> None:
        self._loop.run_until_complete(self._conn.close())
        self._loop.close()


def publish_backlog(access: BrokerAccess, publishers: int, prefix: str, total: int) -> float:
    """Publish `total` messages split over the publishers; returns the publish rate."""
    per = total // publishers
    ts = time.time()
    started = time.monotonic()
    pubs = Publishers(access, publishers, prefix)
    threads = []
    for index, process in enumerate(pubs.processes):
        data = b"".join(payload_line(index * per + k, ts + k / 1e6) for k in range(per))
        assert process.stdin is not None
        thread = threading.Thread(target=_write_all, args=(process.stdin, data))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    pubs.close()
    return per * publishers / (time.monotonic() - started)


def _write_all(stdin: IO[bytes], data: bytes) -> None:
    stdin.write(data)
    stdin.flush()


def drain_rate(count: Callable[[], float], total: float, timeout: float,
               probe: Callable[[float], None] | None = None) -> float:
    """Rate between the first message seen and the whole backlog (or the timeout).

    `probe(seen)` is called when the first messages are seen and again at the end.
    """
    started = time.monotonic()
    first: tuple[float, float] | None = None
    while True:
        now, seen = time.monotonic(), count()
        if first is None and seen > 0:
            first = (now, seen)
            if probe is not None:
                probe(seen)
        if seen >= total or now - started > timeout:
            break
        time.sleep(0.02)
    if first is None:
        return 0.0
    if probe is not None:
        probe(seen)
    if now <= first[0]:
        # The whole backlog arrived between two looks: time it from the start instead.
        return seen / max(now - started, 1e-3)
    return (seen - first[1]) / (now - first[0])


# --- 1. the broker ceiling ---------------------------------------------------------------------

@contextlib.contextmanager
def mqtt_session(access: BrokerAccess, login: tuple[str, str], client_id: str,
                 expiry_s: int) -> Iterator[Any]:
    """A paho client connected with a clean start and this session expiry (0: the session
    ends with the connection), once the broker has answered; disconnected on leaving."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(*login)
    client.on_connect = lambda *_: connected.set()
    properties = None
    if expiry_s:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = expiry_s
    client.connect(access.host, access.port, clean_start=True, properties=properties)
    client.loop_start()
    try:
        if not connected.wait(30):
            raise RuntimeError(f"no CONNACK for {client_id}")
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def persistent_subscription(access: BrokerAccess, admin: tuple[str, str], client_id: str,
                            topic_filter: str) -> None:
    """Create a session that outlives its connection, subscribed, and wait for the SUBACK."""
    subscribed = threading.Event()
    with mqtt_session(access, admin, client_id, expiry_s=3600) as client:
        client.on_subscribe = lambda *_: subscribed.set()
        client.subscribe(topic_filter, qos=1)
        if not subscribed.wait(30):
            raise RuntimeError(f"no SUBACK for {topic_filter}")


def end_session(access: BrokerAccess, login: tuple[str, str], client_id: str) -> None:
    """Take over a consumer's session with a clean start and no expiry, and leave: the broker
    forgets it, and stops queueing what later phases publish for a client that is gone."""
    with mqtt_session(access, login, client_id, expiry_s=0):
        pass


def broker_ceiling(access: BrokerAccess, admin: tuple[str, str], publishers: int,
                   total: int, timeout: float) -> float:
    args = ["mosquitto_sub", "-h", access.host, "-p", str(access.port), "-V", "mqttv5",
            "-u", admin[0], "-P", admin[1], "-q", "1", "-c", "-i", "bench-ceiling",
            "-x", "3600", "-t", f"{TENANT}/devices/+/telemetry"]
    # First visit: the session and its subscription, so the broker keeps the backlog.
    persistent_subscription(access, admin, "bench-ceiling", f"{TENANT}/devices/+/telemetry")
    publish_backlog(access, publishers, "ceiling", total)
    sub = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    received = [0]

    def read() -> None:
        assert sub.stdout is not None
        while chunk := os.read(sub.stdout.fileno(), 1 << 16):
            received[0] += chunk.count(b"\n")

    threading.Thread(target=read, daemon=True).start()
    try:
        return drain_rate(lambda: received[0], total, timeout)
    finally:
        sub.send_signal(signal.SIGTERM)
        sub.wait(10)
        end_session(access, admin, "bench-ceiling")


# --- 2. the baseline: one INSERT per message ---------------------------------------------------

BASELINE_TABLE = "bench_baseline"


async def baseline_worker(host: str, port: int, username: str, password: str, dsn: str) -> None:
    """The usual design: for each message, parse it and INSERT one row, then take the next."""
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    conn = await asyncpg.connect(dsn)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600
    async with aiomqtt.Client(host, port, username=username, password=password,
                              identifier="bench-baseline", clean_start=False,
                              properties=properties,
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(f"{TENANT}/devices/+/telemetry", qos=1)
        print("subscribed", flush=True)
        async for message in client.messages:
            body = json.loads(bytes(message.payload))
            await conn.execute(
                f"INSERT INTO {BASELINE_TABLE} (device, ts, seq, payload) "
                "VALUES ($1, to_timestamp($2), $3, $4::jsonb)",
                str(message.topic).split("/")[2], body["ts"], body["seq"],
                json.dumps(body["values"]))


def start_baseline(access: BrokerAccess, admin: tuple[str, str],
                   dsn: str) -> subprocess.Popen[bytes]:
    worker = subprocess.Popen(
        [sys.executable, __file__, "--baseline-worker", access.host, str(access.port),
         admin[0], admin[1], dsn], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert worker.stdout is not None
    worker.stdout.readline()
    return worker


def baseline(access: BrokerAccess, admin: tuple[str, str], dsn: str, publishers: int,
             total: int, timeout: float) -> float:
    db_count(dsn, f"CREATE TABLE IF NOT EXISTS {BASELINE_TABLE} (device text, ts timestamptz, "
                  "seq bigint, payload jsonb)")
    first = start_baseline(access, admin, dsn)
    first.kill()
    first.wait()
    publish_backlog(access, publishers, "baseline", total)
    worker = start_baseline(access, admin, dsn)
    watcher = Watcher(dsn)
    try:
        return drain_rate(lambda: watcher.value(f"SELECT count(*) FROM {BASELINE_TABLE}"),
                          total, timeout)
    finally:
        watcher.close()
        worker.kill()
        worker.wait()
        end_session(access, admin, "bench-baseline")


# --- 3-5. kubiot-ingest ------------------------------------------------------------------------

def prepare_latency_column(dsn: str) -> None:
    """Stamp every row with the time it is written (bench only), before the ingest starts."""
    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn, SCHEMA)
            await conn.execute(f"ALTER TABLE {SCHEMA}.telemetry ADD COLUMN IF NOT EXISTS "
                               "written_at timestamptz DEFAULT clock_timestamp()")
        finally:
            await conn.close()
    asyncio.run(run())


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def committed_messages(watcher: Watcher, prefix: str, publishers: int, total: int) -> float:
    """Messages of a backlog committed so far.

    Counting rows would cost the server more than the writes it watches, so this looks up the
    newest sample of each device through the primary key instead: a device's messages are
    published, delivered and committed in order, numbered from `index * per`.
    """
    per = total // publishers
    committed = 0.0
    for index in range(publishers):
        newest = watcher.fetchval(
            f"SELECT seq FROM {SCHEMA}.telemetry WHERE device = $1 AND metric = 'temp' "
            "AND stream = '' ORDER BY time DESC, seq DESC LIMIT 1", f"{prefix}-{index}")
        if newest is not None:
            committed += newest - index * per + 1
    return committed


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of a process (all its threads) or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_figures(metrics_url: str) -> tuple[float, float, float]:
    """(batches committed, messages per batch, seconds per commit) from the ingest's metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for metric in family.samples:
            if metric.labels.get("sink", "postgres") == "postgres":
                values[metric.name] = values.get(metric.name, 0.0) + metric.value
    batches = values.get("kubiot_ingest_batch_size_count", 0.0)
    if not batches:
        return 0.0, 0.0, 0.0
    return (batches, values.get("kubiot_ingest_batch_size_sum", 0.0) / batches,
            values.get("kubiot_ingest_commit_duration_seconds_sum", 0.0)
            / values.get("kubiot_ingest_commit_duration_seconds_count", batches))


class CpuProbe:
    """CPU time per message of the ingest's threads, its database backend and the broker."""

    def __init__(self, ingest_pid: int, broker_pid: int | None, watcher: Watcher) -> None:
        self.ingest_pid, self.broker_pid, self.watcher = ingest_pid, broker_pid, watcher
        self.backend_pid: int | None = None
        self.marks: list[tuple[float, float, dict[str, float]]] = []

    def sample(self) -> dict[str, float]:
        pid = self.ingest_pid
        main = cpu_seconds(pid, pid)
        values = {"ingest event-loop thread": main,
                  "ingest other threads": cpu_seconds(pid) - main}
        if self.backend_pid is not None:
            values["PostgreSQL backend of the ingest"] = cpu_seconds(self.backend_pid)
        if self.broker_pid is not None:
            values["broker (mosquitto)"] = cpu_seconds(self.broker_pid)
        return values

    def __call__(self, seen: float) -> None:
        if self.backend_pid is None:
            pid = self.watcher.fetchval("SELECT pid FROM pg_stat_activity "
                                        "WHERE application_name = 'kubiot-ingest' LIMIT 1")
            self.backend_pid = None if pid is None else int(pid)
        self.marks.append((time.monotonic(), seen, self.sample()))

    def per_message(self) -> dict[str, float]:
        """Empty when the run was too short for the kernel's CPU clock (10 ms ticks)."""
        if len(self.marks) < 2 or self.marks[-1][0] - self.marks[0][0] < MIN_CPU_WINDOW_S:
            return {}
        (_, seen0, first), (_, seen1, last) = self.marks[0], self.marks[-1]
        return {name: (last[name] - first[name]) / (seen1 - seen0)
                for name in last if name in first}


def paced_publishers(access: BrokerAccess, devices: int, rate: float, seconds: float) -> int:
    """Run bench/paced_publisher.py; returns how many messages it sent (all acknowledged)."""
    answer = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("paced_publisher.py")), access.host,
         str(access.port), access.publisher_username, access.publisher_password, TENANT,
         "latency", str(devices), f"{rate:.1f}", str(seconds)],
        check=True, stdout=subprocess.PIPE, timeout=seconds + 120)
    return int(answer.stdout)


def ingest_figures(access: BrokerAccess, dsn: str, publishers: int, total: int,
                   seconds: float, live_devices: int, workdir: Path, figures: Figures,
                   broker_pid: int | None, ceiling: Callable[[], float], rounds: int) -> None:
    """(1) and (3) in turns, `rounds` times, then (4) and (5) on the last round's process."""
    prepare_latency_column(dsn)
    env = ingest_env(access, dsn)
    ingest_login = (access.ingest_username, access.ingest_password)
    ingest_client_id = load_settings(env).mqtt_client_id
    for round_ in range(1, rounds + 1):
        # While no ingest session exists, so that it does not queue the ceiling's backlog too.
        figures.ceilings.append(ceiling())
        print(f"  round {round_}: broker ceiling (mosquitto_sub) {figures.ceilings[-1]:10.0f} "
              "msg/s", flush=True)
        # A first visit leaves the ingest's session and shared subscription at the broker.
        first = IngestProcess(env, workdir / f"ingest-{round_}-first.log").start()
        try:
            wait_ready(first)
            assert first.terminate() == 0
        finally:
            first.stop()
        process = ingest_round(env, access, dsn, publishers, total, f"peak{round_}",
                               workdir / f"ingest-{round_}.log", figures, broker_pid)
        print(f"  round {round_}: kubiot-ingest (committed + acked) "
              f"{figures.ingest_rates[-1]:10.0f} msg/s", flush=True)
        try:
            assert process.process is not None
            figures.rss_mb = max(figures.rss_mb, peak_rss_mb(process.process.pid))
            if round_ == rounds:
                latency_figures(access, dsn, process, seconds, live_devices, figures)
            assert process.terminate() == 0
        finally:
            process.stop()
        end_session(access, ingest_login, ingest_client_id)


def ingest_round(env: dict[str, str], access: BrokerAccess, dsn: str, publishers: int,
                 total: int, prefix: str, log: Path, figures: Figures,
                 broker_pid: int | None) -> IngestProcess:
    """(3): a backlog queued in the ingest's session while it was away, taken by a new
    process; returns the process, still running."""
    publish_backlog(access, publishers, prefix, total)
    process = IngestProcess(env, log).start()
    try:
        assert process.process is not None
        watcher = Watcher(dsn)
        probe = CpuProbe(process.process.pid, broker_pid, watcher)
        try:
            figures.ingest_rates.append(drain_rate(
                lambda: committed_messages(watcher, prefix, publishers, total), total, 120,
                probe))
        finally:
            watcher.close()
        figures.cpu = probe.per_message() or figures.cpu
        figures.batches = batch_figures(process.metrics_url)
        stored = db_count(dsn, f"SELECT count(*) FROM {SCHEMA}.telemetry "
                               f"WHERE device LIKE '{prefix}-%'")
        assert stored == total * METRICS_PER_MESSAGE, f"{stored} rows for {total} messages"
    except BaseException:
        process.stop()
        raise
    return process


def latency_figures(access: BrokerAccess, dsn: str, process: IngestProcess, seconds: float,
                    live_devices: int, figures: Figures) -> None:
    """(4): devices sending live at half the ingest's mean rate, to the running process."""
    figures.latency_rate = figures.ingest / 2
    figures.latency_sent = paced_publishers(access, live_devices, figures.latency_rate, seconds)
    drain(dsn, f"SELECT count(*) FROM {SCHEMA}.telemetry", quiet_for=2.0)

    async def quantiles() -> tuple[float, float, int]:
        conn = await asyncpg.connect(dsn)
        try:
            row = await conn.fetchrow(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), "
                "percentile_cont(0.99) WITHIN GROUP (ORDER BY d), count(*) FROM ("
                " SELECT extract(epoch FROM written_at - time) * 1000 AS d"
                f" FROM {SCHEMA}.telemetry WHERE device LIKE 'latency-%'"
                " AND metric = 'temp') AS lat")
            return float(row[0]), float(row[1]), int(row[2])
        finally:
            await conn.close()
    figures.p50_ms, figures.p99_ms, figures.latency_samples = asyncio.run(quantiles())


def wait_ready(process: IngestProcess, timeout: float = 30) -> None:
    import urllib.error
    import urllib.request

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{process.metrics_url}/readyz", timeout=2) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False
    wait_for(ready, timeout)


def wait_for(condition: Callable[[], Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached")
        time.sleep(0.2)


def drain(dsn: str, sql: str, quiet_for: float = 1.0) -> None:
    """Wait until the count stops moving (the queue is empty)."""
    last, since = -1.0, time.monotonic()
    while time.monotonic() - since < quiet_for:
        now = db_count(dsn, sql)
        if now != last:
            last, since = now, time.monotonic()
        time.sleep(0.2)


# --- 6-7. the database ceiling, and where one message's time goes -----------------------------

def backlog_messages(prefix: str, publishers: int, total: int) -> list[InboundMessage]:
    """The messages of a backlog as the ingest receives them (topic, payload, receive time)."""
    per = total // publishers
    ts = time.time()
    received_at = datetime.now(UTC)
    return [InboundMessage(index * per + k + 1,
                           f"{device_root(TENANT, f'{prefix}-{index}')}/telemetry",
                           payload_line(index * per + k, ts + k / 1e6).rstrip(b"\n"),
                           received_at)
            for k in range(per) for index in range(publishers)]


def make_batches(settings: IngestSettings, messages: list[InboundMessage]) -> list[Batch]:
    """Classify and batch as the service does when it takes a backlog: full batches."""
    batcher = Batcher(settings.batch_size, settings.batch_max_delay_s)
    batches = []
    pending = iter(messages)
    while chunk := [m for _, m in zip(range(batcher.room()), pending, strict=False)]:
        for message in chunk:
            batcher.add(message, classify(message, settings.tenant, settings.max_payload_bytes),
                        0.0)
        if batcher.is_full():
            batches.append(batcher.take())
    if batcher.pending_messages:
        batches.append(batcher.take())
    return batches


def database_ceiling(settings: IngestSettings, batches: list[Batch],
                     raw_batches: list[Batch]) -> tuple[float, float, float, float]:
    """Commit `batches` through the product's sink and, in turn with them, `raw_batches` by a
    bare COPY into the same table, one transaction per batch each.

    Taking turns, both write into an index of the same size. Returns (wall seconds of the
    sink, CPU seconds of this thread in the sink, telemetry rows inserted by the sink, wall
    seconds of the bare COPY)."""
    async def run() -> tuple[float, float, float, float]:
        sink = postgres_sink(settings)
        await sink.connect(datetime.now(UTC))
        raw = await asyncpg.connect(settings.database_dsn.get_secret_value())
        try:
            inserted = 0
            wall = cpu = raw_wall = 0.0
            now = datetime.now(UTC)
            for index, batch in enumerate(batches):
                if index < len(raw_batches):
                    began = time.perf_counter()
                    async with raw.transaction():
                        await raw.copy_records_to_table(
                            "telemetry", schema_name=SCHEMA,
                            records=raw_batches[index].telemetry, columns=TELEMETRY_COLUMNS)
                    raw_wall += time.perf_counter() - began
                began, began_cpu = time.perf_counter(), time.thread_time()
                inserted += (await sink.write(batch, now)).telemetry_rows
                wall += time.perf_counter() - began
                cpu += time.thread_time() - began_cpu
            return wall, cpu, float(inserted), raw_wall
        finally:
            await raw.close()
            await sink.close()
    return asyncio.run(run())


def receive_seconds(settings: IngestSettings, messages: list[InboundMessage]) -> float:
    """CPU time of the event-loop thread while the product's subscriber reads the messages'
    PUBLISH packets from a loopback connection into its inbox, the loop takes them out, and
    the subscriber acknowledges them. The broker's side runs in another thread."""
    chunk_size = 500  # well under a socket buffer, so that writing never waits
    packets = [publish_packet(m.mid % 65535 + 1, m.topic, m.payload) for m in messages]
    broker_loop = asyncio.new_event_loop()
    broker = WireBroker()
    threading.Thread(target=broker_loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(broker.start(), broker_loop).result(10)

    async def run() -> float:
        local = settings.model_copy(update={"broker_host": "127.0.0.1",
                                            "broker_port": broker.port})
        inbox = Inbox(len(packets) + 1)
        up = asyncio.Event()
        subscriber = Subscriber(local, [f"{TENANT}/devices/+/telemetry"], inbox,
                                lambda connected: up.set() if connected else None)
        connection = asyncio.create_task(subscriber.run())
        try:
            await asyncio.wait_for(up.wait(), 10)
            spent = 0.0
            for start in range(0, len(packets), chunk_size):
                data = b"".join(packets[start:start + chunk_size])
                began = time.thread_time()
                broker_loop.call_soon_threadsafe(broker.send, data)
                wanted = min(chunk_size, len(packets) - start)
                while wanted:
                    await inbox.wait(None)
                    taken = inbox.drain(wanted)
                    wanted -= len(taken)
                    subscriber.ack([m.receipt for m in taken])
                spent += time.thread_time() - began
            return spent
        finally:
            await subscriber.disconnect()
            connection.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connection

    try:
        return asyncio.run(run())
    finally:
        asyncio.run_coroutine_threadsafe(broker.stop(), broker_loop).result(10)
        broker_loop.call_soon_threadsafe(broker_loop.stop)


def best_of(runs: int, measure: Callable[[], float]) -> float:
    return min(measure() for _ in range(runs))


def thread_seconds(work: Callable[[], object]) -> float:
    began = time.thread_time()
    work()
    return time.thread_time() - began


def database_figures(access: BrokerAccess, dsn: str, publishers: int, total: int,
                     figures: Figures) -> None:
    settings = load_settings(ingest_env(access, dsn))
    messages = backlog_messages("dbceiling", publishers, total)
    tenant, limit = settings.tenant, settings.max_payload_bytes

    def validate() -> None:
        for message in messages:
            parse_payload(message.payload, limit)

    def classify_all() -> None:
        for message in messages:
            classify(message, tenant, limit)

    def batch_all() -> None:
        batcher = Batcher(settings.batch_size, settings.batch_max_delay_s)
        for message, outcome in outcomes:
            batcher.add(message, outcome, 0.0)
            if batcher.is_full():
                batcher.take()

    outcomes = [(m, classify(m, tenant, limit)) for m in messages]
    n = len(messages)
    receive = best_of(3, lambda: receive_seconds(settings, messages))
    validation = best_of(3, lambda: thread_seconds(validate))
    classifying = best_of(3, lambda: thread_seconds(classify_all))
    batching = best_of(3, lambda: thread_seconds(batch_all))
    batches = make_batches(settings, messages)
    raw_batches = make_batches(settings, backlog_messages("rawcopy", publishers, total))
    wall, cpu, rows, raw_wall = database_ceiling(settings, batches, raw_batches)
    figures.db_ceiling, figures.db_rows = n / wall, rows / wall
    figures.raw_copy = sum(b.messages for b in raw_batches) / raw_wall
    figures.db_batches = (len(batches), n / len(batches), wall / len(batches))
    figures.db_client_cpu = cpu / n
    def judge_all() -> None:
        detector = AnomalyDetector(BENCH_RULES)
        judge_stored(detector, outcomes)
        detector.silences(datetime.now(UTC))
        detector.reports_due(datetime.now(UTC))

    figures.classify_batch = (classifying + batching) / n
    figures.detector = best_of(3, lambda: thread_seconds(judge_all)) / n
    figures.stages = {
        "MQTT receive + decode + ack (mqtt5, event loop)": receive / n,
        "validation (pydantic, parse_payload)": validation / n,
        "row building (classify - validation, + batcher)":
            max(0.0, classifying - validation + batching) / n,
        "database writes (PostgresSink.write, wall)": wall / n,
    }


def print_breakdown(figures: Figures) -> None:
    for label, (count, size, seconds) in (("kubiot-ingest", figures.batches),
                                          ("database ceiling", figures.db_batches)):
        if count:
            print(f"  {label + ':':<18} {count:5.0f} batches of {size:6.0f} messages, "
                  f"{seconds * 1000:6.1f} ms per commit = {seconds / size * 1e6:5.1f} us "
                  "per message")
    if figures.cpu:
        print("  CPU per message while kubiot-ingest took the backlog:")
        for name, seconds in figures.cpu.items():
            print(f"    {name:<46} {seconds * 1e6:7.1f} us")
    print("  one message, stage by stage (product code in this process, same messages):")
    whole = sum(figures.stages.values())
    for name, seconds in figures.stages.items():
        print(f"    {name:<46} {seconds * 1e6:7.1f} us {seconds / whole:5.0%}")
    print(f"    {'sum':<46} {whole * 1e6:7.1f} us   -> {1 / whole:.0f} msg/s if done in turn; "
          f"the database write's own CPU: {figures.db_client_cpu * 1e6:.1f} us")
    print("  anomaly detection (bounds on 2 metrics, z-score on every metric, silence; same "
          "messages):")
    print(f"    {'classify + batch, rules off':<46} {figures.classify_batch * 1e6:7.1f} us")
    print(f"    {'classify + batch + detector, rules on':<46} "
          f"{(figures.classify_batch + figures.detector) * 1e6:7.1f} us")
    print(f"    {'the detector alone':<46} {figures.detector * 1e6:7.1f} us")


def ingest_cpu_per_message(figures: Figures) -> tuple[float, str]:
    """The ingest's CPU per message with no rules: measured live in (3) when the run was
    long enough, else the CPU of the stages of (7) (a lower bound: the detector's share is
    then overstated)."""
    live = sum(seconds for name, seconds in figures.cpu.items() if name.startswith("ingest "))
    if live:
        return live, "live in (3)"
    stages = figures.stages
    return (sum(seconds for name, seconds in stages.items() if "wall" not in name)
            + figures.db_client_cpu), "stages of (7)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="longest a consumer is timed, and the length of the latency phase")
    parser.add_argument("--messages", type=int, default=90_000,
                        help="backlog per consumer (the broker queues at most 100000)")
    parser.add_argument("--publishers", type=int, default=3,
                        help="publisher processes filling the backlogs")
    parser.add_argument("--live-devices", type=int, default=10,
                        help="devices (connections) sending the live phase's messages")
    parser.add_argument("--rounds", type=int, default=2,
                        help="times the broker ceiling and the ingest are measured, in turns")
    parser.add_argument("--baseline-worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        host, port, user, password, dsn = args.baseline_worker
        asyncio.run(baseline_worker(host, int(port), user, password, dsn))
        return 0

    figures = Figures()
    workdir = Path(tempfile.mkdtemp(prefix="kubiot-bench-ingest-"))
    total = args.messages - args.messages % args.publishers
    with postgres_server(durable=True) as pg, broker_for_tenant(TENANT) as (broker, access):
        admin = (broker.config.admin_username, broker.config.admin_password)
        print(f"backlog {total} QoS 1 messages x 3 metrics from {args.publishers} publisher "
              f"processes; PostgreSQL with fsync on; {os.cpu_count()} CPUs", flush=True)
        figures.baseline = baseline(access, admin, pg.dsn, args.publishers, total, args.seconds)
        print(f"  baseline (INSERT per message)       {figures.baseline:10.0f} msg/s", flush=True)
        ingest_figures(access, pg.dsn, args.publishers, total, args.seconds, args.live_devices,
                       workdir, figures, broker.pid,
                       lambda: broker_ceiling(access, admin, args.publishers, total,
                                              args.seconds),
                       max(1, args.rounds))
        print(f"  broker ceiling (mosquitto_sub)      {figures.ceiling:10.0f} msg/s "
              "(mean of the rounds)", flush=True)
        print(f"  kubiot-ingest (committed + acked)   {figures.ingest:10.0f} msg/s "
              f"({figures.ingest * METRICS_PER_MESSAGE:.0f} rows/s; mean of the rounds)",
              flush=True)
        database_figures(access, pg.dsn, args.publishers, total, figures)
    print(f"  database ceiling (sink, no MQTT)    {figures.db_ceiling:10.0f} msg/s "
          f"({figures.db_rows:.0f} rows/s)")
    print(f"  raw COPY into the same table        {figures.raw_copy:10.0f} msg/s "
          f"({figures.raw_copy * METRICS_PER_MESSAGE:.0f} rows/s)")
    print(f"  latency at {figures.latency_rate:.0f} msg/s (half of peak, live): "
          f"p50 {figures.p50_ms:.0f} ms, p99 {figures.p99_ms:.0f} ms "
          f"({figures.latency_samples} of {figures.latency_sent} messages stored)")
    print(f"  ingest peak RSS                     {figures.rss_mb:10.1f} MB")
    ratio = figures.ingest / figures.baseline if figures.baseline else float("inf")
    share = figures.share
    db_share = figures.ingest / figures.db_ceiling if figures.db_ceiling else 0.0
    sink_share = figures.db_ceiling / figures.raw_copy if figures.raw_copy else 0.0
    print_breakdown(figures)
    print(f"  ingest / baseline           {ratio:6.1f}x   (target >= 30x)")
    print(f"  ingest / broker ceiling     {share:6.0%}    (target >= 50%)")
    print(f"  sink / raw COPY             {sink_share:6.0%}    (target >= 80%)")
    print(f"  ingest / database ceiling   {db_share:6.0%}")
    print(f"  p99 at half rate            {figures.p99_ms:6.0f} ms (target < 250 ms)")
    print(f"  peak RSS                    {figures.rss_mb:6.0f} MB (target < 120 MB)")
    cpu, source = ingest_cpu_per_message(figures)
    print(f"  detector / ingest CPU per message {figures.detector / cpu:6.1%} "
          f"(target < 10%; {figures.detector * 1e6:.1f} of {cpu * 1e6:.1f} us, {source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
