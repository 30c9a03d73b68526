"""Pure planning: (what the broker has, what is wanted) -> the fewest changes that close the gap.

Both backends turn these changes into their own commands, so the decision "what differs" is
made, and tested, once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kubiot_contract.topics import AccessRules

from .base import BrokerIdentity, PasswordCredential, password_fingerprint

NO_RULES = AccessRules(frozenset(), frozenset())


@dataclass(frozen=True)
class CreateIdentity:
    identity: BrokerIdentity


@dataclass(frozen=True)
class RemoveIdentity:
    username: str


@dataclass(frozen=True)
class ChangeRules:
    """Grant the missing filters and revoke the extra ones; the rest stays untouched."""

    identity: BrokerIdentity
    grant: AccessRules
    revoke: AccessRules


@dataclass(frozen=True)
class ChangePassword:
    identity: BrokerIdentity


@dataclass(frozen=True)
class ChangeEnabled:
    identity: BrokerIdentity
    enabled: bool


Change = CreateIdentity | RemoveIdentity | ChangeRules | ChangePassword | ChangeEnabled


def rules_difference(have: AccessRules, want: AccessRules) -> tuple[AccessRules, AccessRules]:
    """(grant, revoke): filters to add to `have` and to take from it to obtain `want`."""
    grant = AccessRules(want.publish - have.publish, want.subscribe - have.subscribe)
    revoke = AccessRules(have.publish - want.publish, have.subscribe - want.subscribe)
    return grant, revoke


def is_empty(rules: AccessRules) -> bool:
    return not rules.publish and not rules.subscribe


def _same_shape(observed: BrokerIdentity, wanted: BrokerIdentity) -> bool:
    """False when the identity must be recreated rather than changed in place."""
    return (observed.tenant == wanted.tenant and observed.kind == wanted.kind
            and type(observed.credential) is type(wanted.credential))


def _password_differs(observed: BrokerIdentity, wanted: BrokerIdentity) -> bool:
    if not isinstance(wanted.credential, PasswordCredential):
        return False
    assert isinstance(observed.credential, PasswordCredential)
    # An empty fingerprint means the broker cannot tell: set the password once to be sure.
    wanted_print = password_fingerprint(wanted.username, wanted.credential.password)
    return observed.credential.fingerprint != wanted_print


def plan_identity(observed: BrokerIdentity | None, wanted: BrokerIdentity) -> list[Change]:
    """The changes that turn `observed` (None: absent) into `wanted`."""
    if observed is None:
        return [CreateIdentity(wanted)]
    if not _same_shape(observed, wanted):
        return [RemoveIdentity(observed.username), CreateIdentity(wanted)]
    changes: list[Change] = []
    # Disable first, so a session is never left with new rules it should no longer have.
    if observed.enabled and not wanted.enabled:
        changes.append(ChangeEnabled(wanted, False))
    grant, revoke = rules_difference(observed.rules, wanted.rules)
    if not (is_empty(grant) and is_empty(revoke)):
        changes.append(ChangeRules(wanted, grant, revoke))
    if _password_differs(observed, wanted):
        changes.append(ChangePassword(wanted))
    if wanted.enabled and not observed.enabled:
        changes.append(ChangeEnabled(wanted, True))
    return changes


def plan_tenant(observed: Iterable[BrokerIdentity],
                wanted: Iterable[BrokerIdentity]) -> list[Change]:
    """Changes that make the observed identities exactly the wanted ones (extras removed)."""
    have: Mapping[str, BrokerIdentity] = {i.username: i for i in observed}
    want: dict[str, BrokerIdentity] = {}
    for identity in wanted:
        if identity.username in want:
            raise ValueError(f"identity {identity.username!r} is wanted twice")
        want[identity.username] = identity
    changes: list[Change] = [RemoveIdentity(u) for u in sorted(have.keys() - want.keys())]
    for username in sorted(want):
        changes += plan_identity(have.get(username), want[username])
    return changes


def describe(change: Change) -> str:
    """One line for logs and SyncResult.details."""
    match change:
        case CreateIdentity(identity):
            return f"create {identity.username}"
        case RemoveIdentity(username):
            return f"remove {username}"
        case ChangeRules(identity, grant, revoke):
            added = len(grant.publish) + len(grant.subscribe)
            removed = len(revoke.publish) + len(revoke.subscribe)
            return f"rules of {identity.username}: +{added} -{removed}"
        case ChangePassword(identity):
            return f"password of {identity.username}"
        case ChangeEnabled(identity, enabled):
            return f"{'enable' if enabled else 'disable'} {identity.username}"
    raise AssertionError(change)
