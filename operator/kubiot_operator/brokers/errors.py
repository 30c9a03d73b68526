"""Typed broker errors; `reason` becomes a status condition reason on the resource.

Errors that come from an HTTP answer carry its `status` and the broker's own error `code`
(EMQX's `code` field, such as `ALREADY_EXISTS` or `NOT_FOUND`), so callers decide on those
rather than on message text.
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import NOTHING_DONE, SyncResult


class BrokerError(Exception):
    """Something went wrong talking to the broker."""

    reason: str = "BrokerError"
    retryable: bool = False

    def __init__(self, message: str, *, reason: str | None = None, status: int | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        #: The HTTP status of the broker's answer, when there was one.
        self.status = status
        #: The broker's own error code, when it gave one.
        self.code = code


class BrokerUnavailable(BrokerError):
    """Connection refused, timeout, 5xx or 429: worth trying again later."""

    reason = "BrokerUnavailable"
    retryable = True


class BrokerRejected(BrokerError):
    """The broker refused a command (4xx, dynamic-security error): retrying will not help."""

    reason = "BrokerRejected"
    retryable = False


class BrokerAuthError(BrokerError):
    """The operator's own admin credentials were refused."""

    reason = "BrokerAuthenticationFailed"
    retryable = False


class CircuitOpen(BrokerUnavailable):
    """Too many consecutive failures: calls fail fast until the cool-down ends."""

    reason = "BrokerCircuitOpen"


class BrokerNotConfigured(BrokerRejected):
    """The broker lacks a part kubiot writes to; its administrator has to add it.

    `reason` names the part: `BrokerAuthorizationSourceMissing` or `BrokerAuthenticatorMissing`.
    """

    reason = "BrokerNotConfigured"


class BrokerRuleLimit(BrokerRejected):
    """An identity needs more rules than the broker keeps for one username."""

    reason = "BrokerRuleLimit"

    def __init__(self, message: str, *, username: str, rules: int, max_rules: int,
                 status: int | None = None, code: str | None = None) -> None:
        super().__init__(message, status=status, code=code)
        self.username = username
        self.rules = rules
        self.max_rules = max_rules


class BrokerIdentitiesRefused(BrokerRejected):
    """The broker refused some identities of a sync; every other change was applied.

    `refused` maps each refused username to its own error; `reason` is theirs when they share
    one. `applied` is what was written for the others.
    """

    def __init__(self, refused: Mapping[str, BrokerRejected], *,
                 applied: SyncResult = NOTHING_DONE) -> None:
        reasons = {error.reason for error in refused.values()}
        lines = "; ".join(f"{username}: {error}" for username, error in sorted(refused.items()))
        super().__init__(f"the broker refused {len(refused)} identities, the others were "
                         f"applied: {lines}",
                         reason=reasons.pop() if len(reasons) == 1 else "BrokerRejected")
        self.refused = dict(refused)
        self.applied = applied
