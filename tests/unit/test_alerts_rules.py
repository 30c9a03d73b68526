"""The alert rules: exported metrics only, documented, and each covered by promtool tests."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.exported_metrics import exported_series, metric_names_in
from tests.support.tools import REPO_ROOT

ALERTS_FILE = REPO_ROOT / "charts/kubiot/files/alerts.yaml"
ALERT_TESTS_FILE = REPO_ROOT / "charts/kubiot/files/alerts.test.yaml"
OPERATIONS_DOC = REPO_ROOT / "docs/operations.md"
RUNBOOK_PREFIX = "https://github.com/kubiot/kubiot/blob/main/docs/operations.md#"


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS_FILE.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


ALERTS = _alerts()


def _heading_anchors(markdown: Path) -> set[str]:
    """Anchors GitHub gives the headings: lower case, punctuation dropped, spaces to dashes."""
    anchors = set()
    for line in markdown.read_text().splitlines():
        if match := re.match(r"#{1,6}\s+(.*)", line):
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_the_design_s_alerts_all_exist() -> None:
    names = {alert["alert"] for alert in ALERTS}
    assert {
        "KubiotIngestLagHigh", "KubiotIngestRejectingMessages", "KubiotIngestDatabaseErrors",
        "KubiotIngestDatabaseDown", "KubiotIngestBrokerDisconnected",
        "KubiotCertificateExpiringSoon", "KubiotDevicesOffline", "KubiotRolloutAborted",
        "KubiotOperatorReconcileErrors", "KubiotOperatorBrokerErrors",
    } <= names
    assert len(names) == len(ALERTS), "alert names must be unique"


def test_exported_series_are_named_as_prometheus_exposes_them() -> None:
    series = exported_series()
    # Counters once with _total, histograms as their three series, gauges as they are.
    assert "kubiot_ingest_messages_received_total" in series
    assert "kubiot_ingest_messages_received_total_total" not in series
    assert {"kubiot_ingest_lag_seconds_bucket", "kubiot_ingest_lag_seconds_sum",
            "kubiot_ingest_lag_seconds_count"} <= series
    assert "kubiot_ingest_lag_seconds" not in series
    assert {"kubiot_devices_online", "kubiot_operator_reconcile_errors_total",
            "kubiot_operator_reconcile_duration_seconds_bucket"} <= series


def test_alerts_query_only_metrics_kubiot_exports() -> None:
    used = metric_names_in(alert["expr"] for alert in ALERTS)
    assert used, "no kubiot metric found in the alert expressions"
    assert used <= exported_series(), f"not exported: {sorted(used - exported_series())}"


@pytest.mark.parametrize("alert", ALERTS, ids=lambda a: a["alert"])
def test_alert_has_severity_summary_description_and_runbook(alert: dict[str, Any]) -> None:
    assert alert["labels"]["severity"] in {"warning", "critical"}
    annotations = alert["annotations"]
    assert annotations["summary"].strip() and annotations["description"].strip()
    url = annotations["runbook_url"]
    assert url == RUNBOOK_PREFIX + alert["alert"].lower()
    assert url.removeprefix(RUNBOOK_PREFIX) in _heading_anchors(OPERATIONS_DOC), (
        f"docs/operations.md has no section for {alert['alert']}")


def _promtool_cases() -> dict[str, tuple[int, int]]:
    """Per alert name: how many promtool cases expect it to fire, and how many expect silence."""
    cases: dict[str, tuple[int, int]] = {}
    for test in yaml.safe_load(ALERT_TESTS_FILE.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            firing, silent = cases.get(case["alertname"], (0, 0))
            if case.get("exp_alerts"):
                firing += 1
            else:
                silent += 1
            cases[case["alertname"]] = (firing, silent)
    return cases


@pytest.mark.parametrize("alert", ALERTS, ids=lambda a: a["alert"])
def test_promtool_tests_cover_firing_and_silence(alert: dict[str, Any]) -> None:
    firing, silent = _promtool_cases().get(alert["alert"], (0, 0))
    assert firing >= 1, f"no promtool case where {alert['alert']} fires"
    assert silent >= 1, f"no promtool case where {alert['alert']} stays silent"


@pytest.mark.parametrize("alert", ALERTS, ids=lambda a: a["alert"])
def test_the_alert_table_lists_each_alert_and_says_how_the_local_e2e_treats_it(
        alert: dict[str, Any]) -> None:
    name = alert["alert"]
    rows = [line for line in OPERATIONS_DOC.read_text().splitlines()
            if line.startswith(f"| [{name}](#{name.lower()}) |")]
    assert len(rows) == 1, f"docs/operations.md's alert table has no single row for {name}"
    e2e = rows[0].rstrip(" |").rsplit(" | ", 1)[-1]
    if e2e.startswith("not caused"):
        assert f"\n| {name} | " in OPERATIONS_DOC.read_text(), (
            f"{name} is not caused locally, but the table of such alerts does not say why")
    else:
        assert e2e.startswith("fires and resolves: "), e2e
