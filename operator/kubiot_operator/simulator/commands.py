"""What a simulated device does with a command: `ping`, `set` and `reboot`, and a refusal with a
reason for anything else.

A command may arrive twice with the same correlation id (QoS 1 redelivery, or an operator that
restarted before recording that it had sent it): the device answers again from its memory of
recent answers and does not act twice. Pure: the device passes its state and the time in.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kubiot_contract.commands import ResultStatus

KNOWN = ("ping", "set", "reboot")
REMEMBERED_ANSWERS = 256


class Effect(StrEnum):
    NONE = "none"
    REPORT_STATE = "report-state"  # the reported twin changed
    REBOOT = "reboot"  # go offline after answering, come back


@dataclass(frozen=True)
class Answer:
    status: ResultStatus
    message: str
    data: dict[str, Any] | None = None
    effect: Effect = Effect.NONE


@dataclass(frozen=True)
class Received:
    """A command as the device read it."""

    name: str
    correlation: str
    params: dict[str, Any]


def read_command(name: str, payload: bytes, correlation_data: bytes | None) -> Received | None:
    """The command in a `cmd/{name}` message, or None when it carries no correlation id."""
    try:
        body = json.loads(payload) if payload else {}
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    correlation = correlation_data.decode(errors="replace") if correlation_data else body.get("id")
    if not isinstance(correlation, str) or not correlation:
        return None
    params = body.get("params")
    return Received(name, correlation, params if isinstance(params, dict) else {})


def answer(command: Received, *, uptime_seconds: float, seq: int, settings: dict[str, Any]
           ) -> tuple[Answer, dict[str, Any]]:
    """The answer to a command, and the device's settings after it."""
    match command.name:
        case "ping":
            return Answer(ResultStatus.OK, "pong", {"uptimeSeconds": round(uptime_seconds, 3),
                                                    "seq": seq}), settings
        case "set":
            changes = dict(command.params.get("desired") or {}) \
                if isinstance(command.params.get("desired"), dict) else {}
            power = command.params.get("power")
            if power is not None:
                if power not in ("on", "off"):
                    return Answer(ResultStatus.ERROR,
                                  f"power must be on or off, not {str(power)[:32]!r}"), settings
                changes["power"] = power
            if not changes:
                return Answer(ResultStatus.ERROR,
                              "set needs `power` (on or off) or `desired` values"), settings
            updated = {**settings, **changes}
            return Answer(ResultStatus.OK, "applied", dict(updated), Effect.REPORT_STATE), updated
        case "reboot":
            return Answer(ResultStatus.OK, "rebooting", None, Effect.REBOOT), settings
        case _:
            return Answer(ResultStatus.ERROR, f"unknown command {command.name!r}: this device "
                          f"knows {', '.join(KNOWN)}"), settings


@dataclass
class AnswerMemory:
    """The answers to the latest commands, by correlation id, oldest forgotten first."""

    capacity: int = REMEMBERED_ANSWERS
    _answers: OrderedDict[str, Answer] = field(default_factory=OrderedDict)

    def get(self, correlation: str) -> Answer | None:
        return self._answers.get(correlation)

    def remember(self, correlation: str, given: Answer) -> None:
        self._answers[correlation] = given
        while len(self._answers) > self.capacity:
            self._answers.popitem(last=False)
