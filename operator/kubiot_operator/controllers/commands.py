"""The DeviceCommand controller: runs when they are due, commands to each target, answers into
status.

Decisions (when a run is due, who is targeted, how a target's outcome moves) are made in
`reconcile.commands`; this module gathers the devices, publishes, and writes status. The sent
state lives in status: targets are written Sending before their command is published and Sent
after, so a restarted operator resumes a run without losing or repeating a command.

Answers arrive on the operator's MQTT session; `CommandResults` matches them to their run by
correlation id and records them under the same per-command lock the reconcile holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from kubiot_contract.commands import (
    CommandRequest,
    ParsedResult,
    ResultRefused,
    correlation_id,
    parse_result,
)
from kubiot_contract.topics import (
    Channel,
    ContractError,
    command_result_topic,
    command_topic,
    device_root,
    parse_topic,
)
from kubiot_operator.kube.client import DEVICECOMMANDS, TENANTS, NotFound
from kubiot_operator.models import DEVICE_COMMAND
from kubiot_operator.models.command import (
    CommandPhase,
    CommandRun,
    DeviceCommandSpec,
    DeviceCommandStatus,
    RunPhase,
)
from kubiot_operator.models.tenant import TenantSpec
from kubiot_operator.reconcile.commands import (
    DeviceFacts,
    ScheduleInvalid,
    advance_run,
    apply_result,
    cancel_run,
    command_phase,
    decide_schedule,
    kept_runs,
    mark_sent,
    resolve_targets,
    start_run,
)
from kubiot_operator.reconcile.conditions import ConditionUpdate, set_conditions
from kubiot_operator.reconcile.tenant import tenant_namespace

from .objects import (
    checked_status,
    conditions_wire,
    current_conditions,
    generation,
    parse_spec,
    tenant_of_namespace,
    validation_message,
)
from .platform import Outcome, Platform

log = logging.getLogger(__name__)
#: How often a run under way is looked at again (deadlines, devices coming online).
RECHECK_SECONDS = 1.0
#: The longest wait between two looks at an idle schedule: retries wait in monotonic time, and
#: the wall clock a schedule follows may be adjusted meanwhile.
IDLE_RECHECK_SECONDS = 10.0
TENANT_RETRY_SECONDS = 10.0
COMPLETE = "Complete"


def lock_key(namespace: str, name: str) -> str:
    return f"DeviceCommand/{namespace}/{name}"


def _time(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _runs(status: dict[str, Any]) -> list[CommandRun]:
    runs = []
    for raw in status.get("runs") or []:
        try:
            runs.append(CommandRun.model_validate(raw))
        except ValidationError:
            continue  # a hand-edited run is dropped, not trusted
    return sorted(runs, key=lambda r: r.number)


@dataclass
class _Record:
    """The status fields a reconcile carries from step to step."""

    runs: list[CommandRun]
    runs_started: int
    last_scheduled: datetime | None
    next_run: datetime | None

    def wire(self) -> dict[str, Any]:
        latest = self.runs[-1] if self.runs else None
        return {
            "runs": [r.to_wire() for r in self.runs],
            "runsStarted": self.runs_started,
            "lastScheduled": _time(self.last_scheduled),
            "nextRun": _time(self.next_run),  # None removes it (a merge patch)
            "lastRun": _time(latest.started_at) if latest else None,
            "counts": latest.counts.to_wire() if latest else None,
        }


def run_due(body: Mapping[str, Any]) -> bool:
    """Whether the command has a run to advance or a run to start: not finished for good and
    not suspended (a spec change wakes those)."""
    phase = (body.get("status") or {}).get("phase")
    return phase in (None, CommandPhase.PENDING.value, CommandPhase.RUNNING.value,
                     CommandPhase.SCHEDULED.value)


async def reconcile_command(platform: Platform, body: dict[str, Any]) -> Outcome:
    """Start what is due, send what can be sent, time out what is late; write the status
    (the returned outcome carries events and the next recheck, no status to write)."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    if _finished_for_good(body):
        # Finished one-shot commands stay around as records; rechecking one costs no API call.
        return Outcome(status={})
    async with platform.lock(lock_key(namespace, name)):
        latest = await platform.objects.get(DEVICECOMMANDS, name, namespace)
        if latest is None or latest["metadata"].get("deletionTimestamp"):
            return Outcome(status={})
        outcome = await _reconcile(platform, latest)
        previous = latest.get("status") or {}
        if any(previous.get(key) != value for key, value in outcome.status.items()):
            await _write(platform, namespace, name, outcome.status)
        # Written here, under the lock, and not again by the caller: an answer recorded right
        # after the lock is released must not be overwritten by this (then stale) status.
        outcome.status = {}
        return outcome


def _finished_for_good(body: dict[str, Any]) -> bool:
    """A one-shot command whose run is over, and whose spec has not changed since."""
    status = body.get("status") or {}
    return (not (body.get("spec") or {}).get("schedule")
            and status.get("phase") in (CommandPhase.SUCCEEDED.value, CommandPhase.FAILED.value)
            and status.get("observedGeneration") == generation(body)
            and all((run or {}).get("announced") for run in status.get("runs") or []))


async def delete_command(platform: Platform, body: dict[str, Any]) -> Outcome:
    """Nothing outlives a DeviceCommand: commands are not retained, answers go to its status."""
    return Outcome(status={})


async def _write(platform: Platform, namespace: str, name: str, status: dict[str, Any]) -> None:
    if not status:
        return
    with contextlib.suppress(NotFound):  # deleted meanwhile: nothing to record
        await platform.objects.patch(DEVICECOMMANDS, name,
                                     {"status": checked_status(DEVICE_COMMAND, status)},
                                     namespace, subresource="status")


async def _reconcile(platform: Platform, body: dict[str, Any]) -> Outcome:
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    previous: dict[str, Any] = dict(body.get("status") or {})
    conditions = current_conditions(body)
    now = platform.clock()
    outcome = Outcome(status={"observedGeneration": generation(body)})

    def finish(phase: CommandPhase, updates: list[ConditionUpdate]) -> Outcome:
        merged = set_conditions(conditions, updates, now, generation(body))
        outcome.status.update(phase=phase.value, conditions=conditions_wire(merged))
        return outcome

    def refuse(reason: str, message: str) -> Outcome:
        said = next((c for c in conditions if c.type == "Ready"), None)
        if said is None or (said.reason, said.message) != (reason, message):
            outcome.warning(reason, message)  # once, not on every recheck
        return finish(CommandPhase.FAILED, [ConditionUpdate("Ready", False, reason, message)])

    try:
        spec = parse_spec(DeviceCommandSpec, body)
    except ValidationError as exc:
        return refuse("InvalidSpec", validation_message(exc))
    found = await tenant_of_namespace(platform.objects, namespace)
    if found is None:
        outcome.retry_after, outcome.retry_reason = TENANT_RETRY_SECONDS, "TenantNotFound"
        return finish(CommandPhase.PENDING, [ConditionUpdate(
            "Ready", False, "TenantNotFound", f"namespace {namespace} belongs to no Tenant (yet)")])
    tenant = found[0]
    record = _Record(_runs(previous), int(previous.get("runsStarted") or 0),
                     _parse_time(previous.get("lastScheduled")), None)
    created = _parse_time(meta.get("creationTimestamp")) or now
    try:
        decision = decide_schedule(spec, created=created, last_scheduled=record.last_scheduled,
                                   runs=record.runs, now=now)
    except ScheduleInvalid as exc:
        return refuse("InvalidSchedule", f"spec.schedule: {exc}")
    record.last_scheduled, record.next_run = decision.last_scheduled, decision.next_run
    if decision.skipped is not None:
        outcome.normal("RunSkipped", f"the run due at {_time(decision.skipped)} was skipped: "
                       "the previous run is still under way (concurrencyPolicy Forbid)")

    active = decision.start_for is not None or any(r.completed_at is None for r in record.runs)
    devices, children, gateway_online = await _fleet(platform, namespace) if active \
        else ([], {}, {})
    if decision.start_for is not None:
        number = record.runs_started + 1
        if decision.replace:
            record.runs = [cancel_run(r, f"replaced by run {number}", now)
                           if r.completed_at is None else r for r in record.runs]
        targets = resolve_targets(spec.targets, devices, children)
        run = start_run(number=number, token=platform.token(), scheduled_at=decision.start_for,
                        now=now, timeout_seconds=spec.timeout_seconds, targets=targets)
        record.runs.append(run)
        record.runs_started = number
        outcome.normal("RunStarted", f"run {number}: {spec.command} to "
                       f"{run.counts.targeted} devices")
        if targets.too_many:
            outcome.warning("TooManyTargets", f"only the first {len(targets.devices)} "
                            "targets (by name) get the command")

    online = {d.name: not d.suspended and (d.online or (
        d.gateway is not None and gateway_online.get(d.gateway, False))) for d in devices}
    await _send_due(platform, name, namespace, tenant, spec, record, online, now)

    for index, run in enumerate(record.runs):
        if run.completed_at is None or run.announced:
            continue
        counts = run.counts
        summary = (f"run {run.number}: {counts.succeeded}/{counts.targeted} succeeded, "
                   f"{counts.failed} failed, {counts.timed_out} timed out, "
                   f"{counts.offline} offline")
        if run.phase is RunPhase.SUCCEEDED:
            outcome.normal("RunSucceeded", summary)
        else:
            outcome.warning("RunFailed", summary)
        platform.metrics.command_runs.labels(tenant, run.phase.value).inc()
        record.runs[index] = run.model_copy(update={"announced": True})
    record.runs = kept_runs(record.runs, scheduled=spec.schedule is not None,
                            successful_limit=spec.successful_runs_history_limit,
                            failed_limit=spec.failed_runs_history_limit)
    outcome.status.update(record.wire())
    _plan_recheck(outcome, record, now)
    phase = command_phase(spec, record.runs)
    latest = record.runs[-1] if record.runs else None
    complete = ConditionUpdate(COMPLETE, False, "NotStarted", "no run yet")
    if latest is not None and latest.completed_at is None:
        complete = ConditionUpdate(COMPLETE, False, "Running", f"run {latest.number} is under "
                                   f"way: {latest.counts.sent} sent, {latest.counts.pending} "
                                   "pending")
    elif latest is not None:
        complete = ConditionUpdate(COMPLETE, True, latest.phase.value,
                                   f"run {latest.number}: {latest.counts.succeeded}/"
                                   f"{latest.counts.targeted} succeeded")
    return finish(phase, [ConditionUpdate("Ready", True, "Accepted", ""), complete])


async def _send_due(platform: Platform, name: str, namespace: str, tenant: str,
                    spec: DeviceCommandSpec, record: _Record, online: dict[str, bool],
                    now: datetime) -> None:
    """Advance every run under way; record Sending, publish, record Sent."""
    sends: list[tuple[int, str]] = []
    for index, run in enumerate(record.runs):
        step = advance_run(run, online, spec.offline_policy, now)
        record.runs[index] = step.run
        sends += [(index, device) for device in step.send]
    if not sends:
        return
    await _write(platform, namespace, name, record.wire())
    published: dict[int, list[str]] = {}
    try:
        for index, device in sends:
            run = record.runs[index]
            await _publish(platform, name, tenant, spec, run, device)
            platform.metrics.commands_sent.labels(tenant).inc()
            published.setdefault(index, []).append(device)
    finally:
        # Whatever went out is recorded, even when a publish failed midway (it is retried).
        for index, devices in published.items():
            record.runs[index] = mark_sent(record.runs[index], devices, platform.clock())
        if published:
            await _write(platform, namespace, name, record.wire())


async def _publish(platform: Platform, name: str, tenant: str, spec: DeviceCommandSpec,
                   run: CommandRun, device: str) -> None:
    root = device_root(tenant, device)
    correlation = correlation_id(name, run.number, device, run.token)
    request = CommandRequest(id=correlation, params=spec.parameters or {},
                             expires_at=run.deadline)
    await platform.messenger.publish(
        command_topic(root, spec.command), request.encode(), retain=False, qos=1,
        correlation_data=correlation.encode(),
        response_topic=command_result_topic(root, spec.command))


def _plan_recheck(outcome: Outcome, record: _Record, now: datetime) -> None:
    active = [r for r in record.runs if r.completed_at is None]
    wait: float | None = None
    if active:
        until_deadline = min((r.deadline - now).total_seconds() for r in active)
        wait = max(0.1, min(RECHECK_SECONDS, until_deadline))
    elif record.next_run is not None:
        wait = max(0.1, min(IDLE_RECHECK_SECONDS, (record.next_run - now).total_seconds()))
    if wait is not None:
        outcome.retry_after, outcome.retry_reason = wait, "NextStep"
        outcome.planned = True


async def _fleet(platform: Platform, namespace: str
                 ) -> tuple[list[DeviceFacts], dict[str, list[str]], dict[str, bool]]:
    devices = [DeviceFacts(d.name, dict(d.labels), online=d.online, gateway=d.gateway,
                           suspended=d.suspended)
               for d in platform.fleet.devices(namespace)]
    children: dict[str, list[str]] = {}
    gateway_online: dict[str, bool] = {}
    for gateway in platform.fleet.gateways(namespace):
        name, status = gateway.name, gateway.body.get("status") or {}
        children[name] = list(status.get("children") or [])
        gateway_online[name] = status.get("online") is True
    return devices, children, gateway_online


# --- answers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    tenant: str
    device: str
    command: str  # the topic's command name
    parsed: ParsedResult


class CommandResults:
    """Device answers from MQTT into the status of the DeviceCommand they answer.

    `on_result` is called by the MQTT connection and never blocks; `run()` records what
    arrived, one status write per DeviceCommand per batch, once `attach` has given it the
    platform (which needs the MQTT connection first). Answers that match no run waiting
    for them (late, repeated, forged, malformed) are counted in `ignored` and logged.
    """

    def __init__(self) -> None:
        self._platform: Platform | None = None
        self._queue: list[_Answer] = []
        self._wakeup = asyncio.Event()
        self._namespaces: dict[str, str] = {}
        self.recorded = 0
        self.ignored = 0

    @property
    def queued(self) -> int:
        """Answers received and not yet recorded."""
        return len(self._queue)

    def attach(self, platform: Platform) -> None:
        self._platform = platform
        self._wakeup.set()

    def on_result(self, topic: str, payload: bytes, correlation_data: bytes | None) -> None:
        try:
            parsed_topic = parse_topic(topic)
        except ContractError as exc:
            self._ignore(topic, "refused", str(exc))
            return
        if parsed_topic.channel is not Channel.COMMAND_RESULT or parsed_topic.stream is None:
            self._ignore(topic, "refused", "not a command result topic")
            return
        parsed = parse_result(payload, correlation_data)
        if isinstance(parsed, ResultRefused):
            self._ignore(topic, "refused", f"{parsed.reason.value}: {parsed.message}")
            return
        if parsed.correlation.device != parsed_topic.name:
            # A device answers only for itself (a gateway answers on its child's topic).
            self._ignore(topic, "unmatched", "the correlation id names another device")
            return
        self._queue.append(_Answer(parsed_topic.tenant, parsed_topic.name, parsed_topic.stream,
                                   parsed))
        self._wakeup.set()

    def _ignore(self, topic: str, outcome: str, why: str) -> None:
        self.ignored += 1
        if self._platform is not None:
            self._platform.metrics.command_answers.labels(outcome).inc()
        log.info("command result on %s ignored: %s", topic, why)

    async def run(self) -> None:
        """Runs until cancelled."""
        while True:
            await self._wakeup.wait()
            if self._platform is not None:
                await self.flush()
            else:
                self._wakeup.clear()

    async def flush(self) -> None:
        """Record every answer received so far."""
        self._wakeup.clear()
        answers, self._queue = self._queue, []
        by_command: dict[tuple[str, str], list[_Answer]] = {}
        for answer in answers:
            by_command.setdefault((answer.tenant, answer.parsed.correlation.command),
                                  []).append(answer)
        for (tenant, name), batch in by_command.items():
            try:
                await self._record(tenant, name, batch)
            except Exception:
                log.exception("recording answers to DeviceCommand %s failed; retrying", name)
                self._queue.extend(batch)
                self._wakeup.set()
                await asyncio.sleep(1.0)

    async def _record(self, tenant: str, name: str, answers: Sequence[_Answer]) -> None:
        namespace = await self._namespace_of(tenant)
        if namespace is None:
            for answer in answers:
                self._ignore(f"{tenant}/devices/{answer.device}", "unmatched", "no such tenant")
            return
        platform = self._platform
        assert platform is not None
        async with platform.lock(lock_key(namespace, name)):
            body = await platform.objects.get(DEVICECOMMANDS, name, namespace)
            if body is None:
                for answer in answers:
                    self._ignore(f"{tenant}/devices/{answer.device}", "unmatched",
                                 f"no DeviceCommand {namespace}/{name}")
                return
            command = (body.get("spec") or {}).get("command")
            status = body.get("status") or {}
            runs = _runs(status)
            changed = False
            for answer in answers:
                correlation = answer.parsed.correlation
                run_index = next((i for i, r in enumerate(runs)
                                  if r.number == correlation.run), None)
                if run_index is None or answer.command != command or not hmac.compare_digest(
                        runs[run_index].token.encode(), correlation.token.encode()):
                    self._ignore(f"{tenant}/devices/{answer.device}", "unmatched",
                                 f"it answers no run of DeviceCommand {namespace}/{name}")
                    continue
                updated, accepted = apply_result(runs[run_index], answer.device,
                                                 answer.parsed.result, platform.clock())
                if not accepted:
                    self._ignore(f"{tenant}/devices/{answer.device}", "late",
                                 f"run {correlation.run} is not waiting for its answer")
                    continue
                runs[run_index] = updated
                changed = True
                self.recorded += 1
                platform.metrics.command_answers.labels("recorded").inc()
            if changed:
                latest = runs[-1]
                patch = {"runs": [r.to_wire() for r in runs], "counts": latest.counts.to_wire()}
                await platform.objects.patch(
                    DEVICECOMMANDS, name, {"status": checked_status(DEVICE_COMMAND, patch)},
                    namespace, subresource="status")

    async def _namespace_of(self, tenant: str) -> str | None:
        assert self._platform is not None
        if tenant not in self._namespaces:
            body = await self._platform.objects.get(TENANTS, tenant)
            if body is None:
                return None
            try:
                spec = parse_spec(TenantSpec, body)
            except ValidationError:
                return None
            self._namespaces[tenant] = tenant_namespace(tenant, spec)
        return self._namespaces[tenant]


def status_model(body: dict[str, Any]) -> DeviceCommandStatus | None:
    """The status as a model, for readers (the CLI); None when it does not parse."""
    try:
        return DeviceCommandStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return None
