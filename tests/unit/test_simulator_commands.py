"""What a simulated device answers to ping, set, reboot and anything else."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

from kubiot_contract.commands import ResultStatus
from kubiot_operator.simulator.commands import (
    AnswerMemory,
    Effect,
    Received,
    answer,
    read_command,
)
from kubiot_operator.simulator.responder import CommandResponder


def command(name: str, **params: object) -> Received:
    return Received(name, "c-1", dict(params))


def test_ping_answers_pong_with_uptime_and_seq() -> None:
    given, _ = answer(command("ping"), uptime_seconds=12.3456, seq=7, settings={})
    assert (given.status, given.message) == (ResultStatus.OK, "pong")
    assert given.data == {"uptimeSeconds": 12.346, "seq": 7}


def test_set_changes_power_and_desired_values_and_reports_them() -> None:
    given, settings = answer(command("set", power="on", desired={"rpm": 1200}),
                             uptime_seconds=0, seq=0, settings={"mode": "eco"})
    assert given.status is ResultStatus.OK and given.effect is Effect.REPORT_STATE
    assert settings == {"mode": "eco", "power": "on", "rpm": 1200} == given.data


def test_set_refuses_what_it_cannot_apply() -> None:
    for params in ({"power": "maybe"}, {}):
        given, settings = answer(command("set", **params), uptime_seconds=0, seq=0,
                                 settings={"power": "off"})
        assert given.status is ResultStatus.ERROR and settings == {"power": "off"}


def test_reboot_answers_then_reboots_and_unknown_commands_are_refused_with_a_reason() -> None:
    given, _ = answer(command("reboot"), uptime_seconds=0, seq=0, settings={})
    assert given.effect is Effect.REBOOT and given.status is ResultStatus.OK
    given, _ = answer(command("selfdestruct"), uptime_seconds=0, seq=0, settings={})
    assert given.status is ResultStatus.ERROR
    assert given.message == "unknown command 'selfdestruct': this device knows ping, set, reboot"


def test_the_correlation_id_comes_from_v5_data_or_the_body() -> None:
    body = json.dumps({"id": "from-body", "params": {"power": "on"}}).encode()
    assert read_command("set", body, b"from-v5") == Received("set", "from-v5", {"power": "on"})
    assert read_command("set", body, None) == Received("set", "from-body", {"power": "on"})
    assert read_command("ping", b"garbage", None) is None


def test_answers_are_remembered_for_the_latest_commands_only() -> None:
    memory = AnswerMemory(capacity=2)
    for correlation in ("a", "b", "c"):
        memory.remember(correlation, answer(command("ping"), uptime_seconds=0, seq=0,
                                            settings={})[0])
    assert memory.get("a") is None and memory.get("c") is not None


async def test_a_repeated_id_is_answered_again_without_acting_and_expired_ones_are_dropped(
) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    responder = CommandResponder(clock=lambda: now, jitter=lambda: 0.0)
    body = json.dumps({"id": "c-1", "params": {"power": "on"},
                       "expiresAt": "2026-01-01T00:00:30Z"}).encode()
    expired = json.dumps({"id": "c-2", "params": {}, "expiresAt": "2025-12-31T23:59:00Z"})

    first = responder.on_command("p1", "acme/devices/p1", "set", body, None, None,
                                 uptime_seconds=1, seq=0)
    again = responder.on_command("p1", "acme/devices/p1", "set", body, None, None,
                                 uptime_seconds=2, seq=1)
    late = responder.on_command("p1", "acme/devices/p1", "ping", expired.encode(), None, None,
                                uptime_seconds=3, seq=2)
    await asyncio.sleep(0)  # the answers are queued once their work is done

    assert first is not None and first.effect is Effect.REPORT_STATE
    assert again is None and late is None
    assert len(responder.received) == 3 and len(responder.executed) == 1
    assert responder.settings == {"p1": {"power": "on"}}
    assert responder.pending == 2  # the answer, and the same answer again
