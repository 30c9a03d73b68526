"""A planned recheck is raised to kopf as a TemporaryError, which kopf logs at ERROR and posts
as an Error event: the filter takes it down to DEBUG; real temporary failures stay errors."""

from __future__ import annotations

import logging

import pytest

from kubiot_operator.handlers import PLANNED_RECHECK, PlannedRecheckFilter


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logger() -> logging.Logger:
    log = logging.getLogger("kubiot-test.kopf.objects")
    log.filters.clear()
    log.handlers.clear()
    log.propagate = False
    log.addFilter(PlannedRecheckFilter())
    log.addHandler(Collect())
    return log


def collected(log: logging.Logger) -> list[tuple[str, str]]:
    handler = log.handlers[0]
    assert isinstance(handler, Collect)
    return [(r.levelname, r.getMessage()) for r in handler.records]


def test_a_planned_recheck_is_not_logged_as_an_error(logger: logging.Logger) -> None:
    logger.setLevel(logging.INFO)
    logger.error(f"Handler 'reconcile' failed temporarily: {PLANNED_RECHECK}: WaveInProgress")
    assert collected(logger) == []

    logger.setLevel(logging.DEBUG)
    logger.error(f"Handler 'recheck' failed temporarily: {PLANNED_RECHECK}: Soaking")
    assert collected(logger) == [
        ("DEBUG", f"Handler 'recheck' failed temporarily: {PLANNED_RECHECK}: Soaking")]


def test_a_real_temporary_failure_stays_an_error(logger: logging.Logger) -> None:
    logger.setLevel(logging.INFO)
    logger.error("Handler 'reconcile' failed temporarily: BrokerUnavailable: connection lost")
    logger.info("Handler 'reconcile' succeeded.")
    assert [level for level, _ in collected(logger)] == ["ERROR", "INFO"]
