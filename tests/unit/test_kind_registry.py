"""One registry of kinds: kopf, the local stack, the emulator and the CRDs all serve the same
kinds, and no status reaches the API without passing its kind's model."""

from __future__ import annotations

from typing import Any

import pytest

from kubiot_operator.controllers.kinds import CONTROLLERS, apply_outcome
from kubiot_operator.controllers.objects import InvalidStatus, checked_status
from kubiot_operator.controllers.platform import Event, Outcome
from kubiot_operator.handlers import Operator
from kubiot_operator.local.reconciler import LocalReconciler
from kubiot_operator.models import KINDS
from kubiot_operator.settings import OperatorSettings
from tests.support.kube_emulator import kubiot_resources

ALL = {kind.plural for kind in KINDS}


def kopf_kinds(handler_id: str) -> set[str]:
    registry = Operator(OperatorSettings(broker_admin_password="x")).registry
    handlers = [*registry._changing.get_all_handlers(), *registry._spawning.get_all_handlers()]
    return {h.selector.any_name for h in handlers if h.id == handler_id}


@pytest.mark.parametrize("handler_id", ["reconcile", "cleanup", "recheck"])
def test_kopf_registers_every_kind_of_the_registry(handler_id: str) -> None:
    assert kopf_kinds(handler_id) == ALL


def test_the_local_stack_reconciles_what_kopf_does() -> None:
    assert set(LocalReconciler.reconciled_kinds()) == kopf_kinds("reconcile")
    # A Tenant first: what lives in its namespace needs it (deletion runs the other way).
    assert LocalReconciler.reconciled_kinds()[0] == "tenants"


def test_the_emulator_serves_the_generated_crds_of_every_kind() -> None:
    served = {(r.kind, r.plural, r.namespaced) for r in kubiot_resources()}
    assert served == {(k.kind, k.plural, k.namespaced) for k in KINDS}


@pytest.mark.parametrize("controller", CONTROLLERS, ids=lambda c: c.resource.kind)
def test_a_status_key_not_in_the_kinds_model_is_refused(controller: Any) -> None:
    with pytest.raises(InvalidStatus, match="observedGenerations"):
        checked_status(controller.resource, {"observedGenerations": 3})
    assert checked_status(controller.resource, {"observedGeneration": 3}) == {
        "observedGeneration": 3}


async def test_an_outcome_with_a_misspelt_status_is_never_written() -> None:
    written: list[dict[str, Any]] = []
    events: list[Event] = []

    async def write(body: dict[str, Any], status: dict[str, Any]) -> None:
        written.append(status)

    device = {"apiVersion": "kubiot.io/v1alpha1", "kind": "Device",
              "metadata": {"name": "pump-1", "namespace": "acme"}}
    outcome = Outcome(status={"phase": "Ready", "onlien": True})
    outcome.normal("Reconciled", "done")

    with pytest.raises(InvalidStatus, match="onlien"):
        await apply_outcome(device, outcome, write_status=write, post_event=lambda b, e:
                            events.append(e))
    assert written == [] and events == []

    await apply_outcome(device, Outcome(status={"phase": "Ready", "online": True}),
                        write_status=write, post_event=lambda b, e: events.append(e))
    assert written == [{"phase": "Ready", "online": True}]
