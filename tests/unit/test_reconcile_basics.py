"""Label selectors and status conditions, as the operator evaluates and writes them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kubiot_operator.models.common import ConditionStatus, LabelSelector
from kubiot_operator.models.firmware import DeviceSelector
from kubiot_operator.reconcile.conditions import ConditionUpdate, ready_update, set_conditions
from kubiot_operator.reconcile.selectors import device_selected, selector_matches

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def selector(**wire: object) -> LabelSelector:
    return LabelSelector.model_validate(wire)


@pytest.mark.parametrize(("wire", "labels", "expected"), [
    ({"matchLabels": {"site": "a"}}, {"site": "a", "x": "y"}, True),
    ({"matchLabels": {"site": "a"}}, {"site": "b"}, False),
    ({"matchExpressions": [{"key": "site", "operator": "In", "values": ["a", "b"]}]},
     {"site": "b"}, True),
    ({"matchExpressions": [{"key": "site", "operator": "In", "values": ["a"]}]}, {}, False),
    ({"matchExpressions": [{"key": "site", "operator": "NotIn", "values": ["a"]}]}, {}, True),
    ({"matchExpressions": [{"key": "site", "operator": "NotIn", "values": ["a"]}]},
     {"site": "a"}, False),
    ({"matchExpressions": [{"key": "ring", "operator": "Exists"}]}, {"ring": ""}, True),
    ({"matchExpressions": [{"key": "ring", "operator": "DoesNotExist"}]}, {"ring": "x"}, False),
    ({}, {"anything": "goes"}, True),
])
def test_selector_semantics_follow_kubernetes(
    wire: dict[str, object], labels: dict[str, str], expected: bool
) -> None:
    assert selector_matches(selector(**wire), labels) is expected


def test_device_selector_also_checks_the_model() -> None:
    chosen = DeviceSelector.model_validate({"model": "ps-10", "matchLabels": {"site": "a"}})
    assert device_selected(chosen, {"site": "a"}, "ps-10")
    assert not device_selected(chosen, {"site": "a"}, "fm-200")
    assert not device_selected(chosen, {"site": "a"}, None)


def test_transition_time_moves_only_when_status_changes() -> None:
    first = set_conditions([], [ConditionUpdate("IdentityReady", True, "Issued")], T0, 1)
    later = T0 + timedelta(minutes=5)
    same = set_conditions(first, [ConditionUpdate("IdentityReady", True, "Renewed")], later, 2)
    assert same[0].last_transition_time == T0
    assert same[0].reason == "Renewed"
    assert same[0].observed_generation == 2
    flipped = set_conditions(same, [ConditionUpdate("IdentityReady", False, "CSRRejected",
                                                    "key too weak")], later, 2)
    assert flipped[0].last_transition_time == later
    assert flipped[0].status is ConditionStatus.FALSE


def test_ready_names_the_first_condition_that_is_not_true() -> None:
    conditions = set_conditions([], [
        ConditionUpdate("IdentityReady", True, "Issued"),
        ConditionUpdate("AccessReady", False, "BrokerUnavailable", "connection refused"),
    ], T0, 1)
    ready = ready_update(conditions, ["IdentityReady", "AccessReady"])
    assert (ready.ok, ready.reason) == (False, "BrokerUnavailable")
    assert "AccessReady: connection refused" in ready.message
    all_true = set_conditions(conditions, [ConditionUpdate("AccessReady", True, "Synced")], T0, 1)
    assert ready_update(all_true, ["IdentityReady", "AccessReady"]).ok
    ordered = set_conditions(all_true, [ready_update(all_true, ["AccessReady"])], T0, 1)
    assert ordered[0].type == "Ready"
