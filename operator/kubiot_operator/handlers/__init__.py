"""kopf glue: one registry with the startup/cleanup of the runtime and a handler set per kind.

Handlers only connect kopf to the controllers: run one, write the status it concluded, post
its events, and turn "try later" into `kopf.TemporaryError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import kopf

from kubiot_operator import API_GROUP, API_VERSION
from kubiot_operator.brokers import BrokerBackend, BrokerError
from kubiot_operator.controllers.adapters import TrustPublisher
from kubiot_operator.controllers.fleet import FleetIndex
from kubiot_operator.controllers.kinds import (
    CONTROLLERS,
    Controller,
    KindController,
    apply_outcome,
)
from kubiot_operator.controllers.platform import Platform
from kubiot_operator.kube.client import Connection, KubeError
from kubiot_operator.mqtt import MessengerUnavailable
from kubiot_operator.settings import OperatorSettings

from .runtime import Runtime, post_event

FINALIZER = f"{API_GROUP}/cleanup"
#: How a planned recheck's TemporaryError starts (see PlannedRecheckFilter).
PLANNED_RECHECK = "recheck planned"
#: The logger kopf reports handler outcomes on, and posts events from.
KOPF_OBJECTS_LOGGER = "kopf.objects"
RETRY_SECONDS = 10.0
LoginFn = Callable[..., kopf.ConnectionInfo | None]
TRANSIENT = (BrokerError, MessengerUnavailable, KubeError, OSError)


def default_login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Credentials and TLS from the `kubernetes` package's config loading: in a pod, the
    service account, its projected token read afresh at every login; elsewhere the kubeconfig,
    exec plugins such as `aws eks get-token` included. kopf's own readers are the fallback."""
    try:
        via_library = kopf.login_via_client(**kwargs)
    except kopf.LoginError:
        via_library = None
    return (via_library
            or kopf.login_with_service_account(**kwargs)
            or kopf.login_with_kubeconfig(**kwargs))


class Operator:
    """The registry plus the runtime it starts; `registry` goes to `kopf.operator`/`kopf.run`."""

    def __init__(self, settings: OperatorSettings, *, login: LoginFn = default_login,
                 broker: BrokerBackend | None = None, trust: TrustPublisher | None = None,
                 registry: kopf.OperatorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or kopf.OperatorRegistry()
        self.runtime: Runtime | None = None
        self._login = login
        self._broker = broker
        self._trust = trust
        # Fed by kopf's indexing handlers from the watches it already runs; kopf holds every
        # other handler back until the initial listings are indexed, so a quota or a gateway
        # is never decided from a half-known fleet.
        self.fleet = FleetIndex()
        self._register()

    @property
    def platform(self) -> Platform:
        if self.runtime is None or self.runtime.platform is None:
            raise kopf.TemporaryError("the operator is still starting", delay=1)
        return self.runtime.platform

    def _register(self) -> None:
        reg = self.registry

        @kopf.on.startup(registry=reg)
        async def startup(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
            _configure_kopf(settings, self.settings)
            logger = logging.getLogger("kopf")
            info = self._login(settings=settings, logger=logger)
            if info is None:
                raise kopf.PermanentError("no Kubernetes credentials found")

            def relogin() -> Connection | None:
                fresh = self._login(settings=settings, logger=logger)
                return Connection.from_kopf(fresh) if fresh is not None else None

            self.runtime = Runtime(self.settings, Connection.from_kopf(info),
                                   broker=self._broker, trust=self._trust, relogin=relogin,
                                   fleet=self.fleet)
            await self.runtime.start()

        @kopf.on.login(registry=reg)
        def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
            return self._login(**kwargs)

        @kopf.on.cleanup(registry=reg)
        async def cleanup(**_: Any) -> None:
            if self.runtime is not None:
                await self.runtime.stop()

        for plural in ("devices", "gateways", "firmwarereleases"):
            self._register_index(plural)
        for controller in CONTROLLERS:
            self._register_kind(controller)
    def _register_index(self, plural: str) -> None:
        reg = self.registry

        def index(body: kopf.Body, **_: Any) -> bool:
            self.fleet.observe(_plain(body))
            return True  # kopf's own copy stays one flag per object; the facts live in the fleet

        async def gone(type: str, body: kopf.Body, **_: Any) -> None:
            # kopf drops a deleted object from its indexes without calling the index handler.
            if type == "DELETED":
                meta = body.get("metadata", {})
                self.fleet.forget(str(body.get("kind")), meta.get("namespace", ""),
                                  meta.get("name", ""))

        kopf.index(API_GROUP, API_VERSION, plural, registry=reg, id=f"fleet-{plural}")(index)
        kopf.on.event(API_GROUP, API_VERSION, plural, registry=reg, id=f"fleet-{plural}-gone")(
            gone)

    def _register_kind(self, controller: KindController) -> None:
        reg, plural = self.registry, controller.resource.plural
        timer, due = controller.recheck_seconds(self.settings), controller.due

        async def on_change(body: kopf.Body, **_: Any) -> None:
            await self._run(controller, controller.reconcile, body)

        async def on_delete(body: kopf.Body, **_: Any) -> None:
            await self._run(controller, controller.delete, body, with_status=False)

        async def periodic(body: kopf.Body, **_: Any) -> None:
            if not body.get("metadata", {}).get("deletionTimestamp"):
                await self._run(controller, controller.reconcile, body)

        for decorator in (kopf.on.create, kopf.on.update, kopf.on.resume):
            decorator(API_GROUP, API_VERSION, plural, registry=reg, id="reconcile")(on_change)
        kopf.on.delete(API_GROUP, API_VERSION, plural, registry=reg, id="cleanup")(on_delete)
        # A timer only where work is due: kopf evaluates `when` on each event, so a finished
        # rollout or command stops being polled, and a spec change wakes it again.
        when = (lambda body, **_: due(body)) if due is not None else None
        kopf.timer(API_GROUP, API_VERSION, plural, registry=reg, id="recheck",
                   interval=timer, initial_delay=timer, idle=timer / 2, when=when)(periodic)

    async def _run(self, controller: KindController, step: Controller, body: kopf.Body, *,
                   with_status: bool = True) -> None:
        platform = self.platform
        assert self.runtime is not None
        kind = controller.resource.kind
        raw = _plain(body)
        try:
            with self.runtime.metrics.reconciling(kind):
                outcome = await step(platform, raw)
                await apply_outcome(raw, outcome, write_status=self.runtime.write_status,
                                    post_event=post_event, with_status=with_status)
        except TRANSIENT as exc:
            reason = getattr(exc, "reason", type(exc).__name__)
            self.runtime.metrics.reconcile_errors.labels(kind, reason).inc()
            raise kopf.TemporaryError(f"{reason}: {exc}", delay=RETRY_SECONDS) from exc
        if outcome.retry_after is not None:
            if not outcome.planned:
                self.runtime.metrics.reconcile_errors.labels(kind, outcome.retry_reason).inc()
                raise kopf.TemporaryError(outcome.retry_reason, delay=outcome.retry_after)
            # kopf re-runs a handler only after an exception; a planned recheck is one too,
            # marked so that PlannedRecheckFilter keeps it out of the log and the events.
            raise kopf.TemporaryError(f"{PLANNED_RECHECK}: {outcome.retry_reason}",
                                      delay=outcome.retry_after)


class PlannedRecheckFilter(logging.Filter):
    """kopf logs every `TemporaryError` at ERROR and posts it as an Error event on the object.
    A planned recheck (the next step of a rollout or a command) is no error: its record goes
    down to DEBUG, so a rollout in progress does not post an Error event every few seconds;
    it is kept only where DEBUG is enabled."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and \
                f"failed temporarily: {PLANNED_RECHECK}" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def _configure_kopf(kopf_settings: kopf.OperatorSettings, settings: OperatorSettings) -> None:
    kopf_settings.persistence.finalizer = FINALIZER
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=API_GROUP)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration")
    kopf_settings.execution.max_workers = settings.max_workers
    kopf_settings.posting.level = logging.INFO
    objects_logger = logging.getLogger(KOPF_OBJECTS_LOGGER)
    if not any(isinstance(f, PlannedRecheckFilter) for f in objects_logger.filters):
        objects_logger.addFilter(PlannedRecheckFilter())
    kopf_settings.watching.server_timeout = 600
    kopf_settings.networking.request_timeout = 60


def _plain(body: kopf.Body) -> dict[str, Any]:
    """kopf's read-only body as a plain dict (its nested values are already plain)."""
    return {key: body[key] for key in body}


__all__ = ["FINALIZER", "LoginFn", "Operator", "PlannedRecheckFilter", "default_login"]
