"""What every kind with broker access shares: its condition, and how a broker error shows."""

from __future__ import annotations

import logging

from kubiot_operator.brokers import BrokerError, SyncResult
from kubiot_operator.reconcile.conditions import ConditionUpdate

from .platform import Outcome, Platform

log = logging.getLogger(__name__)

ACCESS_READY = "AccessReady"
#: How soon a resource whose Tenant does not exist yet is looked at again.
TENANT_RETRY_SECONDS = 3.0
BROKER_RETRY_SECONDS = 10.0


def broker_failure(platform: Platform, exc: BrokerError, outcome: Outcome) -> ConditionUpdate:
    """A broker error as a condition; retryable ones schedule a retry."""
    platform.metrics.broker_errors.labels(platform.broker_kind, type(exc).__name__).inc()
    if exc.retryable:
        outcome.retry_after, outcome.retry_reason = BROKER_RETRY_SECONDS, exc.reason
    else:
        outcome.warning(exc.reason, str(exc))
    return ConditionUpdate(ACCESS_READY, False, exc.reason, str(exc))


def count_drift(platform: Platform, tenant: str, username: str, result: SyncResult) -> None:
    """Count broker writes a reconcile made to access it had already applied: the broker had
    lost or changed it (an identity deleted by hand, a broker restored from an old backup), so
    they are drift repairs, like the periodic resync's."""
    if result.writes:
        platform.metrics.drift_repairs.labels(tenant, "reconcile").inc(result.writes)
        log.info("drift repaired for %s: %s", username, "; ".join(result.details) or
                 f"{result.writes} broker writes")
