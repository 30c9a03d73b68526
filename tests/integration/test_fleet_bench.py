"""A small run of bench/bench_fleet.py, so the benchmark keeps working and its per-device
figures keep their shape."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_fleet.py"


@pytest.mark.slow
def test_bench_smoke(capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("bench_fleet", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up while the module loads.
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)

    assert bench.main(["--sizes", "200", "--steady-seconds", "3"]) == 0

    out = capsys.readouterr().out
    assert "ready 200/200" in out
    per_device = re.search(r"per Device reconcile ([\d.]+) requests: .*list ([\d.]+)", out)
    assert per_device is not None, out
    assert float(per_device.group(1)) <= 5.0
    assert float(per_device.group(2)) == 0.0
    assert "steady state" in out and "drift-repair pass" in out
