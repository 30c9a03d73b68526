"""A small run of bench/bench_broker_sync.py, so the benchmark keeps working."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_broker_sync.py"


def test_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_broker_sync", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    assert bench.main(["--count", "300"]) == 0

    out = capsys.readouterr().out
    assert "backend resync (create all)" in out
    assert "backend resync (nothing to do)" in out
    assert "raw paho, 603 commands" in out
