"""Telemetry health: the anomaly rules a tenant sets, and what the ingest reports per device.

The ingest evaluates a tenant's `AnomalyRules` on the telemetry stream. Each anomaly it finds
is stored (the `anomalies` table) and counted; and per device it publishes a `HealthReport`,
retained, on `{tenant}/devices/{device}/health`: at once when something changed (a new anomaly,
the device fell silent or came back), otherwise as a heartbeat every `reportSeconds` while the
device sends. The operator reads these reports into the Device's status and into the health
gate of firmware rollouts. Only the tenant's ingest may publish there (see `topics.py`).

docs/ingest.md documents the rules and docs/topics.md the report.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

from .telemetry import MetricName

#: A health report larger than this is refused before it is parsed.
MAX_REPORT_BYTES = 16 * 1024
#: Metric values a report carries at most (the most recent numeric value of each).
MAX_REPORTED_METRICS = 32
HEALTH_FORMAT_VERSION = 1


class _Model(BaseModel):
    """camelCase on the wire, unknown fields refused, immutable (as the CRD models)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True)


class AnomalyRule(StrEnum):
    """Which rule found an anomaly: the `rule` label of the anomaly counter."""

    BOUNDS = "bounds"
    ZSCORE = "zscore"
    SILENT = "silent"


# --- the rules (Tenant `spec.anomalies`) -------------------------------------------------------

class BoundsRule(_Model):
    """A fixed range for one metric: a numeric value outside it is an anomaly."""

    metric: MetricName
    min: float | None = Field(None, allow_inf_nan=False, description="Lowest value allowed.")
    max: float | None = Field(None, allow_inf_nan=False, description="Highest value allowed.")

    @model_validator(mode="after")
    def _a_range(self) -> BoundsRule:
        if self.min is None and self.max is None:
            raise ValueError("set min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not be above max")
        return self


#: A metric name, or `*`: every numeric metric (a rule naming the metric takes precedence).
ScoredMetric = Annotated[str, StringConstraints(
    pattern=r"^(\*|[A-Za-z_][A-Za-z0-9_.\-]{0,63})$")]


class ZScoreRule(_Model):
    """A statistical detector per device and metric: an exponentially weighted mean and
    variance, and a value more than `threshold` standard deviations from the mean is an
    anomaly. Nothing is flagged during the first `warmupSamples` values of a device's metric.
    An anomalous value does not move the mean, so a spike does not teach the detector; a
    lasting shift is learnt after `halfLifeSamples` or so and stops being flagged."""

    metric: ScoredMetric = Field(description="The metric, or `*` for every numeric metric.")
    threshold: float = Field(4.0, ge=1.0, le=100.0, allow_inf_nan=False,
                             description="Standard deviations from the mean that are anomalous.")
    half_life_samples: int = Field(
        50, ge=2, le=100_000, description="Samples after which an old value weighs half.")
    warmup_samples: int = Field(
        30, ge=2, le=100_000, description="Values seen before anything is flagged.")

    @property
    def alpha(self) -> float:
        """The weight of each new value in the moving mean and variance."""
        return 1.0 - math.pow(0.5, 1.0 / self.half_life_samples)


class SilenceRule(_Model):
    """A device that sends no telemetry for `intervals` of its interval is silent. The interval
    is `intervalSeconds` when set, otherwise learnt per device from the gaps between its
    messages (after a few of them)."""

    intervals: float = Field(3.0, ge=1.0, le=1000.0, allow_inf_nan=False,
                             description="Missed intervals that make a device silent.")
    interval_seconds: float | None = Field(
        None, ge=0.1, le=7 * 86400, allow_inf_nan=False,
        description="The devices' telemetry interval; learnt per device when left out.")
    min_silence_seconds: float = Field(
        5.0, ge=0.0, le=86400, allow_inf_nan=False,
        description="Never call a device silent sooner than this after its last message.")


class AnomalyRules(_Model):
    """A tenant's anomaly detection, evaluated by its ingest on the telemetry stream."""

    enabled: bool = Field(True, description="Evaluate the rules (false: keep them, do nothing).")
    bounds: Annotated[list[BoundsRule], Field(max_length=64)] = Field(
        default_factory=list, description="Fixed ranges per metric.")
    zscore: Annotated[list[ZScoreRule], Field(max_length=64)] = Field(
        default_factory=list, description="Statistical detectors per metric.")
    silence: SilenceRule | None = Field(None, description="Report devices that stop sending.")
    report_seconds: float = Field(
        60.0, ge=1.0, le=3600.0, allow_inf_nan=False,
        description="Heartbeat of each sending device's health report; a change is reported "
        "at once (at most once a second per device).")
    max_devices: int = Field(
        100_000, ge=1, le=10_000_000,
        description="Devices whose detector state the ingest keeps; beyond it the least "
        "recently seen are forgotten.")

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.bounds or self.zscore or self.silence)

    def to_json(self) -> str:
        """The rules as the ingest's `KUBIOT_INGEST_ANOMALY_RULES` carries them."""
        return self.model_dump_json(by_alias=True, exclude_none=True)


def parse_rules(text: str) -> AnomalyRules:
    """Rules from their JSON form; raises ValueError with a readable message."""
    try:
        return AnomalyRules.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'rules'}: "
            f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        raise ValueError(f"invalid anomaly rules: {problems}") from None


# --- what the ingest reports ------------------------------------------------------------------

class Anomaly(_Model):
    """One anomalous value (or a silence): what the `anomalies` table stores."""

    rule: AnomalyRule
    metric: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        None, description="The metric; none for a silent device.")
    time: datetime
    value: float | None = Field(None, allow_inf_nan=False)
    low: float | None = Field(None, allow_inf_nan=False, description="Expected range, low end.")
    high: float | None = Field(None, allow_inf_nan=False,
                               description="Expected range, high end.")


ReportedMetrics = Annotated[dict[MetricName, Annotated[float, Field(allow_inf_nan=False)]],
                            Field(max_length=MAX_REPORTED_METRICS)]


class HealthReport(_Model):
    """One device's telemetry health, from one ingest replica.

    `anomalies` counts what this replica found since its previous report of the device, so
    the counts of several replicas (a shared subscription) add up without double counting.
    """

    v: int = HEALTH_FORMAT_VERSION
    time: datetime
    last_telemetry: datetime | None = Field(
        None, description="Device time of the newest sample seen.")
    received_at: datetime | None = Field(
        None, description="When the newest message of the device arrived.")
    silent: bool = False
    anomalies: Annotated[dict[AnomalyRule, Annotated[int, Field(ge=0)]], Field(
        max_length=len(AnomalyRule))] = Field(default_factory=dict)
    latest: Anomaly | None = Field(None, description="The newest anomaly found, if any.")
    metrics: ReportedMetrics = Field(default_factory=dict)

    @property
    def anomaly_count(self) -> int:
        return sum(self.anomalies.values())

    def encode(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


class HealthRejected(ValueError):
    """A health report that cannot be read."""


def parse_health(payload: bytes) -> HealthReport:
    """A health report from its bytes; raises HealthRejected for anything else."""
    if len(payload) > MAX_REPORT_BYTES:
        raise HealthRejected(f"health report larger than {MAX_REPORT_BYTES} bytes")
    try:
        document: Any = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise HealthRejected(f"health report is not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("v") != HEALTH_FORMAT_VERSION:
        raise HealthRejected(f"health report must be a JSON object with v = "
                             f"{HEALTH_FORMAT_VERSION}")
    try:
        report = HealthReport.model_validate(document)
    except ValidationError as exc:
        raise HealthRejected(f"invalid health report: {exc.errors()[0]['msg']}") from None
    return report.model_copy(update={
        "time": _utc(report.time),
        "last_telemetry": report.last_telemetry and _utc(report.last_telemetry),
        "received_at": report.received_at and _utc(report.received_at)})


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
