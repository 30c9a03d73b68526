"""Provision broker clients on a test Mosquitto through its dynamic-security plugin.

A small stand-in for the broker backend, enough for tests that need a client with the
contract's access rules: one role per client, holding exactly the allowed filters.
"""

from __future__ import annotations

import json
import queue
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from kubiot_contract.topics import AccessRules

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"


def client_commands(username: str, password: str, rules: AccessRules) -> list[dict[str, Any]]:
    """createRole + its ACLs + createClient holding the role."""
    role = f"role-{username}"
    commands: list[dict[str, Any]] = [{"command": "createRole", "rolename": role}]
    for topic in sorted(rules.publish):
        commands.append({"command": "addRoleACL", "rolename": role,
                         "acltype": "publishClientSend", "topic": topic, "priority": 0,
                         "allow": True})
    for topic in sorted(rules.subscribe):
        commands.append({"command": "addRoleACL", "rolename": role,
                         "acltype": "subscribePattern", "topic": topic, "priority": 0,
                         "allow": True})
    commands.append({"command": "createClient", "username": username, "password": password,
                     "roles": [{"rolename": role}]})
    return commands


def send_commands(host: str, port: int, admin_username: str, admin_password: str,
                  commands: list[dict[str, Any]], timeout: float = 10.0) -> list[dict[str, Any]]:
    """Send dynamic-security commands as the admin; raise if any of them failed."""
    responses: queue.Queue[bytes] = queue.Queue()
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(admin_username, admin_password)
    client.on_message = lambda _c, _u, message: responses.put(bytes(message.payload))
    client.on_subscribe = lambda *_args: subscribed.set()
    client.connect(host, port)
    client.loop_start()
    try:
        client.subscribe(RESPONSE_TOPIC, qos=1)
        if not subscribed.wait(timeout):
            raise TimeoutError("no SUBACK for the dynamic-security response topic")
        client.publish(CONTROL_TOPIC, json.dumps({"commands": commands}), qos=1).wait_for_publish(
            timeout)
        answer = json.loads(responses.get(timeout=timeout))
    finally:
        client.disconnect()
        client.loop_stop()
    results: list[dict[str, Any]] = answer["responses"]
    failed = [r for r in results if r.get("error")]
    if failed:
        raise RuntimeError(f"dynamic-security commands failed: {failed}")
    return results
