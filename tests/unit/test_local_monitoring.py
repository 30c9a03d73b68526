"""What the local stack tells Prometheus and Mosquitto, and the broker statistics it exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from kubiot_operator.brokers.statistics import BrokerStatistics, parse_statistic
from kubiot_operator.local.mosquitto import MosquittoConfig, render_config
from kubiot_operator.local.prometheus import (
    CHART_RULES,
    ScrapeTarget,
    format_duration,
    local_alert_rules,
    parse_duration,
    server_config,
    target_groups,
)
from kubiot_operator.local.stack import scrape_targets
from kubiot_operator.metrics import OperatorMetrics


def _sample(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None
            ) -> float | None:
    return registry.get_sample_value(name, labels or {})


def test_broker_statistics_become_gauges_and_counters() -> None:
    registry = CollectorRegistry()
    statistics = BrokerStatistics(registry, clock=lambda: 1000.0)
    statistics.on_message("$SYS/broker/clients/connected", b"6")
    statistics.on_message("$SYS/broker/publish/messages/received", b"1234")
    statistics.on_message("$SYS/broker/uptime", b"42 seconds")
    statistics.on_message("$SYS/broker/load/messages/received/1min", b"1.97")  # not exported
    statistics.on_message("$SYS/broker/version", b"mosquitto version 2.0.11")  # not a number
    assert _sample(registry, "kubiot_broker_clients_connected") == 6
    assert _sample(registry, "kubiot_broker_messages_received_total") == 1234
    assert _sample(registry, "kubiot_broker_uptime_seconds") == 42
    assert _sample(registry, "kubiot_broker_statistics_timestamp_seconds") == 1000
    text = generate_latest(registry).decode()
    assert "load" not in text and "version" not in text


def test_a_statistic_not_yet_published_has_no_sample_rather_than_zero() -> None:
    registry = CollectorRegistry()
    BrokerStatistics(registry)
    assert _sample(registry, "kubiot_broker_messages_dropped_total") is None
    assert "# TYPE kubiot_broker_messages_dropped_total counter" in (
        generate_latest(registry).decode())


@pytest.mark.parametrize("payload", [b"", b"many", b"\xff\xfe"])
def test_a_malformed_statistic_is_ignored(payload: bytes) -> None:
    assert parse_statistic("$SYS/broker/clients/connected", payload) is None


def test_mosquitto_publishes_statistics_as_often_as_asked(tmp_path: Path) -> None:
    config = MosquittoConfig(data_dir=tmp_path, service_port=1883, admin_password="x",
                             plugin_path="/dynsec.so", sys_interval=2)
    assert "sys_interval 2" in render_config(config).splitlines()
    default = MosquittoConfig(data_dir=tmp_path, service_port=1883, admin_password="x",
                              plugin_path="/dynsec.so")
    assert "sys_interval" not in render_config(default)


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("500ms", 0.5)])
def test_prometheus_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_prometheus_durations_refuse_what_prometheus_refuses() -> None:
    for text in ("", "10", "1.5m", "10 m", "m"):
        with pytest.raises(ValueError, match="not a Prometheus duration"):
            parse_duration(text)
    assert format_duration(10) == "10s"
    assert format_duration(0.5) == "500ms"


def test_local_rules_shorten_only_the_for_durations_of_the_chart_rules() -> None:
    chart = yaml.safe_load(CHART_RULES.read_text())
    local = local_alert_rules(chart, longest_for=10)
    chart_rules = [r for g in chart["groups"] for r in g["rules"]]
    local_rules = [r for g in local["groups"] for r in g["rules"]]
    assert [r["alert"] for r in local_rules] == [r["alert"] for r in chart_rules]
    for before, after in zip(chart_rules, local_rules, strict=True):
        assert {k: v for k, v in after.items() if k != "for"} == (
            {k: v for k, v in before.items() if k != "for"})
        if "for" in before:
            assert parse_duration(after["for"]) == min(parse_duration(before["for"]), 10)
    assert local_alert_rules(chart, longest_for=None) == chart


def test_prometheus_scrapes_the_targets_file_and_evaluates_as_often(tmp_path: Path) -> None:
    config = server_config(interval=2, targets_file=tmp_path / "targets.json",
                           rules_file=tmp_path / "alerts.yaml")
    assert config["global"] == {"scrape_interval": "2s", "evaluation_interval": "2s",
                                "scrape_timeout": "1500ms"}
    assert config["rule_files"] == [str(tmp_path / "alerts.yaml")]
    [job] = config["scrape_configs"]
    assert job["file_sd_configs"] == [{"files": [str(tmp_path / "targets.json")]}]


def test_local_targets_carry_the_labels_a_cluster_scrape_gives() -> None:
    targets = scrape_targets(9000, {"acme": ("acme-ns", 9100)})
    assert target_groups(targets) == [
        {"targets": ["127.0.0.1:9000"],
         "labels": {"job": "kubiot", "namespace": "local", "pod": "kubiot-operator-local",
                    "service": "kubiot"}},
        {"targets": ["127.0.0.1:9100"],
         "labels": {"job": "kubiot-ingest", "namespace": "acme-ns", "pod": "acme-ingest-local",
                    "service": "acme-ingest"}},
    ]
    assert target_groups([ScrapeTarget("b:1"), ScrapeTarget("a:1")])[0]["targets"] == ["a:1"]


def test_devices_are_counted_per_tenant_and_phase_from_each_reconcile() -> None:
    metrics = OperatorMetrics()
    registry = metrics.registry
    metrics.device_phase("acme", "p1", "acme", "Ready")
    metrics.device_phase("acme", "p2", "acme", "Ready")
    metrics.device_phase("beta", "b1", "beta", "Pending")
    assert _sample(registry, "kubiot_devices", {"tenant": "acme", "phase": "Ready"}) == 2
    assert _sample(registry, "kubiot_devices", {"tenant": "acme", "phase": "Suspended"}) == 0
    # A tenant's online gauge exists before any presence report, so its offline share is known.
    assert _sample(registry, "kubiot_devices_online", {"tenant": "acme"}) == 0

    metrics.device_phase("acme", "p2", "acme", "Suspended")
    metrics.device_phase("acme", "p2", "acme", "Suspended")  # a recheck counts once
    assert _sample(registry, "kubiot_devices", {"tenant": "acme", "phase": "Ready"}) == 1
    assert _sample(registry, "kubiot_devices", {"tenant": "acme", "phase": "Suspended"}) == 1

    metrics.device_gone("acme", "p1")
    metrics.device_gone("acme", "unknown")
    assert _sample(registry, "kubiot_devices", {"tenant": "acme", "phase": "Ready"}) == 0
    assert _sample(registry, "kubiot_devices", {"tenant": "beta", "phase": "Pending"}) == 1
