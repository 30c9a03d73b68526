"""Commands: what the operator publishes on `cmd/{name}` and what a device answers on
`cmd/{name}/result`.

A command carries a correlation id twice: as MQTT v5 correlation data (with the result topic as
the response topic), and as `id` in the JSON body, for devices whose MQTT client cannot read v5
properties. A device answers with the same id, either way; the operator matches results by it.
docs/commands.md documents both payloads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from .topics import NAME_MAX_LENGTH, NAME_PATTERN

#: A result larger than this is refused before it is parsed.
MAX_RESULT_BYTES = 16 * 1024
#: A command's parameters, encoded, are at most this large (the DeviceCommand spec says so too).
MAX_PARAMETERS_BYTES = 8 * 1024
MAX_MESSAGE_LENGTH = 1024
MAX_CORRELATION_LENGTH = 400

#: `{command object}/{run}/{device}/{token}`: which DeviceCommand, which of its runs, which
#: target, and a random token the run keeps in its status, so a result can only be matched by
#: someone who was sent the command.
_OBJECT = r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
_CORRELATION_RE = re.compile(
    rf"^(?P<command>{_OBJECT})/(?P<run>[0-9]{{1,9}})/(?P<device>{NAME_PATTERN[1:-1]})"
    r"/(?P<token>[A-Za-z0-9_-]{16,64})$")


class ResultStatus(StrEnum):
    OK = "ok"
    ERROR = "error"


@dataclass(frozen=True)
class Correlation:
    """The parts of a correlation id."""

    command: str
    run: int
    device: str
    token: str

    def __str__(self) -> str:
        return f"{self.command}/{self.run}/{self.device}/{self.token}"


def correlation_id(command: str, run: int, device: str, token: str) -> str:
    """The correlation id of one target of one run; raises ValueError for parts that do not fit."""
    text = str(Correlation(command, run, device, token))
    if parse_correlation(text) is None:
        raise ValueError(f"{text!r} is not a valid correlation id")
    return text


def parse_correlation(text: str | bytes | None) -> Correlation | None:
    """The parts of a correlation id, or None for anything else."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(text, str) or len(text) > MAX_CORRELATION_LENGTH:
        return None
    match = _CORRELATION_RE.match(text)
    if match is None or len(match["device"]) > NAME_MAX_LENGTH or len(match["command"]) > 253:
        return None
    return Correlation(match["command"], int(match["run"]), match["device"], match["token"])


class CommandRequest(BaseModel):
    """The body of a `cmd/{name}` message."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    id: str = Field(description="The correlation id; answer with it.")
    params: dict[str, Any] = Field(default_factory=dict, description="The command's parameters.")
    expires_at: datetime = Field(alias="expiresAt", description="After this the operator no "
                                 "longer waits for an answer; a device may drop the command.")

    def encode(self) -> bytes:
        return json.dumps(self.model_dump(mode="json", by_alias=True),
                          separators=(",", ":")).encode()


Message = Annotated[str, StringConstraints(max_length=MAX_MESSAGE_LENGTH)]


class CommandResult(BaseModel):
    """The body of a `cmd/{name}/result` message."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str | None = Field(None, max_length=MAX_CORRELATION_LENGTH,
                           description="The command's correlation id, for clients that cannot "
                           "send MQTT v5 correlation data.")
    status: Literal["ok", "error"]
    message: Message = ""
    data: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == ResultStatus.OK.value


class ResultRefusal(StrEnum):
    TOO_LARGE = "too_large"
    BAD_JSON = "bad_json"
    BAD_SCHEMA = "bad_schema"
    NO_CORRELATION = "no_correlation"


@dataclass(frozen=True)
class ResultRefused:
    """A result that does not follow the contract, and why (returned, never raised)."""

    reason: ResultRefusal
    message: str


@dataclass(frozen=True)
class ParsedResult:
    """A result and the correlation it answers."""

    correlation: Correlation
    result: CommandResult


def parse_result(raw: bytes, correlation_data: bytes | None = None
                 ) -> ParsedResult | ResultRefused:
    """Read a device's answer; the v5 correlation data wins over the body's `id`.

    Device bytes are hostile until parsed: anything that does not fit is a ResultRefused.
    """
    if len(raw) > MAX_RESULT_BYTES:
        return ResultRefused(ResultRefusal.TOO_LARGE,
                             f"result is {len(raw)} bytes, the limit is {MAX_RESULT_BYTES}")
    try:
        result = CommandResult.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] in ("json_invalid", "json_type") for e in errors):
            return ResultRefused(ResultRefusal.BAD_JSON, "result is not a JSON object")
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"]) or "result"
        return ResultRefused(ResultRefusal.BAD_SCHEMA, f"{where}: {first['msg']}"[:256])
    correlation = parse_correlation(correlation_data) if correlation_data else None
    if correlation is None:
        correlation = parse_correlation(result.id)
    if correlation is None:
        return ResultRefused(ResultRefusal.NO_CORRELATION,
                             "result carries no valid correlation id (v5 correlation data or "
                             "`id`)")
    return ParsedResult(correlation, result)


def result_payload(correlation: str, status: ResultStatus, message: str = "",
                   data: dict[str, Any] | None = None) -> bytes:
    """A result as a device sends it (the simulator uses this)."""
    body: dict[str, Any] = {"id": correlation, "status": status.value, "message": message}
    if data is not None:
        body["data"] = data
    return json.dumps(body, separators=(",", ":")).encode()
