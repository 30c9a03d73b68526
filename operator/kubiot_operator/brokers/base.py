"""The broker backend interface and the values it exchanges."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from kubiot_contract.topics import AccessRules, IdentityKind

#: Marks everything kubiot created on a broker, so resync never touches the admin's own entries.
MANAGED_MARKER = "kubiot"


@dataclass(frozen=True)
class PasswordCredential:
    """Log in with a username and password (service identities on the service listener).

    `fingerprint` is what a broker can tell back about a password it stores (never the
    password itself); brokers that can tell nothing leave it empty.
    """

    password: str = field(repr=False)
    fingerprint: str = ""


@dataclass(frozen=True)
class CertificateCredential:
    """Log in with a client certificate; the broker takes the username from its CN."""


Credential = PasswordCredential | CertificateCredential


def password_fingerprint(username: str, password: str) -> str:
    """A short digest that changes when the password does; stored beside the identity.

    Service passwords are long random tokens, so a fast digest reveals nothing useful.
    """
    return hashlib.sha256(f"{username}\0{password}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class BrokerIdentity:
    """One broker login and what it may do: the unit every backend synchronises."""

    username: str
    tenant: str
    kind: IdentityKind
    rules: AccessRules
    credential: Credential
    enabled: bool = True


@dataclass(frozen=True)
class SyncResult:
    """`writes` counts the write commands sent to the broker."""

    writes: int
    details: tuple[str, ...] = ()

    def __add__(self, other: SyncResult) -> SyncResult:
        return SyncResult(self.writes + other.writes, self.details + other.details)


NOTHING_DONE = SyncResult(0)


@dataclass(frozen=True)
class BrokerHealth:
    ok: bool
    detail: str


@runtime_checkable
class BrokerBackend(Protocol):
    """What the operator needs from a broker; Mosquitto and EMQX implement it."""

    async def health(self) -> BrokerHealth:
        """Whether the broker answers admin commands."""
        ...

    async def ensure_tenant(self, tenant: str) -> SyncResult:
        """Default deny for the tenant's root, and its tenant-level entries."""
        ...

    async def ensure_identity(self, identity: BrokerIdentity) -> SyncResult:
        """Create the identity, or change only what differs; idempotent."""
        ...

    async def set_enabled(self, username: str, enabled: bool) -> SyncResult:
        """Enable or disable; disabling also ends the identity's live session at once."""
        ...

    async def remove_identity(self, username: str) -> SyncResult:
        """Delete the identity and end its live session; idempotent."""
        ...

    async def remove_tenant(self, tenant: str) -> SyncResult:
        """Delete everything kubiot created for the tenant."""
        ...

    async def list_identities(self, tenant: str) -> list[BrokerIdentity]:
        """What the broker holds for the tenant; passwords come back empty."""
        ...

    async def resync(self, tenant: str, wanted: Iterable[BrokerIdentity]) -> SyncResult:
        """Make the tenant's managed identities exactly `wanted`; no write when nothing differs."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...

    async def __aenter__(self) -> Self:
        ...

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        ...
