"""Ingest throughput, latency and memory, beside a row-per-message baseline and the broker.

    .venv/bin/python bench/bench_ingest.py [--seconds N] [--publishers P]

Starts its own PostgreSQL and Mosquitto on free loopback ports, and `mosquitto_pub -l`
publisher processes sending QoS 1 telemetry (one device each, three metrics per message).

Each consumer has a persistent session; while it is away, the publishers fill the broker with
a backlog of the same size for each, then the consumer is started and timed while it takes
the backlog, so that only the broker, the consumer and PostgreSQL share the machine:
  1. the broker ceiling: how fast a plain `mosquitto_sub` receives the backlog;
  2. the baseline: a subscriber inserting one row per message with asyncpg;
  3. kubiot-ingest: messages per second committed to PostgreSQL (and acknowledged);
then, live:
  4. end-to-end latency (device timestamp to row written) with the publishers sending at half
     of (3);
  5. the ingest process's peak RSS over the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402

from kubiot_ingest.migrations import migrate  # noqa: E402
from kubiot_operator.contract import device_root  # noqa: E402
from kubiot_operator.local.postgres import postgres_server  # noqa: E402
from tests.support.ingest import (  # noqa: E402
    BrokerAccess,
    IngestProcess,
    broker_for_tenant,
    ingest_environment,
)

TENANT = "bench"
SCHEMA = "tenant_bench"
METRICS_PER_MESSAGE = 3


@dataclass
class Figures:
    ceiling: float = 0.0
    baseline: float = 0.0
    ingest: float = 0.0
    latency_rate: float = 0.0
    latency_sent: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    latency_samples: int = 0
    rss_mb: float = 0.0


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

    def paced(self, seconds: float, rate: float, seq_base: int) -> None:
        """`rate` messages per second in total, each stamped with the time it is written."""
        tick = 0.005
        per_tick = rate * tick / len(self.processes)
        owed = [0.0] * len(self.processes)
        seqs = [seq_base + i * 100_000_000 for i in range(len(self.processes))]
        started = time.monotonic()
        next_tick = started
        while time.monotonic() - started < seconds:
            for index, process in enumerate(self.processes):
                assert process.stdin is not None
                owed[index] += per_tick
                n = int(owed[index])
                owed[index] -= n
                if n:
                    now = time.time()
                    process.stdin.write(b"".join(payload_line(seqs[index] + k, now)
                                                 for k in range(n)))
                    process.stdin.flush()
                    seqs[index] += n
                    self.sent += n
            next_tick += tick
            time.sleep(max(0.0, next_tick - time.monotonic()))

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


def drain_rate(count: Callable[[], float], total: float, timeout: float) -> float:
    """Rate between the first message seen and the whole backlog (or the timeout)."""
    started = time.monotonic()
    first: tuple[float, float] | None = None
    while True:
        now, seen = time.monotonic(), count()
        if first is None and seen > 0:
            first = (now, seen)
        if seen >= total or now - started > timeout:
            break
        time.sleep(0.02)
    if first is None:
        return 0.0
    if now <= first[0]:
        # The whole backlog arrived between two looks: time it from the start instead.
        return seen / max(now - started, 1e-3)
    return (seen - first[1]) / (now - first[0])


# --- 1. the broker ceiling ---------------------------------------------------------------------

def persistent_subscription(access: BrokerAccess, admin: tuple[str, str], client_id: str,
                            topic_filter: str) -> None:
    """Create a session that outlives its connection, subscribed, and wait for the SUBACK."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(*admin)
    client.on_subscribe = lambda *_: subscribed.set()
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600
    client.connect(access.host, access.port, clean_start=True, properties=properties)
    client.loop_start()
    try:
        client.subscribe(topic_filter, qos=1)
        if not subscribed.wait(30):
            raise RuntimeError(f"no SUBACK for {topic_filter}")
    finally:
        client.disconnect()
        client.loop_stop()


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
    try:
        return drain_rate(lambda: db_count(dsn, f"SELECT count(*) FROM {BASELINE_TABLE}"),
                          total, timeout)
    finally:
        worker.kill()
        worker.wait()


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


def ingest_figures(access: BrokerAccess, dsn: str, publishers: int, total: int,
                   seconds: float, workdir: Path, figures: Figures) -> None:
    prepare_latency_column(dsn)
    env = ingest_environment(TENANT, access, dsn, BATCH_SIZE=5000, BATCH_MAX_DELAY_MS=100,
                             LOG_LEVEL="WARNING")
    first = IngestProcess(env, workdir / "ingest-first.log").start()
    try:
        wait_ready(first)
        first.terminate()
    finally:
        first.stop()
    publish_backlog(access, publishers, "peak", total)
    process = IngestProcess(env, workdir / "ingest.log").start()
    try:
        rows = f"SELECT count(*) FROM {SCHEMA}.telemetry WHERE device LIKE 'peak-%'"
        figures.ingest = drain_rate(lambda: db_count(dsn, rows) / METRICS_PER_MESSAGE,
                                    total, 120)
        figures.latency_rate = figures.ingest / 2
        pubs = Publishers(access, publishers, "latency")
        pubs.paced(seconds, figures.latency_rate, 0)
        pubs.close()
        figures.latency_sent = pubs.sent
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
        assert process.process is not None
        figures.rss_mb = peak_rss_mb(process.process.pid)
        assert process.terminate() == 0
    finally:
        process.stop()


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="longest a consumer is timed, and the length of the latency phase")
    parser.add_argument("--messages", type=int, default=90_000,
                        help="backlog per consumer (the broker queues at most 100000)")
    parser.add_argument("--publishers", type=int, default=3, help="publisher processes")
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
        figures.ceiling = broker_ceiling(access, admin, args.publishers, total, args.seconds)
        print(f"  broker ceiling (mosquitto_sub)      {figures.ceiling:10.0f} msg/s", flush=True)
        figures.baseline = baseline(access, admin, pg.dsn, args.publishers, total, args.seconds)
        print(f"  baseline (INSERT per message)       {figures.baseline:10.0f} msg/s", flush=True)
        ingest_figures(access, pg.dsn, args.publishers, total, args.seconds, workdir, figures)
    print(f"  kubiot-ingest (committed + acked)   {figures.ingest:10.0f} msg/s "
          f"({figures.ingest * METRICS_PER_MESSAGE:.0f} rows/s)")
    print(f"  latency at {figures.latency_rate:.0f} msg/s (half of peak, live): "
          f"p50 {figures.p50_ms:.0f} ms, p99 {figures.p99_ms:.0f} ms "
          f"({figures.latency_samples} of {figures.latency_sent} messages stored)")
    print(f"  ingest peak RSS                     {figures.rss_mb:10.1f} MB")
    ratio = figures.ingest / figures.baseline if figures.baseline else float("inf")
    share = figures.ingest / figures.ceiling if figures.ceiling else 0.0
    print(f"  ingest / baseline  {ratio:6.1f}x   (target >= 20x)")
    print(f"  ingest / ceiling   {share:6.0%}    (target >= 50%)")
    print(f"  p99 at half rate   {figures.p99_ms:6.0f} ms (target < 1000 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
