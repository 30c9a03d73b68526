"""The Prometheus metrics of the ingest service, on a registry the caller owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kubiot_contract.health import AnomalyRule
from kubiot_contract.telemetry import RejectReason

BATCH_SIZE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000)
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class IngestMetrics:
    """Every metric the dashboards and alerts read, labelled with the tenant."""

    def __init__(self, registry: CollectorRegistry, tenant: str) -> None:
        self.registry = registry
        self.tenant = tenant
        t = ("tenant",)
        self._received = Counter(
            "kubiot_ingest_messages_received_total", "MQTT messages received.", t,
            registry=registry)
        self._rows = Counter(
            "kubiot_ingest_rows_written_total", "Telemetry rows committed, by sink.",
            (*t, "sink"), registry=registry)
        self._rejected = Counter(
            "kubiot_ingest_messages_rejected_total",
            "Messages stored in the dead-letter table, by reason.", (*t, "reason"),
            registry=registry)
        self._quarantined = Counter(
            "kubiot_ingest_messages_quarantined_total",
            "Messages the ingest failed on unexpectedly, kept as dead letters (reason "
            "quarantined).", t, registry=registry)
        self._batch_size = Histogram(
            "kubiot_ingest_batch_size", "Messages per committed batch.", t,
            buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self._commit = Histogram(
            "kubiot_ingest_commit_duration_seconds", "Time to write and commit a batch.",
            (*t, "sink"), buckets=COMMIT_BUCKETS, registry=registry)
        self._lag = Histogram(
            "kubiot_ingest_lag_seconds", "Commit time minus the device's sample timestamp.", t,
            buckets=LAG_BUCKETS, registry=registry)
        self._queue = Gauge(
            "kubiot_ingest_queue_depth", "Messages received and not yet acknowledged.", t,
            registry=registry)
        self._db_errors = Counter(
            "kubiot_ingest_database_errors_total", "Failed database operations (retried).", t,
            registry=registry)
        self._sink_errors = Counter(
            "kubiot_ingest_sink_errors_total", "Failed writes to an optional sink.",
            (*t, "sink"), registry=registry)
        self._broker_connected = Gauge(
            "kubiot_ingest_broker_connected", "1 while connected to the broker.", t,
            registry=registry)
        self._database_up = Gauge(
            "kubiot_ingest_database_up", "1 while the database accepts writes.", t,
            registry=registry)
        self._anomalies = Counter(
            "kubiot_ingest_anomalies_total",
            "Anomalies found in stored telemetry, by rule (bounds, zscore, silent).",
            (*t, "rule"), registry=registry)
        self._silent = Gauge(
            "kubiot_ingest_silent_devices",
            "Devices this replica has found silent and not heard from since.", t,
            registry=registry)
        self._watched = Gauge(
            "kubiot_ingest_anomaly_devices",
            "Devices whose anomaly detection state this replica keeps.", t, registry=registry)
        self._reports = Counter(
            "kubiot_ingest_health_reports_total",
            "Device health reports published and acknowledged by the broker.", t,
            registry=registry)
        self._reports_lost = Counter(
            "kubiot_ingest_health_reports_lost_total",
            "Device health reports not delivered: the connection ended before the broker "
            "acknowledged them, the broker refused them, or too many were in flight.", t,
            registry=registry)
        # Every reason from 0: a counter born with its first increment hides that increment
        # from rate(), so a burst of one new reason would never reach the rejection alert.
        for reason in RejectReason:
            self._rejected.labels(tenant, reason.value)
        for rule in AnomalyRule:
            self._anomalies.labels(tenant, rule.value)
        self.received = self._received.labels(tenant)
        self.quarantined = self._quarantined.labels(tenant)
        self.batch_size = self._batch_size.labels(tenant)
        self.lag = self._lag.labels(tenant)
        self.queue_depth = self._queue.labels(tenant)
        self.database_errors = self._db_errors.labels(tenant)
        self.broker_connected = self._broker_connected.labels(tenant)
        self.database_up = self._database_up.labels(tenant)
        self.silent_devices = self._silent.labels(tenant)
        self.anomaly_devices = self._watched.labels(tenant)
        self.health_reports = self._reports.labels(tenant)
        self.health_reports_lost = self._reports_lost.labels(tenant)

    def rows_written(self, sink: str, count: int) -> None:
        self._rows.labels(self.tenant, sink).inc(count)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self.tenant, reason).inc()

    def anomalies(self, rule: str, count: int = 1) -> None:
        self._anomalies.labels(self.tenant, rule).inc(count)

    def commit_duration(self, sink: str, seconds: float) -> None:
        self._commit.labels(self.tenant, sink).observe(seconds)

    def sink_error(self, sink: str) -> None:
        self._sink_errors.labels(self.tenant, sink).inc()
