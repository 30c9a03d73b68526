"""Hostile messages mixed into a tenant's normal traffic, through a real Mosquitto, PostgreSQL and
`kubiot-ingest` process: every valid sample is stored once, every hostile message is a dead
letter with its reason, and the process never restarts."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from kubiot_contract.topics import device_root
from kubiot_operator.local.postgres import PostgresServer, postgres_server
from tests.support.ingest import (
    IngestProcess,
    Publisher,
    broker_for_tenant,
    ingest_environment,
    process_ready,
    sample,
)
from tests.support.waiting import async_wait_until

TENANT = "hostile"
DEVICES = 3
SAMPLES_PER_DEVICE = 200


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


def hostile_messages(now: datetime) -> list[tuple[str, bytes, str]]:
    """(topic, payload, the reason it must be dead-lettered with)."""
    root = device_root(TENANT, "dev-0")

    def telemetry(ts: object, **values: Any) -> bytes:
        return json.dumps({"ts": ts, "seq": 1, "values": values or {"flow": 1}}).encode()

    return [
        # Each of these stopped the ingest before: it raised, exited, and met the same
        # unacknowledged message again after every restart.
        (f"{root}/telemetry", b'{"ts": 1, "values": {"flow": 1' + b"0" * 400 + b"}}",
         "bad_schema"),
        (f"{root}/telemetry", telemetry("9999-12-31T23:30:00-01:00"), "bad_schema"),
        (f"{root}/telemetry", telemetry("0001-01-01T00:30:00+01:00"), "bad_schema"),
        (f"{root}/state/reported", b"[" * 100_000 + b"]" * 100_000, "bad_json"),
        (f"{root}/state/reported", b'{"nested": ' + b"[" * 5000 + b"]" * 5000 + b"}",
         "bad_json"),
        # Accepted before, then refused by jsonb or by PostgreSQL text in the batch.
        (f"{root}/state/reported", b'{"load": 1e400}', "bad_schema"),
        (f"{root}/state/reported", b'{"name": "\\ud800"}', "bad_json"),
        (f"{root}/state/reported", b'{"name": "a\\u0000b"}', "bad_schema"),
        (f"{root}/telemetry", telemetry(now.isoformat(), mode="eco\u0000"), "bad_schema"),
        # Accepted before, then deleted by retention: outside the stored window.
        (f"{root}/telemetry", telemetry("1970-01-01T00:00:00Z"), "outside_window"),
        (f"{root}/telemetry", telemetry(0), "outside_window"),
        (f"{root}/telemetry", telemetry((now + timedelta(days=2)).isoformat()),
         "outside_window"),
        # (Topics with a control character, which parse_topic once let through, never get
        # here: Mosquitto disconnects a client that publishes one.)
        (f"{root}/telemetry/Not_A_Stream", telemetry(now.isoformat()), "bad_topic"),
        # Plain garbage.
        (f"{root}/telemetry", b"\xff\xfe\x00garbage", "bad_json"),
        (f"{root}/telemetry", telemetry(now.isoformat())[:-7], "bad_json"),
        (f"{root}/telemetry", b'{"ts": 1e400, "values": {"flow": 1e400}}', "bad_schema"),
        (f"{root}/presence", b"\xed\xa0\x80", "bad_schema"),
        (f"{root}/telemetry", b'{"ts": 1, "values": {"a": "' + b"x" * 300_000 + b'"}}',
         "too_large"),
    ]


def valid_messages() -> list[tuple[str, bytes]]:
    return [(f"{device_root(TENANT, f'dev-{d}')}/telemetry", json.dumps(sample(seq)).encode())
            for seq in range(SAMPLES_PER_DEVICE) for d in range(DEVICES)]


def interleave(valid: list[tuple[str, bytes]],
               hostile: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The hostile messages spread evenly through the valid ones."""
    step = max(1, len(valid) // (len(hostile) + 1))
    mixed: list[tuple[str, bytes]] = []
    for index, message in enumerate(valid):
        if index % step == step - 1 and hostile:
            mixed.append(hostile.pop(0))
        mixed.append(message)
    return mixed + hostile


async def fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def scalar(dsn: str, sql: str) -> int:
    return int((await fetch(dsn, sql))[0][0])


async def metric(process: IngestProcess, name: str) -> float:
    async with aiohttp.ClientSession() as session, \
            session.get(f"{process.metrics_url}/metrics") as response:
        text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{"))


async def test_hostile_messages_mixed_into_traffic(postgres: PostgresServer,
                                                   tmp_path: Path) -> None:
    now = datetime.now(UTC)
    hostile = hostile_messages(now)
    valid = valid_messages()
    mixed = interleave(valid, [(topic, payload) for topic, payload, _ in hostile])
    with broker_for_tenant(TENANT) as (_, access):
        process = IngestProcess(ingest_environment(TENANT, access, postgres.dsn),
                                tmp_path / "ingest.log").start()
        try:
            await async_wait_until(lambda: process_ready(process), timeout=20,
                                   message="ingest ready")
            assert process.process is not None
            pid = process.process.pid
            with Publisher(access) as publisher:
                await asyncio.to_thread(publisher.publish_all, mixed)
            schema = f"tenant_{TENANT}"
            expected_rows = len(valid) * 2  # two metrics per sample

            async def settled() -> bool:
                assert process.process is not None and process.process.poll() is None, \
                    process.log()
                return (await scalar(postgres.dsn, f"SELECT count(*) FROM {schema}.telemetry")
                        >= expected_rows
                        and await scalar(postgres.dsn,
                                         f"SELECT count(*) FROM {schema}.dead_letter")
                        >= len(hostile)
                        and await metric(process, "kubiot_ingest_queue_depth") == 0)

            await async_wait_until(settled, timeout=60, interval=0.2,
                                   message="every message stored or dead-lettered")

            # Every valid sample exactly once, counted by (device, seq).
            per_sample = await fetch(postgres.dsn, f"SELECT device, seq, count(*) AS rows "
                                     f"FROM {schema}.telemetry GROUP BY device, seq")
            assert len(per_sample) == DEVICES * SAMPLES_PER_DEVICE
            assert {row["rows"] for row in per_sample} == {2}
            assert {(row["device"], row["seq"]) for row in per_sample} == {
                (f"dev-{d}", seq) for d in range(DEVICES) for seq in range(SAMPLES_PER_DEVICE)}

            # Every hostile message a dead letter, with its reason and its bytes.
            letters = await fetch(postgres.dsn, f"SELECT topic, payload, reason, detail "
                                  f"FROM {schema}.dead_letter")
            assert Counter(row["reason"] for row in letters) == Counter(
                reason for _, _, reason in hostile)
            assert Counter((row["topic"], bytes(row["payload"])) for row in letters) == Counter(
                (topic, payload) for topic, payload, _ in hostile)
            assert all(row["detail"] for row in letters)

            # The same process all along, and nothing it failed on without a reason.
            assert process.process.poll() is None
            assert process.process.pid == pid
            assert await metric(process, "kubiot_ingest_messages_quarantined_total") == 0
            assert await metric(process, "kubiot_ingest_messages_received_total") == len(mixed)
            assert "Traceback" not in process.log()
            assert process.terminate() == 0
        finally:
            process.stop()
