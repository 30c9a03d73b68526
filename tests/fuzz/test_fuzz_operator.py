"""What the operator and a simulated device read from the broker or a device's CSR: a value or a
typed refusal, in bounded time; what reaches a status patch is JSON the API server takes."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import assume, example, given
from hypothesis import strategies as st

from kubiot_contract.health import HealthReport
from kubiot_operator.controllers.firmware import signed_job
from kubiot_operator.models.device import DeviceStatus
from kubiot_operator.pki import CSRRejected, generate_signing_key, public_key_pem, verify_csr
from kubiot_operator.reconcile.health import HealthTracker
from kubiot_operator.reconcile.reports import Ignored, ReportBuffer, admissible_status
from kubiot_operator.simulator import FirmwareJob, JobRefused, parse_job
from tests.fuzz.hostile import (
    ARRIVAL,
    FUZZ,
    TENANT,
    attempt,
    device_payloads,
    finite_json_python,
    json_values,
    mutated,
    topics,
    within,
)
from tests.support.pki import make_csr, resign_csr

SIGNING_KEY = generate_signing_key()
SIGNING_PUBLIC = public_key_pem(SIGNING_KEY)
IMAGE_URL = "http://firmware.example/2.0.0.bin"
MANIFEST: dict[str, Any] = {"version": "2.0.0", "url": IMAGE_URL,
                            "sha256": hashlib.sha256(b"image").hexdigest(), "size": 5,
                            "release": "fw-2", "tenant": TENANT}
DEVICE_KEY = ec.generate_private_key(ec.SECP256R1())
COMMON_NAME = f"{TENANT}.pump-1"
GOOD_CSR = make_csr(DEVICE_KEY, COMMON_NAME)


def _refuse_constant(name: str) -> None:
    raise AssertionError(f"{name} in a status patch")


@FUZZ
@given(reports=st.lists(st.tuples(topics, device_payloads), min_size=1, max_size=4))
@example(reports=[(f"{TENANT}/devices/pump-1/state/reported", b"[" * 100_000 + b"]" * 100_000)])
@example(reports=[(f"{TENANT}/devices/pump-1/ota/status", b'{"state": "x", "n": 1e400}')])
def test_reports_fold_into_patches_the_api_server_accepts(
        reports: list[tuple[str, bytes]]) -> None:
    buffer = ReportBuffer()
    for topic, payload in reports:
        with within():
            ignored = buffer.add(topic, payload, ARRIVAL)
        assert ignored is None or (isinstance(ignored, Ignored) and ignored.reason)
    for _, report in buffer.drain(len(reports)):
        body = json.dumps({"status": report.status_patch()}, allow_nan=False,
                          ensure_ascii=False).encode("utf-8")
        json.loads(body, parse_constant=_refuse_constant)


GOOD_HEALTH = HealthReport(time=ARRIVAL, received_at=ARRIVAL, anomalies={"bounds": 2},
                           metrics={"temperature": 95.0}).encode()


@FUZZ
@given(payloads=st.lists(st.one_of(device_payloads, mutated(st.just(GOOD_HEALTH))),
                         min_size=1, max_size=4))
@example(payloads=[GOOD_HEALTH])
@example(payloads=[GOOD_HEALTH.replace(b"95.0", b"1e400")])
def test_health_reports_fold_into_a_status_the_device_schema_admits(
        payloads: list[bytes]) -> None:
    buffer = ReportBuffer(HealthTracker(ARRIVAL))
    for payload in payloads:
        with within():
            ignored = buffer.add(f"{TENANT}/devices/pump-1/health", payload, ARRIVAL)
        assert ignored is None or (isinstance(ignored, Ignored) and ignored.reason)
    for _, report in buffer.drain(1, ARRIVAL):
        patch = report.status_patch()
        json.loads(json.dumps({"status": patch}, allow_nan=False), parse_constant=_refuse_constant)
        assert admissible_status(patch, DeviceStatus).rejected == ()
        assert report.health_condition is not None and report.health_condition.message


@FUZZ
@given(payload=device_payloads)
def test_any_bytes_on_the_job_topic_are_a_job_or_a_refusal(payload: bytes) -> None:
    job = attempt(lambda: parse_job(payload, SIGNING_PUBLIC, tenant=TENANT, device="pump-1"),
                  JobRefused)
    if isinstance(job, JobRefused):
        assert job.version is None or isinstance(job.version, str)
        return
    assert isinstance(job, FirmwareJob)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["version", "url", "sha256", "size", "release",
                                                "tenant", "extra"]),
                               finite_json_python(), max_size=4))
def test_a_signed_job_with_hostile_fields_is_a_job_or_a_refusal(changes: dict[str, Any]) -> None:
    # Signed with the tenant's key: the verifier goes past the signature to the fields.
    payload = signed_job(SIGNING_KEY, {**MANIFEST, **changes}, "pump-1")
    job = attempt(lambda: parse_job(payload, SIGNING_PUBLIC, tenant=TENANT, device="pump-1"),
                  JobRefused)
    if isinstance(job, JobRefused):
        assert job.version is None or isinstance(job.version, str)
        return
    assert isinstance(job.size, int) and isinstance(job.sha256, str)


def _pem(der: bytes) -> bytes:
    return (b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(der)
            + b"-----END CERTIFICATE REQUEST-----\n")


_GOOD_DER = x509.load_pem_x509_csr(GOOD_CSR).public_bytes(serialization.Encoding.DER)
_GOOD_INFO = x509.load_pem_x509_csr(GOOD_CSR).tbs_certrequest_bytes


def _edit_info(info: bytes, at: int, replacement: bytes) -> bytes:
    at %= len(info)
    return info[:at] + replacement + info[at + len(replacement):]


@st.composite
def hostile_csrs(draw: st.DrawFn) -> bytes | str:
    """CSRs as a device could send them: random, damaged, or signed by the key they carry
    (so that checks past the signature run) with odd subjects, extensions and bytes."""
    kind = draw(st.sampled_from(["bytes", "text", "damaged", "built", "edited"]))
    if kind == "bytes":
        return draw(st.one_of(st.binary(max_size=2048), mutated(st.just(GOOD_CSR))))
    if kind == "text":
        return draw(st.text(max_size=512))
    if kind == "damaged":
        return _pem(draw(mutated(st.just(_GOOD_DER))))
    if kind == "edited":
        at = draw(st.integers(0, len(_GOOD_INFO)))
        replacement = draw(st.binary(min_size=1, max_size=6))
        return resign_csr(GOOD_CSR, DEVICE_KEY, lambda info: _edit_info(info, at, replacement))
    oids = [NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME, NameOID.SERIAL_NUMBER,
            NameOID.EMAIL_ADDRESS, NameOID.DOMAIN_COMPONENT, x509.ObjectIdentifier("1.2.3.4.5")]
    attributes = draw(st.lists(st.tuples(st.sampled_from(oids), st.text(min_size=1, max_size=80)),
                               max_size=6))
    extensions = draw(st.lists(st.tuples(st.binary(max_size=64), st.booleans()), max_size=3))
    try:
        builder = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes]))
        for index, (value, critical) in enumerate(extensions):
            builder = builder.add_extension(x509.UnrecognizedExtension(
                x509.ObjectIdentifier(f"1.3.6.1.4.1.99999.{index}"), value), critical=critical)
        csr = builder.sign(DEVICE_KEY, hashes.SHA256())
    except ValueError:
        assume(False)  # a subject the builder itself will not encode (a device's encoder might)
        raise
    return csr.public_bytes(serialization.Encoding.PEM)


@FUZZ
@given(csr=hostile_csrs())
@example(csr="-----BEGIN CERTIFICATE REQUEST-----\ud800")
def test_a_csr_is_accepted_or_refused_with_a_reason(csr: bytes | str) -> None:
    accepted = attempt(lambda: verify_csr(csr, COMMON_NAME), CSRRejected)
    if isinstance(accepted, CSRRejected):
        assert accepted.reason in {"Unparseable", "BadSignature", "WeakKey",
                                   "UnsupportedKeyType", "SubjectMismatch"}
        return
    assert accepted.is_signature_valid
    assert [a.value for a in accepted.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [
        COMMON_NAME]


@FUZZ
@given(value=json_values)
def test_reported_state_in_a_status_patch_is_strict_json(value: str) -> None:
    buffer = ReportBuffer()
    buffer.add(f"{TENANT}/devices/pump-1/state/reported", ('{"r":' + value + "}").encode(),
               ARRIVAL)
    for _, report in buffer.drain(1):
        json.dumps(report.status_patch(), allow_nan=False).encode("utf-8")
