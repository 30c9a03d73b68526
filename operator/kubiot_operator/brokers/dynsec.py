"""Mosquitto dynamic security, pure part: planned changes -> commands, listings -> identities.

Everything kubiot creates is marked: roles and groups are named `kubiot:...`, clients carry
the text name `kubiot` and a JSON description (tenant, kind, credential). Entries without the
marks belong to the admin and are never read as kubiot's nor touched.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubiot_contract.topics import AccessRules, ContractError, IdentityKind, tenant_root

from .base import (
    MANAGED_MARKER,
    BrokerIdentity,
    CertificateCredential,
    Credential,
    PasswordCredential,
    password_fingerprint,
)
from .plan import Change, ChangeEnabled, ChangePassword, ChangeRules, CreateIdentity, RemoveIdentity

Command = dict[str, Any]

PUBLISH = "publishClientSend"
SUBSCRIBE = "subscribePattern"
#: Tenant-level denies sit below every identity's allows: they decide only what nothing allows.
TENANT_DENY_PRIORITY = -1

#: Errors that mean "already as wanted": a command repeated after a lost reply, or a state
#: changed by hand in between. They make every change idempotent.
HARMLESS_ERRORS = frozenset({
    "Client not found", "Role not found", "Group not found", "ACL not found",
    "Client already exists", "Role already exists", "Group already exists",
    "Client is already in this group", "Group is already in this role",
})

READ_COMMANDS = frozenset({
    "listClients", "listRoles", "listGroups", "getClient", "getRole", "getGroup",
    "getDefaultACLAccess",
})


def role_name(username: str) -> str:
    return f"{MANAGED_MARKER}:{username}"


def tenant_group_name(tenant: str) -> str:
    """The group (and its role) every identity of a tenant belongs to."""
    return f"{MANAGED_MARKER}:tenant:{tenant_root(tenant)}"


def acls_for(rules: AccessRules) -> list[Command]:
    """Allow ACLs for the rules; sorted so the same rules always give the same commands."""
    return ([{"acltype": PUBLISH, "topic": t, "priority": 0, "allow": True}
             for t in sorted(rules.publish)]
            + [{"acltype": SUBSCRIBE, "topic": t, "priority": 0, "allow": True}
               for t in sorted(rules.subscribe)])


def rules_from_acls(acls: Iterable[Mapping[str, Any]]) -> AccessRules:
    """The allow-lists a role grants; anything else in it (denies, other types) is dropped.

    Dropped entries still count as drift: see `role_is_exact`.
    """
    publish = {a["topic"] for a in acls if a.get("acltype") == PUBLISH and a.get("allow")}
    subscribe = {a["topic"] for a in acls if a.get("acltype") == SUBSCRIBE and a.get("allow")}
    return AccessRules(frozenset(publish), frozenset(subscribe))


def role_is_exact(acls: Iterable[Mapping[str, Any]]) -> bool:
    """True when a role holds only what `acls_for` would write (no hand-added denies etc.)."""
    return all(a.get("acltype") in (PUBLISH, SUBSCRIBE) and a.get("allow") is True
               and a.get("priority", 0) == 0 for a in acls)


def describe_client(identity: BrokerIdentity) -> str:
    """The client's textdescription: what kubiot needs to read the identity back."""
    record: dict[str, str] = {"tenant": identity.tenant, "kind": identity.kind.value}
    if isinstance(identity.credential, PasswordCredential):
        record["credential"] = "password"
        record["passwordFingerprint"] = password_fingerprint(identity.username,
                                                             identity.credential.password)
    else:
        record["credential"] = "certificate"
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class ClientRecord:
    """A kubiot-managed client as the broker lists it."""

    username: str
    tenant: str
    kind: IdentityKind
    credential: Credential
    disabled: bool
    roles: frozenset[str]
    groups: frozenset[str]


def parse_client(client: Mapping[str, Any]) -> ClientRecord | None:
    """Read a listed client; None when it is not kubiot's."""
    if client.get("textname") != MANAGED_MARKER:
        return None
    try:
        record = json.loads(client.get("textdescription") or "")
        tenant = tenant_root(str(record["tenant"]))
        kind = IdentityKind(record["kind"])
    except (ValueError, KeyError, TypeError, ContractError):
        return None
    credential: Credential
    if record.get("credential") == "password":
        credential = PasswordCredential("", str(record.get("passwordFingerprint", "")))
    else:
        credential = CertificateCredential()
    return ClientRecord(
        username=str(client["username"]), tenant=tenant, kind=kind, credential=credential,
        disabled=bool(client.get("disabled", False)),
        roles=frozenset(r["rolename"] for r in client.get("roles", [])),
        groups=frozenset(g["groupname"] for g in client.get("groups", [])),
    )


def observed_identity(client: ClientRecord, role_acls: Sequence[Mapping[str, Any]] | None
                      ) -> BrokerIdentity:
    """The identity as the broker holds it; an inexact role reads as one with no rules.

    Reading a tampered role as empty makes the plan rewrite it whole (see `ChangeRules` below).
    """
    exact = role_acls is not None and role_is_exact(role_acls)
    rules = rules_from_acls(role_acls or []) if exact else AccessRules(frozenset(), frozenset())
    role_attached = role_name(client.username) in client.roles
    in_group = tenant_group_name(client.tenant) in client.groups
    return BrokerIdentity(
        username=client.username, tenant=client.tenant, kind=client.kind, rules=rules,
        credential=client.credential,
        # Access needs the role: a certificate login skips the password check, so a disabled
        # client with its role attached could still act.
        enabled=role_attached and in_group and not client.disabled,
    )


def create_commands(identity: BrokerIdentity, *,
                    existing_role: Sequence[Mapping[str, Any]] | None = None) -> list[Command]:
    """A role with the identity's ACLs and a client in the tenant group holding it.

    `existing_role`: the ACLs of a role left behind by a half-finished removal; it is
    repaired in place rather than deleted and created again.
    """
    role = role_name(identity.username)
    if existing_role is None:
        commands: list[Command] = [{"command": "createRole", "rolename": role,
                                    "textname": MANAGED_MARKER,
                                    "acls": acls_for(identity.rules)}]
    else:
        commands = role_repair_commands(identity, existing_role)
    client: Command = {
        "command": "createClient", "username": identity.username,
        "textname": MANAGED_MARKER, "textdescription": describe_client(identity),
        "roles": [{"rolename": role}] if identity.enabled else [],
        "groups": [{"groupname": tenant_group_name(identity.tenant)}],
    }
    if isinstance(identity.credential, PasswordCredential):
        client["password"] = identity.credential.password
    commands.append(client)
    if not identity.enabled:
        commands.append({"command": "disableClient", "username": identity.username})
    return commands


def remove_commands(username: str) -> list[Command]:
    # deleteClient ends the live session; the role goes with it.
    return [{"command": "deleteClient", "username": username},
            {"command": "deleteRole", "rolename": role_name(username)}]


def enable_commands(identity: BrokerIdentity) -> list[Command]:
    return [
        {"command": "addClientRole", "username": identity.username,
         "rolename": role_name(identity.username)},
        {"command": "addGroupClient", "groupname": tenant_group_name(identity.tenant),
         "username": identity.username},
        {"command": "enableClient", "username": identity.username},
    ]


def disable_commands(username: str) -> list[Command]:
    # disableClient kicks the session; detaching the role is what stops a certificate login.
    return [{"command": "disableClient", "username": username},
            {"command": "removeClientRole", "username": username,
             "rolename": role_name(username)}]


def change_commands(change: Change,
                    roles: Mapping[str, Sequence[Mapping[str, Any]]] | None = None
                    ) -> list[Command]:
    """The dynamic-security commands for one planned change.

    `roles`: the kubiot roles the broker holds (name -> ACLs). Given, rules are diffed against
    the role as it is (hand edits included); left out, the plan's grant and revoke are used.
    """
    match change:
        case CreateIdentity(identity):
            existing = roles.get(role_name(identity.username)) if roles is not None else None
            return create_commands(identity, existing_role=existing)
        case RemoveIdentity(username):
            return remove_commands(username)
        case ChangeEnabled(identity, enabled):
            return enable_commands(identity) if enabled else disable_commands(identity.username)
        case ChangePassword(identity):
            assert isinstance(identity.credential, PasswordCredential)
            return [{"command": "setClientPassword", "username": identity.username,
                     "password": identity.credential.password},
                    {"command": "modifyClient", "username": identity.username,
                     "textdescription": describe_client(identity)}]
        case ChangeRules(identity, grant, revoke):
            role = role_name(identity.username)
            if roles is not None:
                return role_repair_commands(identity, roles.get(role))
            commands: list[Command] = [
                {"command": "removeRoleACL", "rolename": role, "acltype": acl, "topic": t}
                for acl, topics in ((PUBLISH, revoke.publish), (SUBSCRIBE, revoke.subscribe))
                for t in sorted(topics)
            ]
            commands += [{"command": "addRoleACL", "rolename": role, **acl}
                         for acl in acls_for(grant)]
            return commands
    raise AssertionError(change)


def _acl_key(acl: Mapping[str, Any]) -> tuple[str, str, int, bool]:
    return (str(acl.get("acltype")), str(acl.get("topic")), int(acl.get("priority", 0)),
            bool(acl.get("allow")))


def role_repair_commands(identity: BrokerIdentity,
                         observed_acls: Sequence[Mapping[str, Any]] | None) -> list[Command]:
    """Make the identity's role hold exactly its ACLs, removing anything added by hand.

    `observed_acls` None means the role itself is gone: create it and attach it again.
    """
    role = role_name(identity.username)
    if observed_acls is None:
        commands: list[Command] = [{"command": "createRole", "rolename": role,
                                    "textname": MANAGED_MARKER,
                                    "acls": acls_for(identity.rules)}]
        if identity.enabled:
            commands.append({"command": "addClientRole", "username": identity.username,
                             "rolename": role})
        return commands
    wanted = {_acl_key(a): a for a in acls_for(identity.rules)}
    have = {_acl_key(a) for a in observed_acls}
    # removeRoleACL names an ACL by type and topic only: remove first, then add.
    commands = [{"command": "removeRoleACL", "rolename": role, "acltype": key[0],
                 "topic": key[1]} for key in sorted(have - wanted.keys())]
    commands += [{"command": "addRoleACL", "rolename": role, **wanted[key]}
                 for key in sorted(wanted.keys() - have)]
    return commands


def tenant_commands(tenant: str, *, role_exists: bool, group_exists: bool,
                    group_has_role: bool) -> list[Command]:
    """Default deny below the tenant's root for every identity in the tenant group."""
    name = tenant_group_name(tenant)
    root = f"{tenant_root(tenant)}/#"
    commands: list[Command] = []
    if not role_exists:
        commands.append({
            "command": "createRole", "rolename": name, "textname": MANAGED_MARKER,
            "acls": [{"acltype": acl, "topic": root, "priority": TENANT_DENY_PRIORITY,
                      "allow": False} for acl in (PUBLISH, SUBSCRIBE)],
        })
    if not group_exists:
        commands.append({"command": "createGroup", "groupname": name,
                         "textname": MANAGED_MARKER})
    if not group_has_role:
        commands.append({"command": "addGroupRole", "groupname": name, "rolename": name,
                         "priority": TENANT_DENY_PRIORITY})
    return commands


def is_write(command: Mapping[str, Any]) -> bool:
    return command["command"] not in READ_COMMANDS
