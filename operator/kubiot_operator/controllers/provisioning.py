"""Provisioning by claim: requests from factory-fresh devices become Devices, answers go back.

The desk answers from what exists, never from what it remembers: a request for a serial that
has no Device creates one (its identity the device's own CSR), and every later request, a
retry, a replay or a duplicate, finds that Device and is answered with where it stands:
pending (being issued, or waiting for approval), accepted with the certificate, or refused.
A restarted operator therefore answers exactly as before, and a device simply asks again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from pydantic import ValidationError

from kubiot_contract.topics import PROVISIONING_LEVEL, IdentityKind
from kubiot_operator.kube.client import DEVICES, SECRETS, TENANTS, KubeError
from kubiot_operator.kube.secrets import secret_data
from kubiot_operator.models.tenant import TenantSpec
from kubiot_operator.mqtt import MessengerUnavailable
from kubiot_operator.reconcile.identity import credential_secret_name, issued_record
from kubiot_operator.reconcile.provisioning import (
    PendingReason,
    ProvisioningRequest,
    Refusal,
    RefusalReason,
    Unanswerable,
    accepted_answer,
    admit,
    awaiting_approval,
    failed_device_refusal,
    match_existing,
    parse_request,
    pending_answer,
    provisioned_device,
    public_key_of_certificate,
    quota_refusal,
    refused_answer,
)
from kubiot_operator.reconcile.reports import TokenBucket
from kubiot_operator.reconcile.tenant import tenant_namespace

from .objects import parse_spec
from .platform import Platform

log = logging.getLogger(__name__)

#: Requests waiting to be answered; beyond this the oldest are dropped (their devices ask again).
QUEUE_LIMIT = 10_000
#: How soon a device is told to ask again while its Device is being issued, and while it waits
#: for a person's approval.
ISSUING_RETRY_SECONDS = 1.0
APPROVAL_RETRY_SECONDS = 5.0


MessageHandler = Callable[[str, bytes], None]


def route_messages(reports: MessageHandler, desk: ProvisioningDesk) -> MessageHandler:
    """One handler for the operator's MQTT session: provisioning requests to the desk, every
    other message (device reports) to the report pump."""

    def on_message(topic: str, payload: bytes) -> None:
        levels = topic.split("/", 2)
        if len(levels) > 1 and levels[1] == PROVISIONING_LEVEL:
            desk.on_message(topic, payload)
        else:
            reports(topic, payload)

    return on_message


class ProvisioningDesk:
    """`on_message` takes requests from the MQTT connection; `run` answers them in order."""

    def __init__(self, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        # Latest request per topic: a device asking again while its first request waits is one
        # request, not two.
        self._pending: OrderedDict[str, bytes] = OrderedDict()
        self._ready = asyncio.Event()
        self._monotonic = monotonic
        self._buckets: dict[str, TokenBucket] = {}
        self.dropped = 0  # requests given up unanswered because the queue was full

    def on_message(self, topic: str, payload: bytes) -> None:
        """Called by the MQTT connection for each request; never blocks."""
        self._pending.pop(topic, None)
        self._pending[topic] = payload
        while len(self._pending) > QUEUE_LIMIT:
            self._pending.popitem(last=False)
            self.dropped += 1
        self._ready.set()

    async def run(self, platform: Platform) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._pending:
                topic, payload = self._pending.popitem(last=False)
                try:
                    await self.answer(platform, topic, payload)
                except (KubeError, MessengerUnavailable, OSError) as exc:
                    # The device asks again; nothing is half-done that a retry would not finish.
                    log.warning("provisioning request on %s not answered: %s", topic, exc)
                    platform.metrics.provisioning_answers.labels("Unanswered").inc()
                except Exception:
                    # A bug must cost one answer, not every later device's provisioning.
                    log.exception("provisioning request on %s failed", topic)
                    platform.metrics.provisioning_answers.labels("Error").inc()

    async def answer(self, platform: Platform, topic: str, payload: bytes) -> bytes | None:
        """Decide on one request and publish the answer; returns it (None: not answerable)."""
        parsed = parse_request(topic, payload)
        if isinstance(parsed, Unanswerable):
            platform.metrics.provisioning_answers.labels("Unanswerable").inc()
            log.info("ignored a message on %s: %s", topic, parsed.reason)
            return None
        if isinstance(parsed, tuple):
            answer_on, refusal = parsed
            return await self._send(platform, answer_on, refused_answer(refusal), refusal.reason)
        request = parsed
        answer, outcome = await self._decide(platform, request)
        return await self._send(platform, request.response_topic, answer, outcome)

    async def _decide(self, platform: Platform, request: ProvisioningRequest
                      ) -> tuple[bytes, str]:
        body = await platform.objects.get(TENANTS, request.tenant)
        spec: TenantSpec | None = None
        if body is not None and not body["metadata"].get("deletionTimestamp"):
            try:
                spec = parse_spec(TenantSpec, body)
            except ValidationError:
                spec = None
        refusal = admit(request, spec.provisioning if spec is not None else None)
        if refusal is not None or spec is None:
            refusal = refusal or Refusal(RefusalReason.PROVISIONING_DISABLED, "no tenant")
            return refused_answer(refusal), refusal.reason.value
        namespace = tenant_namespace(request.tenant, spec)
        device = await platform.objects.get(DEVICES, request.device, namespace)
        if device is None:
            if spec.quotas.max_devices is not None:
                existing = len(await platform.objects.list(DEVICES, namespace))
                refusal = quota_refusal(request.tenant, spec.quotas.max_devices, existing)
                if refusal is not None:
                    return refused_answer(refusal), refusal.reason.value
            if not self._take(request.tenant, spec.provisioning.devices_per_minute):
                refusal = Refusal(RefusalReason.RATE_LIMITED, "too many new devices a minute; "
                                  "ask again later",
                                  retry_after=60.0 / spec.provisioning.devices_per_minute)
                return refused_answer(refusal), refusal.reason.value
            device = await platform.objects.ensure(
                provisioned_device(request, spec.provisioning, namespace))
            platform.metrics.devices_provisioned.labels(request.tenant, request.claim).inc()
            log.info("provisioned Device %s/%s from claim %s", namespace, request.device,
                     request.claim)
            platform.resource_created(device)
        refusal = match_existing(request, device)
        if refusal is not None:
            return refused_answer(refusal), refusal.reason.value
        refusal = failed_device_refusal(device)
        if refusal is not None:
            return refused_answer(refusal), refusal.reason.value
        if awaiting_approval(device["metadata"].get("labels") or {}):
            return pending_answer(PendingReason.AWAITING_APPROVAL,
                                  f"Device {namespace}/{request.device} waits for approval",
                                  APPROVAL_RETRY_SECONDS), PendingReason.AWAITING_APPROVAL.value
        secret = await platform.objects.get(
            SECRETS, credential_secret_name(IdentityKind.DEVICE, request.device), namespace)
        record = issued_record(secret)
        files = secret_data(secret) if secret is not None else {}
        if (record is not None and not record.revoked and "tls.crt" in files
                and public_key_of_certificate(files["tls.crt"]) == request.public_key):
            return accepted_answer(request, files), "Accepted"
        return pending_answer(PendingReason.ISSUING, "the certificate is being issued",
                              ISSUING_RETRY_SECONDS), PendingReason.ISSUING.value

    def _take(self, tenant: str, per_minute: int) -> bool:
        rate = per_minute / 60.0
        bucket = self._buckets.get(tenant)
        if bucket is None or bucket.rate != rate:
            bucket = self._buckets[tenant] = TokenBucket(rate, burst=float(per_minute),
                                                         now=self._monotonic())
        return bucket.take(1, self._monotonic()) == 1

    async def _send(self, platform: Platform, topic: str, answer: bytes, outcome: str
                    ) -> bytes:
        await platform.messenger.publish(topic, answer, retain=False)
        platform.metrics.provisioning_answers.labels(outcome).inc()
        return answer
