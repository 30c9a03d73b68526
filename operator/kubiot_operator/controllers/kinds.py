"""The controller registry: every kind kubiot reconciles, and the one way to apply an Outcome.

Each entry joins a kind of the resource registry (`models.KINDS`: API coordinates, spec and
status models) to its controller entry points and recheck period. The kopf handlers and the
local stack both register exactly these kinds and both apply outcomes with `apply_outcome`,
which refuses a status its kind's model does not describe before anything is written.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubiot_operator.models import (
    DEVICE,
    DEVICE_COMMAND,
    FIRMWARE_RELEASE,
    GATEWAY,
    KINDS,
    TENANT,
    ResourceKind,
)
from kubiot_operator.settings import OperatorSettings

from .commands import delete_command, reconcile_command, run_due
from .device import delete_device, reconcile_device
from .firmware import delete_release, reconcile_release, rollout_due
from .gateway import delete_gateway, reconcile_gateway
from .objects import checked_status
from .platform import Event, Outcome, Platform
from .tenant import delete_tenant, reconcile_tenant

Controller = Callable[[Platform, dict[str, Any]], Awaitable[Outcome]]
StatusPatch = Callable[[dict[str, Any], dict[str, Any]], Awaitable[None]]
EventPost = Callable[[dict[str, Any], Event], None]

#: How often a FirmwareRelease or DeviceCommand in progress is looked at again when nothing
#: announces a change (a wave's pause ending, a command's deadline passing).
PROGRESS_RECHECK_SECONDS = 5.0


@dataclass(frozen=True)
class KindController:
    """One reconciled kind: what it is, and the code that reconciles and retires it."""

    resource: ResourceKind
    reconcile: Controller
    delete: Controller
    #: Seconds between periodic rechecks of one object, from the operator's settings.
    recheck_seconds: Callable[[OperatorSettings], float]
    #: Whether an object has work that no watch event announces (a rollout or a command run in
    #: progress); None: every object is rechecked.
    due: Callable[[Mapping[str, Any]], bool] | None = None


#: In dependency order: a Tenant before what lives in its namespace (deletion runs reversed).
CONTROLLERS: tuple[KindController, ...] = (
    KindController(TENANT, reconcile_tenant, delete_tenant,
                   lambda settings: settings.resync_period_seconds),
    KindController(DEVICE, reconcile_device, delete_device,
                   lambda settings: settings.renewal_check_seconds),
    KindController(GATEWAY, reconcile_gateway, delete_gateway,
                   lambda settings: settings.renewal_check_seconds),
    KindController(FIRMWARE_RELEASE, reconcile_release, delete_release,
                   lambda settings: PROGRESS_RECHECK_SECONDS, due=rollout_due),
    KindController(DEVICE_COMMAND, reconcile_command, delete_command,
                   lambda settings: PROGRESS_RECHECK_SECONDS, due=run_due),
)

if {c.resource.kind for c in CONTROLLERS} != {k.kind for k in KINDS}:  # pragma: no cover
    raise RuntimeError("every kind of models.KINDS needs exactly one controller")


def controller_of(body: Mapping[str, Any]) -> KindController:
    """The controller for an object of one of kubiot's kinds."""
    for controller in CONTROLLERS:
        if controller.resource.kind == body.get("kind"):
            return controller
    raise KeyError(f"kubiot reconciles no kind {body.get('kind')!r}")


async def apply_outcome(body: dict[str, Any], outcome: Outcome, *, write_status: StatusPatch,
                        post_event: EventPost, with_status: bool = True) -> None:
    """Write what a reconcile concluded: the status (checked against the kind's model first),
    then its events. Retries are the caller's: kopf and the local stack schedule them apart."""
    if with_status and outcome.status:
        await write_status(body, checked_status(controller_of(body).resource, outcome.status))
    for event in outcome.events:
        post_event(body, event)
