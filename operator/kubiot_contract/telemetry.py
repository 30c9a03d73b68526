"""The telemetry payload: what a device publishes on `telemetry[/{stream}]`.

A payload is one sample object or a JSON array of them (a batch). docs/telemetry.md documents
the format and its versioning rule; docs/telemetry.schema.json is generated from these models.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

#: Payload format versions this release understands. Additive changes (new optional fields)
#: keep the version; anything a current reader would misread bumps it.
SUPPORTED_VERSIONS = frozenset({1})
CURRENT_VERSION = 1

MAX_METRICS_PER_SAMPLE = 256
MAX_SAMPLES_PER_BATCH = 1000
MAX_TEXT_VALUE_LENGTH = 1024
DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024

MetricName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")]
TextValue = Annotated[str, StringConstraints(max_length=MAX_TEXT_VALUE_LENGTH)]
# Strict types keep `true` a boolean and `"1"` a string: nothing is silently coerced.
FiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]


def _fits_a_double(value: int) -> int:
    # Numbers are stored as double precision; an integer past its range would overflow there.
    try:
        float(value)
    except OverflowError:
        raise ValueError("integer is beyond the range of a double") from None
    return value


StorableInt = Annotated[StrictInt, AfterValidator(_fits_a_double)]
MetricValue = StrictBool | StorableInt | FiniteFloat | TextValue


def _as_utc(ts: datetime) -> datetime:
    if ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    try:
        return ts.astimezone(UTC)
    except OverflowError:
        # "9999-12-31T23:00:00-02:00" parses, but its UTC instant is past year 9999.
        raise ValueError("the timestamp in UTC is outside years 1 to 9999") from None


class Sample(BaseModel):
    """One measurement of one or more metrics at one instant."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: int = Field(CURRENT_VERSION, description="Payload format version.")
    ts: Annotated[datetime, AfterValidator(_as_utc)] = Field(
        description="When the sample was taken: RFC 3339 (UTC if no offset is given), or Unix "
        "time as a number (seconds; values above 2e10 are read as milliseconds).",
    )
    seq: int = Field(
        0, ge=0, le=2**63 - 1,
        description="Sequence number, counting up per device and stream. Together with `ts` it "
        "identifies the sample, so a sample sent twice is stored once.",
    )
    values: dict[MetricName, MetricValue] = Field(
        min_length=1, max_length=MAX_METRICS_PER_SAMPLE,
        description="Metric name to value: a number, a boolean or a string.",
    )


Payload = Sample | Annotated[list[Sample], Field(min_length=1, max_length=MAX_SAMPLES_PER_BATCH)]
_PAYLOAD = TypeAdapter[Sample | list[Sample]](Payload)


class RejectReason(StrEnum):
    """Why a payload went to the dead-letter table."""

    TOO_LARGE = "too_large"
    BAD_JSON = "bad_json"
    BAD_SCHEMA = "bad_schema"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_DEVICE = "unknown_device"
    BAD_TOPIC = "bad_topic"
    #: A sample dated before the retention window or too far ahead of its arrival.
    OUTSIDE_WINDOW = "outside_window"
    #: The ingest failed on the message in a way no rule explains (a bug); kept for a look.
    QUARANTINED = "quarantined"


class TelemetryRejected(ValueError):
    """A payload that does not follow the telemetry contract; `reason` says which rule it broke."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


def parse_payload(raw: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> list[Sample]:
    """Validate a telemetry payload and return its samples, or raise TelemetryRejected."""
    if len(raw) > max_bytes:
        raise TelemetryRejected(
            RejectReason.TOO_LARGE, f"payload is {len(raw)} bytes, the limit is {max_bytes}"
        )
    try:
        parsed = _PAYLOAD.validate_json(raw)
    except ValidationError as exc:
        raise _rejection(exc) from exc
    samples = parsed if isinstance(parsed, list) else [parsed]
    for index, sample in enumerate(samples):
        if sample.v not in SUPPORTED_VERSIONS:
            where = f"sample {index}: " if isinstance(parsed, list) else ""
            raise TelemetryRejected(
                RejectReason.UNSUPPORTED_VERSION,
                f"{where}version {sample.v} is not supported "
                f"(supported: {sorted(SUPPORTED_VERSIONS)})",
            )
    return samples


_UNION_TAGS = frozenset(
    {"Sample", "list[Sample]", "bool", "int", "float", "str", "constrained-str"})


def _rejection(exc: ValidationError) -> TelemetryRejected:
    errors = exc.errors(include_url=False)
    if any(e["type"] in ("json_invalid", "json_type") for e in errors):
        return TelemetryRejected(RejectReason.BAD_JSON, errors[0]["msg"])
    # A union reports one error per branch; explain the most specific place once.
    first = min(errors, key=lambda e: (e["type"] in ("model_type", "list_type"), -len(e["loc"])))
    loc = [str(p) for p in first["loc"] if p not in _UNION_TAGS]
    where = ".".join(loc) or "payload"
    if len(loc) >= 2 and loc[-2] == "values" and "[key]" not in first["loc"]:
        message = (f"must be a finite number, a boolean, or a string of at most "
                   f"{MAX_TEXT_VALUE_LENGTH} characters")
    else:
        message = first["msg"].removeprefix("Value error, ")
    return TelemetryRejected(RejectReason.BAD_SCHEMA, f"{where}: {message}")


def payload_json_schema() -> dict[str, Any]:
    """The JSON schema of a telemetry payload, as published in docs/telemetry.schema.json."""
    schema = _PAYLOAD.json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://kubiot.io/schemas/telemetry/v1.json"
    schema["title"] = "kubiot telemetry payload, version 1"
    return schema


def render_payload_json_schema() -> str:
    return json.dumps(payload_json_schema(), indent=2, sort_keys=True) + "\n"
