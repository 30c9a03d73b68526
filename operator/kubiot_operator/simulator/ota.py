"""What a device checks before it installs firmware: the job's signature, that the job is its
own, and the downloaded image's size and SHA-256. Pure; the device does the I/O."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kubiot_contract.device_json import parse_device_json
from kubiot_contract.telemetry import TelemetryRejected
from kubiot_operator.pki import PKIError, verify_manifest
from kubiot_operator.pki.firmware import SIGNATURE_FIELD

#: Far above any real job (a few hundred bytes); a retained job is read on every reconnect.
MAX_JOB_BYTES = 16 * 1024


class OtaState(StrEnum):
    """The states a device reports on `ota/status`."""

    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Refusal(StrEnum):
    """Why a device refuses a job or an image (the `reason` of a failed `ota/status`)."""

    MALFORMED = "MalformedJob"
    BAD_SIGNATURE = "BadSignature"
    NOT_FOR_THIS_DEVICE = "NotForThisDevice"
    DOWNLOAD_FAILED = "DownloadFailed"
    SIZE_MISMATCH = "ArtifactSizeMismatch"
    HASH_MISMATCH = "ArtifactHashMismatch"
    INSTALL_FAILED = "InstallFailed"


class JobRefused(Exception):
    """The device will not install this job."""

    def __init__(self, reason: Refusal, message: str, version: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.version = version


@dataclass(frozen=True)
class FirmwareJob:
    """A verified job: what to download and what it must hash to."""

    version: str
    url: str
    sha256: str
    size: int
    release: str
    signature: str


def parse_job(payload: bytes, public_key_pem: bytes, *, tenant: str, device: str) -> FirmwareJob:
    """The job if it is well-formed, signed by the tenant's key, and addressed to this device."""
    try:
        # Bounded size and depth: a device reads whatever arrives on its job topic.
        raw = parse_device_json(payload, max_bytes=MAX_JOB_BYTES)
    except TelemetryRejected as exc:
        raise JobRefused(Refusal.MALFORMED, f"the job is not readable JSON: {exc.message}") \
            from exc
    if not isinstance(raw, dict):
        raise JobRefused(Refusal.MALFORMED, "the job is not a JSON object")
    version = raw.get("version") if isinstance(raw.get("version"), str) else None
    signature = raw.get(SIGNATURE_FIELD)
    if not isinstance(signature, str):
        raise JobRefused(Refusal.BAD_SIGNATURE, "the job carries no signature", version)
    try:
        verify_manifest(public_key_pem, raw, signature)
    except PKIError as exc:
        raise JobRefused(Refusal.BAD_SIGNATURE, str(exc), version) from exc
    if raw.get("tenant") != tenant or raw.get("device") != device:
        raise JobRefused(Refusal.NOT_FOR_THIS_DEVICE,
                         f"the job is for {raw.get('tenant')}/{raw.get('device')}", version)
    return _job(raw, signature)


def _job(raw: dict[str, Any], signature: str) -> FirmwareJob:
    try:
        return FirmwareJob(version=str(raw["version"]), url=str(raw["url"]),
                           sha256=str(raw["sha256"]).lower(), size=int(raw["size"]),
                           release=str(raw.get("release") or ""), signature=signature)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise JobRefused(Refusal.MALFORMED, f"the job lacks a field: {exc}",
                         raw["version"] if isinstance(raw.get("version"), str) else None) from exc


def check_image(job: FirmwareJob, image: bytes) -> None:
    """Return when the image is the one the signed job names; raise JobRefused otherwise."""
    if len(image) != job.size:
        raise JobRefused(Refusal.SIZE_MISMATCH,
                         f"the image has {len(image)} bytes, the job says {job.size}", job.version)
    digest = hashlib.sha256(image).hexdigest()
    if digest != job.sha256:
        raise JobRefused(Refusal.HASH_MISMATCH,
                         f"the image hashes to {digest}, the job says {job.sha256}", job.version)


def status_payload(state: OtaState, version: str | None, reason: str | None = None,
                   message: str | None = None) -> bytes:
    """An `ota/status` message; `version` is left out when the job named none readable."""
    body: dict[str, Any] = {"state": state.value}
    if version is not None:
        body["version"] = version
    if reason is not None:
        body["reason"] = reason
    if message:
        body["message"] = message[:256]
    return json.dumps(body, separators=(",", ":")).encode()
