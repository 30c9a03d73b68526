"""DeviceCommand: a command sent to the devices it targets, once, at a time, or on a schedule."""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import ConfigDict, Field, StringConstraints, field_validator

from kubiot_contract.commands import MAX_PARAMETERS_BYTES
from kubiot_operator.models.common import (
    Conditions,
    DNSLabel,
    KubiotModel,
    LabelSelector,
    cel,
    validations,
)

#: A run's per-target outcomes live in the object's status, which etcd bounds (1.5 MiB): at
#: most this many targets, each with a message and data cut to the sizes below.
MAX_TARGETS = 500
MAX_MESSAGE_IN_STATUS = 256
MAX_DATA_IN_STATUS = 512
MAX_HISTORY = 10
#: Five fields (minute hour day-of-month month day-of-week) of numbers, names, `*`, `,`, `-`, `/`.
SCHEDULE_PATTERN = r"^\s*\S+(\s+\S+){4}\s*$"


class CommandTargets(KubiotModel):
    """Which devices get the command: named ones, selected ones, and the children of gateways."""

    model_config = ConfigDict(json_schema_extra=validations(cel(
        "has(self.devices) || has(self.selector) || has(self.gateways)",
        "name devices, a selector or gateways: a command needs targets",
    )))

    devices: Annotated[list[DNSLabel], Field(max_length=MAX_TARGETS)] | None = Field(
        None, description="Devices in this namespace, by name.")
    selector: LabelSelector | None = Field(
        None, description="Devices in this namespace whose labels match.")
    gateways: Annotated[list[DNSLabel], Field(max_length=100)] | None = Field(
        None, description="Every device these gateways serve.")


class OfflinePolicy(StrEnum):
    QUEUE = "Queue"
    FAIL = "Fail"


class ConcurrencyPolicy(StrEnum):
    ALLOW = "Allow"
    FORBID = "Forbid"
    REPLACE = "Replace"


class DeviceCommandSpec(KubiotModel):
    model_config = ConfigDict(json_schema_extra=validations(
        cel("!(has(self.at) && has(self.schedule))",
            "set at most one of at (one run at a time) and schedule (runs on a cron schedule)"),
    ))

    targets: CommandTargets
    command: DNSLabel = Field(description="The command's name; it becomes the topic level of "
                              "`cmd/{command}`, for example ping, set or reboot.")
    parameters: Annotated[dict[str, Any], Field(max_length=64)] | None = Field(
        None, description=f"A JSON object the device receives as `params` (at most "
        f"{MAX_PARAMETERS_BYTES} bytes encoded).")
    timeout_seconds: int = Field(30, ge=1, le=86_400, description="How long a run waits for "
                                 "every answer, counted from its start.")
    offline_policy: OfflinePolicy = Field(
        OfflinePolicy.QUEUE, description="A target offline when a run starts: Queue sends it "
        "when it comes online within the timeout (else it is Offline); Fail marks it Offline "
        "at once.")
    at: datetime | None = Field(None, description="Run once at this time instead of now.")
    schedule: Annotated[str, StringConstraints(pattern=SCHEDULE_PATTERN, max_length=128)] | None \
        = Field(None, description="Run on this cron schedule (five fields, UTC), like a "
                "CronJob.")
    concurrency_policy: ConcurrencyPolicy = Field(
        ConcurrencyPolicy.FORBID, description="When a scheduled run is due while the previous "
        "one still waits for answers: Allow runs both, Forbid skips the new one, Replace ends "
        "the previous one.")
    successful_runs_history_limit: int = Field(3, ge=0, le=MAX_HISTORY)
    failed_runs_history_limit: int = Field(1, ge=0, le=MAX_HISTORY)
    suspend: bool = Field(False, description="Start no new run while set; a run under way "
                          "finishes.")

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(json.dumps(value, separators=(",", ":"))) > \
                MAX_PARAMETERS_BYTES:
            raise ValueError(f"parameters are larger than {MAX_PARAMETERS_BYTES} bytes")
        return value


class CommandPhase(StrEnum):
    PENDING = "Pending"  # waiting for `at`, or never run
    RUNNING = "Running"
    SCHEDULED = "Scheduled"  # waiting for the next fire time
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class TargetState(StrEnum):
    PENDING = "Pending"  # not sent yet (offline and queued, or about to be sent)
    SENDING = "Sending"  # recorded before publishing: a restart sends it again, same id
    SENT = "Sent"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"  # the device answered with an error
    TIMED_OUT = "TimedOut"  # sent, no answer before the deadline
    OFFLINE = "Offline"  # never reachable before the deadline (or at once, with Fail)
    CANCELLED = "Cancelled"  # its run was replaced (Replace) or the target went away


class TargetOutcome(KubiotModel):
    device: DNSLabel
    state: TargetState
    message: Annotated[str, StringConstraints(max_length=MAX_MESSAGE_IN_STATUS)] | None = Field(
        None, description="The device's message (its first 256 characters), or why the target "
        "ended as it did.")
    data: dict[str, Any] | None = Field(None, description="What the device answered in `data`, "
                                        "when it encodes to at most 512 bytes.")
    sent_at: datetime | None = None
    finished_at: datetime | None = None


class RunCounts(KubiotModel):
    targeted: int = Field(0, ge=0)
    pending: int = Field(0, ge=0)
    sent: int = Field(0, ge=0)
    succeeded: int = Field(0, ge=0)
    failed: int = Field(0, ge=0)
    timed_out: int = Field(0, ge=0)
    offline: int = Field(0, ge=0)
    cancelled: int = Field(0, ge=0)


class RunPhase(StrEnum):
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"  # every target succeeded
    FAILED = "Failed"  # some target failed, timed out, was offline or was cancelled


class CommandRun(KubiotModel):
    number: int = Field(ge=1, description="Counts up per DeviceCommand.")
    token: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{16,64}$")] = Field(
        description="Part of every correlation id of the run, so answers cannot be guessed.")
    scheduled_at: datetime = Field(description="When the run was due.")
    started_at: datetime
    deadline: datetime
    completed_at: datetime | None = None
    phase: RunPhase = RunPhase.RUNNING
    announced: bool | None = Field(None, description="The run's outcome was posted as an "
                                   "event.")
    counts: RunCounts = Field(RunCounts())
    targets: Annotated[list[TargetOutcome], Field(max_length=MAX_TARGETS)] = Field(
        default_factory=list, description="Each target's outcome; kept for runs under way and "
        "the latest finished run (older runs keep their counts).")


class DeviceCommandStatus(KubiotModel):
    observed_generation: int | None = None
    phase: CommandPhase | None = None
    conditions: Conditions | None = None
    counts: RunCounts | None = Field(None, description="The latest run's counts.")
    last_run: datetime | None = Field(None, description="When the latest run started.")
    next_run: datetime | None = Field(None, description="When the next run is due.")
    runs_started: int | None = Field(None, ge=0, description="Runs started so far.")
    last_scheduled: datetime | None = Field(
        None, description="The latest fire time acted on (run, or skipped by Forbid).")
    runs: Annotated[list[CommandRun], Field(max_length=2 * MAX_HISTORY + 2)] | None = Field(
        None, description="Runs under way and the kept history, oldest first.")
