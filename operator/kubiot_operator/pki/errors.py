"""The PKI's exceptions: each carries a CamelCase `reason` for status conditions."""

from __future__ import annotations


class PKIError(Exception):
    """Something the PKI refused or could not do; `reason` is CamelCase, the message plain words."""

    reason: str

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason

    @property
    def message(self) -> str:
        return str(self)


class CSRRejected(PKIError):
    """A certificate signing request kubiot will not sign.

    Reasons: Unparseable, BadSignature, WeakKey, UnsupportedKeyType, SubjectMismatch.
    """


class CAInvalid(PKIError):
    """A supplied certificate authority cannot be used (not a CA, wrong key, expired, ...)."""
