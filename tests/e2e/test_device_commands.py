"""Device commands end to end: kopf on the Kubernetes emulator, a real Mosquitto with mutual TLS
and dynamic security, and simulated devices connecting with the certificates the operator
issued. The fleet is provisioned once for the module; the tests run in order on it (the last
one restarts the operator)."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
import yaml

from kubiot_operator.cli import parser
from kubiot_operator.cli_command import send_from_arguments
from kubiot_operator.controllers.platform import Platform
from kubiot_operator.handlers import Operator
from kubiot_operator.simulator import Fleet
from kubiot_operator.simulator.gateway import SimulatedGateway, gateway_credentials
from kubiot_operator.simulator.sender import stop_task
from tests.support.firmware_env import Clock, bounded_request_history
from tests.support.kube_emulator import OperatorRun
from tests.support.operator_env import API, OperatorEnv, operator_env

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

NAMESPACE = TENANT = "acme"
PUMPS = [f"pump-{i:02d}" for i in range(10)]
SOLO = "solo-01"
GHOST = "ghost-01"  # has a Device and credentials, never connects
GATEWAY, METERS = "edge-1", ["meter-01", "meter-02"]  # meters speak through the gateway


@dataclass
class Commands:
    env: OperatorEnv
    operator: Operator
    run: OperatorRun
    fleet: Fleet
    gateway: SimulatedGateway

    async def create(self, name: str, **spec: Any) -> None:
        await self.env.apply({"apiVersion": API, "kind": "DeviceCommand",
                              "metadata": {"name": name, "namespace": NAMESPACE},
                              "spec": {"timeoutSeconds": 15, **spec}})

    async def finished(self, name: str, seconds: float = 30) -> dict[str, Any]:
        """The status once the latest run has an outcome for every target and is announced."""
        body = await self.env.wait("DeviceCommand", name, lambda c: (
            (c or {}).get("status") or {}).get("phase") in ("Succeeded", "Failed"),
            NAMESPACE, seconds)
        assert body is not None
        return dict(body["status"])

    def platform(self) -> Platform:
        assert self.operator.runtime is not None and self.operator.runtime.platform is not None
        return self.operator.runtime.platform


def targets(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["device"]: t for t in status["runs"][-1]["targets"]}


def received(fleet: Fleet, device: str, command: str) -> list[str]:
    """The correlation ids of `command`'s runs a simulated device was sent (repeats included)."""
    return [r.correlation for r in fleet[device].commands_received
            if r.correlation.startswith(f"{command}/")]


def executed(fleet: Fleet, device: str, command: str) -> list[str]:
    return [r.correlation for r in fleet[device].commands_executed
            if r.correlation.startswith(f"{command}/")]


def device(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "Device",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
            "spec": {"model": "pump-ctl"}}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def commands(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Commands]:
    async with operator_env(tmp_path_factory.mktemp("commands")) as env, \
            bounded_request_history(env.kube):
        operator = env.operator()
        async with env.running(operator) as run:
            await env.apply({"apiVersion": API, "kind": "Tenant", "metadata": {"name": TENANT},
                             "spec": {"displayName": "ACME", "namespace": NAMESPACE}})
            # The Tenant creates its namespace; nothing can be created in it before.
            await env.wait("Namespace", NAMESPACE, lambda namespace: namespace is not None)
            await env.apply(*(device(n, {"fleet": "pumps"}) for n in PUMPS),
                            device(SOLO, {"fleet": "solo"}), device(GHOST, {"fleet": "ghost"}),
                            *(device(n, {"behind": GATEWAY}) for n in METERS),
                            {"apiVersion": API, "kind": "Gateway",
                             "metadata": {"name": GATEWAY, "namespace": NAMESPACE},
                             "spec": {"selector": {"matchLabels": {"behind": GATEWAY}}}})
            bundles = {}
            for name in [*PUMPS, SOLO, *METERS]:
                # Ready, not only issued: a device that connects before its access rules are
                # in place has its presence refused, and would not show online.
                await env.wait("Device", name, lambda d: ((d or {}).get("status") or {}).get(
                    "phase") == "Ready", NAMESPACE, timeout=60)
            for name in [*PUMPS, SOLO]:
                bundles[name] = await env.device_credentials(name, NAMESPACE)
            await env.wait("Gateway", GATEWAY, lambda g: ((g or {}).get("status") or {}).get(
                "childCount") == 2 and g["status"].get("phase") == "Ready", NAMESPACE,
                timeout=60)
            gateway = SimulatedGateway(gateway_credentials(await env.device_credentials(
                GATEWAY, NAMESPACE, kind="gateway")), METERS, telemetry_seconds=30,
                check_hostname=False)
            fleet = Fleet.from_bundles(bundles, telemetry_seconds=30, check_hostname=False,
                                       reboot_seconds=0.5)
            gateway_task = asyncio.create_task(gateway.run())
            async with fleet:
                await fleet.wait_connected(30)
                for name in [*PUMPS, SOLO, *METERS]:
                    await env.wait("Device", name, lambda d: (d or {}).get("status", {}).get(
                        "online") is True, NAMESPACE, timeout=30)
                try:
                    yield Commands(env, operator, run, fleet, gateway)
                finally:
                    await stop_task(gateway_task)


async def test_a_command_to_one_device_returns_its_answer_in_status(commands: Commands) -> None:
    await commands.create("ping-solo", targets={"devices": [SOLO]}, command="ping")

    status = await commands.finished("ping-solo")

    assert status["phase"] == "Succeeded"
    assert status["counts"]["targeted"] == status["counts"]["succeeded"] == 1
    answer = targets(status)[SOLO]
    assert answer["state"] == "Succeeded" and answer["message"] == "pong"
    assert answer["data"]["uptimeSeconds"] > 0
    run = status["runs"][0]
    took = (datetime.fromisoformat(answer["finishedAt"])
            - datetime.fromisoformat(run["startedAt"])).total_seconds()
    assert took < 15
    assert len(received(commands.fleet, SOLO, "ping-solo")) == 1


async def test_a_command_to_a_selector_of_ten_returns_every_answer(commands: Commands) -> None:
    await commands.create("pumps-on", targets={"selector": {"matchLabels": {"fleet": "pumps"}}},
                          command="set", parameters={"power": "on", "desired": {"rpm": 1200}})

    status = await commands.finished("pumps-on")

    assert status["phase"] == "Succeeded"
    assert status["counts"]["succeeded"] == 10
    assert sorted(targets(status)) == PUMPS
    assert all(t["data"] == {"power": "on", "rpm": 1200} for t in targets(status).values())
    assert all(commands.fleet[n].settings == {"power": "on", "rpm": 1200} for n in PUMPS)
    # The devices report what they were set to.
    for name in PUMPS:
        await commands.env.wait("Device", name, lambda d: ((d or {}).get("status") or {}).get(
            "reported", {}).get("power") == "on", NAMESPACE)


async def test_the_children_of_a_gateway_answer_through_it(commands: Commands) -> None:
    await commands.create("meters-set", targets={"gateways": [GATEWAY]}, command="set",
                          parameters={"power": "off"})

    status = await commands.finished("meters-set")

    assert status["phase"] == "Succeeded", status
    assert {d: t["data"] for d, t in targets(status).items()} == {
        m: {"power": "off"} for m in METERS}
    assert commands.gateway.commands.settings == {m: {"power": "off"} for m in METERS}


async def test_offline_devices_are_reported_offline_at_once_or_at_the_deadline(
        commands: Commands) -> None:
    await commands.create("ping-ghost-now", targets={"devices": [GHOST, SOLO]}, command="ping",
                          offlinePolicy="Fail")
    await commands.create("ping-ghost-queued", targets={"devices": [GHOST]}, command="ping",
                          offlinePolicy="Queue", timeoutSeconds=3)

    now = await commands.finished("ping-ghost-now", seconds=10)
    queued = await commands.finished("ping-ghost-queued", seconds=15)

    assert now["phase"] == "Failed"
    assert {d: t["state"] for d, t in targets(now).items()} == {GHOST: "Offline",
                                                                SOLO: "Succeeded"}
    assert targets(now)[GHOST]["message"] == "offline when the run started"
    assert targets(queued)[GHOST]["state"] == "Offline"
    assert targets(queued)[GHOST]["message"] == "offline until the deadline"
    assert queued["counts"]["offline"] == 1


async def test_an_unknown_command_is_refused_by_the_device_with_its_reason(
        commands: Commands) -> None:
    await commands.create("selfdestruct", targets={"devices": [SOLO]}, command="selfdestruct")

    status = await commands.finished("selfdestruct")

    assert status["phase"] == "Failed"
    answer = targets(status)[SOLO]
    assert answer["state"] == "Failed"
    assert answer["message"] == ("unknown command 'selfdestruct': this device knows ping, set, "
                                 "reboot")


async def test_a_rebooted_device_goes_offline_and_comes_back(commands: Commands) -> None:
    before = commands.fleet[SOLO].connects
    await commands.create("reboot-solo", targets={"devices": [SOLO]}, command="reboot")

    status = await commands.finished("reboot-solo")

    assert targets(status)[SOLO]["message"] == "rebooting"
    await commands.env.wait("Device", SOLO, lambda d: ((d or {}).get("status") or {}).get(
        "online") is True and commands.fleet[SOLO].connects > before, NAMESPACE, timeout=15)
    assert commands.fleet[SOLO].reboots == 1


async def test_the_cli_prints_each_answer_as_it_comes(
        commands: Commands, monkeypatch: pytest.MonkeyPatch,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    kubeconfig = tmp_path_factory.mktemp("kubeconfig") / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": commands.env.kube.url,
                                                      "insecure-skip-tls-verify": True}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "me"}}],
        "users": [{"name": "me", "user": {"token": "t"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    args = parser().parse_args(["command", f"{NAMESPACE}/fleet=pumps", "ping", "--wait",
                                "--timeout", "15", "--param", "verbose=true"])
    out = io.StringIO()

    status = await send_from_arguments(args, out)

    lines = out.getvalue().splitlines()
    assert status == 0
    created = re.fullmatch(r"devicecommand acme/(ping-[0-9a-f]{6}) created: ping", lines[0])
    assert created is not None
    body = await commands.env.kube.get(API, "DeviceCommand", created[1], NAMESPACE)
    assert body is not None and body["spec"]["parameters"] == {"verbose": True}
    assert sorted(line.split()[0] for line in lines[1:-1]) == PUMPS
    assert all(line.split()[1:3] == ["Succeeded", "pong"] for line in lines[1:-1])
    assert lines[-1] == "10/10 succeeded, 0 failed, 0 timed out, 0 offline"


async def test_a_schedule_fires_on_time_and_keeps_its_history_limit(commands: Commands) -> None:
    platform = commands.platform()
    start = datetime.now(UTC).replace(second=10, microsecond=0)
    clock = Clock(start)
    real_clock, platform.clock = platform.clock, clock
    try:
        await commands.create("ping-every-minute", targets={"devices": [SOLO]},
                              command="ping", schedule="* * * * *",
                              successfulRunsHistoryLimit=2)
        first = start.replace(second=0) + timedelta(minutes=1)
        body = await commands.env.wait("DeviceCommand", "ping-every-minute", lambda c: (
            (c or {}).get("status") or {}).get("nextRun") == _wire(first), NAMESPACE)
        assert body is not None and not body["status"].get("runs")

        for minute in range(1, 4):
            clock.now = start + timedelta(minutes=minute)
            body = await commands.env.wait("DeviceCommand", "ping-every-minute",
                                           _run_finished(minute), NAMESPACE, timeout=20)
            assert body is not None
            latest = body["status"]["runs"][-1]
            assert latest["scheduledAt"] == _wire(first + timedelta(minutes=minute - 1))
            assert latest["phase"] == "Succeeded"
    finally:
        platform.clock = real_clock

    runs = body["status"]["runs"]
    assert [r["number"] for r in runs] == [2, 3]
    assert body["status"]["nextRun"] == _wire(first + timedelta(minutes=3))
    assert len(executed(commands.fleet, SOLO, "ping-every-minute")) == 3


async def test_an_operator_restart_mid_command_neither_loses_nor_repeats_it(
        commands: Commands) -> None:
    for name in PUMPS:
        # Answers come while the operator is down.
        commands.fleet[name].commands.command_seconds = 2.0
    await commands.create("ping-across-restart", command="ping", timeoutSeconds=30,
                          targets={"selector": {"matchLabels": {"fleet": "pumps"}}})
    await commands.env.wait("DeviceCommand", "ping-across-restart", lambda c: (
        ((c or {}).get("status") or {}).get("counts") or {}).get("sent") == 10, NAMESPACE)

    await commands.run.kill()  # as a crash would: nothing is flushed
    runtime = commands.operator.runtime
    assert runtime is not None and runtime.mqtt is not None and not runtime.mqtt.connected
    await _until_answers_are_pending(commands)
    async with commands.env.running():
        status = await commands.finished("ping-across-restart", seconds=30)

    assert status["phase"] == "Succeeded" and status["counts"]["succeeded"] == 10
    for name in PUMPS:
        assert len(received(commands.fleet, name, "ping-across-restart")) == 1, name
        assert len(executed(commands.fleet, name, "ping-across-restart")) == 1, name


async def _until_answers_are_pending(commands: Commands) -> None:
    """Every pump has acted and holds its answer: the operator is not there to take it."""
    for _ in range(100):
        if all(commands.fleet[n].commands.pending for n in PUMPS):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the pumps did not answer while the operator was down")


def _run_finished(number: int) -> Callable[[dict[str, Any] | None], bool]:
    """Run `number` has started and ended, and the command waits for its next fire time."""
    def check(body: dict[str, Any] | None) -> bool:
        status = (body or {}).get("status") or {}
        runs = status.get("runs") or [{}]
        return bool(status.get("runsStarted") == number and runs[-1].get("completedAt")
                    and status.get("phase") == "Scheduled")
    return check


def _wire(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")

