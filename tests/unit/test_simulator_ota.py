"""What a simulated device accepts: signed jobs of its own, images matching the signed hash."""

from __future__ import annotations

import hashlib
import json
import ssl

import pytest

from kubiot_contract.ota import OtaState
from kubiot_contract.topics import IdentityKind
from kubiot_operator.pki import (
    create_server_ca,
    create_tenant_ca,
    generate_signing_key,
    issue_identity_certificate,
    public_key_pem,
)
from kubiot_operator.reconcile.release import signed_job
from kubiot_operator.simulator import (
    BundleIncomplete,
    DeviceCredentials,
    InstallResult,
    JobRefused,
    Refusal,
    Scenario,
    SyntheticArtifacts,
    check_image,
    parse_job,
    synthetic_image,
)
from kubiot_operator.simulator.ota import status_payload

KEY = generate_signing_key()
PUBLIC = public_key_pem(KEY)
URL = "http://firmware.example/2.0.0.bin"
IMAGE = synthetic_image(URL)
MANIFEST = {"version": "2.0.0", "url": URL, "sha256": hashlib.sha256(IMAGE).hexdigest(),
            "size": len(IMAGE), "release": "fw-2", "tenant": "acme"}


def test_a_signed_job_for_this_device_is_accepted() -> None:
    job = parse_job(signed_job(KEY, MANIFEST, "dev-1"), PUBLIC, tenant="acme", device="dev-1")
    assert (job.version, job.url, job.size, job.release) == ("2.0.0", URL, 4096, "fw-2")
    check_image(job, IMAGE)


@pytest.mark.parametrize(("field", "value"), [("url", "http://evil.example/x.bin"),
                                         ("sha256", "b" * 64), ("version", "6.6.6")])
def test_a_changed_field_breaks_the_signature(field: str, value: str) -> None:
    tampered = json.loads(signed_job(KEY, MANIFEST, "dev-1")) | {field: value}
    with pytest.raises(JobRefused) as refused:
        parse_job(json.dumps(tampered).encode(), PUBLIC, tenant="acme", device="dev-1")
    assert refused.value.reason is Refusal.BAD_SIGNATURE
    assert refused.value.version == tampered["version"]


def test_a_job_signed_with_another_key_is_refused() -> None:
    with pytest.raises(JobRefused) as refused:
        parse_job(signed_job(generate_signing_key(), MANIFEST, "dev-1"), PUBLIC,
                  tenant="acme", device="dev-1")
    assert refused.value.reason is Refusal.BAD_SIGNATURE


def test_a_job_for_another_device_is_refused() -> None:
    with pytest.raises(JobRefused) as refused:
        parse_job(signed_job(KEY, MANIFEST, "dev-2"), PUBLIC, tenant="acme", device="dev-1")
    assert refused.value.reason is Refusal.NOT_FOR_THIS_DEVICE


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b'{"version": "2.0.0"}'])
def test_malformed_or_unsigned_jobs_are_refused(payload: bytes) -> None:
    with pytest.raises(JobRefused) as refused:
        parse_job(payload, PUBLIC, tenant="acme", device="dev-1")
    assert refused.value.reason in (Refusal.MALFORMED, Refusal.BAD_SIGNATURE)


def test_an_image_that_does_not_match_the_signed_hash_is_refused() -> None:
    job = parse_job(signed_job(KEY, {**MANIFEST, "sha256": "c" * 64}, "dev-1"), PUBLIC,
                    tenant="acme", device="dev-1")
    with pytest.raises(JobRefused) as refused:
        check_image(job, IMAGE)
    assert refused.value.reason is Refusal.HASH_MISMATCH
    with pytest.raises(JobRefused) as short:
        check_image(job, IMAGE[:-1])
    assert short.value.reason is Refusal.SIZE_MISMATCH


async def test_synthetic_images_are_deterministic_per_url() -> None:
    source = SyntheticArtifacts(size=100)
    assert await source.fetch(URL) == await source.fetch(URL) == synthetic_image(URL, 100)
    assert await source.fetch(URL + "?x") != await source.fetch(URL)
    assert len(synthetic_image(URL, 4097)) == 4097


def test_status_payloads_carry_the_version_and_reason() -> None:
    assert json.loads(status_payload(OtaState.FAILED, "2.0.0", "BadSignature")) == {
        "state": "failed", "version": "2.0.0", "reason": "BadSignature"}
    assert json.loads(status_payload(OtaState.FAILED, None, "MalformedJob")) == {
        "state": "failed", "reason": "MalformedJob"}


def test_a_failing_fraction_is_stable_per_device_and_near_the_fraction() -> None:
    scenario = Scenario.failing_fraction(0.3, seed="s")
    names = [f"dev-{i:03d}" for i in range(1000)]
    failing = {n for n in names if scenario.result_for(n) is InstallResult.FAIL}
    assert 250 < len(failing) < 350
    assert failing == {n for n in names
                       if Scenario.failing_fraction(0.3, seed="s").result_for(n)
                       is InstallResult.FAIL}
    assert Scenario.fail().result_for("x") is InstallResult.FAIL
    assert Scenario.hang().result_for("x") is InstallResult.HANG
    with pytest.raises(ValueError, match="between 0 and 1"):
        Scenario.failing_fraction(1.5)


def bundle(**override: bytes) -> dict[str, bytes]:
    ca = create_tenant_ca("acme")
    cert = issue_identity_certificate(ca, tenant="acme", kind=IdentityKind.DEVICE, name="dev-1",
                                      validity_days=1)
    assert cert.key_pem is not None
    data = {"username": b"acme.dev-1", "topic-root": b"acme/devices/dev-1",
            "broker-host": b"127.0.0.1", "broker-port": b"8883", "tls.crt": cert.cert_pem,
            "tls.key": cert.key_pem, "ca.crt": ca.cert_pem,
            "broker-ca.crt": create_server_ca().cert_pem, "firmware-signing.pub": PUBLIC}
    return {**data, **override}


def test_credentials_load_from_the_secret_data() -> None:
    credentials = DeviceCredentials.from_secret_data(bundle())
    assert (credentials.tenant, credentials.name, credentials.broker_port) == (
        "acme", "dev-1", 8883)
    context = credentials.tls_context()
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname


def test_an_incomplete_bundle_names_what_is_missing() -> None:
    data = bundle()
    del data["firmware-signing.pub"]
    with pytest.raises(BundleIncomplete, match=r"firmware-signing\.pub"):
        DeviceCredentials.from_secret_data(data)
    with pytest.raises(BundleIncomplete, match="not a device"):
        DeviceCredentials.from_secret_data(bundle(username=b"acme.gw.edge-1"))


def test_a_scenario_limited_to_versions_lets_other_versions_install() -> None:
    scenario = Scenario(InstallResult.FAIL, versions=frozenset({"2.0.0"}))
    assert scenario.result_for("dev-1", "2.0.0") is InstallResult.FAIL
    assert scenario.result_for("dev-1", "1.1.0") is InstallResult.SUCCEED


@pytest.mark.parametrize("payload", [
    b"[" * 100_000 + b"]" * 100_000,   # raised RecursionError out of the device's job handler
    b'{"version": "2", "size": 1e400}',
    b"\xff\xfe{}",
])
def test_an_unreadable_job_is_refused_as_malformed(payload: bytes) -> None:
    with pytest.raises(JobRefused) as caught:
        parse_job(payload, PUBLIC, tenant="acme", device="dev-1")
    assert caught.value.reason is Refusal.MALFORMED


def test_a_signed_job_with_a_nonsense_size_is_refused_as_malformed() -> None:
    job = signed_job(KEY, {**MANIFEST, "size": [1]}, "dev-1")
    with pytest.raises(JobRefused) as caught:
        parse_job(job, PUBLIC, tenant="acme", device="dev-1")
    assert (caught.value.reason, caught.value.version) == (Refusal.MALFORMED, "2.0.0")
