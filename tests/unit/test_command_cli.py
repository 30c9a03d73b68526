"""`kubiot command`: how targets and parameters are read, and what is refused before any call."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from kubiot_operator.cli import main
from kubiot_operator.cli_command import (
    UsageError,
    command_manifest,
    parse_params,
    parse_target,
    send_command,
)


def test_a_device_or_a_label_selector() -> None:
    assert parse_target("acme/pump-1") == ("acme", {"devices": ["pump-1"]})
    assert parse_target("acme/fleet=pumps,ring!=canary,site,!retired") == ("acme", {
        "selector": {"matchLabels": {"fleet": "pumps"}, "matchExpressions": [
            {"key": "ring", "operator": "NotIn", "values": ["canary"]},
            {"key": "site", "operator": "Exists"},
            {"key": "retired", "operator": "DoesNotExist"}]}})
    for bad in ("pump-1", "acme/", "/pump-1", "acme/a=b,!c=d"):
        with pytest.raises(UsageError):
            parse_target(bad)


def test_parameters_are_json_when_they_read_as_json() -> None:
    assert parse_params(["power=on", "rpm=1200", "eco=true", 'desired={"a": 1}', "x="]) == {
        "power": "on", "rpm": 1200, "eco": True, "desired": {"a": 1}, "x": ""}
    with pytest.raises(UsageError):
        parse_params(["novalue"])


def test_a_command_name_that_cannot_be_a_topic_level_is_refused_before_any_call() -> None:
    with pytest.raises(UsageError, match="command"):
        command_manifest(namespace="acme", targets={"devices": ["p"]}, command="Re/boot",
                         params={}, timeout_seconds=30, offline_policy="Queue")
    manifest = command_manifest(namespace="acme", targets={"devices": ["p"]}, command="ping",
                                params={}, timeout_seconds=30, offline_policy="Fail")
    assert manifest["metadata"]["name"].startswith("ping-")
    assert manifest["spec"] == {"targets": {"devices": ["p"]}, "command": "ping",
                                "timeoutSeconds": 30, "offlinePolicy": "Fail"}


class Store:
    """Answers with a finished run on the second read."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.created: list[dict[str, Any]] = []
        self.reads = 0
        self.status = status

    async def create(self, manifest: dict[str, Any]) -> None:
        self.created.append(manifest)

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        return {"status": self.status} if self.reads > 1 else {"status": {}}


async def test_wait_prints_answers_and_exits_1_unless_every_target_succeeded() -> None:
    run = {"completedAt": "2026-01-01T00:00:01Z", "phase": "Failed",
           "counts": {"targeted": 2, "succeeded": 1, "offline": 1},
           "targets": [{"device": "p1", "state": "Succeeded", "message": "pong",
                        "data": {"seq": 3}},
                       {"device": "p2", "state": "Offline",
                        "message": "offline when the run started"}]}
    store = Store({"runs": [run]})
    manifest = command_manifest(namespace="acme", targets={"devices": ["p1", "p2"]},
                                command="ping", params={}, timeout_seconds=5,
                                offline_policy="Fail", name="ping-1")
    out = io.StringIO()
    assert await send_command(store, manifest, wait=True, out=out, poll_seconds=0) == 1
    assert out.getvalue().splitlines() == [
        "devicecommand acme/ping-1 created: ping",
        'p1  Succeeded  pong  {"seq":3}',
        "p2  Offline  offline when the run started",
        "1/2 succeeded, 0 failed, 0 timed out, 1 offline"]


def test_local_without_a_running_stack_says_so(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["command", "acme/pump-1", "ping", "--local", str(tmp_path),
              "--manifests", str(tmp_path)])
    assert exited.value.code == 2
    assert "no local stack data" in capsys.readouterr().err
