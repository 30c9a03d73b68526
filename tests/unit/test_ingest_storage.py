"""Line protocol for InfluxDB, daily partition arithmetic, migrations and metric names."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from prometheus_client import CollectorRegistry

from kubiot_contract.telemetry import RejectReason
from kubiot_ingest.metrics import IngestMetrics
from kubiot_ingest.migrations import Layout, load_migrations, quote_ident, render
from kubiot_ingest.partitions import (
    days_to_create,
    expired,
    partition_day,
    partition_name,
    window,
)
from kubiot_ingest.records import TelemetryRow
from kubiot_ingest.sinks.influx import epoch_ns, to_line_protocol

TS = datetime(2026, 11, 24, 10, 0, 0, 250000, tzinfo=UTC)


def test_line_protocol_has_one_line_per_sample() -> None:
    rows: list[TelemetryRow] = [
        (TS, "pump-1", "", 7, "flow", 12.5, None),
        (TS, "pump-1", "", 7, "mode", None, 'eco "max"'),
        (TS, "pump-1", "", 7, "on", 1.0, None),
        (TS, "pump 2", "vibration", 8, "rms,x", 3.0, None),
    ]
    assert to_line_protocol("acme", rows) == [
        'telemetry,tenant=acme,device=pump-1 flow=12.5,mode="eco \\"max\\"",on=1.0,seq=7i '
        "1795514400250000000",
        r"telemetry,tenant=acme,device=pump\ 2,stream=vibration rms\,x=3.0,seq=8i "
        "1795514400250000000",
    ]


def test_epoch_nanoseconds_are_exact() -> None:
    assert epoch_ns(datetime(1970, 1, 1, tzinfo=UTC)) == 0
    assert epoch_ns(TS) == 1795514400_250000000


def test_partitions_are_named_by_day() -> None:
    assert partition_name(date(2026, 11, 24)) == "telemetry_p20261124"
    assert partition_day("telemetry_p20261124") == date(2026, 11, 24)
    assert partition_day("telemetry_default") is None


def test_only_days_inside_the_window_get_a_partition() -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    first, last = window(now, retention_days=30, ahead_days=2)
    assert (first, last) == (date(2026, 10, 26), date(2026, 11, 27))
    times = [now, now - timedelta(days=1), now + timedelta(days=10),
             now - timedelta(days=400), now]
    assert days_to_create(times, {date(2026, 11, 25)}, first, last) == [date(2026, 11, 24)]


def test_partitions_expire_once_all_their_rows_are_past_retention() -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    days = {date(2026, 10, 25), date(2026, 10, 26), date(2026, 11, 25)}
    # 30 days back is 2026-10-26 12:00: the 25th is wholly older, the 26th is not.
    assert expired(days, now, retention_days=30) == [date(2026, 10, 25)]


def test_migrations_are_versioned_per_layout() -> None:
    native = load_migrations(Layout.NATIVE)
    timescale = load_migrations(Layout.TIMESCALE)
    assert [m.version for m in native] == [m.version for m in timescale] == [1, 2, 3]
    assert "PARTITION BY RANGE" in native[1].sql
    assert "create_hypertable" in timescale[1].sql
    assert native[0] == timescale[0]
    sql = render(native[0], 'tenant_"x')
    assert '"tenant_""x".dead_letter' in sql
    assert "{{schema}}" not in sql
    assert quote_ident("tenant_acme") == '"tenant_acme"'


def test_metric_names_are_the_ones_dashboards_use() -> None:
    registry = CollectorRegistry()
    metrics = IngestMetrics(registry, "acme")
    metrics.received.inc(3)
    metrics.rows_written("postgres", 10)
    metrics.rejected("bad_json")
    metrics.batch_size.observe(3)
    metrics.commit_duration("postgres", 0.01)
    metrics.lag.observe(0.2)
    metrics.queue_depth.set(4)
    metrics.database_errors.inc()
    metrics.broker_connected.set(1)
    metrics.database_up.set(1)
    value = registry.get_sample_value
    t = {"tenant": "acme"}
    assert value("kubiot_ingest_messages_received_total", t) == 3
    assert value("kubiot_ingest_rows_written_total", {**t, "sink": "postgres"}) == 10
    assert value("kubiot_ingest_messages_rejected_total", {**t, "reason": "bad_json"}) == 1
    assert value("kubiot_ingest_batch_size_count", t) == 1
    assert value("kubiot_ingest_commit_duration_seconds_count", {**t, "sink": "postgres"}) == 1
    assert value("kubiot_ingest_lag_seconds_count", t) == 1
    assert value("kubiot_ingest_queue_depth", t) == 4
    assert value("kubiot_ingest_database_errors_total", t) == 1
    assert value("kubiot_ingest_broker_connected", t) == 1
    assert value("kubiot_ingest_database_up", t) == 1


def test_every_reject_reason_is_exported_from_zero() -> None:
    # rate() cannot see a counter's first increment: a reason first seen in a burst would
    # otherwise never reach KubiotIngestRejectingMessages.
    registry = CollectorRegistry()
    IngestMetrics(registry, "acme")
    for reason in RejectReason:
        assert registry.get_sample_value("kubiot_ingest_messages_rejected_total",
                                         {"tenant": "acme", "reason": reason.value}) == 0
