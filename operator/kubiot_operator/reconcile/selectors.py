"""Label selectors, evaluated the way Kubernetes evaluates them."""

from __future__ import annotations

from collections.abc import Mapping

from kubiot_operator.models.common import LabelSelector, SelectorOperator
from kubiot_operator.models.firmware import DeviceSelector


def selector_matches(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    """True when the labels satisfy every matchLabels entry and every matchExpression."""
    for key, value in (selector.match_labels or {}).items():
        if labels.get(key) != value:
            return False
    for requirement in selector.match_expressions or []:
        present = requirement.key in labels
        values = requirement.values or []
        match requirement.operator:
            case SelectorOperator.IN:
                ok = present and labels[requirement.key] in values
            case SelectorOperator.NOT_IN:
                ok = not present or labels[requirement.key] not in values
            case SelectorOperator.EXISTS:
                ok = present
            case SelectorOperator.DOES_NOT_EXIST:
                ok = not present
        if not ok:
            return False
    return True


def device_selected(selector: DeviceSelector, labels: Mapping[str, str],
                    model: str | None) -> bool:
    """Labels and, when the selector names one, the hardware model."""
    if selector.model is not None and selector.model != model:
        return False
    return selector_matches(selector, labels)


def selects_everything(selector: LabelSelector) -> bool:
    """An empty selector matches every device; callers refuse that where it would be a mistake."""
    return not selector.match_labels and not selector.match_expressions
