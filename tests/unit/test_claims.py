"""A tenant's provisioning claims: issued into a Secret, rotated, revoked onto the CRL, retired."""

from __future__ import annotations

import base64
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from kubiot_contract.topics import claim_access
from kubiot_operator.brokers import BrokerIdentity, SyncResult
from kubiot_operator.brokers.base import NOTHING_DONE
from kubiot_operator.controllers.resync import wanted_identities
from kubiot_operator.controllers.tenant import reconcile_tenant
from kubiot_operator.kube.client import SECRETS, TENANTS
from kubiot_operator.models.tenant import TenantSpec
from kubiot_operator.pki import revoked_serials
from tests.support.firmware_env import (
    API,
    Clock,
    MemoryObjects,
    RecordingMessenger,
    memory_platform,
)


class TenantBroker:
    """The broker calls the Tenant controller makes, remembered."""

    def __init__(self) -> None:
        self.identities: dict[str, BrokerIdentity] = {}

    async def ensure_tenant(self, tenant: str) -> SyncResult:
        return NOTHING_DONE

    async def ensure_identity(self, identity: BrokerIdentity) -> SyncResult:
        self.identities[identity.username] = identity
        return SyncResult(1)

    async def remove_identity(self, username: str) -> SyncResult:
        self.identities.pop(username, None)
        return NOTHING_DONE


class Tenants:
    def __init__(self) -> None:
        self.objects = MemoryObjects()
        self.platform = memory_platform(self.objects, RecordingMessenger(), Clock())
        self.broker = TenantBroker()
        self.platform.broker = self.broker  # type: ignore[assignment]

    async def reconcile(self, claims: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
        body = await self.objects.get(TENANTS, "acme") or {
            "apiVersion": API, "kind": "Tenant", "metadata": {"name": "acme", "uid": "u1"}}
        body["spec"] = {"provisioning": {"enabled": True, "claims": claims, **settings}}
        self.objects.put(body)
        outcome = await reconcile_tenant(self.platform, body)
        await self.objects.patch(TENANTS, "acme", {"status": outcome.status})
        return outcome.status

    async def claim_secret(self, name: str = "line-1") -> dict[str, bytes]:
        secret = await self.objects.get(SECRETS, f"{name}-claim-credentials", "acme")
        assert secret is not None
        return {k: base64.b64decode(v) for k, v in secret["data"].items()}

    async def revoked(self) -> set[int]:
        return revoked_serials(await self.platform.authority.crl("acme"))


def serial_of(status: dict[str, Any], name: str = "line-1") -> str:
    entry = next(c for c in status["claims"] if c["name"] == name)
    return str(entry["certificate"]["serial"])


async def test_a_claim_is_issued_into_a_secret_for_manufacturing_once() -> None:
    tenants = Tenants()
    status = await tenants.reconcile([{"name": "line-1"}])
    ready = next(c for c in status["conditions"] if c["type"] == "ProvisioningReady")
    assert (ready["status"], ready["message"]) == ("True", "1 active claims: line-1")
    files = await tenants.claim_secret()
    certificate = x509.load_pem_x509_certificate(files["tls.crt"])
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        "acme.claim.line-1"
    assert b"PRIVATE KEY" in files["tls.key"]
    assert files["topic-root"] == b"acme/provisioning/line-1"
    assert files["username"] == b"acme.claim.line-1"
    identity = tenants.broker.identities["acme.claim.line-1"]
    assert identity.rules == claim_access("acme", "line-1")
    assert serial_of(await tenants.reconcile([{"name": "line-1"}])) == serial_of(status)


async def test_rotating_a_claim_reissues_it_and_revokes_the_old_certificate() -> None:
    tenants = Tenants()
    first = serial_of(await tenants.reconcile([{"name": "line-1"}]))
    second = serial_of(await tenants.reconcile([{"name": "line-1", "rotation": 1}]))
    assert second != first
    assert int(first, 16) in await tenants.revoked()
    assert int(second, 16) not in await tenants.revoked()
    assert "acme.claim.line-1" in tenants.broker.identities


async def test_a_revoked_claim_goes_on_the_crl_and_off_the_broker() -> None:
    tenants = Tenants()
    serial = serial_of(await tenants.reconcile([{"name": "line-1"}, {"name": "line-2"}]))
    status = await tenants.reconcile([{"name": "line-1", "revoked": True}, {"name": "line-2"}])
    assert int(serial, 16) in await tenants.revoked()
    assert set(tenants.broker.identities) == {"acme.claim.line-2", "acme.svc.ingest"}
    entry = next(c for c in status["claims"] if c["name"] == "line-1")
    assert entry["revoked"] is True

    spec = TenantSpec.model_validate({"provisioning": {"claims": [
        {"name": "line-1", "revoked": True}, {"name": "line-2"}]}})
    wanted = {i.username for i in await wanted_identities(tenants.platform, "acme", spec)}
    assert "acme.claim.line-2" in wanted and "acme.claim.line-1" not in wanted


async def test_a_claim_taken_out_of_the_spec_is_revoked_and_forgotten() -> None:
    tenants = Tenants()
    status = await tenants.reconcile([{"name": "line-1"}, {"name": "line-2"}])
    serial = serial_of(status, "line-2")
    status = await tenants.reconcile([{"name": "line-1"}])
    assert [c["name"] for c in status["claims"]] == ["line-1"]
    assert int(serial, 16) in await tenants.revoked()
    assert "acme.claim.line-2" not in tenants.broker.identities


async def test_a_bad_name_pattern_is_reported_and_leaves_the_rest_of_the_tenant_be() -> None:
    tenants = Tenants()
    status = await tenants.reconcile([{"name": "line-1"}], namePattern="sn-(")
    provisioning = next(c for c in status["conditions"] if c["type"] == "ProvisioningReady")
    assert (provisioning["status"], provisioning["reason"]) == ("False", "InvalidNamePattern")
    assert "not a regular expression" in provisioning["message"]
    identity = next(c for c in status["conditions"] if c["type"] == "IdentityReady")
    assert identity["status"] == "True"  # the CA, and the claim, are there all the same
    assert "acme.claim.line-1" in tenants.broker.identities
    # Not Failed: only provisioning stops (the in-memory cluster never makes the ingest
    # Deployment available, so the Tenant waits for it rather than reporting Degraded).
    assert status["phase"] in ("Pending", "Degraded")
