"""Grafana-managed alert rules: generated from the Prometheus rules, current, and each alert's
twin has the same expression, threshold, `for`, labels and annotations."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from kubiot_operator.alerting import (
    GRAFANA_RULES,
    PROMETHEUS_RULES,
    Threshold,
    constant,
    grafana_alert_rules,
    render,
    split_threshold,
)
from tests.support.tools import REPO_ROOT

PROMETHEUS = yaml.safe_load((REPO_ROOT / PROMETHEUS_RULES).read_text())
GRAFANA = yaml.safe_load((REPO_ROOT / GRAFANA_RULES).read_text())
ALERTS = [rule for group in PROMETHEUS["groups"] for rule in group["rules"] if "alert" in rule]
TWINS = {rule["title"]: rule for group in GRAFANA["groups"] for rule in group["rules"]}
#: Grafana's Threshold evaluator types, as PromQL comparisons.
EVALUATORS = {"gt": ">", "lt": "<"}


def _one_line(expr: str) -> str:
    return " ".join(expr.split())


def test_the_committed_grafana_rules_are_generated_from_the_prometheus_rules() -> None:
    assert (REPO_ROOT / GRAFANA_RULES).read_text() == render(
        (REPO_ROOT / PROMETHEUS_RULES).read_text()), "run `make alerts`"


def test_every_prometheus_alert_has_one_grafana_twin_in_the_same_group() -> None:
    assert sorted(TWINS) == sorted(rule["alert"] for rule in ALERTS)
    for group, twin_group in zip(PROMETHEUS["groups"], GRAFANA["groups"], strict=True):
        assert twin_group["name"] == group["name"]
        assert [r["title"] for r in twin_group["rules"]] == [
            r["alert"] for r in group["rules"] if "alert" in r]
    uids = [rule["uid"] for rule in TWINS.values()]
    assert len(set(uids)) == len(uids) and all(len(uid) <= 40 for uid in uids)


def _grafana_expression(twin: dict[str, Any]) -> tuple[str, str | None, float | None]:
    """The twin's query, and the comparison and threshold its condition applies to it."""
    data = {item["refId"]: item for item in twin["data"]}
    query = data["A"]["model"]["expr"]
    condition = data[twin["condition"]]["model"]
    if condition["type"] == "threshold":
        assert condition["expression"] == "A"
        [evaluator] = [c["evaluator"] for c in condition["conditions"]]
        return query, EVALUATORS[evaluator["type"]], float(evaluator["params"][0])
    assert condition["type"] == "math"
    if condition["expression"] == "$A == $A":  # every series the query returns fires
        return query, None, None
    match = re.fullmatch(r"\$A (==|!=|>=|<=|>|<) (\S+)", condition["expression"])
    assert match, condition
    return query, match.group(1), float(match.group(2))


@pytest.mark.parametrize("alert", ALERTS, ids=lambda rule: rule["alert"])
def test_the_twin_has_the_same_expression_threshold_for_labels_and_annotations(
        alert: dict[str, Any]) -> None:
    twin = TWINS[alert["alert"]]
    query, comparison, threshold = _grafana_expression(twin)
    expr = _one_line(alert["expr"])
    if comparison is None:
        assert query == expr
    else:
        # The Prometheus expression is the twin's query, its comparison, and a constant equal
        # to the twin's threshold (`7 * 86400` is 604800).
        assert expr.startswith(query + " " + comparison + " "), (expr, query, comparison)
        assert constant(expr[len(query) + len(comparison) + 2:]) == threshold
    assert twin["for"] == alert.get("for", "0s")
    assert twin["labels"] == alert["labels"]
    assert twin["annotations"] == {
        key: value.replace("$value", "$values.A.Value")
        for key, value in alert["annotations"].items()}
    # As in Prometheus, an expression returning nothing is no alert.
    assert twin["noDataState"] == "OK"
    assert [d["datasourceUid"] for d in twin["data"]] == [
        "${KUBIOT_PROMETHEUS_DATASOURCE_UID}", "__expr__"]


@pytest.mark.parametrize(("expr", "expected"), [
    ("sum(rate(x[5m])) > 0.05", Threshold("sum(rate(x[5m]))", ">", 0.05)),
    ("x == 0", Threshold("x", "==", 0)),
    ("(x - time()) < 7 * 86400", Threshold("(x - time())", "<", 604800)),
    ('1 - (sum by (t) (a{le=">"}) / sum by (t) (b)) > 0.2',
     Threshold('1 - (sum by (t) (a{le=">"}) / sum by (t) (b))', ">", 0.2)),
    ('up{job=~"x>y"} >= 1', Threshold('up{job=~"x>y"}', ">=", 1)),
    ("(a unless a offset 15m) or increase(a[15m]) > 0", None),
    ("a > bool 1", None),
    ("a > b", None),
    ("a", None),
])
def test_split_threshold_only_splits_a_query_compared_with_a_constant(
        expr: str, expected: Threshold | None) -> None:
    assert split_threshold(expr) == expected


def test_the_chart_fills_in_the_data_source_and_folder() -> None:
    generated = grafana_alert_rules(PROMETHEUS, datasource_uid="prom-1", folder="IoT")
    assert {group["folder"] for group in generated["groups"]} == {"IoT"}
    assert {rule["data"][0]["datasourceUid"] for group in generated["groups"]
            for rule in group["rules"]} == {"prom-1"}
