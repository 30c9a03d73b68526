"""The topic contract: exact allow-lists, and no identity reaching past its own roots."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubiot_contract import topics as contract
from kubiot_contract.health import ZScoreRule, parse_rules
from kubiot_contract.topics import (
    AccessRules,
    Channel,
    ContractError,
    IdentityKind,
    device_access,
    filter_covers,
    filters_overlap,
    gateway_access,
    ingest_access,
    operator_access,
    topic_matches,
)

names = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")


def test_device_allow_list_is_exactly_its_own_topics() -> None:
    assert device_access("acme", "pump-1") == AccessRules(
        publish=frozenset({
            "acme/devices/pump-1/telemetry",
            "acme/devices/pump-1/telemetry/+",
            "acme/devices/pump-1/state/reported",
            "acme/devices/pump-1/presence",
            "acme/devices/pump-1/ota/status",
            "acme/devices/pump-1/cmd/+/result",
        }),
        subscribe=frozenset({
            "acme/devices/pump-1/state/desired",
            "acme/devices/pump-1/ota/job",
            "acme/devices/pump-1/cmd/+",
        }),
    )


def test_gateway_allow_list_is_its_own_topics_plus_its_childrens() -> None:
    rules = gateway_access("acme", "edge-1", ["ble-1", "ble-2"])
    own = {
        "acme/gateways/edge-1/telemetry", "acme/gateways/edge-1/telemetry/+",
        "acme/gateways/edge-1/state/reported", "acme/gateways/edge-1/presence",
        "acme/gateways/edge-1/ota/status", "acme/gateways/edge-1/cmd/+/result",
    }
    children = device_access("acme", "ble-1") | device_access("acme", "ble-2")
    assert rules.publish == own | children.publish
    assert rules.subscribe == {
        "acme/gateways/edge-1/state/desired", "acme/gateways/edge-1/ota/job",
        "acme/gateways/edge-1/cmd/+",
    } | children.subscribe
    assert rules.may_publish("acme/devices/ble-2/telemetry/vibration")
    assert not rules.may_publish("acme/devices/pump-1/telemetry")


def test_two_tenants_share_no_topic() -> None:
    acme = device_access("acme", "pump-1") | ingest_access("acme") | operator_access("acme")
    globex = device_access("globex", "pump-1") | ingest_access("globex")
    for a in acme.publish | acme.subscribe:
        for b in globex.publish | globex.subscribe:
            assert not filters_overlap(a, b), (a, b)


def test_ingest_reads_telemetry_presence_and_reports_and_publishes_only_health() -> None:
    rules = ingest_access("acme")
    assert rules.publish == frozenset({"acme/devices/+/health", "acme/gateways/+/health"})
    assert not rules.may_publish("acme/devices/pump-1/state/desired")
    assert not rules.may_publish("globex/devices/pump-1/health")
    assert rules.may_subscribe("acme/devices/+/telemetry/+")
    assert rules.may_subscribe("acme/gateways/+/presence")
    assert not rules.may_subscribe("acme/devices/+/state/desired")
    assert not rules.may_subscribe("acme/#")
    assert contract.ingest_shared_subscriptions("acme")[0].startswith(
        "$share/kubiot-ingest-acme/acme/"
    )


def test_topic_metadata_follows_the_contract_table() -> None:
    assert contract.topic_spec(Channel.STATE_DESIRED).retained
    assert contract.topic_spec(Channel.PRESENCE).retained
    assert not contract.topic_spec(Channel.TELEMETRY).retained
    assert all(spec.qos == 1 for spec in contract.TOPICS)


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("acme/devices/pump-1/telemetry", (IdentityKind.DEVICE, "pump-1", Channel.TELEMETRY, None)),
        ("acme/devices/pump-1/telemetry/vib", (IdentityKind.DEVICE, "pump-1", Channel.TELEMETRY,
                                               "vib")),
        ("acme/gateways/edge/presence", (IdentityKind.GATEWAY, "edge", Channel.PRESENCE, None)),
        ("acme/devices/d/cmd/reboot/result", (IdentityKind.DEVICE, "d", Channel.COMMAND_RESULT,
                                              "reboot")),
    ],
)
def test_parse_topic(topic: str, expected: tuple[object, ...]) -> None:
    parsed = contract.parse_topic(topic)
    assert parsed.tenant == "acme"
    assert (parsed.kind, parsed.name, parsed.channel, parsed.stream) == expected


@pytest.mark.parametrize("topic", [
    "acme/devices/pump-1", "acme/things/pump-1/telemetry", "acme/devices/Pump/telemetry",
    "acme/devices/pump-1/telemetry/a/b", "acme/devices/pump-1/state", "acme/devices/+/presence",
    # `$` in a pattern also matches before a final newline: names must match in full.
    "acme/devices/pump-1\n/telemetry", "acme/devices/pump-1/telemetry/flow\n",
    "acme\n/devices/pump-1/presence", "acme/devices/pump-1/cmd/ping\n/result",
])
def test_parse_topic_refuses_what_is_not_in_the_contract(topic: str) -> None:
    with pytest.raises(ContractError):
        contract.parse_topic(topic)


def test_usernames_round_trip_and_never_collide() -> None:
    assert contract.device_username("acme", "pump-1") == "acme.pump-1"
    assert contract.parse_username("acme.pump-1") == contract.Identity(
        IdentityKind.DEVICE, "acme", "pump-1")
    assert contract.parse_username("acme.gw.edge") == contract.Identity(
        IdentityKind.GATEWAY, "acme", "edge")
    assert contract.parse_username("acme.svc.ingest").kind is IdentityKind.INGEST
    # A device called "gw" and a gateway called anything still differ.
    assert contract.device_username("acme", "gw") != contract.gateway_username("acme", "gw")
    with pytest.raises(ContractError):
        contract.parse_username(contract.OPERATOR_USERNAME)


@pytest.mark.parametrize("bad", ["", "A", "a.b", "a/b", "+", "#", "-a", "a-", "x" * 64, "$sys",
                                 "a\n"])
def test_names_must_be_dns_labels(bad: str) -> None:
    with pytest.raises(ContractError, match="DNS label"):
        contract.device_root("acme", bad)


def test_mqtt_filter_algebra() -> None:
    assert topic_matches("a/+/c", "a/b/c")
    assert topic_matches("a/#", "a")
    assert not topic_matches("a/+", "a/b/c")
    assert not topic_matches("#", "$SYS/broker/uptime")
    assert filters_overlap("a/+/c", "a/b/#")
    assert not filters_overlap("a/b/c", "a/b/d")
    assert filter_covers("a/#", "a/b/+")
    assert not filter_covers("a/+", "a/#")
    assert not filter_covers("a/b", "a/b/c")


# --- properties ------------------------------------------------------------------------------

@given(tenant=names, other_tenant=names, device=names, other_device=names)
def test_no_device_reaches_another_device_or_tenant(
    tenant: str, other_tenant: str, device: str, other_device: str
) -> None:
    rules = device_access(tenant, device)
    own_root = contract.device_root(tenant, device) + "/#"
    for f in rules.publish | rules.subscribe:
        assert filter_covers(own_root, f)
        if other_tenant != tenant:
            assert not filters_overlap(f, f"{other_tenant}/#")
        if other_device != device:
            assert not filters_overlap(f, contract.device_root(tenant, other_device) + "/#")
        assert not filters_overlap(f, contract.gateway_root(tenant, device) + "/#")


@given(tenant=names, other_tenant=names, gateway=names,
       children=st.sets(names, max_size=5), stranger=names)
def test_a_gateway_reaches_only_itself_and_its_children(
    tenant: str, other_tenant: str, gateway: str, children: set[str], stranger: str
) -> None:
    rules = gateway_access(tenant, gateway, children)
    roots = [contract.gateway_root(tenant, gateway) + "/#"] + [
        contract.device_root(tenant, c) + "/#" for c in children
    ]
    for f in rules.publish | rules.subscribe:
        assert any(filter_covers(root, f) for root in roots), f
        if other_tenant != tenant:
            assert not filters_overlap(f, f"{other_tenant}/#")
        if stranger not in children:
            assert not filters_overlap(f, contract.device_root(tenant, stranger) + "/#")


def test_ingest_may_take_its_shared_subscriptions() -> None:
    rules = ingest_access("acme")
    for shared in contract.ingest_shared_subscriptions("acme"):
        assert rules.may_subscribe(shared)
        assert rules.may_subscribe(contract.unshared(shared))
    assert not rules.may_subscribe("$share/kubiot-ingest-acme/globex/devices/+/telemetry")


@given(tenant=names, other_tenant=names)
def test_service_identities_stay_inside_their_tenant(tenant: str, other_tenant: str) -> None:
    rules = ingest_access(tenant) | operator_access(tenant)
    for f in map(contract.unshared, rules.publish | rules.subscribe):
        assert filter_covers(f"{tenant}/#", f)
        if other_tenant != tenant:
            assert not filters_overlap(f, f"{other_tenant}/#")


@given(filter_a=st.lists(st.sampled_from(["a", "b", "+"]), min_size=1, max_size=4),
       filter_b=st.lists(st.sampled_from(["a", "b", "+", "#"]), min_size=1, max_size=4),
       topic=st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=5))
def test_filter_algebra_agrees_with_matching(
    filter_a: list[str], filter_b: list[str], topic: list[str]
) -> None:
    if "#" in filter_b[:-1]:
        filter_b = filter_b[: filter_b.index("#") + 1]
    a, b, t = "/".join(filter_a), "/".join(filter_b), "/".join(topic)
    if topic_matches(a, t) and topic_matches(b, t):
        assert filters_overlap(a, b)
    if filter_covers(b, a) and topic_matches(a, t):
        assert topic_matches(b, t)


def test_docs_list_every_topic_and_the_example_devices_rules() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "topics.md").read_text()
    for spec in contract.TOPICS:
        assert f"| `{spec.pattern}` |" in text, spec.pattern
    rules = device_access("acme", "pump-1")
    for topic_filter in rules.publish | rules.subscribe:
        assert f"`{topic_filter}`" in text, topic_filter


# --- client ids --------------------------------------------------------------------------------

@given(tenant=names, name=names, other=names)
def test_device_and_gateway_client_ids_never_take_a_service_form(
        tenant: str, name: str, other: str) -> None:
    for client_id in (contract.device_client_id(tenant, name),
                      contract.gateway_client_id(tenant, name)):
        assert contract.is_device_client_id(client_id)
        with pytest.raises(contract.ContractError):
            contract.service_client_id(client_id)
    for service_id in (contract.ingest_client_id(other), contract.operator_client_id(other),
                       contract.ADMIN_CLIENT_ID, contract.REPORTS_CLIENT_ID):
        assert contract.service_client_id(service_id) == service_id
        assert not contract.is_device_client_id(service_id)


def test_an_ingest_instance_name_with_a_dot_is_refused() -> None:
    assert contract.ingest_client_id("acme", "acme-ingest-7d9f-abcde") == "acme-ingest-7d9f-abcde"
    with pytest.raises(contract.ContractError, match="belong to devices"):
        contract.ingest_client_id("acme", "acme.pump-1")


# --- provisioning claims -----------------------------------------------------------------------

def test_a_claim_may_only_ask_and_read_answers_under_its_own_claim() -> None:
    assert contract.claim_access("acme", "line-1") == AccessRules(
        publish=frozenset({"acme/provisioning/line-1/+/request"}),
        subscribe=frozenset({"acme/provisioning/line-1/+/response"}),
    )
    rules = contract.claim_access("acme", "line-1")
    assert rules.may_publish("acme/provisioning/line-1/sn-0001/request")
    for refused in ("acme/provisioning/line-1/sn-0001/response",
                    "acme/provisioning/line-2/sn-0001/request",
                    "acme/devices/sn-0001/telemetry", "globex/provisioning/line-1/sn-1/request"):
        assert not rules.may_publish(refused), refused
    for refused in ("#", "acme/#", "acme/provisioning/#", "acme/provisioning/+/+/response",
                    "acme/provisioning/line-1/+/request", "acme/devices/+/state/desired",
                    "$SYS/#"):
        assert not rules.may_subscribe(refused), refused


def test_claim_usernames_round_trip_and_never_collide() -> None:
    assert contract.claim_username("acme", "line-1") == "acme.claim.line-1"
    assert contract.parse_username("acme.claim.line-1") == contract.Identity(
        IdentityKind.CLAIM, "acme", "line-1")
    assert contract.claim_client_id("acme", "line-1") == "acme.claim.line-1"
    assert contract.is_device_client_id("acme.claim.line-1")
    # A device called "claim", a gateway called "line-1": still three different usernames.
    assert len({contract.claim_username("acme", "line-1"),
                contract.device_username("acme", "claim"),
                contract.gateway_username("acme", "line-1")}) == 3
    assert contract.certificate_names("acme", IdentityKind.CLAIM, "line-1") == (
        "acme.claim.line-1", "kubiot://acme/claims/line-1")


@given(tenant=names, a=names, b=names)
def test_usernames_of_different_kinds_never_collide(tenant: str, a: str, b: str) -> None:
    usernames = [contract.device_username(tenant, a), contract.gateway_username(tenant, a),
                 contract.claim_username(tenant, a), contract.ingest_username(tenant)]
    assert len(set(usernames)) == 4
    for username in usernames:
        identity = contract.parse_username(username)
        assert identity.tenant == tenant
    assert contract.claim_username(tenant, a) != contract.device_username(tenant, b)
    assert contract.claim_username(tenant, a) != contract.gateway_username(tenant, b)


@given(tenant=names, other_tenant=names, claim=names, other_claim=names, device=names)
def test_no_claim_reaches_past_its_own_provisioning_topics(
        tenant: str, other_tenant: str, claim: str, other_claim: str, device: str) -> None:
    rules = contract.claim_access(tenant, claim)
    own_root = contract.claim_root(tenant, claim) + "/#"
    for f in rules.publish | rules.subscribe:
        assert filter_covers(own_root, f)
        assert f.endswith("/request") if f in rules.publish else f.endswith("/response")
        assert not filters_overlap(f, contract.device_root(tenant, device) + "/#")
        assert not filters_overlap(f, contract.gateway_root(tenant, device) + "/#")
        if other_tenant != tenant:
            assert not filters_overlap(f, f"{other_tenant}/#")
        if other_claim != claim:
            assert not filters_overlap(f, contract.claim_root(tenant, other_claim) + "/#")
    # No device, gateway or ingest rule reaches a provisioning topic.
    others = (device_access(tenant, device) | gateway_access(tenant, device, [claim])
              | ingest_access(tenant))
    for f in map(contract.unshared, others.publish | others.subscribe):
        assert not filters_overlap(f, f"{tenant}/provisioning/#")


def test_the_operator_reads_requests_and_answers_them() -> None:
    rules = operator_access("acme")
    assert rules.may_subscribe("acme/provisioning/+/+/request")
    assert rules.may_publish("acme/provisioning/line-1/sn-1/response")
    assert not rules.may_publish("acme/provisioning/line-1/sn-1/request")
    assert "+/provisioning/+/+/request" in contract.report_filters()


def test_provisioning_topics_round_trip() -> None:
    root = contract.claim_root("acme", "line-1")
    topic = contract.provisioning_topic(root, "sn-7", contract.ProvisioningMessage.REQUEST)
    assert topic == "acme/provisioning/line-1/sn-7/request"
    assert contract.parse_provisioning_topic(topic) == contract.ParsedProvisioningTopic(
        "acme", "line-1", "sn-7", contract.ProvisioningMessage.REQUEST)


@pytest.mark.parametrize("topic", [
    "acme/provisioning/line-1/sn-7", "acme/provisioning/line-1/SN-7/request",
    "acme/provisioning/line-1/sn-7/request/x", "acme/devices/line-1/sn-7/request",
    "acme/provisioning/+/sn-7/request", "acme/provisioning/line-1/sn-7/answer",
    "Acme/provisioning/line-1/sn-7/request", "acme/provisioning/line.1/sn-7/request",
])
def test_parse_provisioning_topic_refuses_what_is_not_one(topic: str) -> None:
    with pytest.raises(ContractError):
        contract.parse_provisioning_topic(topic)


@given(topic=st.text(max_size=80))
def test_parse_provisioning_topic_never_raises_anything_else(topic: str) -> None:
    try:
        parsed = contract.parse_provisioning_topic(topic)
    except ContractError:
        return
    assert contract.provisioning_topic(contract.claim_root(parsed.tenant, parsed.claim),
                                       parsed.serial, parsed.message) == topic


def test_docs_list_every_provisioning_topic_and_a_claims_rules() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "topics.md").read_text()
    for spec in contract.PROVISIONING_TOPICS:
        assert f"| `{spec.pattern}` |" in text, spec.pattern
    rules = contract.claim_access("acme", "line-1")
    for topic_filter in rules.publish | rules.subscribe:
        assert f"`{topic_filter}`" in text, topic_filter
    assert "`{tenant}.claim.{claim}`" in text


def test_health_is_written_by_the_ingest_and_read_by_the_operator_never_by_devices() -> None:
    topic = contract.health_topic(contract.device_root("acme", "pump-1"))
    assert topic == "acme/devices/pump-1/health"
    assert contract.parse_topic(topic).channel is Channel.HEALTH
    device = device_access("acme", "pump-1")
    assert not device.may_publish(topic)
    assert not device.may_subscribe(topic)
    assert operator_access("acme").may_subscribe("acme/devices/+/health")
    assert "+/devices/+/health" in contract.report_filters()
    assert not ingest_access("acme").may_subscribe("acme/devices/+/health")


@pytest.mark.parametrize("metric", ["*", "temp", "motor.rpm", "_x-1"])
def test_a_zscore_rule_names_a_metric_or_every_one(metric: str) -> None:
    assert ZScoreRule(metric=metric).metric == metric


@pytest.mark.parametrize("metric", ["", "**", "t*", "1temp", "a b"])
def test_a_zscore_rule_refuses_what_is_neither_a_metric_nor_the_wildcard(metric: str) -> None:
    with pytest.raises(ValueError, match="metric"):
        ZScoreRule(metric=metric)


def test_invalid_rules_are_described_in_plain_words() -> None:
    with pytest.raises(ValueError,
                       match=r"^invalid anomaly rules: bounds\.0: set min, max or both$"):
        parse_rules('{"bounds": [{"metric": "temp"}]}')
