"""Status conditions: set one without losing when it last changed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from kubiot_operator.models.common import Condition, ConditionStatus


@dataclass(frozen=True)
class ConditionUpdate:
    """What a reconcile concluded about one condition type."""

    type: str
    ok: bool
    reason: str
    message: str = ""
    status: ConditionStatus | None = None  # overrides `ok` for Unknown

    @property
    def resolved_status(self) -> ConditionStatus:
        if self.status is not None:
            return self.status
        return ConditionStatus.TRUE if self.ok else ConditionStatus.FALSE


def set_conditions(current: Sequence[Condition], updates: Sequence[ConditionUpdate],
                   now: datetime, generation: int | None) -> list[Condition]:
    """Apply updates; lastTransitionTime moves only when a condition's status changes."""
    by_type = {c.type: c for c in current}
    for update in updates:
        status = update.resolved_status
        previous = by_type.get(update.type)
        changed = previous is None or previous.status != status
        by_type[update.type] = Condition(
            type=update.type,
            status=status,
            reason=update.reason,
            message=update.message,
            last_transition_time=now if changed or previous is None
            else previous.last_transition_time,
            observed_generation=generation,
        )
    return sorted(by_type.values(), key=lambda c: (c.type != "Ready", c.type))


def is_true(conditions: Sequence[Condition], condition_type: str) -> bool:
    return any(c.type == condition_type and c.status is ConditionStatus.TRUE for c in conditions)


def ready_update(conditions: Sequence[Condition], required: Sequence[str]) -> ConditionUpdate:
    """Ready is True when every required condition is; otherwise it names the first that is not."""
    by_type = {c.type: c for c in conditions}
    # A known failure says more than a condition not reached yet (because of that failure).
    for condition_type in required:
        condition = by_type.get(condition_type)
        if condition is not None and condition.status is not ConditionStatus.TRUE:
            return ConditionUpdate("Ready", False, condition.reason,
                                   f"{condition_type}: {condition.message}")
    for condition_type in required:
        if condition_type not in by_type:
            return ConditionUpdate("Ready", False, "Reconciling", f"{condition_type} is not known")
    return ConditionUpdate("Ready", True, "Reconciled", "")
