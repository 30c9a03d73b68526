"""The chart's Grafana dashboards as data: their panels' queries, with Grafana's variables filled
in the way Grafana would fill them for "every tenant" over the last few minutes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.tools import REPO_ROOT

DASHBOARD_DIR = REPO_ROOT / "charts/kubiot/dashboards"

#: What Grafana puts in for its built-in variables: `$__rate_interval` is at least four scrape
#: intervals (a minute covers a 15 s scrape too); `$__range` is the dashboard's time range.
BUILT_IN = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m",
            "__range_s": "300"}
#: A multi-value variable with "All" selected becomes its `allValue`, a regex.
ALL = ".*"
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref_id: str
    expr: str

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel} ({self.ref_id})"


def dashboards() -> list[Path]:
    return sorted(DASHBOARD_DIR.glob("*.json"))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def fill_variables(expr: str, variables: dict[str, str]) -> str:
    """The expression with `$name` and `${name}` replaced; an unknown variable is an error."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return variables[name]

    return _VARIABLE.sub(value, expr)


def panel_queries(path: Path) -> list[PanelQuery]:
    """Every query of every panel of a dashboard, its variables filled for "All"."""
    dashboard = json.loads(path.read_text())
    variables = dict(BUILT_IN)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            variables[variable["name"]] = variable.get("allValue") or ALL
    return [PanelQuery(dashboard["title"], panel["title"], target.get("refId", "?"),
                       fill_variables(target["expr"], variables))
            for panel in _panels(dashboard["panels"])
            for target in panel.get("targets", []) if target.get("expr")]
