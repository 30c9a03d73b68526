"""Everything a controller needs from the outside world, in one value."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from kubiot_operator.brokers import BrokerBackend
from kubiot_operator.controllers.adapters import Messenger, Objects, TrustPublisher
from kubiot_operator.controllers.fleet import FleetIndex
from kubiot_operator.metrics import OperatorMetrics
from kubiot_operator.pki import TenantAuthority
from kubiot_operator.reconcile.health import HealthTracker
from kubiot_operator.reconcile.identity import BrokerEndpoint
from kubiot_operator.reconcile.tenant import IngestEnvironment


def utc_now() -> datetime:
    return datetime.now(UTC)


def run_token() -> str:
    """A random token for a command run's correlation ids (128 bits)."""
    return secrets.token_urlsafe(16)


@dataclass
class Platform:
    """The adapters plus the platform facts controllers decide with."""

    objects: Objects
    authority: TenantAuthority
    broker: BrokerBackend
    messenger: Messenger
    trust: TrustPublisher
    metrics: OperatorMetrics
    endpoint: BrokerEndpoint
    ingest: IngestEnvironment
    ca_namespace: str
    broker_kind: str = "mosquitto"
    # The devices, gateways and releases the watch has shown: per-object questions about the
    # fleet are answered here, never by listing the API.
    fleet: FleetIndex = field(default_factory=FleetIndex)
    clock: Callable[[], datetime] = utc_now
    # Each device's presence and telemetry health, fed by the report pump: what a release's
    # health gate judges.
    health: HealthTracker = field(default_factory=lambda: HealthTracker(utc_now()))
    token: Callable[[], str] = run_token
    # Called when a namespace's devices change, so gateways serving them are brought up to date.
    gateway_refresh: Callable[[str], None] = field(default=lambda namespace: None)
    # Called with a resource a controller created for another controller to reconcile (a
    # provisioned Device). In a cluster the API server's watch does this; the local stack
    # has no watch and runs the controller when told.
    resource_created: Callable[[dict[str, Any]], None] = field(default=lambda body: None)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict, repr=False)

    def lock(self, key: str) -> asyncio.Lock:
        """One lock per identity, so two reconciles never issue for it at once."""
        return self._locks.setdefault(key, asyncio.Lock())


class EventType(StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


@dataclass(frozen=True)
class Event:
    """A Kubernetes event about the reconciled object."""

    type: EventType
    reason: str
    message: str


@dataclass
class Outcome:
    """What a reconcile produced: the status to write, events to post, and when to come back.

    `retry_after` is set for failures the system will outlive (broker down); a failure the user
    must fix is only a False condition and an event, with no retry until the spec changes.
    """

    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    retry_after: float | None = None
    retry_reason: str = ""
    planned: bool = False  # the retry is a scheduled recheck (a rollout's next step), no failure

    def normal(self, reason: str, message: str) -> None:
        self.events.append(Event(EventType.NORMAL, reason, message))

    def warning(self, reason: str, message: str) -> None:
        self.events.append(Event(EventType.WARNING, reason, message))
