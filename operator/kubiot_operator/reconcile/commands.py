"""What kubiot decides for a DeviceCommand: when runs are due, whom they target, how each
target's outcome moves, and which runs are kept. Pure: time comes in as a value.

A target moves Pending → Sending → Sent → Succeeded | Failed, or ends TimedOut (sent, no answer
by the run's deadline), Offline (never reachable: at once with `offlinePolicy: Fail`, at the
deadline with Queue) or Cancelled (its run was replaced). Sending is written to status before
the command is published and Sent after, so a restarted operator sends a Sending target again,
with the same correlation id (a device answers a repeated id without acting twice), and never
sends a Sent one again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from kubiot_contract.commands import CommandResult
from kubiot_operator.models.command import (
    MAX_DATA_IN_STATUS,
    MAX_MESSAGE_IN_STATUS,
    MAX_TARGETS,
    CommandPhase,
    CommandRun,
    CommandTargets,
    ConcurrencyPolicy,
    DeviceCommandSpec,
    OfflinePolicy,
    RunCounts,
    RunPhase,
    TargetOutcome,
    TargetState,
)
from kubiot_operator.reconcile.selectors import selector_matches

TERMINAL = frozenset({TargetState.SUCCEEDED, TargetState.FAILED, TargetState.TIMED_OUT,
                      TargetState.OFFLINE, TargetState.CANCELLED})
AWAITING_ANSWER = frozenset({TargetState.SENDING, TargetState.SENT})

# --- cron ------------------------------------------------------------------------------------


class ScheduleInvalid(ValueError):
    """A schedule that is not a five-field cron expression kubiot understands."""


_MONTHS = {name: i for i, name in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
    start=1)}
_WEEKDAYS = {name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_NO_NAMES: Mapping[str, int] = {}
_FIELDS: tuple[tuple[str, int, int, Mapping[str, int]], ...] = (
    ("minute", 0, 59, _NO_NAMES), ("hour", 0, 23, _NO_NAMES), ("day of month", 1, 31, _NO_NAMES),
    ("month", 1, 12, _MONTHS), ("day of week", 0, 7, _WEEKDAYS))
_ITEM_RE = re.compile(r"^(?P<range>\*|[a-z0-9]+(-[a-z0-9]+)?)(/(?P<step>[0-9]+))?$")
#: A schedule that matches no date within this many years never fires (`0 0 30 2 *`).
_SEARCH_YEARS = 8


def _value(text: str, what: str, low: int, high: int, names: Mapping[str, int]) -> int:
    value = names.get(text) if text.isalpha() else (int(text) if text.isdigit() else None)
    if value is None or not low <= value <= high:
        raise ScheduleInvalid(f"{what}: {text!r} is not between {low} and {high}")
    return value


def _field(text: str, what: str, low: int, high: int, names: Mapping[str, int]) -> frozenset[int]:
    values: set[int] = set()
    for item in text.lower().split(","):
        match = _ITEM_RE.match(item)
        if match is None:
            raise ScheduleInvalid(f"{what}: cannot read {item!r}")
        step = int(match["step"]) if match["step"] else 1
        if step < 1:
            raise ScheduleInvalid(f"{what}: a step must be at least 1")
        part = match["range"]
        if part == "*":
            start, end = low, high
        elif "-" in part:
            first, last = part.split("-")
            start, end = (_value(first, what, low, high, names),
                          _value(last, what, low, high, names))
            if start > end:
                raise ScheduleInvalid(f"{what}: range {item!r} runs backwards")
        else:
            start = _value(part, what, low, high, names)
            end = high if match["step"] else start  # `5/15` means from 5 on, every 15
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class CronSchedule:
    """A five-field cron expression, evaluated in UTC as Vixie cron and CronJob do: when both
    day of month and day of week are restricted, a day matching either fires."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 is Sunday
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, text: str) -> CronSchedule:
        parts = text.split()
        if len(parts) != 5:
            raise ScheduleInvalid(f"a schedule has five fields (minute hour day-of-month month "
                                  f"day-of-week), not {len(parts)}")
        minutes, hours, days, months, weekdays = (
            _field(part, *spec) for part, spec in zip(parts, _FIELDS, strict=True))
        return cls(minutes, hours, days, months, frozenset(0 if d == 7 else d for d in weekdays),
                   any_day=parts[2].startswith("*"),
                   any_weekday=parts[4].startswith("*"))

    def _day_matches(self, moment: datetime) -> bool:
        in_month = moment.day in self.days
        in_week = (moment.weekday() + 1) % 7 in self.weekdays
        if self.any_day or self.any_weekday:
            return in_month and in_week
        return in_month or in_week

    def next_after(self, moment: datetime) -> datetime | None:
        """The first fire time strictly after `moment`, or None when it never fires."""
        t = moment.replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = moment + timedelta(days=366 * _SEARCH_YEARS)
        while t <= limit:
            if t.month not in self.months:
                year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
                t = t.replace(year=year, month=month, day=1, hour=0, minute=0)
            elif not self._day_matches(t):
                t = t.replace(hour=0, minute=0) + timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0) + timedelta(hours=1)
            elif t.minute not in self.minutes:
                t += timedelta(minutes=1)
            else:
                return t
        return None

    def latest_at_or_before(self, moment: datetime) -> datetime | None:
        """The last fire time at or before `moment`, or None within the search window."""
        t = moment.replace(second=0, microsecond=0)
        limit = moment - timedelta(days=366 * _SEARCH_YEARS)
        while t >= limit:
            if t.month not in self.months:
                t = t.replace(day=1, hour=0, minute=0) - timedelta(minutes=1)
            elif not self._day_matches(t):
                t = t.replace(hour=0, minute=0) - timedelta(minutes=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0) - timedelta(minutes=1)
            elif t.minute not in self.minutes:
                t -= timedelta(minutes=1)
            else:
                return t
        return None


# --- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceFacts:
    """What the controller knows about one Device of the namespace."""

    name: str
    labels: Mapping[str, str]
    online: bool
    gateway: str | None = None
    suspended: bool = False


@dataclass(frozen=True)
class Targets:
    """The devices a run goes to, and names that are no Device."""

    devices: tuple[str, ...]
    unknown: tuple[str, ...] = ()
    too_many: bool = False


def resolve_targets(targets: CommandTargets, devices: Iterable[DeviceFacts],
                    gateway_children: Mapping[str, Sequence[str]]) -> Targets:
    """Named devices, selected devices and the children of named gateways, each once, sorted."""
    by_name = {d.name: d for d in devices}
    chosen: set[str] = set()
    unknown: set[str] = set()
    for name in targets.devices or []:
        (chosen if name in by_name else unknown).add(name)
    if targets.selector is not None:
        chosen |= {d.name for d in by_name.values() if selector_matches(targets.selector,
                                                                        d.labels)}
    for gateway in targets.gateways or []:
        children = gateway_children.get(gateway)
        if children is None:
            unknown.add(gateway)
            continue
        chosen |= {c for c in children if c in by_name}
        chosen |= {d.name for d in by_name.values() if d.gateway == gateway}
    ordered = sorted(chosen)
    room = max(0, MAX_TARGETS - len(unknown))
    return Targets(tuple(ordered[:room]), tuple(sorted(unknown)), too_many=len(ordered) > room)


# --- runs ------------------------------------------------------------------------------------


def start_run(*, number: int, token: str, scheduled_at: datetime, now: datetime,
              timeout_seconds: int, targets: Targets) -> CommandRun:
    """A new run: every target Pending; names that are no Device fail at once."""
    outcomes = [TargetOutcome(device=name, state=TargetState.PENDING) for name in
                targets.devices]
    outcomes += [TargetOutcome(device=name, state=TargetState.FAILED, finished_at=now,
                               message=f"no Device or Gateway named {name} in this namespace")
                 for name in targets.unknown]
    run = CommandRun(number=number, token=token, scheduled_at=scheduled_at, started_at=now,
                     deadline=now + timedelta(seconds=timeout_seconds), targets=outcomes)
    return _settled(run, now)


def count(targets: Iterable[TargetOutcome]) -> RunCounts:
    tally = {state: 0 for state in TargetState}
    total = 0
    for target in targets:
        tally[target.state] += 1
        total += 1
    return RunCounts(targeted=total, pending=tally[TargetState.PENDING],
                     sent=tally[TargetState.SENDING] + tally[TargetState.SENT],
                     succeeded=tally[TargetState.SUCCEEDED], failed=tally[TargetState.FAILED],
                     timed_out=tally[TargetState.TIMED_OUT], offline=tally[TargetState.OFFLINE],
                     cancelled=tally[TargetState.CANCELLED])


def _settled(run: CommandRun, now: datetime) -> CommandRun:
    """Counts recomputed; the run completes when every target has an outcome."""
    counts = count(run.targets)
    update: dict[str, Any] = {"counts": counts}
    if run.completed_at is None and all(t.state in TERMINAL for t in run.targets):
        update["completed_at"] = now
        update["phase"] = RunPhase.SUCCEEDED if counts.succeeded == counts.targeted \
            else RunPhase.FAILED
    return run.model_copy(update=update)


@dataclass(frozen=True)
class RunStep:
    """A run after one look at the devices, and whom to send the command to now."""

    run: CommandRun
    send: tuple[str, ...] = ()


def advance_run(run: CommandRun, online: Mapping[str, bool], policy: OfflinePolicy,
                now: datetime) -> RunStep:
    """Deadlines, offline targets, and which targets to send (they become Sending)."""
    if run.completed_at is not None:
        return RunStep(run)
    expired = now >= run.deadline
    send: list[str] = []
    targets = []
    for target in run.targets:
        state, message = target.state, target.message
        reachable = online.get(target.device, False)
        if state in TERMINAL:
            pass
        elif expired and state in AWAITING_ANSWER:
            state, message = TargetState.TIMED_OUT, "no answer before the deadline"
        elif expired:
            state, message = TargetState.OFFLINE, "offline until the deadline"
        elif state is TargetState.PENDING and not reachable and policy is OfflinePolicy.FAIL:
            state, message = TargetState.OFFLINE, "offline when the run started"
        elif state in (TargetState.PENDING, TargetState.SENDING) and reachable:
            # Sending again after a restart is safe: the correlation id is the same.
            state = TargetState.SENDING
            send.append(target.device)
        if state is not target.state:
            target = target.model_copy(update={
                "state": state, "message": message,
                "finished_at": now if state in TERMINAL else None})
        targets.append(target)
    return RunStep(_settled(run.model_copy(update={"targets": targets}), now), tuple(send))


def mark_sent(run: CommandRun, devices: Iterable[str], now: datetime) -> CommandRun:
    """Sending targets whose publish succeeded become Sent."""
    published = set(devices)
    targets = [t.model_copy(update={"state": TargetState.SENT, "sent_at": now})
               if t.device in published and t.state is TargetState.SENDING else t
               for t in run.targets]
    return _settled(run.model_copy(update={"targets": targets}), now)


def apply_result(run: CommandRun, device: str, result: CommandResult, now: datetime
                 ) -> tuple[CommandRun, bool]:
    """Record a device's answer; False when the target is not waiting for one (late,
    repeated, or never sent in this run)."""
    if run.completed_at is not None:
        return run, False
    accepted = False
    targets = []
    for target in run.targets:
        if target.device == device and target.state in AWAITING_ANSWER:
            message, data = _kept_answer(result)
            target = target.model_copy(update={
                "state": TargetState.SUCCEEDED if result.ok else TargetState.FAILED,
                "message": message, "data": data,
                "sent_at": target.sent_at or now, "finished_at": now})
            accepted = True
        targets.append(target)
    if not accepted:
        return run, False
    return _settled(run.model_copy(update={"targets": targets}), now), True


def _kept_answer(result: CommandResult) -> tuple[str | None, dict[str, Any] | None]:
    """The message and data as status keeps them: bounded, so that a run of hundreds of
    targets fits in one object."""
    message = result.message[:MAX_MESSAGE_IN_STATUS] or None
    data = result.data
    if data is not None:
        size = len(json.dumps(data, separators=(",", ":")))
        if size > MAX_DATA_IN_STATUS:
            data = None
            note = f"(data of {size} bytes not kept)"
            room = MAX_MESSAGE_IN_STATUS - len(note) - 1
            message = f"{message[:room]} {note}" if message else note
    return message, data


def cancel_run(run: CommandRun, why: str, now: datetime) -> CommandRun:
    """End a run early: targets without an outcome are Cancelled."""
    targets = [t if t.state in TERMINAL else t.model_copy(update={
        "state": TargetState.CANCELLED, "message": why, "finished_at": now})
        for t in run.targets]
    return _settled(run.model_copy(update={"targets": targets}), now)


# --- schedule --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleDecision:
    """Whether a run starts now (and for which fire time), and when the next one is due."""

    start_for: datetime | None = None
    skipped: datetime | None = None  # a fire time Forbid skipped
    replace: bool = False  # end the runs under way first (Replace)
    next_run: datetime | None = None
    last_scheduled: datetime | None = None


def decide_schedule(spec: DeviceCommandSpec, *, created: datetime,
                    last_scheduled: datetime | None, runs: Sequence[CommandRun],
                    now: datetime) -> ScheduleDecision:
    """When the next run is due. One-shot commands run once (now, or at `at`); scheduled ones
    run the latest fire time missed since the last one acted on (missed ones collapse into
    one, as CronJob does), subject to `suspend` and `concurrencyPolicy`.

    Raises ScheduleInvalid for a schedule that cannot be read."""
    if spec.schedule is None:
        if runs or last_scheduled is not None:
            return ScheduleDecision(last_scheduled=last_scheduled)
        # Without `at`, now: the API server's creation time may be ahead of this clock.
        due = spec.at or now
        if spec.suspend or due > now:
            return ScheduleDecision(next_run=None if spec.suspend else due)
        return ScheduleDecision(start_for=due, last_scheduled=due)
    cron = CronSchedule.parse(spec.schedule)
    if spec.suspend:
        return ScheduleDecision(last_scheduled=last_scheduled)
    since = last_scheduled or created
    latest = cron.latest_at_or_before(now)
    next_run = cron.next_after(now)
    if latest is None or latest <= since:
        return ScheduleDecision(next_run=next_run, last_scheduled=last_scheduled)
    active = any(r.completed_at is None for r in runs)
    if active and spec.concurrency_policy is ConcurrencyPolicy.FORBID:
        return ScheduleDecision(skipped=latest, next_run=next_run, last_scheduled=latest)
    return ScheduleDecision(start_for=latest, next_run=next_run, last_scheduled=latest,
                            replace=active and spec.concurrency_policy is
                            ConcurrencyPolicy.REPLACE)


def kept_runs(runs: Sequence[CommandRun], *, scheduled: bool, successful_limit: int,
              failed_limit: int) -> list[CommandRun]:
    """Runs under way, plus the newest finished ones within each history limit (a one-shot
    command keeps its one run: it is the command's answer). Only runs under way and the latest
    finished one keep each target's outcome; older ones keep their counts."""
    if not scheduled:
        return list(runs)
    keep: set[int] = set()
    succeeded = [r for r in runs if r.completed_at is not None and r.phase is RunPhase.SUCCEEDED]
    failed = [r for r in runs if r.completed_at is not None and r.phase is not RunPhase.SUCCEEDED]
    for finished, limit in ((succeeded, successful_limit), (failed, failed_limit)):
        newest = sorted(finished, key=lambda r: r.number)[-limit:] if limit else []
        keep |= {r.number for r in newest}
    keep |= {r.number for r in runs if r.completed_at is None}
    kept = sorted((r for r in runs if r.number in keep), key=lambda r: r.number)
    latest_finished = max((r.number for r in runs if r.completed_at is not None), default=None)
    return [r if r.completed_at is None or r.number == latest_finished
            else r.model_copy(update={"targets": []}) for r in kept]


def command_phase(spec: DeviceCommandSpec, runs: Sequence[CommandRun]) -> CommandPhase:
    if any(r.completed_at is None for r in runs):
        return CommandPhase.RUNNING
    if spec.schedule is not None:
        return CommandPhase.SUSPENDED if spec.suspend else CommandPhase.SCHEDULED
    if not runs:
        return CommandPhase.SUSPENDED if spec.suspend else CommandPhase.PENDING
    return CommandPhase.SUCCEEDED if runs[-1].phase is RunPhase.SUCCEEDED \
        else CommandPhase.FAILED
