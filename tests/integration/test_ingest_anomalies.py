"""Anomaly detection in the real ingest, against a real Mosquitto and PostgreSQL: the rows of
the anomalies table, the counter, and the retained health report a stock client reads."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from kubiot_contract.health import (
    AnomalyRule,
    AnomalyRules,
    BoundsRule,
    SilenceRule,
    ZScoreRule,
    parse_health,
)
from kubiot_contract.topics import device_access, device_root, health_topic, operator_access
from kubiot_ingest.batcher import Batch
from kubiot_ingest.config import load_settings
from kubiot_ingest.records import InboundMessage
from kubiot_ingest.service import IngestService
from kubiot_operator.local.postgres import PostgresServer, postgres_server
from tests.support.dynsec import client_commands, send_commands
from tests.support.ingest import (
    IngestProcess,
    Publisher,
    broker_for_tenant,
    ingest_environment,
    metrics_text,
    process_ready,
    sample,
)
from tests.support.waiting import async_wait_until

RULES = AnomalyRules(
    bounds=[BoundsRule(metric="flow", max=100)],
    silence=SilenceRule(intervals=2, interval_seconds=1, min_silence_seconds=0),
    report_seconds=1)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


async def query(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def series(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{wanted}}} not exported")


def subscribe_once(host: str, port: int, username: str, password: str,
                   topic: str) -> subprocess.CompletedProcess[str]:
    """A stock `mosquitto_sub` (MQTT v5) waiting up to 5 s for one message."""
    return subprocess.run(
        ["mosquitto_sub", "-h", host, "-p", str(port), "-V", "mqttv5", "-u", username,
         "-P", password, "-t", topic, "-q", "1", "-C", "1", "-W", "5", "-v"],
        capture_output=True, text=True, timeout=20, check=False)


async def test_the_ingest_records_counts_and_reports_anomalies_and_silence(
        postgres: PostgresServer, tmp_path: Path) -> None:
    tenant = "watched"
    topic = health_topic(device_root(tenant, "pump-1"))
    with broker_for_tenant(tenant) as (broker, access):
        send_commands(access.host, access.port, broker.config.admin_username,
                      broker.config.admin_password,
                      client_commands("operator", "operator-pw", operator_access(tenant))
                      + client_commands("pump-1", "device-pw", device_access(tenant, "pump-1")))
        env = ingest_environment(tenant, access, postgres.dsn,
                                 ANOMALY_RULES=RULES.to_json())
        process = IngestProcess(env, tmp_path / "ingest.log").start()
        try:
            await async_wait_until(lambda: process_ready(process), timeout=20, message="ready")
            flows = [1.0, 2.0, 500.0, 3.0, 4.0]
            with Publisher(access) as publisher:
                await asyncio.to_thread(publisher.publish_all, [
                    (f"{device_root(tenant, 'pump-1')}/telemetry",
                     sample(seq, flow=flow, on=True)) for seq, flow in enumerate(flows)])
            schema = f"tenant_{tenant}"
            await async_wait_until(
                lambda: _count(postgres.dsn, f"SELECT count(*) FROM {schema}.anomalies", 2),
                timeout=15, message="the out-of-range value and the silence recorded")
            rows = await query(postgres.dsn, f"SELECT * FROM {schema}.anomalies ORDER BY rule")
            text = await metrics_text(process)
            forgery = await asyncio.to_thread(subprocess.run, [
                "mosquitto_pub", "-h", access.host, "-p", str(access.port), "-V", "mqttv5",
                "-u", "pump-1", "-P", "device-pw", "-t", topic, "-q", "1", "-r",
                "-m", '{"v":1,"time":"2026-11-24T10:00:00Z","silent":false}'],
                capture_output=True, text=True, timeout=20, check=False)
            read = await asyncio.to_thread(subscribe_once, access.host, access.port,
                                           "operator", "operator-pw", topic)
            peeked = await asyncio.to_thread(subscribe_once, access.host, access.port,
                                             "pump-1", "device-pw", topic)
        finally:
            assert await asyncio.to_thread(process.terminate) == 0
    bounds, silent = (dict(r) for r in rows)
    assert (bounds["device"], bounds["metric"], bounds["rule"], bounds["value"],
            bounds["low"], bounds["high"]) == ("pump-1", "flow", "bounds", 500.0, None, 100.0)
    assert bounds["time"] == datetime(2026, 11, 24, 10, 0, 0, 2000, tzinfo=UTC)
    assert (silent["device"], silent["metric"], silent["rule"], silent["high"]) == (
        "pump-1", "", "silent", 2.0)
    assert series(text, "kubiot_ingest_anomalies_total", tenant=tenant, rule="bounds") == 1
    assert series(text, "kubiot_ingest_anomalies_total", tenant=tenant, rule="silent") == 1
    assert series(text, "kubiot_ingest_anomalies_total", tenant=tenant, rule="zscore") == 0
    assert series(text, "kubiot_ingest_silent_devices", tenant=tenant) == 1
    assert series(text, "kubiot_ingest_health_reports_total", tenant=tenant) >= 2
    # The retained report, as the operator's identity reads it: silent since the last sample.
    assert read.returncode == 0, read.stderr
    received_topic, payload = read.stdout.strip().split(" ", 1)
    report = parse_health(payload.encode())
    assert received_topic == topic
    assert report.silent and report.anomalies == {AnomalyRule.SILENT: 1}
    assert report.latest is not None and report.latest.rule is AnomalyRule.SILENT
    assert report.metrics == {"flow": 4.0}  # the boolean `on` is no measurement
    assert report.last_telemetry == datetime(2026, 11, 24, 10, 0, 0, 4000, tzinfo=UTC)
    # The device itself can neither forge its verdict (the report read above is the ingest's,
    # published before the forgery) nor read it.
    assert "Not authorized" in forgery.stderr, forgery
    assert "denied" in peeked.stderr and not peeked.stdout, peeked


async def test_a_redelivered_batch_records_each_anomaly_once(postgres: PostgresServer) -> None:
    tenant = "redelivered"
    env = {"KUBIOT_INGEST_TENANT": tenant, "KUBIOT_INGEST_DATABASE_DSN": postgres.dsn,
           "KUBIOT_INGEST_RETENTION_DAYS": "3650",
           "KUBIOT_INGEST_ANOMALY_RULES": RULES.to_json()}
    service = IngestService(load_settings(env))
    received = datetime.now(UTC)

    def batch_of(seqs: range) -> Batch:
        batch = Batch()
        for seq in seqs:
            message = InboundMessage(seq + 1, f"{device_root(tenant, 'pump-1')}/telemetry",
                                     json.dumps(sample(seq, flow=200.0 + seq)).encode(),
                                     received)
            batch.add(message, service._classify(message))
        return batch

    try:
        assert await service._commit(batch_of(range(10)))
        await service._record_anomalies()
        # The broker delivers the batch again, with more behind it (a lost PUBACK).
        assert await service._commit(batch_of(range(15)))
        await service._record_anomalies()
        assert service.sink.redelivered_batches == 1
        stored = await query(postgres.dsn, f"SELECT time FROM tenant_{tenant}.anomalies")
    finally:
        await service.sink.close()
    assert len(stored) == 15
    assert service.metrics.registry.get_sample_value(
        "kubiot_ingest_anomalies_total", {"tenant": tenant, "rule": "bounds"}) == 15


async def _count(dsn: str, sql: str, at_least: int) -> bool:
    return int((await query(dsn, sql))[0][0]) >= at_least


SEED = 424242
STREAM_DEVICES = 16
STREAM_STEPS = 160
STEP_PAUSE_S = 0.02
SILENT_AFTER = 40


async def test_a_seeded_stream_through_the_real_ingest_records_each_injected_anomaly_only(
        postgres: PostgresServer, tmp_path: Path) -> None:
    """16 devices x 160 samples through Mosquitto, the ingest process and PostgreSQL; seed
    424242. Four devices get 2% spikes on `temp` after the warm-up (15 to 30 sigma), two a
    lasting 20-sigma step from sample 100, every device 1% of `pressure` out of bounds, one
    device stops after sample 40; the other devices are clean (and fall silent only when the
    stream ends)."""
    tenant = "seeded"
    rules = AnomalyRules(
        bounds=[BoundsRule(metric="pressure", min=0.5, max=3.0)],
        zscore=[ZScoreRule(metric="temp", threshold=6, half_life_samples=20, warmup_samples=30)],
        silence=SilenceRule(intervals=6, interval_seconds=0.5, min_silence_seconds=3))
    rng = random.Random(SEED)
    names = [f"unit-{i:02d}" for i in range(STREAM_DEVICES)]
    spiky, stepping, silent = set(names[:4]), set(names[4:6]), names[-1]
    spikes: set[tuple[str, int]] = set()
    out_of_range: set[tuple[str, int]] = set()
    start = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    with broker_for_tenant(tenant) as (_, access):
        env = ingest_environment(tenant, access, postgres.dsn, ANOMALY_RULES=rules.to_json())
        process = IngestProcess(env, tmp_path / "ingest.log").start()
        try:
            await async_wait_until(lambda: process_ready(process), timeout=20, message="ready")
            with Publisher(access) as publisher:
                for step in range(STREAM_STEPS):
                    last_step_at = datetime.now(UTC)
                    batch = []
                    for name in names:
                        if name == silent and step > SILENT_AFTER:
                            continue
                        temp = 20 + rng.gauss(0, 0.5)
                        if name in spiky and step >= 30 and rng.random() < 0.02:
                            temp += rng.choice((-1, 1)) * rng.uniform(15, 30) * 0.5
                            spikes.add((name, step))
                        if name in stepping and step >= 100:
                            temp += 20 * 0.5
                        pressure = 1.5 + rng.gauss(0, 0.05)
                        if rng.random() < 0.01:
                            pressure = rng.choice((0.2, 3.6))
                            out_of_range.add((name, step))
                        batch.append((f"{device_root(tenant, name)}/telemetry", sample(
                            step, start + timedelta(seconds=step), temp=temp,
                            pressure=pressure)))
                    await asyncio.to_thread(publisher.publish_all, batch)
                    await asyncio.sleep(STEP_PAUSE_S)
            schema = f"tenant_{tenant}"
            await async_wait_until(
                lambda: _count(postgres.dsn, f"SELECT count(*) FROM {schema}.anomalies "
                               "WHERE rule = 'silent'", 1),
                timeout=20, message="the silent device found")
            await async_wait_until(
                lambda: _count(postgres.dsn, f"SELECT count(*) FROM {schema}.telemetry",
                               2 * (STREAM_STEPS * (STREAM_DEVICES - 1) + SILENT_AFTER + 1)),
                timeout=20, message="every sample stored")
            await asyncio.sleep(1)  # the last batch's anomalies are written after its commit
            rows = await query(postgres.dsn,
                               f"SELECT device, time, rule FROM {schema}.anomalies")
        finally:
            assert await asyncio.to_thread(process.terminate) == 0

    def step_of(moment: datetime) -> int:
        return int((moment - start).total_seconds())

    found = {(r["rule"], r["device"], step_of(r["time"])) for r in rows
             if r["rule"] != "silent"}
    assert len(spikes) >= 5 and len(out_of_range) >= 10  # the test bites
    assert {(d, s) for rule, d, s in found if rule == "bounds"} == out_of_range
    zscore = {(d, s) for rule, d, s in found if rule == "zscore"}
    assert {(d, s) for d, s in zscore if d in spiky} == spikes
    for name in stepping:
        steps = sorted(s for d, s in zscore if d == name)
        assert steps[0] == 100 and steps[-1] < 100 + 2 * 20, (name, steps)
    assert not {(d, s) for d, s in zscore if d not in spiky | stepping}
    silences = [r for r in rows if r["rule"] == "silent"]
    assert [r["device"] for r in silences].count(silent) == 1
    # The others fell silent only once the stream had ended (`time`: when last heard from).
    assert all(r["time"] >= last_step_at for r in silences if r["device"] != silent)
