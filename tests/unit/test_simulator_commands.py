"""What a simulated device answers to ping, set, reboot and anything else."""

from __future__ import annotations

import json

from kubiot_contract.commands import ResultStatus
from kubiot_operator.simulator.commands import (
    AnswerMemory,
    Effect,
    Received,
    answer,
    read_command,
)


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
