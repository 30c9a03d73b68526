"""How long syncing N device identities into a real Mosquitto takes, beside a raw baseline.

Backend: `MosquittoDynsecBackend.resync` of one tenant with N certificate devices (batched
dynamic-security commands), then a second resync that must find nothing to do.
Baseline, in the same run on a fresh broker: a minimal paho client sending the same number of
raw dynamic-security commands (the same createRole + createClient per device), one per message,
all in flight at once.

    .venv/bin/python bench/bench_broker_sync.py [--count N] [--batch-size B] [--parallel]

`--parallel` runs the two measurements at the same time on two brokers (each Mosquitto is
single-threaded, so on two or more cores they barely disturb each other): half the wall time
for large N.

Mosquitto 2.0 rewrites its whole dynamic-security file after every write command, so both
times grow with N squared; the ratio between them is what the backend adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from kubiot_contract.topics import IdentityKind, device_access, device_username
from kubiot_operator.brokers import BrokerIdentity, CertificateCredential, MosquittoDynsecBackend
from kubiot_operator.brokers.dynsec import create_commands, tenant_commands
from kubiot_operator.local.mosquitto import MosquittoBroker, MosquittoConfig
from kubiot_operator.local.ports import free_port

TENANT = "bench"
CONTROL = "$CONTROL/dynamic-security/v1"


@contextmanager
def running_broker() -> Iterator[MosquittoConfig]:
    with tempfile.TemporaryDirectory(prefix="kubiot-bench-") as tmp:
        config = MosquittoConfig(data_dir=Path(tmp), service_port=free_port(),
                                 admin_password=secrets.token_urlsafe(16))
        broker = MosquittoBroker(config)
        broker.start()
        try:
            yield config
        finally:
            broker.stop()


def identities(count: int) -> list[BrokerIdentity]:
    return [BrokerIdentity(device_username(TENANT, f"d{i:05}"), TENANT, IdentityKind.DEVICE,
                           device_access(TENANT, f"d{i:05}"), CertificateCredential())
            for i in range(count)]


async def backend_sync(config: MosquittoConfig, wanted: list[BrokerIdentity],
                       batch_size: int) -> tuple[float, float, int]:
    async with MosquittoDynsecBackend("127.0.0.1", config.service_port, config.admin_username,
                                      config.admin_password, batch_size=batch_size,
                                      timeout=600) as backend:
        start = time.perf_counter()
        result = await backend.resync(TENANT, wanted)
        first = time.perf_counter() - start
        start = time.perf_counter()
        again = await backend.resync(TENANT, wanted)
        second = time.perf_counter() - start
        if again.writes:
            raise SystemExit(f"second resync wrote {again.writes} commands; expected none")
        listed = await backend.list_identities(TENANT)
        if len(listed) != len(wanted):
            raise SystemExit(f"broker lists {len(listed)} identities, expected {len(wanted)}")
        return first, second, result.writes


def raw_commands(wanted: list[BrokerIdentity]) -> list[dict[str, Any]]:
    """The very commands the backend sends, so only the way they are sent differs."""
    commands = tenant_commands(TENANT, role_exists=False, group_exists=False,
                               group_has_role=False)
    for identity in wanted:
        commands += create_commands(identity)
    return commands


def raw_paho(config: MosquittoConfig, commands: list[dict[str, Any]]) -> float:
    """Send each command as its own message, all in flight, and wait for every response."""
    answered = threading.Semaphore(0)
    subscribed = threading.Event()
    errors: list[str] = []

    def on_message(client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        for response in json.loads(message.payload)["responses"]:
            if "error" in response:
                errors.append(response["error"])
        answered.release()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.username_pw_set(config.admin_username, config.admin_password)
    client.on_message = on_message
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect("127.0.0.1", config.service_port)
    client.loop_start()
    client.subscribe(f"{CONTROL}/response", qos=1)
    subscribed.wait(10)
    start = time.perf_counter()
    for command in commands:
        client.publish(CONTROL, json.dumps({"commands": [command]}), qos=1)
    for _ in commands:
        if not answered.acquire(timeout=600):
            raise SystemExit("the broker stopped answering raw commands")
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    if errors:
        raise SystemExit(f"raw commands failed: {errors[:3]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="device identities")
    parser.add_argument("--batch-size", type=int, default=200,
                        help="dynamic-security commands per message (backend)")
    parser.add_argument("--parallel", action="store_true",
                        help="measure the backend and the raw client at the same time")
    args = parser.parse_args(argv)
    wanted = identities(args.count)
    commands = raw_commands(wanted)
    figures: dict[str, Any] = {}

    def measure_backend() -> None:
        with running_broker() as config:
            figures["backend"] = asyncio.run(backend_sync(config, wanted, args.batch_size))

    def measure_raw() -> None:
        with running_broker() as config:
            figures["raw"] = raw_paho(config, commands)

    if args.parallel:
        threads = [threading.Thread(target=measure_backend), threading.Thread(target=measure_raw)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if len(figures) != 2:
            raise SystemExit("a measurement failed; see the error above")
    else:
        measure_backend()
        measure_raw()
    first, second, writes = figures["backend"]
    raw = figures["raw"]

    print(f"identities                     {args.count:>10}")
    print(f"backend write commands         {writes:>10}")
    print(f"backend resync (create all)    {first:>9.2f}s  "
          f"({args.count / first:,.0f} identities/s)")
    print(f"backend resync (nothing to do) {second:>9.2f}s  (0 writes)")
    print(f"raw paho, {len(commands)} commands      {raw:>9.2f}s  "
          f"({len(commands) / raw:,.0f} commands/s)")
    print(f"backend / raw                  {first / raw:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
