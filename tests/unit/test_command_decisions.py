"""DeviceCommand decisions: cron, targets, each target's outcome, schedules and history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubiot_contract.commands import CommandResult
from kubiot_operator.models.command import (
    CommandRun,
    CommandTargets,
    DeviceCommandSpec,
    OfflinePolicy,
    RunPhase,
    TargetState,
)
from kubiot_operator.reconcile.commands import (
    CronSchedule,
    DeviceFacts,
    ScheduleInvalid,
    Targets,
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

T0 = datetime(2026, 11, 30, 5, 58, 30, tzinfo=UTC)  # a Monday
OK = CommandResult(status="ok", message="pong", data={"uptimeSeconds": 3})
ERROR = CommandResult(status="error", message="unknown command")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- cron ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("schedule", "after", "expected"), [
    ("* * * * *", "2026-11-30T05:58:30", "2026-11-30T05:59:00"),
    ("0 6 * * 1-5", "2026-11-30T05:58:30", "2026-11-30T06:00:00"),
    ("0 6 * * 1-5", "2026-11-30T06:00:00", "2026-12-01T06:00:00"),  # strictly after
    ("0 6 * * mon-fri", "2026-12-04T07:00:00", "2026-12-07T06:00:00"),  # over the weekend
    ("*/15 * * * *", "2026-11-30T05:58:30", "2026-11-30T06:00:00"),
    ("5/20 * * * *", "2026-11-30T05:58:30", "2026-11-30T06:05:00"),
    ("0 0 1 jan *", "2026-11-30T05:58:30", "2027-01-01T00:00:00"),  # over the year's end
    ("0 0 29 2 *", "2026-11-30T05:58:30", "2028-02-29T00:00:00"),  # the next leap day
    ("0 0 31 * *", "2026-11-30T05:58:30", "2026-12-31T00:00:00"),  # skips 30-day months
    ("0 12 13 * 5", "2026-11-30T05:58:30", "2026-12-04T12:00:00"),  # the 13th OR a Friday
    # A day field starting with `*` counts as unrestricted (as in Vixie cron): odd days AND
    # Fridays, not either.
    ("0 12 */2 * 5", "2026-12-01T13:00:00", "2026-12-11T12:00:00"),
    ("0 0 * * 7", "2026-11-30T05:58:30", "2026-12-06T00:00:00"),  # 7 is Sunday too
    ("0 0 * * 0", "2026-11-30T05:58:30", "2026-12-06T00:00:00"),
    ("30 23 31 12 *", "2026-12-31T23:30:00", "2027-12-31T23:30:00"),
])
def test_next_fire_time(schedule: str, after: str, expected: str) -> None:
    assert CronSchedule.parse(schedule).next_after(at(after)) == at(expected)


def test_a_schedule_that_never_fires_has_no_next_time() -> None:
    cron = CronSchedule.parse("0 0 30 2 *")
    assert cron.next_after(T0) is None and cron.latest_at_or_before(T0) is None


@pytest.mark.parametrize("schedule", ["* * * *", "60 * * * *", "* 24 * * *", "* * 0 * *",
                                      "* * * 13 *", "* * * * 8", "5-1 * * * *", "*/0 * * * *",
                                      "a b c d e", "* * * foo *", "1,,2 * * * *"])
def test_unreadable_schedules_are_refused(schedule: str) -> None:
    with pytest.raises(ScheduleInvalid):
        CronSchedule.parse(schedule)


schedules = st.tuples(
    st.sampled_from(["*", "0", "*/7", "5,35", "10-20/5"]),
    st.sampled_from(["*", "6", "*/5", "1-3"]),
    st.sampled_from(["*", "1", "15,31", "*/10"]),
    st.sampled_from(["*", "2", "jun-aug", "*/4"]),
    st.sampled_from(["*", "1-5", "0", "sat,sun"]),
).map(" ".join)
moments = st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1),
                       timezones=st.just(UTC))


@given(schedule=schedules, moment=moments)
def test_next_and_latest_agree(schedule: str, moment: datetime) -> None:
    cron = CronSchedule.parse(schedule)
    following = cron.next_after(moment)
    assert following is not None and following > moment and following.second == 0
    assert cron.latest_at_or_before(following) == following
    # Nothing fires between the moment and the next fire time.
    assert cron.latest_at_or_before(following - timedelta(minutes=1)) == \
        cron.latest_at_or_before(moment)


# --- targets ---------------------------------------------------------------------------------


FLEET = [DeviceFacts("pump-1", {"fleet": "pumps"}, online=True),
         DeviceFacts("pump-2", {"fleet": "pumps"}, online=False),
         DeviceFacts("meter-1", {"fleet": "meters"}, online=True, gateway="gw-1"),
         DeviceFacts("meter-2", {"fleet": "meters"}, online=True)]


def test_targets_by_name_selector_and_gateway_are_resolved_once() -> None:
    targets = CommandTargets.model_validate({
        "devices": ["pump-1", "ghost"], "selector": {"matchLabels": {"fleet": "pumps"}},
        "gateways": ["gw-1", "gw-9"]})
    resolved = resolve_targets(targets, FLEET, {"gw-1": ["meter-2"]})
    assert resolved == Targets(("meter-1", "meter-2", "pump-1", "pump-2"), ("ghost", "gw-9"))


# --- a run, target by target ----------------------------------------------------------------


def run_of(*devices: str, unknown: tuple[str, ...] = (), timeout: int = 30) -> CommandRun:
    return start_run(number=1, token="t" * 22, scheduled_at=T0, now=T0,
                     timeout_seconds=timeout, targets=Targets(devices, unknown))


def states(run: CommandRun) -> dict[str, TargetState]:
    return {t.device: t.state for t in run.targets}


def test_online_targets_are_sent_offline_ones_queued_then_answers_recorded() -> None:
    step = advance_run(run_of("pump-1", "pump-2"), {"pump-1": True}, OfflinePolicy.QUEUE, T0)
    assert step.send == ("pump-1",)
    assert states(step.run) == {"pump-1": TargetState.SENDING, "pump-2": TargetState.PENDING}
    run = mark_sent(step.run, step.send, T0)
    assert run.counts.sent == 1 and run.counts.pending == 1

    later = T0 + timedelta(seconds=5)
    step = advance_run(run, {"pump-1": True, "pump-2": True}, OfflinePolicy.QUEUE, later)
    assert step.send == ("pump-2",)  # came online within the timeout; pump-1 is not re-sent
    run = mark_sent(step.run, step.send, later)
    run, accepted = apply_result(run, "pump-1", OK, later)
    assert accepted and run.completed_at is None
    run, accepted = apply_result(run, "pump-2", ERROR, later)
    assert accepted
    assert states(run) == {"pump-1": TargetState.SUCCEEDED, "pump-2": TargetState.FAILED}
    assert run.targets[0].data == {"uptimeSeconds": 3}
    assert run.targets[1].message == "unknown command"
    assert (run.phase, run.completed_at, run.counts.failed) == (RunPhase.FAILED, later, 1)


def test_fail_policy_marks_offline_targets_at_once() -> None:
    step = advance_run(run_of("pump-1", "pump-2"), {"pump-1": True}, OfflinePolicy.FAIL, T0)
    assert states(step.run)["pump-2"] is TargetState.OFFLINE
    assert step.run.targets[1].message == "offline when the run started"


def test_the_deadline_times_out_sent_targets_and_ends_queued_ones_offline() -> None:
    step = advance_run(run_of("pump-1", "pump-2", timeout=10), {"pump-1": True},
                       OfflinePolicy.QUEUE, T0)
    run = mark_sent(step.run, step.send, T0)
    step = advance_run(run, {"pump-1": True, "pump-2": False}, OfflinePolicy.QUEUE,
                       T0 + timedelta(seconds=10))
    assert states(step.run) == {"pump-1": TargetState.TIMED_OUT, "pump-2": TargetState.OFFLINE}
    assert step.send == () and step.run.phase is RunPhase.FAILED
    late, accepted = apply_result(step.run, "pump-1", OK, T0 + timedelta(seconds=11))
    assert not accepted and late == step.run


def test_a_sending_target_is_sent_again_after_a_restart_but_a_sent_one_never() -> None:
    step = advance_run(run_of("pump-1", "pump-2"), {"pump-1": True, "pump-2": True},
                       OfflinePolicy.QUEUE, T0)
    # The operator stopped after publishing to pump-1 only and recording it.
    run = mark_sent(step.run, ["pump-1"], T0)
    again = advance_run(run, {"pump-1": True, "pump-2": True}, OfflinePolicy.QUEUE, T0)
    assert again.send == ("pump-2",)


def test_an_answer_racing_the_sent_record_counts_and_repeats_are_ignored() -> None:
    step = advance_run(run_of("pump-1"), {"pump-1": True}, OfflinePolicy.QUEUE, T0)
    run, accepted = apply_result(step.run, "pump-1", OK, T0)
    assert accepted and run.phase is RunPhase.SUCCEEDED
    assert mark_sent(run, ["pump-1"], T0).targets == run.targets
    _, again = apply_result(run, "pump-1", ERROR, T0)
    assert not again


def test_status_keeps_a_bounded_message_and_small_data_only() -> None:
    step = advance_run(run_of("pump-1", "pump-2"), {"pump-1": True, "pump-2": True},
                       OfflinePolicy.QUEUE, T0)
    big = CommandResult(status="ok", message="m" * 1000, data={"blob": "x" * 600})
    run, _ = apply_result(step.run, "pump-1", big, T0)
    run, _ = apply_result(run, "pump-2", OK, T0)
    kept = {t.device: t for t in run.targets}
    assert kept["pump-1"].data is None and len(kept["pump-1"].message or "") == 256
    assert (kept["pump-1"].message or "").endswith("(data of 611 bytes not kept)")
    assert kept["pump-2"].data == {"uptimeSeconds": 3}


def test_an_answer_for_a_target_never_sent_is_refused() -> None:
    _, accepted = apply_result(run_of("pump-1"), "pump-1", OK, T0)
    assert not accepted


def test_unknown_names_fail_at_once_and_cancel_ends_the_rest() -> None:
    run = run_of("pump-1", unknown=("ghost",))
    assert states(run)["ghost"] is TargetState.FAILED
    cancelled = cancel_run(run, "replaced by run 2", T0)
    assert states(cancelled) == {"pump-1": TargetState.CANCELLED, "ghost": TargetState.FAILED}
    assert cancelled.phase is RunPhase.FAILED


# --- schedules and history -------------------------------------------------------------------


def spec(**fields: object) -> DeviceCommandSpec:
    return DeviceCommandSpec.model_validate(
        {"targets": {"devices": ["pump-1"]}, "command": "ping", **fields})


def test_a_one_shot_command_runs_once_now_or_at_its_time() -> None:
    now_decision = decide_schedule(spec(), created=T0, last_scheduled=None, runs=[], now=T0)
    assert now_decision.start_for == T0
    later = T0 + timedelta(hours=1)
    waiting = decide_schedule(spec(at=later), created=T0, last_scheduled=None, runs=[], now=T0)
    assert (waiting.start_for, waiting.next_run) == (None, later)
    done = decide_schedule(spec(), created=T0, last_scheduled=T0, runs=[run_of("pump-1")],
                           now=later)
    assert done.start_for is None


def test_a_schedule_fires_once_per_fire_time_and_collapses_missed_ones() -> None:
    weekday = spec(schedule="0 6 * * 1-5")
    before = decide_schedule(weekday, created=T0, last_scheduled=None, runs=[], now=T0)
    assert (before.start_for, before.next_run) == (None, at("2026-11-30T06:00:00"))
    due = decide_schedule(weekday, created=T0, last_scheduled=None, runs=[],
                          now=at("2026-11-30T06:00:02"))
    assert due.start_for == at("2026-11-30T06:00:00")
    assert due.next_run == at("2026-12-01T06:00:00")
    again = decide_schedule(weekday, created=T0, last_scheduled=due.last_scheduled, runs=[],
                            now=at("2026-11-30T06:00:05"))
    assert again.start_for is None
    # The operator was down for three days: one run, for the latest missed time.
    missed = decide_schedule(weekday, created=T0, last_scheduled=due.last_scheduled, runs=[],
                             now=at("2026-12-03T09:00:00"))
    assert missed.start_for == at("2026-12-03T06:00:00")


def test_concurrency_policies_and_suspend() -> None:
    active = [run_of("pump-1")]
    now = at("2026-11-30T06:00:01")
    forbid = decide_schedule(spec(schedule="* * * * *"), created=T0, last_scheduled=None,
                             runs=active, now=now)
    assert forbid.start_for is None and forbid.skipped == at("2026-11-30T06:00:00")
    replace = decide_schedule(spec(schedule="* * * * *", concurrencyPolicy="Replace"),
                              created=T0, last_scheduled=None, runs=active, now=now)
    assert replace.start_for is not None and replace.replace
    allow = decide_schedule(spec(schedule="* * * * *", concurrencyPolicy="Allow"),
                            created=T0, last_scheduled=None, runs=active, now=now)
    assert allow.start_for is not None and not allow.replace
    suspended = decide_schedule(spec(schedule="* * * * *", suspend=True), created=T0,
                                last_scheduled=None, runs=[], now=now)
    assert suspended.start_for is None and suspended.next_run is None


def finished(number: int, ok: bool) -> CommandRun:
    run = run_of("pump-1").model_copy(update={"number": number})
    run = mark_sent(advance_run(run, {"pump-1": True}, OfflinePolicy.QUEUE, T0).run,
                    ["pump-1"], T0)
    return apply_result(run, "pump-1", OK if ok else ERROR, T0)[0]


def test_history_keeps_the_newest_runs_within_each_limit_and_every_active_one() -> None:
    runs = [finished(1, True), finished(2, False), finished(3, True), finished(4, False),
            finished(5, True), run_of("pump-1").model_copy(update={"number": 6})]
    kept = kept_runs(runs, scheduled=True, successful_limit=2, failed_limit=1)
    assert [r.number for r in kept] == [3, 4, 5, 6]
    # Only the latest finished run and the one under way keep each target's outcome.
    assert [len(r.targets) for r in kept] == [0, 0, 1, 1]
    assert kept[0].counts.succeeded == 1
    assert [r.number for r in kept_runs(runs, scheduled=True, successful_limit=0,
                                        failed_limit=0)] == [6]
    assert kept_runs(runs[:1], scheduled=False, successful_limit=0, failed_limit=0) == runs[:1]


def test_the_command_phase_follows_its_runs() -> None:
    assert command_phase(spec(), []).value == "Pending"
    assert command_phase(spec(), [run_of("pump-1")]).value == "Running"
    assert command_phase(spec(), [finished(1, True)]).value == "Succeeded"
    assert command_phase(spec(), [finished(1, False)]).value == "Failed"
    assert command_phase(spec(schedule="0 6 * * *"), [finished(1, True)]).value == "Scheduled"
    assert command_phase(spec(schedule="0 6 * * *", suspend=True), []).value == "Suspended"
