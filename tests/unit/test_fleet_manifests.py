"""`kubiot local fleet` writes manifests the platform accepts, at any size."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from kubiot_operator.cli import main
from kubiot_operator.local.fleet import fleet_resources
from kubiot_operator.manifests import load_resources


def test_one_device_in_a_hundred_is_behind_a_gateway() -> None:
    resources = list(fleet_resources("plant", 25_000))
    kinds = Counter(r["kind"] for r in resources)
    assert kinds == {"Tenant": 1, "Gateway": 3, "Device": 25_000, "FirmwareRelease": 1}
    children = Counter(r["metadata"]["labels"].get("kubiot.io/gateway")
                       for r in resources if r["kind"] == "Device")
    assert children == {None: 24_750, "gw-000": 100, "gw-001": 100, "gw-002": 50}


def test_the_written_manifests_load_without_problems(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as finished:
        main(["local", "fleet", "--devices", "300", "--tenant", "plant",
              "--out", str(tmp_path)])
    assert finished.value.code in (0, None)
    loaded = load_resources([tmp_path])
    assert loaded.problems == []
    assert Counter(r["kind"] for r in loaded.resources)["Device"] == 300
