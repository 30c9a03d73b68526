"""Markers by folder: tests/unit are fast and start nothing; tests/fuzz start nothing either
but run many generated examples; the others start real servers."""

from __future__ import annotations

from pathlib import Path

import pytest

_MARKER_BY_FOLDER = {"unit": "unit", "integration": "integration", "e2e": "e2e", "fuzz": "fuzz"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests_root = Path(__file__).parent
    for item in items:
        folder = Path(item.fspath).relative_to(tests_root).parts[0]
        marker = _MARKER_BY_FOLDER.get(folder)
        if marker:
            item.add_marker(getattr(pytest.mark, marker))
