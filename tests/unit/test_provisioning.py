"""Provisioning by claim: requests become Devices once, answers say where each stands, and
hostile bytes are refused with a reason, never an exception."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from kubiot_operator.brokers import BrokerIdentity, SyncResult
from kubiot_operator.brokers.base import NOTHING_DONE
from kubiot_operator.controllers.device import reconcile_device
from kubiot_operator.controllers.provisioning import ProvisioningDesk, route_messages
from kubiot_operator.kube.client import DEVICES
from kubiot_operator.models.tenant import ProvisioningSpec
from kubiot_operator.reconcile.provisioning import (
    APPROVED_LABEL,
    CLAIM_LABEL,
    PROVISIONED_LABEL,
    ProvisioningRequest,
    Refusal,
    RefusalReason,
    Unanswerable,
    admit,
    parse_request,
)
from tests.support.firmware_env import (
    API,
    Clock,
    MemoryObjects,
    RecordingMessenger,
    memory_platform,
)

REQUEST = "acme/provisioning/line-1/{serial}/request"
RESPONSE = "acme/provisioning/line-1/{serial}/response"


def device_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr_for(key: ec.EllipticCurvePrivateKey, common_name: str) -> str:
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common_name)])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def request_bytes(key: ec.EllipticCurvePrivateKey, serial: str, **extra: Any) -> bytes:
    return json.dumps({"csr": csr_for(key, f"acme.{serial}"), **extra}).encode()


KEY = device_key()


def parsed(serial: str = "sn-0001", key: ec.EllipticCurvePrivateKey = KEY) -> ProvisioningRequest:
    result = parse_request(REQUEST.format(serial=serial), request_bytes(key, serial))
    assert isinstance(result, ProvisioningRequest), result
    return result


# --- parsing -----------------------------------------------------------------------------------

def test_a_request_names_its_claim_and_serial_and_carries_the_devices_csr() -> None:
    request = parse_request(REQUEST.format(serial="sn-0001"),
                            request_bytes(KEY, "sn-0001", model="pressure-v2"))
    assert isinstance(request, ProvisioningRequest)
    assert (request.tenant, request.claim, request.serial, request.device, request.model) == (
        "acme", "line-1", "sn-0001", "sn-0001", "pressure-v2")
    assert request.response_topic == RESPONSE.format(serial="sn-0001")


@pytest.mark.parametrize(("payload", "reason", "words"), [
    (b"\xff\xfe", RefusalReason.MALFORMED, "JSON"),
    (b"[1, 2]", RefusalReason.MALFORMED, "JSON object"),
    (b'{"model": "x"}', RefusalReason.MALFORMED, "csr"),
    (b'{"csr": 7}', RefusalReason.MALFORMED, "csr"),
    (b"{" * 100_000, RefusalReason.MALFORMED, "larger"),
    (b'{"csr": "-----BEGIN CERTIFICATE REQUEST-----\\nnope"}', RefusalReason.BAD_CSR,
     "Unparseable"),
    (json.dumps({"csr": csr_for(KEY, "acme.sn-0002")}).encode(), RefusalReason.BAD_CSR,
     "SubjectMismatch"),
    (json.dumps({"csr": csr_for(KEY, "acme.sn-0001"), "model": "a/b"}).encode(),
     RefusalReason.MALFORMED, "model"),
])
def test_bad_requests_are_refused_with_a_reason(payload: bytes, reason: RefusalReason,
                                                words: str) -> None:
    result = parse_request(REQUEST.format(serial="sn-0001"), payload)
    assert isinstance(result, tuple), result
    topic, refusal = result
    assert topic == RESPONSE.format(serial="sn-0001")
    assert refusal.reason is reason
    assert words in refusal.message


@pytest.mark.parametrize("topic", ["acme/provisioning/line-1/sn-1/response",
                                   "acme/devices/sn-1/telemetry", "acme/provisioning/#"])
def test_what_is_not_a_request_is_not_answered(topic: str) -> None:
    assert isinstance(parse_request(topic, b"{}"), Unanswerable)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@given(topic=st.text(max_size=60) | st.sampled_from([REQUEST.format(serial="sn-0001")]),
       payload=st.binary(max_size=300))
def test_hostile_bytes_never_raise(topic: str, payload: bytes) -> None:
    result = parse_request(topic, payload)
    assert isinstance(result, ProvisioningRequest | Unanswerable | tuple)
    if isinstance(result, tuple):
        assert isinstance(result[1], Refusal)


@given(body=st.dictionaries(st.sampled_from(["csr", "model", "serial", "x"]), json_values,
                            max_size=4),
       csr=st.sampled_from(["", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END "
                            "CERTIFICATE REQUEST-----\n", csr_for(KEY, "acme.sn-0001")[:-40]]))
@settings(max_examples=200)
def test_hostile_json_never_raises(body: dict[str, Any], csr: str) -> None:
    for candidate in (body, {**body, "csr": csr}):
        result = parse_request(REQUEST.format(serial="sn-0001"), json.dumps(candidate).encode())
        assert isinstance(result, tuple) and isinstance(result[1], Refusal), result


# --- admission ---------------------------------------------------------------------------------

def spec(**fields: Any) -> ProvisioningSpec:
    return ProvisioningSpec.model_validate({"enabled": True, "claims": [{"name": "line-1"}],
                                            **fields})


@pytest.mark.parametrize(("settings_", "reason"), [
    ({"enabled": False}, RefusalReason.PROVISIONING_DISABLED),
    ({"claims": [{"name": "line-2"}]}, RefusalReason.UNKNOWN_CLAIM),
    ({"claims": [{"name": "line-1", "revoked": True}]}, RefusalReason.CLAIM_REVOKED),
    ({"namePattern": "^sn-[0-9]{6}$"}, RefusalReason.NAME_NOT_ALLOWED),
    ({"serials": ["sn-0002"]}, RefusalReason.SERIAL_NOT_ALLOWED),
])
def test_admission_refuses_with_the_reason(settings_: dict[str, Any],
                                           reason: RefusalReason) -> None:
    refusal = admit(parsed(), spec(**settings_))
    assert refusal is not None and refusal.reason is reason


def test_admission_lets_a_matching_name_and_a_listed_serial_through() -> None:
    assert admit(parsed(), spec(namePattern="^sn-[0-9]{4}$", serials=["sn-0001"])) is None


def test_a_name_pattern_that_is_no_regular_expression_stops_provisioning_only() -> None:
    refusal = admit(parsed(), spec(namePattern="sn-("))
    assert refusal is not None
    assert refusal.reason is RefusalReason.PROVISIONING_MISCONFIGURED
    assert "namePattern is not a regular expression" in refusal.message
    assert refusal.retry_after is not None


# --- the desk, with the Device controller ------------------------------------------------------

class RecordingBroker:
    """The broker calls the Device controller makes, remembered."""

    def __init__(self) -> None:
        self.identities: dict[str, BrokerIdentity] = {}

    async def ensure_identity(self, identity: BrokerIdentity) -> SyncResult:
        self.identities[identity.username] = identity
        return SyncResult(1)

    async def set_enabled(self, username: str, enabled: bool) -> SyncResult:
        return NOTHING_DONE

    async def remove_identity(self, username: str) -> SyncResult:
        self.identities.pop(username, None)
        return NOTHING_DONE


class Desk:
    """The desk over in-memory objects, with the Device controller run when it creates one."""

    def __init__(self, provisioning: dict[str, Any]) -> None:
        self.objects = MemoryObjects()
        self.messenger = RecordingMessenger()
        self.platform = memory_platform(self.objects, self.messenger, Clock())
        self.broker = RecordingBroker()
        self.platform.broker = self.broker  # type: ignore[assignment]
        self.created: list[str] = []
        self.platform.resource_created = lambda body: self.created.append(
            body["metadata"]["name"])
        self.objects.put({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": "acme", "labels": {"kubiot.io/tenant": "acme"}}})
        self.objects.put({"apiVersion": API, "kind": "Tenant", "metadata": {"name": "acme"},
                          "spec": {"provisioning": {"enabled": True,
                                                    "claims": [{"name": "line-1"}],
                                                    **provisioning}}})
        self.desk = ProvisioningDesk(monotonic=lambda: self.now)
        self.now = 0.0

    async def ask(self, serial: str, key: ec.EllipticCurvePrivateKey = KEY,
                  payload: bytes | None = None) -> dict[str, Any]:
        answer = await self.desk.answer(self.platform, REQUEST.format(serial=serial),
                                        request_bytes(key, serial) if payload is None else payload)
        assert answer is not None
        assert self.messenger.published[-1].topic == RESPONSE.format(serial=serial)
        value: dict[str, Any] = json.loads(answer)
        return value

    async def reconcile(self, serial: str) -> dict[str, Any]:
        device = await self.objects.get(DEVICES, serial, "acme")
        assert device is not None
        outcome = await reconcile_device(self.platform, device)
        await self.objects.patch(DEVICES, serial, {"status": outcome.status}, "acme")
        return outcome.status

    def devices(self) -> list[str]:
        return sorted(name for (plural, _, name) in self.objects.items if plural == "devices")


async def test_a_request_becomes_one_device_that_is_answered_with_its_certificate() -> None:
    desk = Desk({"deviceLabels": {"site": "field"}})
    first = await desk.ask("sn-0001")
    assert first["status"] == "pending" and first["reason"] == "Issuing"
    assert desk.created == ["sn-0001"]
    device = await desk.objects.get(DEVICES, "sn-0001", "acme")
    assert device is not None
    labels = device["metadata"]["labels"]
    assert labels[PROVISIONED_LABEL] == "true" and labels[CLAIM_LABEL] == "line-1"
    assert labels[APPROVED_LABEL] == "true" and labels["site"] == "field"
    assert device["spec"]["identity"]["type"] == "CSR"

    status = await desk.reconcile("sn-0001")
    assert status["phase"] == "Ready"
    answer = await desk.ask("sn-0001")
    assert answer["status"] == "accepted"
    assert answer["username"] == "acme.sn-0001"
    assert answer["topicRoot"] == "acme/devices/sn-0001"
    certificate = x509.load_pem_x509_certificate(answer["certificate"].encode())
    assert certificate.public_key() == KEY.public_key()
    assert "PRIVATE KEY" not in json.dumps(answer)

    # A replay, and a duplicate with a fresh CSR for the same key: the same Device.
    assert (await desk.ask("sn-0001"))["status"] == "accepted"
    again = json.dumps({"csr": csr_for(KEY, "acme.sn-0001"), "model": "m-1"}).encode()
    assert (await desk.ask("sn-0001", payload=again))["certificate"] == answer["certificate"]
    assert desk.devices() == ["sn-0001"] and desk.created == ["sn-0001"]


async def test_a_reused_serial_with_another_key_is_refused() -> None:
    desk = Desk({})
    await desk.ask("sn-0001")
    answer = await desk.ask("sn-0001", key=device_key())
    assert (answer["status"], answer["reason"]) == ("refused", "SerialInUse")
    assert desk.devices() == ["sn-0001"]


async def test_a_device_made_by_hand_keeps_its_name() -> None:
    desk = Desk({})
    desk.objects.put({"apiVersion": API, "kind": "Device",
                      "metadata": {"name": "sn-0001", "namespace": "acme"}, "spec": {}})
    answer = await desk.ask("sn-0001")
    assert (answer["status"], answer["reason"]) == ("refused", "NameTaken")


async def test_with_manual_approval_the_device_waits_until_approved() -> None:
    desk = Desk({"approval": "Manual"})
    answer = await desk.ask("sn-0001")
    assert (answer["status"], answer["reason"]) == ("pending", "AwaitingApproval")
    status = await desk.reconcile("sn-0001")
    assert status["phase"] == "Pending"
    identity = next(c for c in status["conditions"] if c["type"] == "IdentityReady")
    assert identity["reason"] == "AwaitingApproval"
    assert "kubiot approve acme/sn-0001" in identity["message"]
    assert desk.broker.identities == {}  # no broker access before approval
    assert (await desk.ask("sn-0001"))["reason"] == "AwaitingApproval"

    await desk.objects.patch(DEVICES, "sn-0001", {"metadata": {"labels": {
        APPROVED_LABEL: "true"}}}, "acme")
    assert (await desk.reconcile("sn-0001"))["phase"] == "Ready"
    assert "acme.sn-0001" in desk.broker.identities
    assert (await desk.ask("sn-0001"))["status"] == "accepted"


async def test_new_devices_are_rate_limited_and_told_when_to_ask_again() -> None:
    desk = Desk({"devicesPerMinute": 2})
    assert (await desk.ask("sn-0001"))["status"] == "pending"
    assert (await desk.ask("sn-0002"))["status"] == "pending"
    limited = await desk.ask("sn-0003")
    assert (limited["status"], limited["reason"]) == ("refused", "RateLimited")
    assert limited["retryAfterSeconds"] == 30.0
    assert (await desk.ask("sn-0001"))["status"] == "pending"  # known devices are not limited
    desk.now += 30.0
    assert (await desk.ask("sn-0003"))["status"] == "pending"
    assert desk.devices() == ["sn-0001", "sn-0002", "sn-0003"]


@pytest.mark.parametrize(("provisioning", "reason"), [
    ({"namePattern": "^sn-[0-9]{6}$"}, "NameNotAllowed"),
    ({"enabled": False}, "ProvisioningDisabled"),
    ({"claims": [{"name": "line-1", "revoked": True}]}, "ClaimRevoked"),
])
async def test_refusals_make_no_device(provisioning: dict[str, Any], reason: str) -> None:
    desk = Desk(provisioning)
    answer = await desk.ask("sn-0001")
    assert (answer["status"], answer["reason"]) == ("refused", reason)
    assert desk.devices() == []


async def test_hostile_bytes_are_answered_with_a_refusal() -> None:
    desk = Desk({})
    answer = await desk.ask("sn-0001", payload=b"\x00" * 64)
    assert (answer["status"], answer["reason"]) == ("refused", "Malformed")
    assert desk.devices() == []


def test_provisioning_requests_go_to_the_desk_and_reports_to_the_pump() -> None:
    reports: list[str] = []
    desk = ProvisioningDesk()
    route = route_messages(lambda topic, _: reports.append(topic), desk)
    route("acme/devices/d1/presence", b"online")
    route(REQUEST.format(serial="sn-1"), b"{}")
    route(REQUEST.format(serial="sn-1"), b"{}")  # the same device asking again: one request
    assert reports == ["acme/devices/d1/presence"]
    assert len(desk._pending) == 1


async def test_a_tenant_at_its_device_quota_refuses_new_devices_before_creating_them() -> None:
    desk = Desk({})
    tenant = desk.objects.items[("tenants", None, "acme")]
    tenant["spec"]["quotas"] = {"maxDevices": 1}
    assert (await desk.ask("sn-0001"))["status"] == "pending"
    full = await desk.ask("sn-0002")
    assert (full["status"], full["reason"], full["retryAfterSeconds"]) == (
        "refused", "QuotaExceeded", 60.0)
    assert desk.devices() == ["sn-0001"]


async def test_a_failed_device_is_explained_to_the_device() -> None:
    desk = Desk({})
    await desk.ask("sn-0001")
    await desk.objects.patch(DEVICES, "sn-0001", {"status": {"phase": "Failed", "conditions": [
        {"type": "IdentityReady", "status": "False", "reason": "WeakKey",
         "message": "the key is too small"}]}}, "acme")
    answer = await desk.ask("sn-0001")
    assert (answer["status"], answer["reason"]) == ("refused", "DeviceFailed")
    assert "WeakKey: the key is too small" in answer["message"]


@given(payload=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
       serial=st.sampled_from(["sn-0001", "sn-0002"]))
@settings(max_examples=100, deadline=None)
def test_the_desk_answers_hostile_requests_with_a_refusal_and_makes_no_device(
        payload: bytes, serial: str) -> None:
    import asyncio

    async def scenario() -> None:
        desk = Desk({})
        answer = await desk.ask(serial, payload=payload)
        assert answer["status"] == "refused"
        assert answer["reason"] in {"Malformed", "BadCSR"}
        assert desk.devices() == []

    asyncio.run(scenario())
