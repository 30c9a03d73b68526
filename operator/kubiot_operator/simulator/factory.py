"""A factory-fresh simulated device: it holds only its tenant's claim and its own serial, asks
for an identity on first boot, and then runs as a normal simulated device with it.

The exchange is short on purpose: connect with the claim, subscribe to the answer, send the
request (a CSR for a key made here, which never leaves), take the answer, disconnect. Every
device of a production line holds the same claim, and the broker binds the claim's client id to
its certificate, so a second device connecting ends the first one's session; a device whose
session is taken over before its answer arrives asks again after a jittered backoff. A pending
answer (being issued, or waiting for a person's approval) is asked again after the wait the
answer suggests, also jittered, so a line of devices does not ask in step.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aiomqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from kubiot_contract.topics import (
    IdentityKind,
    ProvisioningMessage,
    device_username,
    provisioning_topic,
    validate_name,
)

from .credentials import BundleIncomplete, DeviceCredentials
from .device import SimulatedDevice
from .outbox import RetryPolicy

log = logging.getLogger(__name__)
#: aiomqtt's own log of a claim session. Ending a session the broker already ended (it was taken
#: over) is routine here, not the warning aiomqtt makes of it.
_session_log = log.getChild("session")
_session_log.setLevel(logging.ERROR)

#: How long a device waits for its answer before it asks again. Short: a session taken over
#: just as it connects is not always reported (see `ignore_lost_claim_sessions`).
ANSWER_TIMEOUT = 2.0
#: The longest wait an answer can ask for; a device does not go quiet for longer.
MAX_RETRY_AFTER = 3600.0
#: Backoff after a lost session or an unanswered request.
ASK_AGAIN = RetryPolicy(first=0.2, ceiling=5.0)


class FactoryState(StrEnum):
    FRESH = "fresh"
    PENDING = "pending"
    PROVISIONED = "provisioned"
    REFUSED = "refused"


class ProvisioningRefused(Exception):
    """The platform refused the device for good; `reason` is the answer's reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class Answer:
    """An answer as the device reads it."""

    status: str
    reason: str = ""
    message: str = ""
    retry_after: float | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, payload: bytes) -> Answer | None:
        try:
            body = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("status"), str):
            return None
        retry = body.get("retryAfterSeconds")
        if isinstance(retry, int | float) and not isinstance(retry, bool) \
                and math.isfinite(retry):
            retry_after: float | None = min(max(float(retry), 0.0), MAX_RETRY_AFTER)
        else:
            retry_after = None
        return cls(status=body["status"], reason=str(body.get("reason", "")),
                   message=str(body.get("message", "")), retry_after=retry_after, fields=body)


class FactoryDevice:
    """`provision()` gets the device its identity; `run()` provisions and then runs it."""

    def __init__(self, claim: DeviceCredentials, serial: str, *, model: str | None = None,
                 check_hostname: bool = True, telemetry_seconds: float = 5.0,
                 answer_timeout: float = ANSWER_TIMEOUT, ask_again: RetryPolicy = ASK_AGAIN,
                 jitter: Callable[[], float] = random.random,
                 key: ec.EllipticCurvePrivateKey | None = None) -> None:
        self.claim = claim
        # Made once: building a TLS context takes longer than the whole exchange.
        self._claim_tls = claim.tls_context(check_hostname=check_hostname)
        self.serial = validate_name(serial, "serial")
        self.model = model
        self._check_hostname = check_hostname
        self._telemetry_seconds = telemetry_seconds
        self._answer_timeout = answer_timeout
        self._ask_again = ask_again
        self._jitter = jitter
        # Made on the device, and it stays there: only the CSR is sent.
        self.key = key or ec.generate_private_key(ec.SECP256R1())
        self.state = FactoryState.FRESH
        self.last_answer: Answer | None = None
        self.requests = 0
        self.lost_sessions = 0
        self.device: SimulatedDevice | None = None
        self.provisioned = asyncio.Event()

    @property
    def tenant(self) -> str:
        return self.claim.tenant

    def csr_pem(self) -> bytes:
        """A CSR for the device's own key, with the CN its identity will have."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                device_username(self.tenant, self.serial))])
        csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(
            self.key, hashes.SHA256())
        return csr.public_bytes(serialization.Encoding.PEM)

    def request_payload(self) -> bytes:
        body: dict[str, Any] = {"csr": self.csr_pem().decode()}
        if self.model is not None:
            body["model"] = self.model
        return json.dumps(body).encode()

    async def run(self) -> None:
        """Provision, then run as a normal device until cancelled; a refusal ends it."""
        try:
            credentials = await self.provision()
        except ProvisioningRefused as exc:
            log.warning("device %s refused: %s", self.serial, exc)
            return
        self.device = SimulatedDevice(credentials, telemetry_seconds=self._telemetry_seconds,
                                      check_hostname=self._check_hostname)
        await self.device.run()

    async def provision(self) -> DeviceCredentials:
        """Ask until accepted; raise ProvisioningRefused when refused for good."""
        failures = 0
        payload = self.request_payload()
        while True:
            try:
                answer = await self._ask(payload)
            except (aiomqtt.MqttError, TimeoutError, ssl.SSLError, OSError) as exc:
                self.lost_sessions += 1
                log.debug("device %s: no answer (%s); asking again", self.serial, exc)
                await asyncio.sleep(self._ask_again.delay(failures, self._jitter()))
                failures += 1
                continue
            failures = 0
            self.last_answer = answer
            if answer.status == "accepted":
                try:
                    credentials = self._credentials(answer)
                except BundleIncomplete as exc:
                    self.state = FactoryState.REFUSED
                    raise ProvisioningRefused("IncompleteAnswer", str(exc)) from exc
                self.state = FactoryState.PROVISIONED
                self.provisioned.set()
                return credentials
            if answer.status == "refused" and answer.retry_after is None:
                self.state = FactoryState.REFUSED
                raise ProvisioningRefused(answer.reason, answer.message)
            self.state = FactoryState.PENDING
            wait = answer.retry_after or 1.0
            await asyncio.sleep(wait * (0.5 + self._jitter()))

    async def _ask(self, payload: bytes) -> Answer:
        root = self.claim.topic_root
        request = provisioning_topic(root, self.serial, ProvisioningMessage.REQUEST)
        response = provisioning_topic(root, self.serial, ProvisioningMessage.RESPONSE)
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
        client = aiomqtt.Client(
            self.claim.broker_host, self.claim.broker_port, identifier=self.claim.username,
            protocol=aiomqtt.ProtocolVersion.V5, keepalive=30, properties=properties,
            tls_context=self._claim_tls, logger=_session_log,
            # The exchange is a few small packets each way; waiting for more to send along
            # (Nagle) would hold the claim's one session for tens of milliseconds longer.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        entered = False
        try:
            async with asyncio.timeout(self._answer_timeout):
                await client.__aenter__()
                entered = True
                # Read from the start: the message iterator is what notices a session taken
                # over, while a SUBACK or PUBACK that will never come would only time out.
                answer = asyncio.create_task(_first_answer(client))
                sending = asyncio.create_task(self._send_request(client, request, response,
                                                                 payload))
                try:
                    done, _ = await asyncio.wait({answer, sending},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if answer not in done:
                        sending.result()  # raises when the request could not be sent
                    return await answer
                finally:
                    for task in (answer, sending):
                        task.cancel()
                    await asyncio.gather(answer, sending, return_exceptions=True)
        finally:
            if entered:
                # Outside the answer's deadline, so a timeout cannot cut the goodbye short.
                with contextlib.suppress(aiomqtt.MqttError, ssl.SSLError, OSError,
                                         TimeoutError):
                    async with asyncio.timeout(self._answer_timeout):
                        await client.__aexit__(None, None, None)
            # Also when connecting failed half-way: a session can be taken over before
            # aiomqtt's connect returns.
            await _take_disconnection(client)

    async def _send_request(self, client: aiomqtt.Client, request: str, response: str,
                            payload: bytes) -> None:
        await client.subscribe(response, qos=1)
        await client.publish(request, payload, qos=1)
        self.requests += 1

    def _credentials(self, answer: Answer) -> DeviceCredentials:
        """The device's own bundle: the answer's certificate and broker, and its own key."""
        fields = answer.fields
        files = {"username": fields.get("username", ""), "topic-root": fields.get("topicRoot", ""),
                 "broker-host": fields.get("brokerHost", ""),
                 "broker-port": str(fields.get("brokerPort", "")),
                 "tls.crt": fields.get("certificate", ""), "ca.crt": fields.get("ca", ""),
                 "broker-ca.crt": fields.get("brokerCa", ""),
                 "firmware-signing.pub": fields.get("firmwareSigningKey", "")}
        data = {key: str(value).encode() for key, value in files.items() if value}
        data["tls.key"] = self.key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption())
        return DeviceCredentials.from_secret_data(data, IdentityKind.DEVICE)


async def _first_answer(client: aiomqtt.Client) -> Answer:
    async for message in client.messages:
        answer = Answer.parse(message.payload if isinstance(message.payload, bytes) else b"")
        if answer is not None:
            return answer
    raise aiomqtt.MqttError("the session ended before the answer")


async def _take_disconnection(client: aiomqtt.Client) -> None:
    """Read why a closed session ended (a takeover, mostly), which aiomqtt otherwise leaves for
    the event loop to report as never retrieved: its message iterator, drained, raises it."""
    with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
        async with asyncio.timeout(0.1):
            async for _ in client.messages:
                pass


def ignore_lost_claim_sessions(loop: asyncio.AbstractEventLoop) -> None:
    """Keep the event loop from reporting claim sessions taken over while connecting.

    aiomqtt 2.5 (Client.__aenter__) replaces its finished disconnection future when a session
    ends between the CONNACK and the end of its connect; the replaced future's error is then
    never retrieved and the loop prints it at exit. And paho asks the loop to watch a socket for
    writing from a callback that can run after the broker closed it (EBADF). With many devices
    sharing one claim both are routine, so a program running them passes everything else on to
    the default handler.
    """
    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        message = str(context.get("message", ""))
        lost_while_connecting = (isinstance(error, aiomqtt.MqttCodeError)
                                 and message == "Future exception was never retrieved")
        closed_socket = (isinstance(error, OSError) and error.errno == errno.EBADF
                         and "add_writer" in message)
        if lost_while_connecting or closed_socket:
            log.debug("a claim session ended while connecting: %s", error)
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


def claim_credentials(data: dict[str, bytes]) -> DeviceCredentials:
    """A claim's bundle (its Secret's data) as the credentials a factory device holds."""
    return DeviceCredentials.from_secret_data(data, IdentityKind.CLAIM)
