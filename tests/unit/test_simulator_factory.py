"""A factory-fresh simulated device: its CSR, and how it reads answers and asks again."""

from __future__ import annotations

import json
from collections.abc import Iterator

import aiomqtt
import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from kubiot_contract.topics import IdentityKind
from kubiot_operator.pki import create_tenant_ca, issue_identity_certificate, verify_csr
from kubiot_operator.simulator.credentials import DeviceCredentials
from kubiot_operator.simulator.factory import (
    Answer,
    FactoryDevice,
    FactoryState,
    ProvisioningRefused,
    claim_credentials,
)
from kubiot_operator.simulator.outbox import RetryPolicy

CA = create_tenant_ca("acme")


def claim() -> DeviceCredentials:
    issued = issue_identity_certificate(CA, tenant="acme", kind=IdentityKind.CLAIM,
                                        name="line-1", validity_days=5)
    assert issued.key_pem is not None
    return claim_credentials({
        "username": b"acme.claim.line-1", "topic-root": b"acme/provisioning/line-1",
        "broker-host": b"127.0.0.1", "broker-port": b"8883", "tls.crt": issued.cert_pem,
        "tls.key": issued.key_pem, "ca.crt": CA.cert_pem, "firmware-signing.pub": b"key"})


class Scripted(FactoryDevice):
    """A factory device whose exchanges with the broker are scripted."""

    def __init__(self, answers: list[Answer | Exception]) -> None:
        super().__init__(claim(), "sn-0001", check_hostname=False, jitter=lambda: 0.0,
                         ask_again=RetryPolicy(first=0.001, ceiling=0.001))
        self._script: Iterator[Answer | Exception] = iter(answers)
        self.asked = 0

    async def _ask(self, payload: bytes) -> Answer:
        self.asked += 1
        step = next(self._script)
        if isinstance(step, Exception):
            raise step
        return step


def accepted(device: FactoryDevice) -> Answer:
    issued = issue_identity_certificate(CA, tenant="acme", kind=IdentityKind.DEVICE,
                                        name="sn-0001", validity_days=5,
                                        csr_pem=device.csr_pem())
    return Answer.parse(json.dumps({
        "status": "accepted", "device": "sn-0001", "username": "acme.sn-0001",
        "topicRoot": "acme/devices/sn-0001", "certificate": issued.cert_pem.decode(),
        "ca": CA.cert_pem.decode(), "brokerHost": "127.0.0.1", "brokerPort": "8883",
        "firmwareSigningKey": "key"}).encode()) or pytest.fail("unparsed")


def test_the_csr_is_for_the_devices_own_key_and_its_future_name() -> None:
    device = FactoryDevice(claim(), "sn-0001", check_hostname=False)
    csr = verify_csr(device.csr_pem(), "acme.sn-0001")
    assert csr.public_key() == device.key.public_key()
    assert json.loads(device.request_payload()).keys() == {"csr"}


async def test_it_asks_again_after_a_lost_session_and_a_pending_answer() -> None:
    device = Scripted([])
    device._script = iter([aiomqtt.MqttError("taken over"),
                           Answer("pending", "Issuing", retry_after=0.001), accepted(device)])
    credentials = await device.provision()
    assert device.asked == 3 and device.lost_sessions == 1
    assert device.state is FactoryState.PROVISIONED and device.provisioned.is_set()
    assert credentials.username == "acme.sn-0001"
    assert credentials.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    certificate = x509.load_pem_x509_certificate(credentials.certificate_pem)
    assert certificate.public_key() == device.key.public_key()


async def test_a_refusal_ends_it_unless_it_may_ask_again_later() -> None:
    device = Scripted([Answer("refused", "RateLimited", retry_after=0.001),
                       Answer("refused", "NameNotAllowed", "outside the pattern")])
    with pytest.raises(ProvisioningRefused) as caught:
        await device.provision()
    assert caught.value.reason == "NameNotAllowed" and device.asked == 2
    assert device.state is FactoryState.REFUSED


async def test_an_accepted_answer_without_a_certificate_is_no_identity() -> None:
    device = Scripted([Answer("accepted", fields={"status": "accepted"})])
    with pytest.raises(ProvisioningRefused) as caught:
        await device.provision()
    assert caught.value.reason == "IncompleteAnswer"


@given(payload=st.binary(max_size=200))
def test_answers_it_cannot_read_are_ignored(payload: bytes) -> None:
    answer = Answer.parse(payload)
    assert answer is None or isinstance(answer.status, str)


@given(retry=st.one_of(st.floats(), st.integers(), st.booleans(), st.text(max_size=5)))
def test_a_suggested_wait_is_always_a_sane_number_of_seconds(retry: object) -> None:
    answer = Answer.parse(json.dumps({"status": "pending", "retryAfterSeconds": retry}).encode())
    assert answer is not None
    assert answer.retry_after is None or 0.0 <= answer.retry_after <= 3600.0
