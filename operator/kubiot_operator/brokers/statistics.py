"""Mosquitto's own statistics, from its `$SYS` topics, as Prometheus metrics.

Mosquitto 2 publishes its counters as retained text messages under `$SYS/broker/` every
`sys_interval` seconds; it has no metrics endpoint of its own. EMQX exports Prometheus metrics
itself, so this is for the Mosquitto backend (the local stack, single-node installs). Pure: the
owner of an MQTT session feeds it messages, Prometheus collects the latest values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: What to subscribe to: every broker statistic (the `load/` averages are left to PromQL).
STATISTICS_FILTER = "$SYS/broker/#"


class StatisticKind(StrEnum):
    GAUGE = "gauge"
    COUNTER = "counter"


@dataclass(frozen=True)
class BrokerStatistic:
    """One `$SYS` topic and the metric it becomes."""

    topic: str
    metric: str
    kind: StatisticKind
    help: str


_G, _C = StatisticKind.GAUGE, StatisticKind.COUNTER
#: The topics Mosquitto 2.0 publishes that say how the broker is doing. Counters are totals
#: since the broker started; Prometheus's rate() handles the reset a restart causes.
STATISTICS: tuple[BrokerStatistic, ...] = (
    BrokerStatistic("$SYS/broker/clients/connected", "kubiot_broker_clients_connected", _G,
                    "Clients connected to the broker."),
    BrokerStatistic("$SYS/broker/clients/disconnected", "kubiot_broker_clients_disconnected",
                    _G, "Persistent sessions whose client is not connected."),
    BrokerStatistic("$SYS/broker/clients/expired", "kubiot_broker_sessions_expired", _C,
                    "Persistent sessions the broker expired."),
    BrokerStatistic("$SYS/broker/subscriptions/count", "kubiot_broker_subscriptions", _G,
                    "Subscriptions held by the broker."),
    BrokerStatistic("$SYS/broker/retained messages/count", "kubiot_broker_retained_messages",
                    _G, "Retained messages held by the broker."),
    BrokerStatistic("$SYS/broker/store/messages/count", "kubiot_broker_stored_messages", _G,
                    "Messages held in the broker's store (retained and queued)."),
    BrokerStatistic("$SYS/broker/messages/received", "kubiot_broker_packets_received", _C,
                    "MQTT packets of any type the broker received."),
    BrokerStatistic("$SYS/broker/messages/sent", "kubiot_broker_packets_sent", _C,
                    "MQTT packets of any type the broker sent."),
    BrokerStatistic("$SYS/broker/publish/messages/received", "kubiot_broker_messages_received",
                    _C, "PUBLISH messages the broker received."),
    BrokerStatistic("$SYS/broker/publish/messages/sent", "kubiot_broker_messages_sent", _C,
                    "PUBLISH messages the broker sent."),
    BrokerStatistic("$SYS/broker/publish/messages/dropped", "kubiot_broker_messages_dropped",
                    _C, "PUBLISH messages the broker dropped (queues full, clients gone)."),
    BrokerStatistic("$SYS/broker/bytes/received", "kubiot_broker_received_bytes", _C,
                    "Bytes the broker received."),
    BrokerStatistic("$SYS/broker/bytes/sent", "kubiot_broker_sent_bytes", _C,
                    "Bytes the broker sent."),
    BrokerStatistic("$SYS/broker/uptime", "kubiot_broker_uptime_seconds", _G,
                    "Seconds since the broker started."),
)
STATISTICS_BY_TOPIC = {s.topic: s for s in STATISTICS}
UPDATED_METRIC = "kubiot_broker_statistics_timestamp_seconds"


def parse_statistic(topic: str, payload: bytes) -> tuple[BrokerStatistic, float] | None:
    """The statistic a `$SYS` message carries, or None for a topic kubiot does not export.

    Values are plain numbers, except uptime (`"42 seconds"`)."""
    statistic = STATISTICS_BY_TOPIC.get(topic)
    if statistic is None:
        return None
    words = payload.decode("ascii", errors="replace").split()
    try:
        return statistic, float(words[0])
    except (IndexError, ValueError):
        return None


class BrokerStatistics(Collector):
    """The latest value of each statistic, exposed on the registry it is registered with.

    A statistic not seen yet is exported without samples, so dashboards read "no data" rather
    than a made-up zero."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._values: dict[str, float] = {}
        self._updated: float | None = None
        self._clock = clock
        if registry is not None:
            registry.register(self)

    def on_message(self, topic: str, payload: bytes) -> None:
        """Record a `$SYS` message; other topics are ignored."""
        parsed = parse_statistic(topic, payload)
        if parsed is None:
            return
        statistic, value = parsed
        self._values[statistic.metric] = value
        self._updated = self._clock()

    def value(self, metric: str) -> float | None:
        return self._values.get(metric)

    def collect(self) -> Iterator[Metric]:
        for statistic in STATISTICS:
            family: Metric
            if statistic.kind is StatisticKind.COUNTER:
                family = CounterMetricFamily(statistic.metric, statistic.help)
            else:
                family = GaugeMetricFamily(statistic.metric, statistic.help)
            if statistic.metric in self._values:
                family.add_metric([], self._values[statistic.metric])
            yield family
        # Mosquitto keeps publishing while it lives: a stale timestamp means the broker (or the
        # session reading it) is gone and the values above are its last words.
        updated = GaugeMetricFamily(UPDATED_METRIC,
                                    "When the broker last published its statistics (Unix time).")
        if self._updated is not None:
            updated.add_metric([], self._updated)
        yield updated
