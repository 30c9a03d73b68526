"""Typed broker errors; `reason` becomes a status condition reason on the resource."""

from __future__ import annotations


class BrokerError(Exception):
    """Something went wrong talking to the broker."""

    reason: str = "BrokerError"
    retryable: bool = False

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


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
