"""When a device gets a new credential: first time, spec change, renewal, after suspension."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

from kubiot_contract.topics import IdentityKind
from kubiot_operator.models.common import KeyAlgorithm
from kubiot_operator.models.identity import IdentitySpec, IdentityType
from kubiot_operator.models.tenant import TenantSpec
from kubiot_operator.reconcile.identity import (
    REVOKED_ANNOTATION,
    BrokerEndpoint,
    IssueReason,
    credential_policy,
    credential_secret,
    decide_identity,
    issued_record,
)

NOW = datetime(2026, 6, 1, tzinfo=UTC)
TENANT = TenantSpec.model_validate({})


def secret_for(policy_spec: IdentitySpec, not_after: datetime, serial: str = "0a1b") -> dict:
    policy = credential_policy(TENANT, policy_spec)
    return credential_secret(
        tenant="acme", kind=IdentityKind.DEVICE, name="pump-1", namespace="acme",
        username="acme.pump-1", topic_root="acme/devices/pump-1", policy=policy,
        endpoint=BrokerEndpoint("mqtt.example.com", 8883, b"CA"),
        files={"tls.crt": b"CERT", "tls.key": b"KEY"}, serial=serial, not_after=not_after)


def test_tenant_defaults_fill_the_identity_spec() -> None:
    policy = credential_policy(TENANT, IdentitySpec())
    assert policy.key_algorithm is KeyAlgorithm.ECDSA_P256
    assert (policy.validity_days, policy.renew_before_days) == (365, 30)
    override = credential_policy(TENANT, IdentitySpec.model_validate(
        {"keyAlgorithm": "RSA-3072", "validityDays": 90, "renewBeforeDays": 10}))
    assert (override.key_algorithm, override.validity_days, override.renew_before_days) == (
        KeyAlgorithm.RSA_3072, 90, 10)


def test_a_device_without_a_secret_gets_a_new_credential() -> None:
    policy = credential_policy(TENANT, IdentitySpec())
    assert decide_identity(policy, issued_record(None), NOW).issue is IssueReason.NEW


def test_a_current_credential_is_kept_until_its_renewal_time() -> None:
    spec = IdentitySpec()
    policy = credential_policy(TENANT, spec)
    record = issued_record(secret_for(spec, NOW + timedelta(days=100)))
    decision = decide_identity(policy, record, NOW)
    assert decision.issue is None
    assert decision.renew_at == NOW + timedelta(days=70)
    later = decide_identity(policy, record, NOW + timedelta(days=70))
    assert later.issue is IssueReason.RENEWAL and later.revoke_serial is None


def test_a_changed_key_algorithm_reissues_and_revokes_the_old_certificate() -> None:
    record = issued_record(secret_for(IdentitySpec(), NOW + timedelta(days=100)))
    policy = credential_policy(TENANT, IdentitySpec.model_validate({"keyAlgorithm": "RSA-2048"}))
    decision = decide_identity(policy, record, NOW)
    assert decision.issue is IssueReason.SPEC_CHANGED
    assert decision.revoke_serial == "0a1b"


def test_a_credential_revoked_while_suspended_is_reissued_on_resume() -> None:
    secret = secret_for(IdentitySpec(), NOW + timedelta(days=100))
    secret["metadata"]["annotations"][REVOKED_ANNOTATION] = "true"
    decision = decide_identity(credential_policy(TENANT, IdentitySpec()), issued_record(secret),
                               NOW)
    assert decision.issue is IssueReason.RESUMED


def test_passwords_do_not_expire() -> None:
    spec = IdentitySpec(type=IdentityType.PASSWORD)
    record = issued_record(secret_for(spec, NOW - timedelta(days=1)))
    assert decide_identity(credential_policy(TENANT, spec), record, NOW).issue is None


def test_the_secret_tells_the_device_where_to_connect() -> None:
    secret = secret_for(IdentitySpec(), NOW + timedelta(days=100))
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert data["username"] == b"acme.pump-1"
    assert data["topic-root"] == b"acme/devices/pump-1"
    assert (data["broker-host"], data["broker-port"]) == (b"mqtt.example.com", b"8883")
    assert data["broker-ca.crt"] == b"CA" and data["tls.key"] == b"KEY"
    assert secret["metadata"]["name"] == "pump-1-device-credentials"
    assert secret["metadata"]["labels"]["kubiot.io/tenant"] == "acme"
