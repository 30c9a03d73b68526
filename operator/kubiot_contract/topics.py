"""The topic contract: every MQTT topic, broker username and access rule kubiot knows.

This module is the single place that says which topics exist, who may publish or subscribe
to them, and how identities are named on the broker. Broker backends, the operator, the ingest
service and the device simulator all derive their topics from here; docs/topics.md documents it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

#: Tenant, device and gateway names: Kubernetes DNS labels. They carry no `.`, `/`, `+`, `#` or
#: `$`, so they are safe as topic levels and keep broker usernames unambiguous.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
NAME_MAX_LENGTH = 63
# Used with fullmatch: `$` alone also matches before a trailing newline ("pump-1\n").
_NAME_RE = re.compile(NAME_PATTERN)

#: The operator's own broker identity. It has no `.`, so it can never equal a tenant identity.
OPERATOR_USERNAME = "kubiot-operator"

#: The topic level under a tenant root that holds device roots, and the one for gateways.
DEVICE_LEVEL = "devices"
GATEWAY_LEVEL = "gateways"
#: The topic level under a tenant root that holds the roots of provisioning claims.
PROVISIONING_LEVEL = "provisioning"


class ContractError(ValueError):
    """A name or topic does not fit the topic contract."""


class Direction(StrEnum):
    DEVICE_TO_CLOUD = "device-to-cloud"
    CLOUD_TO_DEVICE = "cloud-to-device"
    #: Published by the tenant's ingest about a device, read by the operator; devices have no
    #: access to it (they can neither forge nor read their own verdict).
    INGEST_TO_OPERATOR = "ingest-to-operator"


class Channel(StrEnum):
    """The first topic level under a device or gateway root."""

    TELEMETRY = "telemetry"
    STATE_REPORTED = "state/reported"
    STATE_DESIRED = "state/desired"
    PRESENCE = "presence"
    OTA_JOB = "ota/job"
    OTA_STATUS = "ota/status"
    COMMAND = "cmd"
    COMMAND_RESULT = "cmd-result"
    HEALTH = "health"


class IdentityKind(StrEnum):
    DEVICE = "device"
    GATEWAY = "gateway"
    INGEST = "ingest"
    CLAIM = "claim"  # a provisioning claim, shared by factory-fresh devices


class ProvisioningMessage(StrEnum):
    """The messages of provisioning by claim: the last level of its topics."""

    REQUEST = "request"
    RESPONSE = "response"


class Reader(StrEnum):
    """The platform services that read what devices send."""

    INGEST = "ingest"
    OPERATOR = "operator"


class _Pattern:
    """A topic pattern's levels and its MQTT filter, for the rows of both tables."""

    pattern: str

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(self.pattern.split("/"))

    @property
    def filter(self) -> str:
        """The pattern as an MQTT filter: each placeholder level becomes `+`."""
        return "/".join("+" if _is_placeholder(level) else level for level in self.levels)


@dataclass(frozen=True)
class TopicSpec(_Pattern):
    """One row of the topic contract: a topic filter relative to an identity's root.

    Access rules, the ingest's and the operator's subscriptions and the topic parser are all
    derived from these rows: devices publish the device-to-cloud rows and subscribe to the
    cloud-to-device ones, which only the operator publishes; `read_by` says which services
    subscribe to a device-to-cloud row.
    """

    channel: Channel
    pattern: str  # `{stream}` or `{name}` stands for one level that is a DNS label
    direction: Direction
    qos: int
    retained: bool
    meaning: str
    read_by: frozenset[Reader] = frozenset()


def _is_placeholder(level: str) -> bool:
    return level.startswith("{") and level.endswith("}")


_INGEST = frozenset({Reader.INGEST})
_OPERATOR = frozenset({Reader.OPERATOR})
_BOTH = _INGEST | _OPERATOR


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(Channel.TELEMETRY, "telemetry", Direction.DEVICE_TO_CLOUD, 1, False,
              "JSON measurements: one sample object or an array of them (a batch)", _INGEST),
    TopicSpec(Channel.TELEMETRY, "telemetry/{stream}", Direction.DEVICE_TO_CLOUD, 1, False,
              "the same, for a named stream (for example `telemetry/vibration`)", _INGEST),
    TopicSpec(Channel.STATE_REPORTED, "state/reported", Direction.DEVICE_TO_CLOUD, 1, True,
              "device twin, reported half", _BOTH),
    TopicSpec(Channel.STATE_DESIRED, "state/desired", Direction.CLOUD_TO_DEVICE, 1, True,
              "device twin, desired half (from the Device's `spec.desired`)"),
    TopicSpec(Channel.PRESENCE, "presence", Direction.DEVICE_TO_CLOUD, 1, True,
              "`online` on connect, and `offline` as the device's last will", _BOTH),
    TopicSpec(Channel.OTA_JOB, "ota/job", Direction.CLOUD_TO_DEVICE, 1, True,
              "signed firmware job: version, url, sha256, size, signature"),
    TopicSpec(Channel.OTA_STATUS, "ota/status", Direction.DEVICE_TO_CLOUD, 1, False,
              "firmware progress: downloading, installing, succeeded, failed (with reason)",
              _OPERATOR),
    TopicSpec(Channel.COMMAND, "cmd/{name}", Direction.CLOUD_TO_DEVICE, 1, False,
              "a command for the device (ping, reboot, ...)"),
    TopicSpec(Channel.COMMAND_RESULT, "cmd/{name}/result", Direction.DEVICE_TO_CLOUD, 1, False,
              "the device's answer to a command", _OPERATOR),
    TopicSpec(Channel.HEALTH, "health", Direction.INGEST_TO_OPERATOR, 1, True,
              "the ingest's verdict on the device's telemetry: last sample, silent or not, "
              "anomalies found (`kubiot_contract.health.HealthReport`)", _OPERATOR),
)


@dataclass(frozen=True)
class ProvisioningTopicSpec(_Pattern):
    """One row of the provisioning topics: a topic filter relative to a claim's root,
    `{tenant}/provisioning/{claim}`.

    The claim publishes the claim-to-cloud rows and subscribes to the cloud-to-claim ones; the
    operator does the opposite. Nothing else is derived from them: no device, gateway or ingest
    rule ever reaches a provisioning topic.
    """

    message: ProvisioningMessage
    pattern: str  # `{serial}`: the device's serial, a DNS label, which becomes its name
    direction: Direction
    qos: int
    retained: bool
    meaning: str


PROVISIONING_TOPICS: tuple[ProvisioningTopicSpec, ...] = (
    ProvisioningTopicSpec(ProvisioningMessage.REQUEST, "{serial}/request",
                          Direction.DEVICE_TO_CLOUD, 1, False,
                          "a factory-fresh device asks for its identity: its CSR (JSON)"),
    ProvisioningTopicSpec(ProvisioningMessage.RESPONSE, "{serial}/response",
                          Direction.CLOUD_TO_DEVICE, 1, False,
                          "the answer: accepted (certificate, CA, broker), pending or refused "
                          "(with a reason); never a key"),
)

PRESENCE_ONLINE = "online"
PRESENCE_OFFLINE = "offline"


def topic_spec(channel: Channel) -> TopicSpec:
    """The contract row for a channel (the first one, for telemetry)."""
    return next(spec for spec in TOPICS if spec.channel is channel)


def validate_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a valid tenant, device or gateway name, else raise ContractError."""
    if len(name) > NAME_MAX_LENGTH or not _NAME_RE.fullmatch(name):
        raise ContractError(
            f"{what} {name!r} must be a DNS label: lower-case letters, digits and '-', "
            f"starting and ending with a letter or digit, at most {NAME_MAX_LENGTH} characters"
        )
    return name


# --- roots and topics -------------------------------------------------------------------------

def tenant_root(tenant: str) -> str:
    return validate_name(tenant, "tenant")


def device_root(tenant: str, device: str) -> str:
    """`{tenant}/devices/{device}`: every topic of a device lives below it."""
    return f"{tenant_root(tenant)}/{DEVICE_LEVEL}/{validate_name(device, 'device')}"


def gateway_root(tenant: str, gateway: str) -> str:
    """`{tenant}/gateways/{gateway}`: every topic of a gateway's own lives below it."""
    return f"{tenant_root(tenant)}/{GATEWAY_LEVEL}/{validate_name(gateway, 'gateway')}"


def claim_root(tenant: str, claim: str) -> str:
    """`{tenant}/provisioning/{claim}`: every provisioning topic of a claim lives below it."""
    return f"{tenant_root(tenant)}/{PROVISIONING_LEVEL}/{validate_name(claim, 'claim')}"


def provisioning_topic(root: str, serial: str, message: ProvisioningMessage) -> str:
    """The request or response topic of one serial under a claim's root."""
    spec = next(s for s in PROVISIONING_TOPICS if s.message is message)
    return "/".join([root, *(validate_name(serial, "serial") if _is_placeholder(level)
                             else level for level in spec.levels)])


def channel_topic(root: str, channel: Channel, parameter: str | None = None) -> str:
    """A concrete topic of a channel under `root`; `parameter` fills the row's placeholder
    (a telemetry stream, or a command name) and picks the row that has one."""
    for spec in TOPICS:
        placeholders = [level for level in spec.levels if _is_placeholder(level)]
        if spec.channel is channel and bool(placeholders) == (parameter is not None):
            levels = [validate_name(parameter, placeholders[0].strip("{}"))
                      if _is_placeholder(level) and parameter is not None else level
                      for level in spec.levels]
            return "/".join([root, *levels])
    raise ContractError(f"channel {channel.value!r} has no topic "
                        f"{'with' if parameter is not None else 'without'} a parameter")


def telemetry_topic(root: str, stream: str | None = None) -> str:
    return channel_topic(root, Channel.TELEMETRY, stream)


def state_reported_topic(root: str) -> str:
    return channel_topic(root, Channel.STATE_REPORTED)


def state_desired_topic(root: str) -> str:
    return channel_topic(root, Channel.STATE_DESIRED)


def presence_topic(root: str) -> str:
    return channel_topic(root, Channel.PRESENCE)


def ota_job_topic(root: str) -> str:
    return channel_topic(root, Channel.OTA_JOB)


def ota_status_topic(root: str) -> str:
    return channel_topic(root, Channel.OTA_STATUS)


def command_topic(root: str, name: str) -> str:
    return channel_topic(root, Channel.COMMAND, name)


def command_result_topic(root: str, name: str) -> str:
    return channel_topic(root, Channel.COMMAND_RESULT, name)


def health_topic(root: str) -> str:
    return channel_topic(root, Channel.HEALTH)


# --- broker usernames --------------------------------------------------------------------------

#: The usernames of identities that hold certificates; each is also its certificate's CN.
#: A gateway's and a claim's have three labels, so they never equal a device's two, and their
#: middle labels (`gw`, `claim`) differ from each other and from a service's (`svc`).
_CERTIFICATE_USERNAMES = {
    IdentityKind.DEVICE: "{tenant}.{name}",
    IdentityKind.GATEWAY: "{tenant}.gw.{name}",
    IdentityKind.CLAIM: "{tenant}.claim.{name}",
}


def device_username(tenant: str, device: str) -> str:
    """`{tenant}.{device}`; also the CN of the device's certificate."""
    return _CERTIFICATE_USERNAMES[IdentityKind.DEVICE].format(
        tenant=validate_name(tenant, "tenant"), name=validate_name(device, "device"))


def gateway_username(tenant: str, gateway: str) -> str:
    """`{tenant}.gw.{gateway}`: three labels, so it never equals a device's two."""
    return _CERTIFICATE_USERNAMES[IdentityKind.GATEWAY].format(
        tenant=validate_name(tenant, "tenant"), name=validate_name(gateway, "gateway"))


def claim_username(tenant: str, claim: str) -> str:
    """`{tenant}.claim.{claim}`: a provisioning claim; also its certificate's CN."""
    return _CERTIFICATE_USERNAMES[IdentityKind.CLAIM].format(
        tenant=validate_name(tenant, "tenant"), name=validate_name(claim, "claim"))


def ingest_username(tenant: str) -> str:
    """`{tenant}.svc.ingest`: the tenant's ingest service."""
    return f"{validate_name(tenant, 'tenant')}.svc.ingest"


@dataclass(frozen=True)
class Identity:
    """Who a broker username belongs to."""

    kind: IdentityKind
    tenant: str
    name: str


def parse_username(username: str) -> Identity:
    """Invert the username functions above; raise ContractError for anything else."""
    parts = username.split(".")
    try:
        if len(parts) == 2:
            return Identity(IdentityKind.DEVICE, validate_name(parts[0]), validate_name(parts[1]))
        if len(parts) == 3 and parts[1] == "gw":
            return Identity(IdentityKind.GATEWAY, validate_name(parts[0]), validate_name(parts[2]))
        if len(parts) == 3 and parts[1:] == ["svc", "ingest"]:
            return Identity(IdentityKind.INGEST, validate_name(parts[0]), "ingest")
        if len(parts) == 3 and parts[1] == "claim":
            return Identity(IdentityKind.CLAIM, validate_name(parts[0]), validate_name(parts[2]))
    except ContractError as exc:
        raise ContractError(f"{username!r} is not a kubiot broker username: {exc}") from exc
    raise ContractError(f"{username!r} is not a kubiot broker username")


# --- client ids ------------------------------------------------------------------------------
#
# Sessions belong to identities. A device's, gateway's or claim's client id is its username,
# and the broker binds it: Mosquitto's device listener sets `use_username_as_clientid`, EMQX sets
# `mqtt.peer_cert_as_clientid = cn`, so whatever client id a device asks for, it gets the CN of
# its certificate. Service client ids never contain a `.`, while every device, gateway and claim
# client id does: no device can ever present a service's client id, resume its session or
# displace it. A claim is shared by many factory devices, so only one of them at a time can be
# connected under it: the provisioning exchange is kept short, and retried with jitter.

SERVICE_CLIENT_ID_PATTERN = r"^[A-Za-z0-9][-A-Za-z0-9_]{0,127}$"
_SERVICE_CLIENT_ID_RE = re.compile(SERVICE_CLIENT_ID_PATTERN)


def device_client_id(tenant: str, device: str) -> str:
    """A device's MQTT client id: its username (the broker enforces it)."""
    return device_username(tenant, device)


def gateway_client_id(tenant: str, gateway: str) -> str:
    """A gateway's MQTT client id: its username (the broker enforces it)."""
    return gateway_username(tenant, gateway)


def claim_client_id(tenant: str, claim: str) -> str:
    """A claim's MQTT client id: its username (the broker enforces it)."""
    return claim_username(tenant, claim)


def service_client_id(client_id: str, what: str = "service client id") -> str:
    """Return `client_id` if a service (ingest, operator) may use it, else raise ContractError."""
    if not _SERVICE_CLIENT_ID_RE.match(client_id):
        raise ContractError(
            f"{what} {client_id!r} must be 1 to 128 letters, digits, '-' or '_' (no '.': "
            f"client ids with a '.' belong to devices and gateways)")
    return client_id


def ingest_client_id(tenant: str, instance: str | None = None) -> str:
    """The client id of one ingest replica: `kubiot-ingest-{tenant}`, or its own instance name
    (the pod name in Kubernetes), so that each replica keeps its own session."""
    if instance is None:
        return f"kubiot-ingest-{validate_name(tenant, 'tenant')}"
    return service_client_id(instance, "ingest client id")


def operator_client_id(purpose: str) -> str:
    """The operator's client id for one of its connections (`admin`, `reports`, ...)."""
    return service_client_id(f"{OPERATOR_USERNAME}-{purpose}", "operator client id")


#: The operator's administrative connection (Mosquitto's dynamic-security commands).
ADMIN_CLIENT_ID = f"{OPERATOR_USERNAME}-admin"
#: The operator's connection that publishes desired state and jobs and reads reports.
REPORTS_CLIENT_ID = f"{OPERATOR_USERNAME}-reports"


def is_device_client_id(client_id: str) -> bool:
    """True when `client_id` has the form a broker binds to a certificate (a device's, a
    gateway's or a claim's)."""
    try:
        identity = parse_username(client_id)
    except ContractError:
        return False
    return identity.kind in _CERTIFICATE_USERNAMES


def certificate_uri(tenant: str, kind: IdentityKind, name: str) -> str:
    """The URI SAN that names an identity in its certificate: `kubiot://{tenant}/{kind}s/{name}`."""
    return _uri(validate_name(tenant, "tenant"), kind, validate_name(name))


def _uri(tenant: str, kind: IdentityKind, name: str) -> str:
    return f"kubiot://{tenant}/{kind.value}s/{name}"


def certificate_names(tenant: str, kind: IdentityKind, name: str) -> tuple[str, str]:
    """A device's, gateway's or claim's certificate names: (CN, which is its username; URI SAN).

    The names are checked once for both (this is on the path of every certificate issued).
    """
    username = _CERTIFICATE_USERNAMES.get(kind)
    if username is None:
        raise ContractError(
            f"only devices, gateways and claims hold certificates, not {kind.value}s")
    tenant, name = validate_name(tenant, "tenant"), validate_name(name, kind.value)
    return username.format(tenant=tenant, name=name), _uri(tenant, kind, name)


# --- parsing topics ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ParsedTopic:
    """A concrete topic taken apart by the contract."""

    tenant: str
    kind: IdentityKind  # DEVICE or GATEWAY: whose root the topic is under
    name: str
    channel: Channel
    stream: str | None = None  # telemetry stream, or command name


def parse_topic(topic: str) -> ParsedTopic:
    """Take a concrete topic apart, or raise ContractError when it is not in the contract."""
    levels = topic.split("/")
    if len(levels) < 4 or levels[1] not in (DEVICE_LEVEL, GATEWAY_LEVEL):
        raise ContractError(f"topic {topic!r} is not under a device or gateway root")
    tenant, collection, name, *rest = levels
    try:
        validate_name(tenant, "tenant")
        validate_name(name, "device" if collection == DEVICE_LEVEL else "gateway")
    except ContractError as exc:
        raise ContractError(f"topic {topic!r}: {exc}") from exc
    kind = IdentityKind.DEVICE if collection == DEVICE_LEVEL else IdentityKind.GATEWAY
    channel, stream = _parse_channel(rest, topic)
    return ParsedTopic(tenant, kind, name, channel, stream)


@dataclass(frozen=True)
class ParsedProvisioningTopic:
    """A provisioning topic taken apart: whose claim, which serial, which message."""

    tenant: str
    claim: str
    serial: str
    message: ProvisioningMessage


def parse_provisioning_topic(topic: str) -> ParsedProvisioningTopic:
    """Take a provisioning topic apart, or raise ContractError when it is not one."""
    levels = topic.split("/")
    if len(levels) < 4 or levels[1] != PROVISIONING_LEVEL:
        raise ContractError(f"topic {topic!r} is not under a provisioning claim's root")
    tenant, _, claim, *rest = levels
    if not (_NAME_RE.match(tenant) and _NAME_RE.match(claim)):
        raise ContractError(f"topic {topic!r}: tenant and claim must be DNS labels")
    for spec in PROVISIONING_TOPICS:
        if len(spec.levels) != len(rest):
            continue
        serial = None
        for expected, level in zip(spec.levels, rest, strict=True):
            if _is_placeholder(expected) and _NAME_RE.match(level):
                serial = level
            elif expected != level:
                break
        else:
            if serial is not None:
                return ParsedProvisioningTopic(tenant, claim, serial, spec.message)
    raise ContractError(f"topic {topic!r} names no provisioning message")


def _parse_channel(rest: list[str], topic: str) -> tuple[Channel, str | None]:
    for spec in TOPICS:
        if len(spec.levels) != len(rest):
            continue
        parameter = None
        for expected, level in zip(spec.levels, rest, strict=True):
            if _is_placeholder(expected) and _NAME_RE.fullmatch(level):
                parameter = level
            elif expected != level:
                break
        else:
            return spec.channel, parameter
    raise ContractError(f"topic {topic!r} names no channel of the topic contract")


# --- access rules ------------------------------------------------------------------------------

@dataclass(frozen=True)
class AccessRules:
    """The topic filters one broker identity may publish to and subscribe to; all else is denied."""

    publish: frozenset[str]
    subscribe: frozenset[str]

    def __or__(self, other: AccessRules) -> AccessRules:
        return AccessRules(self.publish | other.publish, self.subscribe | other.subscribe)

    def may_publish(self, topic: str) -> bool:
        return any(topic_matches(f, topic) for f in self.publish)

    def may_subscribe(self, topic_filter: str) -> bool:
        """True when `topic_filter` is one of, or narrower than, an allowed filter."""
        return any(filter_covers(f, topic_filter) for f in self.subscribe)


def _filters(base: str, rows: Iterable[_Pattern]) -> frozenset[str]:
    return frozenset(f"{base}/{spec.filter}" for spec in rows)


def _sent_by_devices() -> list[TopicSpec]:
    return [spec for spec in TOPICS if spec.direction is Direction.DEVICE_TO_CLOUD]


def _sent_to_devices() -> list[TopicSpec]:
    return [spec for spec in TOPICS if spec.direction is Direction.CLOUD_TO_DEVICE]


def _sent_by_ingest() -> list[TopicSpec]:
    return [spec for spec in TOPICS if spec.direction is Direction.INGEST_TO_OPERATOR]


def _read_by(reader: Reader) -> list[TopicSpec]:
    """The rows a service subscribes to: what devices send, and what the ingest reports."""
    return [spec for spec in (*_sent_by_devices(), *_sent_by_ingest())
            if reader in spec.read_by]


def _endpoint_rules(root: str) -> AccessRules:
    """What a device (or a gateway for itself) may do under its own root."""
    return AccessRules(publish=_filters(root, _sent_by_devices()),
                       subscribe=_filters(root, _sent_to_devices()))


def device_access(tenant: str, device: str) -> AccessRules:
    """A device touches only its own topics."""
    return _endpoint_rules(device_root(tenant, device))


def gateway_access(tenant: str, gateway: str, children: Iterable[str]) -> AccessRules:
    """A gateway's own topics plus, on their behalf, those of the devices it serves."""
    rules = _endpoint_rules(gateway_root(tenant, gateway))
    for child in sorted(set(children)):
        rules = rules | device_access(tenant, child)
    return rules


def _provisioning_rows(direction: Direction) -> list[ProvisioningTopicSpec]:
    return [spec for spec in PROVISIONING_TOPICS if spec.direction is direction]


def claim_access(tenant: str, claim: str) -> AccessRules:
    """A claim may publish only requests and read only answers, under its own claim's root.

    Brokers without per-connection topic substitution (Mosquitto 2.0's dynamic security) cannot
    narrow this to one serial, so every holder of the claim may read every answer under it:
    answers carry only public material (a certificate, the CA, where the broker is).
    """
    root = claim_root(tenant, claim)
    return AccessRules(publish=_filters(root, _provisioning_rows(Direction.DEVICE_TO_CLOUD)),
                       subscribe=_filters(root, _provisioning_rows(Direction.CLOUD_TO_DEVICE)))


def _claims(tenant: str) -> str:
    return f"{tenant_root(tenant)}/{PROVISIONING_LEVEL}/+"


def _collections(tenant: str) -> tuple[str, ...]:
    root = tenant_root(tenant)
    return (f"{root}/{DEVICE_LEVEL}/+", f"{root}/{GATEWAY_LEVEL}/+")


def _ingest_filters(tenant: str) -> set[str]:
    return {f for base in _collections(tenant) for f in _filters(base, _read_by(Reader.INGEST))}


def unshared(topic_filter: str) -> str:
    """The filter a shared subscription (`$share/<group>/<filter>`) applies to."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) == 3:
            return parts[2]
    return topic_filter


def ingest_share_group(tenant: str) -> str:
    return f"kubiot-ingest-{tenant_root(tenant)}"


def ingest_access(tenant: str) -> AccessRules:
    """The tenant's ingest service reads what devices and gateways send, and publishes only
    its health reports about them.

    Brokers check a shared subscription's ACL against the whole filter, `$share/<group>/`
    included, so the shared forms of the same filters are allowed too.
    """
    plain = _ingest_filters(tenant)
    shared = {f"$share/{ingest_share_group(tenant)}/{f}" for f in plain}
    publish = {f for base in _collections(tenant) for f in _filters(base, _sent_by_ingest())}
    return AccessRules(publish=frozenset(publish), subscribe=frozenset(plain | shared))


def operator_access(tenant: str) -> AccessRules:
    """The operator sends desired state, firmware jobs, commands and provisioning answers; it
    reads reports and provisioning requests."""
    publish: set[str] = set(_filters(_claims(tenant),
                                     _provisioning_rows(Direction.CLOUD_TO_DEVICE)))
    subscribe: set[str] = set(_filters(_claims(tenant),
                                       _provisioning_rows(Direction.DEVICE_TO_CLOUD)))
    for base in _collections(tenant):
        publish |= _filters(base, _sent_to_devices())
        subscribe |= _filters(base, _read_by(Reader.OPERATOR))
    return AccessRules(publish=frozenset(publish), subscribe=frozenset(subscribe))


def report_filters() -> list[str]:
    """What the operator subscribes to across every tenant: everything devices and gateways
    send that the operator reads (presence, reported state, firmware progress, command
    results), and the provisioning requests of every claim."""
    return sorted([f for collection in (DEVICE_LEVEL, GATEWAY_LEVEL)
                   for f in _filters(f"+/{collection}/+", _read_by(Reader.OPERATOR))]
                  + list(provisioning_request_filters()))


def provisioning_request_filters() -> frozenset[str]:
    """The provisioning requests of every claim of every tenant."""
    return _filters(f"+/{PROVISIONING_LEVEL}/+", _provisioning_rows(Direction.DEVICE_TO_CLOUD))


def ingest_shared_subscriptions(tenant: str, group: str | None = None) -> list[str]:
    """Shared subscriptions for the ingest replicas of a tenant, so they split the load."""
    share = group or ingest_share_group(tenant)
    return [f"$share/{share}/{f}" for f in sorted(_ingest_filters(tenant))]


# --- MQTT filter algebra -----------------------------------------------------------------------

def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching of a concrete topic against a filter (`+` one level, `#` the rest)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels) or (level != "+" and level != t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)


def filters_overlap(a: str, b: str) -> bool:
    """True when some concrete topic matches both filters."""
    a_levels, b_levels = a.split("/"), b.split("/")
    for i in range(max(len(a_levels), len(b_levels))):
        x = a_levels[i] if i < len(a_levels) else None
        y = b_levels[i] if i < len(b_levels) else None
        if x == "#" or y == "#":
            return True
        if x is None or y is None:
            return False
        if x != "+" and y != "+" and x != y:
            return False
    return True


def filter_covers(wide: str, narrow: str) -> bool:
    """True when every topic matching `narrow` also matches `wide`."""
    w_levels, n_levels = wide.split("/"), narrow.split("/")
    for i, level in enumerate(w_levels):
        if level == "#":
            return True
        if i >= len(n_levels):
            return False
        if level == "+":
            if n_levels[i] == "#":
                return False
            continue
        if level != n_levels[i]:
            return False
    return len(w_levels) == len(n_levels)
