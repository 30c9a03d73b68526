"""QoS 1 publishes that return their PUBACK's reason code.

aiomqtt 2.5 waits for the PUBACK of a QoS 1 publish but drops its reason code: its
`_on_publish` callback ignores the argument
(https://github.com/empicano/aiomqtt/blob/v2.5.1/aiomqtt/client.py#L661; aiomqtt 3 returns the
PUBACK from `publish`). paho, underneath, hands the reason code to its public `on_publish`
callback, so this publishes through paho and listens there, passing every other PUBACK on to
aiomqtt's own callback.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode


class PubackPublisher:
    """Publishes with QoS 1 on a connected aiomqtt client and waits for the PUBACK."""

    def __init__(self, client: aiomqtt.Client) -> None:
        # The one private access: aiomqtt's paho client, for paho's public `on_publish` and
        # `publish` (aiomqtt 2.5 exposes neither the client nor the reason code; see above).
        self._paho: mqtt.Client = client._client
        self._aiomqtt_on_publish = self._paho.on_publish
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._paho.on_publish = self._on_publish

    async def publish(self, topic: str, payload: bytes,
                      properties: Properties | None = None) -> int:
        """Send `payload`; the reason code of its PUBACK (0 delivered, 16 no matching
        subscribers, 0x80 and above refused). Raises `aiomqtt.MqttError` when not connected."""
        info = self._paho.publish(topic, payload, qos=1, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, f"could not publish to {topic}")
        # Registered after paho returns and still in time: aiomqtt runs paho on this event
        # loop, so the PUBACK is read in a later callback of the loop, never inside publish().
        acknowledged: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[info.mid] = acknowledged
        try:
            return await acknowledged
        finally:
            self._waiting.pop(info.mid, None)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                    reason_code: ReasonCode, properties: Properties) -> None:
        acknowledged = self._waiting.pop(mid, None)
        if acknowledged is None:
            if self._aiomqtt_on_publish is not None:
                self._aiomqtt_on_publish(client, userdata, mid, reason_code,  # type: ignore[call-arg]
                                         properties)
            return
        if not acknowledged.done():
            acknowledged.set_result(int(reason_code.value))
