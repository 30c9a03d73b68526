"""The Grafana dashboards: valid JSON, a datasource variable, and only exported metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.dashboards import dashboards, fill_variables, panel_queries
from tests.support.exported_metrics import exported_series, metric_names_in
from tests.support.tools import REPO_ROOT

DASHBOARD_DIR = REPO_ROOT / "charts/kubiot/dashboards"
DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))
DATASOURCE = "${datasource}"


def _load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _datasource_references(node: Any) -> Iterator[Any]:
    """Every `datasource` value anywhere in the dashboard."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from _datasource_references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _datasource_references(item)


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    targets = [t for p in _panels(dashboard) for t in p.get("targets", [])]
    variables = [v for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return ([t["expr"] for t in targets]
            + [v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
               for v in variables])


def test_the_fleet_ingest_and_rollout_dashboards_exist() -> None:
    titles = {_load(p)["title"] for p in DASHBOARDS}
    assert {"kubiot / Fleet overview", "kubiot / Ingest internals",
            "kubiot / Firmware rollouts"} <= titles


def test_dashboard_uids_are_unique() -> None:
    uids = [_load(p)["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_datasource_is_a_template_variable_never_a_fixed_uid(path: Path) -> None:
    dashboard = _load(path)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    references = list(_datasource_references(dashboard))
    assert references
    for reference in references:
        assert reference == {"type": "prometheus", "uid": DATASOURCE}, reference


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_query_uses_only_exported_metrics(path: Path) -> None:
    dashboard = _load(path)
    expressions = _expressions(dashboard)
    assert all(e.strip() for e in expressions), "empty query"
    used = metric_names_in(expressions)
    assert used, "the dashboard queries no kubiot metric"
    assert used <= exported_series(), f"not exported: {sorted(used - exported_series())}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_panels_fit_the_grid_and_have_unique_ids(path: Path) -> None:
    panels = list(_panels(_load(path)))
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], f"{panel['title']} has no query"


def test_every_panel_query_can_be_run_with_its_variables_filled_in() -> None:
    """What the real-Prometheus e2e test runs: no variable left that it cannot fill in."""
    queries = [q for path in dashboards() for q in panel_queries(path)]
    assert len(queries) >= len(DASHBOARDS)
    assert not [q for q in queries if "$" in q.expr]
    assert fill_variables('rate(x{t=~"$tenant"}[$__rate_interval])',
                          {"tenant": ".*", "__rate_interval": "1m"}) == 'rate(x{t=~".*"}[1m])'
    assert fill_variables("${tenant:regex}", {"tenant": "a"}) == "a"
