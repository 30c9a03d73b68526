"""charts/kubiot: every value is documented, and the values files only set values that exist."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.support.tools import REPO_ROOT

CHART = REPO_ROOT / "charts/kubiot"
KEY_LINE = re.compile(r"^(\s*)([A-Za-z_][\w.-]*):")


def _undocumented_keys(text: str) -> list[str]:
    """Keys with no comment right above them nor on a parent key."""
    undocumented = []
    documented_parents: list[tuple[int, bool]] = []  # (indent, documented) of open parents
    previous = ""
    for line in text.splitlines():
        match = KEY_LINE.match(line)
        if match:
            indent = len(match.group(1))
            while documented_parents and documented_parents[-1][0] >= indent:
                documented_parents.pop()
            commented = previous.lstrip().startswith("#")
            inherited = any(documented for _, documented in documented_parents)
            if not (commented or inherited) and not line.rstrip().endswith(":"):
                undocumented.append(match.group(2))
            documented_parents.append((indent, commented or inherited))
        if line.strip():
            previous = line
    return undocumented


def _paths(values: Any, prefix: str = "") -> set[str]:
    if not isinstance(values, dict) or not values:
        return {prefix}
    found = {prefix} if prefix else set()
    for key, value in values.items():
        found |= _paths(value, f"{prefix}.{key}" if prefix else str(key))
    return found


def test_every_value_is_documented() -> None:
    assert _undocumented_keys((CHART / "values.yaml").read_text()) == []


def test_the_documentation_check_finds_an_undocumented_value() -> None:
    assert _undocumented_keys("a:\n  # -- documented\n  b: 1\n  c: 2\n") == ["c"]


def test_chart_version_and_app_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["appVersion"] == "0.1.0"


@pytest.mark.parametrize("values_file", ["values-minikube.yaml", "values-eks.yaml"])
def test_values_files_set_only_values_the_chart_has(values_file: str) -> None:
    known = _paths(yaml.safe_load((CHART / "values.yaml").read_text()))
    overrides = yaml.safe_load((CHART / values_file).read_text())
    # Maps the chart passes through as a whole (labels, annotations, selectors, resources).
    free_form = ("labels", "annotations", "nodeSelector", "resources", "podAnnotations")
    for path in _paths(overrides):
        if any(f".{name}." in f".{path}." for name in free_form):
            continue
        assert path in known, f"{values_file}: {path} is not a chart value"
