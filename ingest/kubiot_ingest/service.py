"""The ingest service: broker → inbox → batches → PostgreSQL (and InfluxDB) → acknowledgements."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry

from kubiot_contract.telemetry import RejectReason
from kubiot_contract.topics import (
    IdentityKind,
    device_root,
    gateway_root,
    health_topic,
    ingest_shared_subscriptions,
)
from kubiot_ingest.anomaly import AnomalyDetector, Finding, judge_stored
from kubiot_ingest.batcher import Batch, Batcher, single
from kubiot_ingest.config import IngestSettings
from kubiot_ingest.metrics import IngestMetrics
from kubiot_ingest.records import (
    DeadLetter,
    InboundMessage,
    Outcome,
    SampleKey,
    StoredWindow,
    classify,
    dead_letter,
)
from kubiot_ingest.server import MetricsServer, build_app
from kubiot_ingest.sinks.influx import InfluxSink
from kubiot_ingest.sinks.postgres import (
    AnomalyRow,
    PostgresSink,
    WriteFailure,
    write_failure,
)
from kubiot_ingest.subscriber import Inbox, Subscriber

log = logging.getLogger(__name__)

MAINTENANCE_INTERVAL_S = 3600.0
FIRST_RETRY_DELAY_S = 0.1
INFLUX_ATTEMPTS = 3
LAG_SAMPLES_PER_BATCH = 100
#: Messages classified between two turns of the event loop while a batch is being committed.
CLASSIFY_SLICE = 500
#: How much of a quarantined message's payload goes into the log line.
LOGGED_PAYLOAD_BYTES = 200
#: How often silent devices are looked for and due health reports published.
HEALTH_TICK_S = 0.25
#: Silences found and reports made at most per tick (the rest wait for the next ones): a
#: whole fleet falling silent at once, or a restart meeting every device anew, must not hold
#: the event loop for seconds.
HEALTH_PER_TICK = 500
#: Anomalies waiting to be recorded at most (the database away); the oldest go first.
MAX_PENDING_ANOMALIES = 100_000

Entries = Sequence[tuple[InboundMessage, Outcome]]
#: A batch (or part of one) written, and which of its samples were new (None: all).
Written = tuple[Batch, frozenset[SampleKey] | None]


def utcnow() -> datetime:
    return datetime.now(UTC)


def postgres_sink(settings: IngestSettings) -> PostgresSink:
    """The tenant's PostgreSQL sink, as the service configures it."""
    return PostgresSink(
        settings.database_dsn.get_secret_value(), settings.schema_name,
        retention_days=settings.retention_days,
        compress_after_days=settings.compress_after_days,
        ahead_days=settings.partitions_ahead_days)


class IngestService:
    """One tenant's ingest pipeline. `run()` returns the process exit code."""

    def __init__(self, settings: IngestSettings, registry: CollectorRegistry | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = IngestMetrics(self.registry, settings.tenant)
        self.clock = clock
        self.window = StoredWindow(retention=timedelta(days=settings.retention_days),
                                   max_future_skew=timedelta(seconds=settings.max_future_skew_s))
        self.sink = postgres_sink(settings)
        self.influx: InfluxSink | None = None
        if settings.influx_url and settings.influx_org and settings.influx_bucket:
            token = settings.influx_token.get_secret_value() if settings.influx_token else None
            self.influx = InfluxSink(settings.influx_url, settings.influx_org,
                                     settings.influx_bucket, token, settings.tenant)
        self._stop = asyncio.Event()
        self._stop_deadline: float | None = None
        self._inbox: Inbox | None = None
        self._batcher: Batcher | None = None
        self._committing_messages = 0
        self._database_up = False
        self._broker_up = False
        rules = settings.active_anomaly_rules
        self.detector = AnomalyDetector(rules) if rules is not None else None
        #: Anomalies found and not recorded yet, and when the health tick may next try to.
        self._anomaly_rows: list[AnomalyRow] = []
        self._anomalies_retry_at = 0.0

    # --- state ---------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if self._stop.is_set():
            return False, "stopping"
        if not self._database_up:
            return False, "database unavailable"
        if not self._broker_up:
            return False, "broker not connected"
        return True, "ready"

    def request_stop(self) -> None:
        """Stop taking messages, flush what was taken, acknowledge it, and return from run()."""
        if not self._stop.is_set():
            log.info("stopping: flushing what was received")
            self._stop_deadline = time.monotonic() + self.settings.shutdown_timeout_s
            self._stop.set()
            if self._inbox is not None:
                self._inbox.wake()

    def _set_database(self, up: bool) -> None:
        if up != self._database_up:
            log.log(logging.INFO if up else logging.WARNING,
                    "database %s", "available" if up else "unavailable")
        self._database_up = up
        self.metrics.database_up.set(1 if up else 0)

    def _set_broker(self, up: bool) -> None:
        self._broker_up = up
        self.metrics.broker_connected.set(1 if up else 0)

    # --- run -----------------------------------------------------------------------------

    async def run(self) -> int:
        self.metrics.database_up.set(0)
        self.metrics.broker_connected.set(0)
        server = MetricsServer(build_app(self.registry, self.ready),
                               self.settings.metrics_host, self.settings.metrics_port)
        await server.start()
        try:
            if not await self._connect_database():
                return 0
            inbox = self._inbox = Inbox(self.settings.queue_max)
            subscriber = Subscriber(
                self.settings,
                ingest_shared_subscriptions(self.settings.tenant, self.settings.share_group),
                inbox, self._set_broker, self._report_published)
            connection = asyncio.create_task(subscriber.run(), name="broker connection")
            # Should the connection task fail, the consumer must not sleep through it.
            connection.add_done_callback(lambda _: inbox.wake())
            try:
                await self._consume(inbox, subscriber, connection)
            finally:
                subscriber.stop_taking()
                await subscriber.disconnect()
                connection.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connection
                self._set_broker(False)
        finally:
            await self.sink.close()
            if self.influx is not None:
                await self.influx.close()
            await server.stop()
        log.info("stopped")
        return 0

    async def _connect_database(self) -> bool:
        """Connect and migrate, retrying until it works; False if asked to stop meanwhile."""
        delay = FIRST_RETRY_DELAY_S
        while not self._stop.is_set():
            try:
                await self.sink.connect(self.clock())
            except Exception as exc:
                self._database_failed(exc)
                await self._pause(delay)
                delay = min(delay * 2, self.settings.retry_max_delay_s)
                continue
            self._set_database(True)
            log.info("database schema %s ready (%s layout)", self.settings.schema_name,
                     self.sink.layout)
            return True
        return False

    def _database_failed(self, exc: BaseException) -> None:
        self._set_database(False)
        self.metrics.database_errors.inc()
        log.warning("database error (will retry): %s: %s", type(exc).__name__, exc)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up early when a stop is requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _consume(self, inbox: Inbox, subscriber: Subscriber,
                       connection: asyncio.Task[None]) -> None:
        s = self.settings
        batcher = Batcher(s.batch_size, s.batch_max_delay_s)
        next_maintenance = time.monotonic() + MAINTENANCE_INTERVAL_S
        # One batch commits while the next one is built: parsing overlaps the database's work,
        # and commits (so acknowledgements) stay in the order the messages came.
        self._batcher = batcher
        committing: asyncio.Task[bool] | None = None
        taking = True
        next_health = time.monotonic() if self.detector is not None else math.inf
        while True:
            if connection.done():
                connection.result()  # the connection task only ends by failing: surface it
            if taking and self._stop.is_set():
                subscriber.stop_taking()
                taking = False
            now = time.monotonic()
            if not len(inbox) and not batcher.is_due(now):
                if not taking and not batcher.pending_messages:
                    break
                deadline = batcher.deadline()
                wake_at = min(next_maintenance, next_health)
                if deadline is not None:
                    wake_at = min(wake_at, deadline)
                if taking:
                    await inbox.wait(max(0.0, wake_at - now))
            # Every message adds at least one row (or is merged), so this never overfills.
            drained = inbox.drain(batcher.room())
            if drained:
                self.metrics.received.inc(len(drained))
            for start in range(0, len(drained), CLASSIFY_SLICE):
                if committing is not None and not committing.done():
                    # The commit needs this loop between its round trips: let it take its
                    # next step, so that it progresses while the next batch is classified.
                    await asyncio.sleep(0)
                for message in drained[start:start + CLASSIFY_SLICE]:
                    batcher.add(message, self._classify(message), now)
            flush = batcher.is_due(time.monotonic()) or (not taking and not len(inbox))
            if flush and batcher.pending_messages:
                if committing is not None and not await committing:
                    return  # stopping while the database is down: the broker redelivers
                batch = batcher.take()
                self._committing_messages = batch.messages
                committing = asyncio.create_task(self._commit_and_ack(batch, subscriber))
            self._update_queue_depth()
            if time.monotonic() >= next_health:
                next_health = time.monotonic() + HEALTH_TICK_S
                self._watch_health(subscriber)
                if self._anomaly_rows and (committing is None or committing.done()) \
                        and time.monotonic() >= self._anomalies_retry_at:
                    # Nothing is being committed: record the silences found meanwhile.
                    if committing is not None and not committing.result():
                        return
                    committing = asyncio.create_task(self._record_anomalies())
            if time.monotonic() >= next_maintenance:
                next_maintenance = time.monotonic() + MAINTENANCE_INTERVAL_S
                if committing is not None:
                    await committing
                await self._maintain()
        if committing is not None:
            await committing
        if self._anomaly_rows and self._database_up:
            await self._record_anomalies()

    async def _commit_and_ack(self, batch: Batch, subscriber: Subscriber) -> bool:
        if not await self._commit(batch):
            return False
        subscriber.ack(batch.receipts)
        self._committing_messages = 0
        self._update_queue_depth()
        if self._anomaly_rows:
            await self._record_anomalies()
        return True

    def _update_queue_depth(self) -> None:
        """Messages received and not yet acknowledged: inbox, batch being built, committing."""
        building = self._batcher.pending_messages if self._batcher is not None else 0
        inbox = len(self._inbox) if self._inbox is not None else 0
        self.metrics.queue_depth.set(inbox + building + self._committing_messages)

    def _classify(self, message: InboundMessage) -> Outcome:
        s = self.settings
        try:
            return classify(message, s.tenant, s.max_payload_bytes, self.window)
        except Exception as exc:
            # classify() refuses whatever a device can send with a reason; reaching this is a
            # bug, and the message must not hold back the ones behind it.
            return self._quarantine(message, "classifying", exc)

    def _quarantine(self, message: InboundMessage, stage: str, exc: Exception) -> DeadLetter:
        self.metrics.quarantined.inc()
        log.error("quarantined a message: %s it raised %s: %s (topic %r, payload %r)",
                  stage, type(exc).__name__, exc, message.topic,
                  message.payload[:LOGGED_PAYLOAD_BYTES], exc_info=exc)
        return dead_letter(message, RejectReason.QUARANTINED,
                           f"{stage} it raised {type(exc).__name__}: {exc}")

    async def _commit(self, batch: Batch) -> bool:
        """Write the batch, retrying until it is committed; False if stopping runs out of time.

        Only database failures are retried. Messages whose data the database refuses, or on
        which the write fails for no known reason, are found by splitting the batch and kept as
        dead letters, so that they cannot hold back the stream.
        """
        delay = FIRST_RETRY_DELAY_S
        while True:
            refused: list[DeadLetter] = []
            written: list[Written] = []
            try:
                started = time.perf_counter()
                inserted = await self._write_isolating(batch.entries, refused, written,
                                                       whole=batch)
                self.metrics.commit_duration("postgres", time.perf_counter() - started)
                break
            except Exception as exc:
                # Only database failures get here: connecting (whatever it raised) or writing.
                self._database_failed(exc)
                if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                    log.warning("giving up on %d messages at shutdown; the broker keeps them",
                                batch.messages)
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max_delay_s)
        self._set_database(True)
        self._record(batch, inserted, refused)
        if self.detector is not None:
            self._evaluate(self.detector, written)
        if self.influx is not None and batch.telemetry:
            await self._write_influx(batch)
        return True

    async def _write_isolating(self, entries: Entries, refused: list[DeadLetter],
                               written: list[Written], whole: Batch | None = None) -> int:
        """Write `entries`, halving them around the messages the write fails on; those become
        dead letters (added to `refused`), what was stored is added to `written`. Returns the
        telemetry rows inserted; raises only on a database failure."""
        batch = whole if whole is not None else _batch_of(entries)
        await self.sink.connect(self.clock())
        try:
            result = await self.sink.write(batch, self.clock())
            written.append((batch, result.fresh))
            return result.telemetry_rows
        except Exception as exc:
            failure = write_failure(exc)
            if failure is WriteFailure.DATABASE:
                raise
            problem = exc
        if len(entries) > 1:
            log.warning("the write of %d messages failed (%s: %s); splitting them",
                        len(entries), type(problem).__name__, problem)
            half = len(entries) // 2
            return (await self._write_isolating(entries[:half], refused, written)
                    + await self._write_isolating(entries[half:], refused, written))
        message, _ = entries[0]
        if failure is WriteFailure.DATA:
            letter = dead_letter(message, RejectReason.BAD_SCHEMA,
                                 f"database refused it: {problem}")
        else:
            letter = self._quarantine(message, "writing", problem)
        await self._keep_dead_letter(message, letter)
        refused.append(letter)
        return 0

    async def _keep_dead_letter(self, message: InboundMessage, letter: DeadLetter) -> None:
        await self.sink.connect(self.clock())
        try:
            await self.sink.write(single(message, letter), self.clock())
        except Exception as exc:
            if write_failure(exc) is WriteFailure.DATABASE:
                raise
            # A dead letter holds only cleaned text and raw bytes, so this is a bug. Holding the
            # message back would stop the tenant's stream for good: log it and let it go.
            self.metrics.quarantined.inc()
            log.error("could not keep a message even as a dead letter (%s: %s); dropping it "
                      "(topic %r, payload %r)", type(exc).__name__, exc, message.topic,
                      message.payload[:LOGGED_PAYLOAD_BYTES], exc_info=exc)

    def _record(self, batch: Batch, inserted: int, refused: list[DeadLetter]) -> None:
        m = self.metrics
        m.batch_size.observe(batch.messages)
        m.rows_written("postgres", inserted)
        for letter in [*batch.dead_letters, *refused]:
            m.rejected(letter.reason.value)
        committed_at = self.clock()
        # Observing is not free: a large batch is sampled evenly, LAG_SAMPLES_PER_BATCH at most.
        times = batch.sample_times
        step = max(1, len(times) // LAG_SAMPLES_PER_BATCH)
        for sampled_at in times[::step]:
            m.lag.observe(max(0.0, (committed_at - sampled_at).total_seconds()))

    # --- anomalies and health reports --------------------------------------------------------

    def _evaluate(self, detector: AnomalyDetector, written: list[Written]) -> None:
        """Judge the samples the commit stored (a redelivered one was judged when it was new)."""
        found: list[Finding] = []
        for batch, fresh in written:
            found += judge_stored(detector, batch.entries, fresh)
        if found:
            self._found(found)

    def _found(self, found: list[Finding]) -> None:
        detected_at = self.clock()
        rows = self._anomaly_rows
        for finding in found:
            a = finding.anomaly
            self.metrics.anomalies(a.rule.value)
            rows.append((finding.device, a.metric or "", a.time, a.rule.value, a.value, a.low,
                         a.high, detected_at))
            log.debug("anomaly: %s %s %s: %s (expected %s to %s)", a.rule.value,
                      finding.device, a.metric or "-", a.value, a.low, a.high)
        if len(rows) > MAX_PENDING_ANOMALIES:
            dropped = len(rows) - MAX_PENDING_ANOMALIES
            del rows[:dropped]
            log.warning("%d anomalies were not recorded: the database is away", dropped)

    async def _record_anomalies(self) -> bool:
        """Write the anomalies found so far; on a database failure they wait for the next
        commit. Always True: it never holds back acknowledgements."""
        rows, self._anomaly_rows = self._anomaly_rows, []
        try:
            await self.sink.connect(self.clock())
            await self.sink.write_anomalies(rows)
            self._set_database(True)
        except Exception as exc:
            if write_failure(exc) is WriteFailure.DATABASE:
                self._database_failed(exc)
                self._anomaly_rows[:0] = rows
                self._anomalies_retry_at = time.monotonic() + self.settings.retry_max_delay_s
            else:
                log.error("could not record %d anomalies (%s: %s); dropping them", len(rows),
                          type(exc).__name__, exc, exc_info=exc)
        return True

    def _watch_health(self, subscriber: Subscriber) -> None:
        """Find the devices that fell silent, and publish the health reports that are due."""
        detector = self.detector
        assert detector is not None
        now = self.clock()
        silent = detector.silences(now, HEALTH_PER_TICK)
        if silent:
            self._found(silent)
            for finding in silent:
                log.info("device %s is silent (last heard from at %s)", finding.device,
                         finding.anomaly.time.isoformat())
        tenant = self.settings.tenant
        for (kind, name), report in detector.reports_due(now, HEALTH_PER_TICK):
            root = (device_root(tenant, name) if kind is IdentityKind.DEVICE
                    else gateway_root(tenant, name))
            subscriber.publish(health_topic(root), report.encode())
        subscriber.send_publishes()
        self.metrics.silent_devices.set(detector.silent_devices)
        self.metrics.anomaly_devices.set(detector.devices)

    def _report_published(self, delivered: bool, count: int) -> None:
        if delivered:
            self.metrics.health_reports.inc(count)
        else:
            self.metrics.health_reports_lost.inc(count)

    async def _write_influx(self, batch: Batch) -> None:
        # PostgreSQL is the record: InfluxDB gets a few attempts and never holds back acks.
        assert self.influx is not None
        for attempt in range(INFLUX_ATTEMPTS):
            started = time.perf_counter()
            try:
                written = await self.influx.write(batch.telemetry)
            except Exception as exc:
                self.metrics.sink_error("influx")
                log.warning("InfluxDB write failed (attempt %d): %s", attempt + 1, exc)
                await asyncio.sleep(FIRST_RETRY_DELAY_S * 2**attempt)
                continue
            self.metrics.commit_duration("influx", time.perf_counter() - started)
            self.metrics.rows_written("influx", written)
            return

    async def _maintain(self) -> None:
        try:
            dropped = await self.sink.maintain(self.clock())
            await self.sink.forget_anomalies(self.clock())
        except Exception as exc:
            self._database_failed(exc)
            return
        if dropped:
            log.info("dropped expired telemetry partitions: %s", dropped)


def _batch_of(entries: Entries) -> Batch:
    batch = Batch()
    for message, outcome in entries:
        batch.add(message, outcome)
    return batch
