"""The chart's Prometheus alert rules as Grafana-managed alert rules, so the two cannot drift.

`charts/kubiot/files/alerts.yaml` is the one source: the PrometheusRule is rendered from it, and
`grafana_alert_rules` turns it into Grafana's alert-rule provisioning format (apiVersion 1),
committed as `charts/kubiot/files/grafana-alerts.yaml` and shipped in a ConfigMap the Grafana
sidecar loads. `python -m kubiot_operator.alerting` (`make alerts`) regenerates it.

Each rule keeps its expression, threshold, `for`, labels and annotations:

- `query <op> constant` becomes query A (the expression left of the comparison) and condition C
  comparing A with the constant: a Threshold expression for `>` and `<`, a Math expression for
  the other comparisons.
- Any other expression (a set operation, say) is query A as it stands; as in Prometheus, every
  series it returns is an alert (condition C: `$A == $A`, true for any number).

Annotations read the query's value as `$values.A.Value` where Prometheus says `$value`: in Grafana
`$value` is a string describing every expression's value.
"""

from __future__ import annotations

import ast
import operator
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROMETHEUS_RULES = Path("charts/kubiot/files/alerts.yaml")
GRAFANA_RULES = Path("charts/kubiot/files/grafana-alerts.yaml")
#: Filled in by the chart (values `grafanaAlerts.datasourceUid` and `dashboards.folder`).
DATASOURCE_PLACEHOLDER = "${KUBIOT_PROMETHEUS_DATASOURCE_UID}"
FOLDER_PLACEHOLDER = "${KUBIOT_GRAFANA_FOLDER}"
EXPRESSION_DATASOURCE = "__expr__"
QUERY, CONDITION = "A", "C"
#: Comparisons Grafana's Threshold expression has; the others go through a Math expression.
THRESHOLD_TYPES = {">": "gt", "<": "lt"}
COMPARISONS = (">=", "<=", "==", "!=", ">", "<")
_SET_OPERATORS = re.compile(r"\b(and|or|unless)\b")
_OPENING, _CLOSING = "([{", ")]}"
_ARITHMETIC: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv}
HEADER = ("# Generated from alerts.yaml by `make alerts` (python -m kubiot_operator.alerting); "
          "do not edit.\n")


@dataclass(frozen=True)
class Threshold:
    """`query <comparison> value`, split at the expression's outermost comparison."""

    query: str
    comparison: str
    value: float


def _depth_zero(expr: str) -> str:
    """The expression with everything inside brackets and quotes blanked out, same length."""
    out, depth, quote = [], 0, ""
    for char in expr:
        if quote:
            out.append(" ")
            if char == quote:
                quote = ""
            continue
        if char in "\"'`":
            quote = char
            out.append(" ")
        elif char in _OPENING:
            depth += 1
            out.append(" ")
        elif char in _CLOSING:
            depth -= 1
            out.append(" ")
        else:
            out.append(char if depth == 0 else " ")
    return "".join(out)


def constant(text: str) -> float | None:
    """The value of a constant such as `0.05` or `7 * 86400`; None for anything else."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        return None

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            return _ARITHMETIC[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(ast.dump(node))

    try:
        return value(tree.body)
    except (ValueError, ZeroDivisionError):
        return None


def split_threshold(expr: str) -> Threshold | None:
    """The query and threshold of `query <op> constant`; None for any other shape."""
    outer = _depth_zero(expr)
    if _SET_OPERATORS.search(outer) or re.search(r"\bbool\b", outer):
        return None
    found = [(m.start(), m.group()) for m in re.finditer(r">=|<=|==|!=|>|<", outer)]
    if len(found) != 1:
        return None
    at, comparison = found[0]
    value = constant(expr[at + len(comparison):])
    if value is None:
        return None
    return Threshold(expr[:at].strip(), comparison, value)


def _number(value: float) -> int | float:
    return int(value) if value == int(value) else value


def _condition(threshold: Threshold | None) -> dict[str, Any]:
    base = {"refId": CONDITION}
    if threshold is not None and threshold.comparison in THRESHOLD_TYPES:
        return {**base, "type": "threshold", "expression": QUERY, "conditions": [{
            "evaluator": {"type": THRESHOLD_TYPES[threshold.comparison],
                          "params": [_number(threshold.value)]}}]}
    if threshold is not None:
        expression = f"${QUERY} {threshold.comparison} {_number(threshold.value)}"
    else:
        expression = f"${QUERY} == ${QUERY}"
    return {**base, "type": "math", "expression": expression}


def grafana_annotation(text: str) -> str:
    """A Prometheus annotation template as Grafana reads it."""
    return re.sub(r"\$value\b", f"$values.{QUERY}.Value", text)


def rule_uid(alert: str) -> str:
    """A stable uid (Grafana allows 40 characters): `KubiotIngestDown` -> `kubiot-ingest-down`."""
    return re.sub(r"(?<!^)(?=[A-Z])", "-", alert).lower()[:40]


def grafana_rule(rule: dict[str, Any], *, datasource_uid: str) -> dict[str, Any]:
    """One Prometheus alerting rule as a Grafana alert rule."""
    expr = " ".join(str(rule["expr"]).split())
    threshold = split_threshold(expr)
    query = threshold.query if threshold is not None else expr
    return {
        "uid": rule_uid(rule["alert"]),
        "title": rule["alert"],
        "condition": CONDITION,
        "data": [
            {"refId": QUERY, "datasourceUid": datasource_uid,
             # Instant queries over the last 10 minutes: the longest rate window of the rules.
             "relativeTimeRange": {"from": 600, "to": 0},
             "model": {"refId": QUERY, "expr": query, "instant": True, "range": False}},
            {"refId": CONDITION, "datasourceUid": EXPRESSION_DATASOURCE,
             "model": _condition(threshold)},
        ],
        # As in Prometheus: no series, no alert; a failing query is an error, not silence.
        "noDataState": "OK",
        "execErrState": "Error",
        "for": rule.get("for", "0s"),
        "labels": dict(rule.get("labels") or {}),
        "annotations": {key: grafana_annotation(str(value))
                        for key, value in (rule.get("annotations") or {}).items()},
    }


def grafana_alert_rules(rules: dict[str, Any], *, datasource_uid: str = DATASOURCE_PLACEHOLDER,
                        folder: str = FOLDER_PLACEHOLDER, interval: str = "1m"
                        ) -> dict[str, Any]:
    """Prometheus rule groups as Grafana's alert-rule provisioning file (apiVersion 1)."""
    return {"apiVersion": 1, "groups": [
        {"orgId": 1, "name": group["name"], "folder": folder, "interval": interval,
         "rules": [grafana_rule(rule, datasource_uid=datasource_uid)
                   for rule in group["rules"] if "alert" in rule]}
        for group in rules["groups"]]}


def render(rules_text: str) -> str:
    """The committed file's text for the Prometheus rules file's text."""
    generated = grafana_alert_rules(yaml.safe_load(rules_text))
    return HEADER + yaml.safe_dump(generated, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    source = Path(args[0]) if args else PROMETHEUS_RULES
    target = Path(args[1]) if len(args) > 1 else GRAFANA_RULES
    target.write_text(render(source.read_text()))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
