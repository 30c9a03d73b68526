"""A simulated device: a real MQTT v5 client with the device's own mutual-TLS identity.

It announces presence (with `offline` as its last will), sends telemetry, reports and applies
its twin, and installs firmware from signed `ota/job` messages as a real device would: verify
the signature and that the job is its own, download, check size and SHA-256, install, report.
It answers commands (`ping`, `set`, `reboot`; see `commands.py`) on the response topic with the
command's correlation data, keeping each answer until a PUBACK with reason 0, as telemetry.

Telemetry is sampled at a steady rate whether or not the device is connected, and kept in an
outbox until a PUBACK with reason 0 (see `outbox.py`); reconnection and resending both back off.

`faults` make it go silent, anomalous or offline once it runs a given version (`faults.py`),
so a release's health gate can be tried on a fleet that acknowledges a bad update.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from kubiot_contract.ota import OtaState
from kubiot_contract.telemetry import CURRENT_VERSION
from kubiot_contract.topics import (
    PRESENCE_OFFLINE,
    PRESENCE_ONLINE,
    Channel,
    ota_job_topic,
    ota_status_topic,
    presence_topic,
    state_desired_topic,
    state_reported_topic,
    telemetry_topic,
    topic_spec,
)

from .artifacts import ArtifactSource, ArtifactUnavailable, SyntheticArtifacts
from .commands import Effect, Received
from .credentials import DeviceCredentials
from .faults import ANOMALOUS_TEMPERATURE, Faults, HealthFault
from .ota import FirmwareJob, JobRefused, Refusal, check_image, parse_job, status_payload
from .outbox import DEFAULT_CAPACITY, PendingTelemetry, RetryPolicy, TelemetryOutbox
from .puback import PubackPublisher
from .responder import CommandResponder
from .scenario import InstallResult, Scenario
from .sender import RECONNECT, TELEMETRY_RETRY, TelemetrySender, stop_task, until_one_ends

log = logging.getLogger(__name__)


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class OtaReport:
    """One `ota/status` the device sent."""

    state: OtaState
    version: str | None
    reason: str | None = None


class SimulatedDevice:
    """`run()` keeps the device connected until cancelled; the attributes show what it did."""

    def __init__(self, credentials: DeviceCredentials, *, firmware: str = "1.0.0",
                 scenario: Scenario | None = None, artifacts: ArtifactSource | None = None,
                 telemetry_seconds: float = 5.0, check_hostname: bool = True,
                 connect_limit: asyncio.Semaphore | None = None,
                 clock: Callable[[], datetime] = _utc_now,
                 telemetry_retry: RetryPolicy = TELEMETRY_RETRY,
                 reconnect: RetryPolicy = RECONNECT,
                 outbox_capacity: int = DEFAULT_CAPACITY,
                 jitter: Callable[[], float] = random.random,
                 reboot_seconds: float = 1.0, command_seconds: float = 0.0,
                 faults: Faults | None = None) -> None:
        self.credentials = credentials
        self._fault_changed = asyncio.Event()
        self._firmware = firmware
        self._faults = faults or Faults()
        self.scenario = scenario or Scenario()
        self._artifacts = artifacts or SyntheticArtifacts()
        self._telemetry_seconds = telemetry_seconds
        self._tls = credentials.tls_context(check_hostname=check_hostname)
        self._connect_limit = connect_limit
        self._clock = clock
        self._reconnect = reconnect
        self._jitter = jitter
        self._client: aiomqtt.Client | None = None
        self._job_task: asyncio.Task[None] | None = None
        self._handled: str | None = None  # signature of the last job acted on
        self.desired: dict[str, Any] = {}
        self.ota_reports: list[OtaReport] = []
        self._telemetry = TelemetrySender(f"device {credentials.name}", retry=telemetry_retry,
                                          capacity=outbox_capacity, jitter=jitter)
        self.telemetry_sampled = 0  # also the next sample's seq
        self.connected = asyncio.Event()
        self.connects = 0
        self.commands = CommandResponder(clock=clock, jitter=jitter,
                                         command_seconds=command_seconds)
        self.reboots = 0
        self._reboot_seconds = reboot_seconds
        self._reboot = asyncio.Event()
        self._booted = time.monotonic()

    @property
    def name(self) -> str:
        return self.credentials.name

    @property
    def root(self) -> str:
        return self.credentials.topic_root

    @property
    def outbox(self) -> TelemetryOutbox:
        """Telemetry sampled and not yet delivered."""
        return self._telemetry.outbox

    @property
    def telemetry_sent(self) -> int:
        """Telemetry messages delivered: acknowledged with PUBACK reason 0."""
        return self.outbox.delivered

    async def run(self) -> None:
        """Sample telemetry and stay connected; reconnect, backing off, after losing the
        session or failing to get one."""
        sampling = asyncio.create_task(self._sample_telemetry())
        failures = 0
        try:
            while True:
                before = self.connects
                await self._until_fault(offline=False)
                try:
                    await self._session()
                except aiomqtt.MqttError as exc:
                    log.debug("device %s lost its session: %s", self.name, exc)
                finally:
                    self.connected.clear()
                    self._client = None
                failures = 0 if self.connects > before else failures + 1
                if self._reboot.is_set():
                    self._reboot.clear()
                    self.reboots += 1
                    await asyncio.sleep(self._reboot_seconds)
                    self._booted = time.monotonic()
                    continue
                await asyncio.sleep(self._reconnect.delay(failures, self._jitter()))
        finally:
            await stop_task(sampling)

    async def _session(self) -> None:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
        client = aiomqtt.Client(
            self.credentials.broker_host, self.credentials.broker_port,
            username=self.credentials.username, password=self.credentials.password,
            identifier=self.credentials.username, protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=self._tls, keepalive=30, properties=properties,
            will=aiomqtt.Will(presence_topic(self.root), PRESENCE_OFFLINE, qos=1, retain=True))
        publisher = PubackPublisher(client)
        async with self._connect_slot():
            await client.__aenter__()
        try:
            self._client = client
            await client.subscribe(state_desired_topic(self.root), qos=1)
            await client.subscribe(ota_job_topic(self.root), qos=1)
            await client.subscribe(f"{self.root}/{topic_spec(Channel.COMMAND).filter}", qos=1)
            await self._publish(presence_topic(self.root), PRESENCE_ONLINE.encode(), retain=True)
            await self._report_state()
            self.connects += 1
            self.connected.set()
            try:
                # Any of these ending ends the session: a lost connection, a PUBACK that never
                # came, or a reboot asked for by a command.
                await until_one_ends(self._receive(client), self._telemetry.run(publisher),
                                     self.commands.deliver(publisher), self._until_reboot(),
                                     self._until_offline())
            finally:
                await self._cancel_job()
        finally:
            with contextlib.suppress(aiomqtt.MqttError, ssl.SSLError, OSError):
                await client.__aexit__(None, None, None)

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            data = payload if isinstance(payload, bytes) else str(payload).encode()
            correlation = getattr(message.properties, "CorrelationData", None)
            response_topic = getattr(message.properties, "ResponseTopic", None)
            self._dispatch(str(message.topic), data,
                           bytes(correlation) if correlation is not None else None,
                           str(response_topic) if response_topic else None)

    def _connect_slot(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self._connect_limit if self._connect_limit is not None else contextlib.nullcontext()

    async def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if self._client is None:
            raise aiomqtt.MqttError("not connected")
        await self._client.publish(topic, payload, qos=1, retain=retain)

    # --- twin and telemetry ------------------------------------------------------------------

    async def _report_state(self) -> None:
        reported = {**self.desired, **self.settings, "firmware": self.firmware}
        await self._publish(state_reported_topic(self.root),
                            json.dumps(reported, sort_keys=True).encode(), retain=True)

    async def _apply_desired(self, payload: bytes) -> None:
        try:
            desired = json.loads(payload) if payload else {}
        except ValueError:
            return  # a device ignores what it cannot read; the twin shows it was not applied
        if isinstance(desired, dict):
            self.desired = {k: v for k, v in desired.items() if k != "firmware"}
            await self._report_state()

    @property
    def firmware(self) -> str:
        """The version the device runs."""
        return self._firmware

    @firmware.setter
    def firmware(self, version: str) -> None:
        self._firmware = version
        self._fault_changed.set()

    @property
    def faults(self) -> Faults:
        """The health faults it shows by firmware version (see `faults.py`)."""
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self._faults = faults
        self._fault_changed.set()

    @property
    def fault(self) -> HealthFault | None:
        """The health fault the device shows with the firmware it runs now."""
        return self.faults.active(self.firmware)

    def telemetry_sample(self, seq: int) -> dict[str, Any]:
        """One telemetry payload in the platform's format."""
        temperature = ANOMALOUS_TEMPERATURE if self.fault is HealthFault.ANOMALOUS else \
            round(21.0 + 3.0 * math.sin(seq / 10), 3)
        return {"v": CURRENT_VERSION, "ts": self._clock().isoformat(), "seq": seq,
                "values": {"temperature": temperature, "firmware": self.firmware}}

    async def _sample_telemetry(self) -> None:
        """One sample every `telemetry_seconds`, on a fixed schedule, connected or not (none
        while the device shows the silent fault)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        ticks = self.telemetry_sampled  # the schedule counts samples, and ticks left out
        while True:
            ticks += 1
            if self.fault is not HealthFault.SILENT:
                seq = self.telemetry_sampled
                sample = json.dumps(self.telemetry_sample(seq)).encode()
                self._telemetry.add(PendingTelemetry(seq, telemetry_topic(self.root), sample))
                self.telemetry_sampled += 1
            await asyncio.sleep(max(0.0, started + ticks * self._telemetry_seconds
                                    - loop.time()))
    # --- firmware ----------------------------------------------------------------------------

    def _dispatch(self, topic: str, payload: bytes, correlation: bytes | None = None,
                  response_topic: str | None = None) -> None:
        if topic == state_desired_topic(self.root):
            self._spawn_side(self._apply_desired(payload))
        elif topic == ota_job_topic(self.root):
            self._on_job(payload)
        elif topic.startswith(f"{self.root}/cmd/"):
            self._on_command(topic.rsplit("/", 1)[1], payload, correlation, response_topic)

    # --- commands ----------------------------------------------------------------------------

    @property
    def settings(self) -> dict[str, Any]:
        """What `set` commands changed (reported with the twin)."""
        return self.commands.settings.get(self.name, {})

    @property
    def commands_received(self) -> list[Received]:
        """Every command that arrived, repeats included."""
        return [command for _, command in self.commands.received]

    @property
    def commands_executed(self) -> list[Received]:
        """Every command acted on: once per correlation id."""
        return [command for _, command in self.commands.executed]

    @property
    def uptime_seconds(self) -> float:
        return time.monotonic() - self._booted

    def _on_command(self, name: str, payload: bytes, correlation: bytes | None,
                    response_topic: str | None) -> None:
        given = self.commands.on_command(
            self.name, self.root, name, payload, correlation, response_topic,
            uptime_seconds=self.uptime_seconds, seq=self.telemetry_sampled,
            delivered=lambda a: self._reboot.set if a.effect is Effect.REBOOT else None)
        if given is not None and given.effect is Effect.REPORT_STATE:
            self._spawn_side(self._report_state())

    async def _until_reboot(self) -> None:
        """Ends the session when a reboot was asked for (and answered): offline, then back."""
        await self._reboot.wait()
        await self._publish(presence_topic(self.root), PRESENCE_OFFLINE.encode(), retain=True)

    async def _until_fault(self, *, offline: bool) -> None:
        """Until the firmware it runs (or its faults) make the device offline, or not."""
        while (self.fault is HealthFault.OFFLINE) is not offline:
            self._fault_changed.clear()
            await self._fault_changed.wait()

    async def _until_offline(self) -> None:
        """Ends the session when the firmware it runs makes the device go offline for good."""
        await self._until_fault(offline=True)
        log.info("device %s goes offline (simulated fault of firmware %s)", self.name,
                 self.firmware)
        await self._publish(presence_topic(self.root), PRESENCE_OFFLINE.encode(), retain=True)

    def _spawn_side(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        task.add_done_callback(_log_failure)

    def _on_job(self, payload: bytes) -> None:
        if not payload:
            return  # the job was withdrawn; nothing to install
        try:
            job = parse_job(payload, self.credentials.firmware_key_pem,
                            tenant=self.credentials.tenant, device=self.name)
        except JobRefused as exc:
            self._spawn_side(self._refuse(exc))
            return
        if job.signature == self._handled:
            return  # the broker re-delivers the retained job after a reconnect
        self._handled = job.signature
        # A newer job (a rollback, a newer release) replaces one still in progress.
        previous, self._job_task = self._job_task, asyncio.create_task(self._install(job))
        if previous is not None:
            previous.cancel()
        self._job_task.add_done_callback(_log_failure)

    async def _cancel_job(self) -> None:
        if self._job_task is not None:
            await stop_task(self._job_task)
            self._job_task = None
            self._handled = None  # redelivered on reconnect, and started again

    async def _install(self, job: FirmwareJob) -> None:
        if job.version == self.firmware:
            await self._status(OtaState.SUCCEEDED, job.version)
            return
        try:
            await self._status(OtaState.DOWNLOADING, job.version)
            await asyncio.sleep(self.scenario.step_seconds)
            try:
                image = await self._artifacts.fetch(job.url)
            except ArtifactUnavailable as exc:
                raise JobRefused(Refusal.DOWNLOAD_FAILED, str(exc), job.version) from exc
            check_image(job, image)
            await self._status(OtaState.INSTALLING, job.version)
            await asyncio.sleep(self.scenario.step_seconds)
            match self.scenario.result_for(self.name, job.version):
                case InstallResult.HANG:
                    await asyncio.Event().wait()
                case InstallResult.FAIL:
                    raise JobRefused(Refusal.INSTALL_FAILED, "the new image did not boot",
                                     job.version)
                case InstallResult.SUCCEED:
                    pass
        except JobRefused as exc:
            await self._refuse(exc)
            return
        self.firmware = job.version
        await self._report_state()
        await self._status(OtaState.SUCCEEDED, job.version)

    async def _refuse(self, exc: JobRefused) -> None:
        log.info("device %s refused firmware %s: %s", self.name, exc.version, exc)
        await self._status(OtaState.FAILED, exc.version, exc.reason.value, str(exc))

    async def _status(self, state: OtaState, version: str | None, reason: str | None = None,
                      message: str | None = None) -> None:
        self.ota_reports.append(OtaReport(state, version, reason))
        await self._publish(ota_status_topic(self.root),
                            status_payload(state, version, reason, message))


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        if not isinstance(exc, aiomqtt.MqttError):
            log.error("simulated device task failed: %r", exc)
