"""Write failures by kind: the database is retried, bad data and bugs are isolated to the
messages that cause them and kept as dead letters; nothing stops the stream."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import pytest

from kubiot_contract.health import AnomalyRules, BoundsRule
from kubiot_contract.telemetry import RejectReason
from kubiot_ingest.batcher import Batch, Batcher
from kubiot_ingest.config import load_settings
from kubiot_ingest.records import DeadLetter, InboundMessage, TelemetryRecords
from kubiot_ingest.service import IngestService
from kubiot_ingest.sinks.postgres import WriteFailure, WriteResult, write_failure

RECEIVED = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
ENV = {"KUBIOT_INGEST_TENANT": "acme", "KUBIOT_INGEST_DATABASE_DSN": "postgresql://unused",
       "KUBIOT_INGEST_RETRY_MAX_DELAY_S": "0.01"}


class ClientSideDataError(asyncpg.InterfaceError, ValueError):
    """What asyncpg raises for a value it cannot encode (its own DataError is private)."""


@pytest.mark.parametrize(("exc", "failure"), [
    (ConnectionResetError(), WriteFailure.DATABASE),
    (TimeoutError(), WriteFailure.DATABASE),
    (asyncpg.CannotConnectNowError("the database system is starting up"), WriteFailure.DATABASE),
    (asyncpg.AdminShutdownError("terminating connection"), WriteFailure.DATABASE),
    (asyncpg.ConnectionDoesNotExistError("closed"), WriteFailure.DATABASE),
    (asyncpg.InterfaceError("connection is closed"), WriteFailure.DATABASE),
    (asyncpg.ReadOnlySQLTransactionError("read-only"), WriteFailure.DATABASE),
    (asyncpg.InsufficientPrivilegeError("permission denied"), WriteFailure.DATABASE),
    (asyncpg.UntranslatableCharacterError("\\u0000"), WriteFailure.DATA),
    (asyncpg.DatetimeFieldOverflowError("out of range"), WriteFailure.DATA),
    (asyncpg.CheckViolationError("check"), WriteFailure.DATA),
    (ClientSideDataError("invalid input for query argument $1"), WriteFailure.DATA),
    (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
     WriteFailure.UNEXPECTED),
    (TypeError("a bug"), WriteFailure.UNEXPECTED),
])
def test_write_failures_are_classified(exc: BaseException, failure: WriteFailure) -> None:
    assert write_failure(exc) is failure


class ScriptedSink:
    """Stands in for PostgresSink: refuses any batch holding a payload named in `refuse`
    (with the exception given there), and fails `outages` times first with a lost connection."""

    def __init__(self, refuse: dict[bytes, BaseException], outages: int = 0) -> None:
        self.refuse = refuse
        self.outages = outages
        self.committed: list[Batch] = []
        self.attempts = 0

    async def connect(self, now: datetime) -> None:
        pass

    async def write(self, batch: Batch, now: datetime) -> WriteResult:
        self.attempts += 1
        if self.outages:
            self.outages -= 1
            raise ConnectionResetError("connection reset by peer")
        for message, outcome in batch.entries:
            if isinstance(outcome, TelemetryRecords) and message.payload in self.refuse:
                raise self.refuse[message.payload]
        self.committed.append(batch)
        return WriteResult(len(batch.telemetry), len(batch.dead_letters), len(batch.seen))

    async def close(self) -> None:
        pass

    def stored(self) -> dict[bytes, RejectReason | None]:
        """Each committed message's payload: None when stored as telemetry, else its reason."""
        result: dict[bytes, RejectReason | None] = {}
        for batch in self.committed:
            for message, outcome in batch.entries:
                result[message.payload] = (outcome.reason if isinstance(outcome, DeadLetter)
                                           else None)
        return result


def service_with(sink: ScriptedSink, **env: str) -> IngestService:
    service = IngestService(load_settings({**ENV, **env}))
    service.sink = sink  # type: ignore[assignment]
    return service


def sample_payload(seq: int) -> bytes:
    return b'{"ts": "2026-11-25T11:00:00Z", "seq": %d, "values": {"flow": 1}}' % seq


def batch_of(service: IngestService, count: int) -> Batch:
    batcher = Batcher(10_000, 1.0)
    for seq in range(count):
        message = InboundMessage(seq, f"acme/devices/pump-{seq % 3}/telemetry",
                                 sample_payload(seq), RECEIVED)
        batcher.add(message, service._classify(message), 0.0)
    return batcher.take()


def metric(service: IngestService, name: str, **labels: str) -> float:
    return service.registry.get_sample_value(name, {"tenant": "acme", **labels}) or 0.0


async def test_a_data_error_dead_letters_only_the_message_it_comes_from() -> None:
    sink = ScriptedSink({sample_payload(37): asyncpg.UntranslatableCharacterError("bad")})
    service = service_with(sink)
    assert await service._commit(batch_of(service, 100))
    stored = sink.stored()
    assert len(stored) == 100
    assert stored.pop(sample_payload(37)) is RejectReason.BAD_SCHEMA
    assert set(stored.values()) == {None}
    # Halving finds it in about 2 log2(n) writes, not n.
    assert sink.attempts <= 2 * 7 + 2
    assert metric(service, "kubiot_ingest_messages_rejected_total", reason="bad_schema") == 1
    assert metric(service, "kubiot_ingest_messages_quarantined_total") == 0
    assert metric(service, "kubiot_ingest_database_errors_total") == 0


async def test_an_unexpected_error_quarantines_the_message_and_is_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    sink = ScriptedSink({sample_payload(5): TypeError("a bug in the sink")})
    service = service_with(sink)
    assert await service._commit(batch_of(service, 8))
    stored = sink.stored()
    assert stored.pop(sample_payload(5)) is RejectReason.QUARANTINED
    assert set(stored.values()) == {None}
    assert metric(service, "kubiot_ingest_messages_quarantined_total") == 1
    assert metric(service, "kubiot_ingest_messages_rejected_total", reason="quarantined") == 1
    (logged,) = [r for r in caplog.records if "quarantined" in r.getMessage()]
    assert "acme/devices/pump-2/telemetry" in logged.getMessage()
    assert '"seq": 5' in logged.getMessage()


async def test_a_lost_connection_is_retried_with_the_whole_batch() -> None:
    sink = ScriptedSink({}, outages=3)
    service = service_with(sink)
    assert await service._commit(batch_of(service, 10))
    assert sink.attempts == 4
    assert len(sink.committed) == 1 and sink.committed[0].messages == 10
    assert metric(service, "kubiot_ingest_database_errors_total") == 3
    assert metric(service, "kubiot_ingest_messages_quarantined_total") == 0


async def test_a_message_classify_fails_on_is_quarantined(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in classify")

    monkeypatch.setattr("kubiot_ingest.service.classify", broken)
    service = service_with(ScriptedSink({}))
    message = InboundMessage(1, "acme/devices/pump-1/telemetry", sample_payload(1), RECEIVED)
    letter = service._classify(message)
    assert isinstance(letter, DeadLetter)
    assert letter.reason is RejectReason.QUARANTINED
    assert "RuntimeError: a bug in classify" in letter.detail
    assert metric(service, "kubiot_ingest_messages_quarantined_total") == 1


def test_the_window_follows_the_settings() -> None:
    service = IngestService(load_settings({**ENV, "KUBIOT_INGEST_RETENTION_DAYS": "7",
                                           "KUBIOT_INGEST_MAX_FUTURE_SKEW_S": "60"}))
    assert service.window.retention.days == 7
    assert service.window.max_future_skew.total_seconds() == 60


class AnomalyRecordingSink(ScriptedSink):
    """A ScriptedSink that also records anomalies, failing `anomaly_outages` times first."""

    def __init__(self, refuse: dict[bytes, BaseException], anomaly_outages: int = 0) -> None:
        super().__init__(refuse)
        self.anomaly_outages = anomaly_outages
        self.anomalies: list[tuple[object, ...]] = []

    async def write_anomalies(self, rows: list[tuple[object, ...]]) -> int:
        if self.anomaly_outages:
            self.anomaly_outages -= 1
            raise ConnectionResetError("connection reset by peer")
        self.anomalies += rows
        return len(rows)


async def test_only_stored_telemetry_is_judged_and_anomalies_outlast_a_database_failure() -> None:
    rules = AnomalyRules(bounds=[BoundsRule(metric="flow", max=0.5)])
    sink = AnomalyRecordingSink({sample_payload(3): asyncpg.UntranslatableCharacterError("bad")},
                                anomaly_outages=1)
    service = service_with(sink, KUBIOT_INGEST_ANOMALY_RULES=rules.to_json())
    assert await service._commit(batch_of(service, 10))
    # Every stored sample's flow of 1 is out of bounds; the dead-lettered one is not judged.
    assert metric(service, "kubiot_ingest_anomalies_total", rule="bounds") == 9
    await service._record_anomalies()  # the database is away: they wait
    assert sink.anomalies == []
    await service._record_anomalies()
    assert len(sink.anomalies) == 9
    assert {row[:2] for row in sink.anomalies} == {("pump-0", "flow"), ("pump-1", "flow"),
                                                   ("pump-2", "flow")}
    assert metric(service, "kubiot_ingest_database_errors_total") == 1
